"""Several processes, one run: two processes with two CPU devices each against one process with four, and that
against this process's single device."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from dibjax import config_lib, distributed, errors, train
from tests.runs import CLI, ROOT, smoke_args, smoke_config

EPOCHS = 4


def _args(data_dir, workdir, *extra):
    # An evaluation batch that is not a multiple of 4 devices: evaluation rounds it up to 12.
    return [*CLI, *smoke_args(data_dir, workdir, f"--config.train.num_epochs={EPOCHS}", *extra, eval_batch_size=10)]


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(data_dir, workdir):
    port = _free_port()
    return [
        subprocess.Popen(
            _args(
                data_dir,
                workdir,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_as_one_with_four_devices_and_resume_after_sigterm(tiny_data, tmp_path):
    single_dir, pair_dir = tmp_path / "one-process", tmp_path / "two-processes"
    single = subprocess.Popen(
        _args(tiny_data, single_dir), cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pair = _start_pair(tiny_data, pair_dir)
    deadline = time.monotonic() + 400
    while not (pair_dir / "checkpoints" / "1").exists():
        assert all(p.poll() is None for p in pair) and time.monotonic() < deadline, [p.communicate() for p in pair]
        time.sleep(0.05)
    for p in pair:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in pair]
    for p, (_, stderr) in zip(pair, outputs, strict=True):
        assert p.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert "Traceback" not in stderr
    stopped = [
        re.fullmatch(
            rf"stopped by SIGTERM in epoch (\d+)/{EPOCHS}; the checkpoint of epoch (\d+) is intact: "
            r"rerunning the same command resumes from it",
            stderr.strip().splitlines()[-1],
        )
        for _, stderr in outputs
    ]
    assert all(stopped) and stopped[0].groups() == stopped[1].groups(), [o[1][-2000:] for o in outputs]
    # Only process 0 prints (gloo, the CPU collectives library, prints its connections in both).
    ours = [[line for line in out.splitlines() if "connected peer ranks" not in line] for out, _ in outputs]
    assert ours[0][0].startswith("dibjax: cifar10 smoke,sgd") and "train loss" in outputs[0][0]
    assert ours[1] == []

    rerun = _start_pair(tiny_data, pair_dir)
    rerun_outputs = [p.communicate(timeout=600) for p in rerun]
    for p, (_, stderr) in zip(rerun, rerun_outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert f"resuming after epoch {stopped[0][2]}/{EPOCHS}" in rerun_outputs[0][0]
    assert "devices: 4 × cpu in 2 processes" in rerun_outputs[0][0]
    single_out, single_err = single.communicate(timeout=600)
    assert single.returncode == 0, single_err[-3000:]
    assert "devices: 4 × cpu (JAX" in single_out

    one, two = _records(single_dir), _records(pair_dir)
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == list(range(1, EPOCHS + 1))
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate"):
        np.testing.assert_allclose([r[name] for r in two], [r[name] for r in one], rtol=2e-5, err_msg=name)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a["grad_norms"], b["grad_norms"], rtol=2e-5)
    summary = json.loads((pair_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == two[-1]["test_accuracy"]
    assert len(summary["devices"]) == 4

    # The batch split over 4 devices trains as on one, up to the order of the sums across devices: equal to float
    # tolerance over the first epoch; later epochs drift apart (about 1e-3 relative after 4), as training amplifies
    # those rounding differences.
    assert jax.device_count() == 1
    config = smoke_config(tiny_data, **{"train.num_epochs": EPOCHS, "train.eval_batch_size": 10})
    train.train_and_evaluate(config, tmp_path / "one-device")
    alone = _records(tmp_path / "one-device")
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(one[0][name], alone[0][name], rtol=1e-5, err_msg=name)


def test_evaluation_batch_is_rounded_up_to_the_devices_and_training_batch_checked():
    config = config_lib.get_config("cifar10", "full,sgd")
    assert [config_lib.eval_batch_size(config, n) for n in (1, 2, 4, 8, 3)] == [500, 500, 500, 504, 501]
    config_lib.check_batch_sizes(config, 1000, 8)
    config.train.batch_size = 100
    with pytest.raises(
        errors.ConfigError, match=r"train.batch_size=100 must be a multiple of the 8 devices .*96 or 104"
    ):
        config_lib.check_batch_sizes(config, 1000, 8)


def test_partial_distributed_flags_are_refused_before_any_work():
    with pytest.raises(errors.ConfigError, match=r"--num_processes and --process_id missing"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(errors.ConfigError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert jax.process_count() == 1


def test_local_rows_of_one_process_are_the_whole_batch():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert distributed.local_rows(sharding, 8) == slice(0, 8)
