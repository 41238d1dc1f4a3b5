"""Failures a user meets: each ends with a clear message and never loses or corrupts a run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dibjax import checkpoints, config_lib, data, errors, models, streams, train, trainer
from dibjax import workdir as workdir_lib
from tests.runs import CLI, ROOT, smoke_args, smoke_config, stop_at_evaluation


def run_cli(args, env=None):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def assert_one_line_error(result, pattern):
    """Exit status 1, no traceback, and a last stderr line ``error: ...`` matching ``pattern``."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last


def write_npz(folder, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", image=images, label=labels)
    return folder


def good_arrays(n=32, size=16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 10


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """The final state of an uninterrupted 3-epoch smoke run, for runs that must end exactly like it."""
    workdir = tmp_path_factory.mktemp("straight")
    train.train_and_evaluate(smoke_config(tiny_data, **{"train.num_epochs": 3}), workdir)
    return final_state(workdir)


def final_state(workdir):
    config = smoke_config(workdir, **{"train.num_epochs": 3})
    abstract = trainer.Trainer(config, data.DATASETS["cifar10"], steps_per_epoch=6).abstract_state()
    store = checkpoints.Checkpoints(workdir, create=False)
    try:
        return jax.device_get(store.restore(store.epochs()[-1], abstract))
    finally:
        store.close()


def assert_same_state(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("float images", r"train\.npz: images must be a uint8 NumPy array, got float32"),
        ("grey images", r"train\.npz: images must have shape \(N, H, W, 3\), got \(32, 16, 16\)"),
        ("one channel", r"train\.npz: images must have shape \(N, H, W, 3\), got \(32, 16, 16, 1\)"),
        ("28x28 images", r"config\.image_size is 16 but the images are 28×28"),
        ("label 10", r"train\.npz: labels must lie in \[0, 10\), found values in \[0, 10\]"),
        ("label -1", r"train\.npz: labels must lie in \[0, 10\), found values in \[-1, 9\]"),
        ("label count", r"train\.npz: 32 images but 31 labels"),
        ("wrong keys", r"train\.npz: missing key\(s\) \['image', 'label'\] \(has \['x', 'y'\]\)"),
        ("no folder", r"npz data folder .*absent does not exist"),
    ],
)
def test_bad_data_is_refused_naming_the_file_before_any_work(tmp_path, case, pattern):
    images, labels = good_arrays()
    folder = tmp_path / "data"
    if case == "float images":
        write_npz(folder, images.astype(np.float32), labels)
    elif case == "grey images":
        write_npz(folder, images[..., 0], labels)
    elif case == "one channel":
        write_npz(folder, images[..., :1], labels)
    elif case == "28x28 images":
        write_npz(folder, good_arrays(size=28)[0], labels)
    elif case == "label 10":
        write_npz(folder, images, np.where(labels == 9, 10, labels))
    elif case == "label -1":
        write_npz(folder, images, np.where(labels == 0, -1, labels))
    elif case == "label count":
        write_npz(folder, images, labels[:-1])
    elif case == "wrong keys":
        folder.mkdir()
        for split in ("train", "test"):
            np.savez(folder / f"{split}.npz", x=images, y=labels)
    else:
        folder = tmp_path / "absent"
    with pytest.raises(errors.RunError, match=pattern):
        train.train_and_evaluate(smoke_config(folder), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    images, labels = good_arrays()
    bad = write_npz(tmp_path / "bad", images.astype(np.float32), labels)
    result = run_cli(smoke_args(bad, tmp_path / "run"))
    assert_one_line_error(result, r"train\.npz: images must be a uint8 NumPy array, got float32")
    # --traceback shows where it came from, and still ends with the message.
    shown = run_cli(smoke_args(bad, tmp_path / "run", "--traceback"))
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "dibjax.errors.DataError" in shown.stderr
    assert shown.stderr.strip().splitlines()[-1] == result.stderr.strip().splitlines()[-1]

    variant = run_cli(["--config=configs/cifar10.py:tpu", f"--workdir={tmp_path / 'run'}"])
    assert_one_line_error(variant, r"unknown config variant 'tpu' in 'tpu'; accepted sizes: \('full', 'cpu', 'smoke'\)")
    field = run_cli(smoke_args(bad, tmp_path / "run", "--config.train.epochs=3"))
    assert_one_line_error(field, r"--config\.train\.epochs=3: the configuration has no field train\.epochs")
    missing_file = run_cli(["--config=configs/cifar11.py", f"--workdir={tmp_path / 'run'}"])
    assert_one_line_error(missing_file, r"--config: cannot load the config file .*configs/cifar11\.py")

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    unwritable = run_cli(smoke_args(tiny_data_for(tmp_path), a_file / "run"))
    assert_one_line_error(unwritable, rf"cannot create the workdir {re.escape(str(a_file / 'run'))}: Not a directory")
    assert not (tmp_path / "run").exists()


def tiny_data_for(tmp_path):
    images, labels = good_arrays()
    return write_npz(tmp_path / "good", images, labels)


def test_a_missing_archive_offline_is_one_line(tmp_path):
    # Every download goes to a closed local port: the machine is offline as far as dibjax can tell.
    closed = "http://127.0.0.1:9"
    env = dict(os.environ, http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="")
    (tmp_path / "tfds").mkdir()
    args = [
        "--config=configs/cifar10.py:smoke,sgd",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.dir={tmp_path}/tfds",
    ]
    result = run_cli(args, env=env)
    assert_one_line_error(
        result, r"downloading https://www\.cs\.toronto\.edu/~kriz/cifar-10-python\.tar\.gz failed .*place it in"
    )


def test_a_benchmark_reports_a_user_error_in_one_line(tiny_data, tmp_path):
    # The search's first run is refused by the workdir check, before any data is loaded.
    command = [sys.executable, "-m", "benchmarks.regimes", "--cifar10", str(tiny_data), "--regimes", "data10"]
    command += ["--workdir", str(tmp_path / "runs[1]"), "--ledger", ""]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, r"runs\[1\].*\[")


def test_a_bug_keeps_its_traceback():
    code = "from dibjax import cli; cli.run(lambda argv: 1 / 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


# --------------------------------------------------------------------------- checkpoints


def flip_bytes(checkpoint):
    """Inverts 16 bytes in the middle of the largest array-data file of an orbax checkpoint."""
    target = max((p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize)
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    target.write_bytes(bytes(raw))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.uint32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.bool_])
def test_fingerprint_changes_with_any_one_element(dtype):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (5, 7)), dtype)
    tree = {"a": x, "b": [jnp.arange(3.0)]}
    digests, nonfinite = checkpoints.fingerprint(tree)
    assert set(digests) == {"['a']", "['b'][0]"} and nonfinite == []
    assert checkpoints.fingerprint(jax.tree.map(jnp.copy, tree))[0] == digests
    for index in [(0, 0), (2, 3), (4, 6)]:
        changed = x.at[index].set(jnp.logical_not(x[index]) if dtype == jnp.bool_ else x[index] + 1)
        assert checkpoints.fingerprint({"a": changed, "b": tree["b"]})[0]["['a']"] != digests["['a']"]
    # Swapping two unequal elements keeps every sum of values but not the fingerprint.
    flat = np.asarray(x).ravel()
    i, j = 0, int(np.flatnonzero(flat != flat[0])[0])
    swapped = flat.copy()
    swapped[[i, j]] = swapped[[j, i]]
    assert checkpoints.fingerprint({"a": jnp.asarray(swapped.reshape(x.shape))})[0]["['a']"] != digests["['a']"]
    if jnp.issubdtype(dtype, jnp.floating):
        assert checkpoints.fingerprint({"a": x.at[1, 1].set(jnp.nan)})[1] == ["['a']"]


def test_a_corrupted_checkpoint_is_set_aside_and_the_run_continues_exactly(
    tiny_data, tmp_path, monkeypatch, straight_run
):
    config = smoke_config(tiny_data, **{"train.num_epochs": 3})
    workdir = tmp_path / "run"
    restore = stop_at_evaluation(monkeypatch, 3)  # in epoch 3, after the checkpoints of epochs 1 and 2
    with pytest.raises(errors.RunInterrupted):
        train.train_and_evaluate(config, workdir)
    restore()
    shutil.copytree(workdir, tmp_path / "all-bad")

    flip_bytes(workdir / "checkpoints" / "2")
    with pytest.warns(
        UserWarning, match=rf"checkpoint {re.escape(str(workdir))}/checkpoints/2 (does not match|cannot)"
    ):
        train.train_and_evaluate(config, workdir)
    (moved,) = (workdir / "corrupted_checkpoints").iterdir()
    assert moved.name.startswith("2-")
    assert_same_state(final_state(workdir), straight_run)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]

    # With no intact checkpoint the run is refused, naming the workdir; nothing is trained over it.
    for epoch in (1, 2):
        flip_bytes(tmp_path / "all-bad" / "checkpoints" / str(epoch))
    with pytest.warns(UserWarning), pytest.raises(errors.CheckpointError, match=r"no intact checkpoint in .*all-bad"):
        train.train_and_evaluate(config, tmp_path / "all-bad")
    assert not (tmp_path / "all-bad" / "checkpoints" / "3").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, where a run can fill the disk; skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_a_rerun_resumes(
    tiny_data, small_disk, monkeypatch, straight_run
):
    config = smoke_config(tiny_data, **{"train.num_epochs": 3})
    workdir, filler = small_disk / "run", small_disk / "filler"

    def fill_the_disk():
        deadline = time.monotonic() + 60
        while not (workdir / "checkpoints" / "1").exists():  # the checkpoint of epoch 1 is written in the background
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    restore = stop_at_evaluation(monkeypatch, 2, action=fill_the_disk)  # in epoch 2, after checkpoint 1
    with pytest.raises(errors.WorkdirError) as failure:
        train.train_and_evaluate(config, workdir)
    message = str(failure.value)
    assert str(workdir) in message and "No space left on device" in message and "epoch 2" in message
    assert "the checkpoint of epoch 1 is intact: rerunning the same command resumes from it" in message
    restore()
    filler.unlink()
    train.train_and_evaluate(config, workdir)
    assert_same_state(final_state(workdir), straight_run)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]


# --------------------------------------------------------------------------- stopping and rerunning


def test_sigterm_stops_cleanly_and_a_rerun_resumes(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    args = smoke_args(tiny_data, workdir, "--config.train.num_epochs=12")
    process = subprocess.Popen([*CLI, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "1").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = re.fullmatch(
        r"stopped by SIGTERM in epoch (\d+)/12; the checkpoint of epoch (\d+) is intact: "
        r"rerunning the same command resumes from it",
        stderr.strip().splitlines()[-1],
    )
    assert stopped and int(stopped[2]) == int(stopped[1]) - 1, stderr[-3000:]

    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming after epoch {stopped[2]}/12, from its checkpoint" in rerun.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 13))


def test_ctrl_c_stops_at_the_next_step_and_a_rerun_continues_exactly(tiny_data, tmp_path, monkeypatch, straight_run):
    config = smoke_config(tiny_data, **{"train.num_epochs": 3})
    handler = signal.getsignal(signal.SIGINT)
    restore = stop_at_evaluation(monkeypatch, 2, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(errors.RunInterrupted, match=r"^stopped by SIGINT in epoch 2/3; the checkpoint of epoch 1") as e:
        train.train_and_evaluate(config, tmp_path)
    assert e.value.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler
    restore()
    train.train_and_evaluate(config, tmp_path)
    assert_same_state(final_state(tmp_path), straight_run)


def test_rerunning_a_finished_run_neither_loads_data_nor_builds_a_model(tiny_data, tmp_path, monkeypatch, capsys):
    config = smoke_config(tiny_data, **{"train.num_epochs": 1})
    summary = train.train_and_evaluate(config, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(data, "load", refuse)
    monkeypatch.setattr(trainer.Trainer, "__post_init__", refuse)
    capsys.readouterr()
    assert train.train_and_evaluate(config, tmp_path) == summary
    assert capsys.readouterr().out.startswith(f"{tmp_path} holds this finished run: test accuracy")


def test_a_run_scored_on_validation_images_says_so_in_every_line(tiny_data, tmp_path, capsys):
    config = smoke_config(tiny_data, **{"train.num_epochs": 1, "data.validation_size": 16})
    train.train_and_evaluate(config, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert "80 training / 16 validation images" in lines[1]
    scored = [line for line in lines if " acc " in line or "accuracy" in line]
    assert scored and all("validation" in line and "test " not in line for line in scored), scored
    train.train_and_evaluate(config, tmp_path)
    assert capsys.readouterr().out.startswith(f"{tmp_path} holds this finished run: validation accuracy")


# --------------------------------------------------------------------------- seeds and donation


def test_every_random_stream_is_its_own_for_every_seed():
    draws = {}
    for seed in range(4):
        draws["init", seed] = tuple(np.asarray(jax.random.key_data(streams.init_key(seed))).tolist())
        draws["augment", seed] = tuple(np.asarray(jax.random.key_data(streams.augment_key(seed))).tolist())
        for epoch in (1, 2):
            draws["order", seed, epoch] = tuple(streams.order_rng(seed, epoch).integers(0, 2**32, 2).tolist())
        draws["probe", seed] = tuple(streams.probe_rng(seed).integers(0, 2**32, 2).tolist())
    assert len(set(draws.values())) == len(draws)


def test_the_trainer_draws_from_the_seed_streams(tiny_data):
    config = smoke_config(tiny_data, **{"seed": 3})
    run_trainer = trainer.Trainer(config, data.DATASETS["cifar10"], steps_per_epoch=6)
    state = run_trainer.create_state()
    np.testing.assert_array_equal(state.augment_key, jax.random.key_data(streams.augment_key(3)))
    model = models.build_model(config_lib.model_fields(config), 10, nnx.Rngs(streams.init_key(3)))
    jax.tree.map(np.testing.assert_array_equal, state.params["stages"][0], nnx.state(model.stages[0], nnx.Param))
    batches = data.train_batches(data.load(config.data)[0], 16, seed=3, epoch=2)
    order = streams.order_rng(3, 2).permutation(96)[:16]
    np.testing.assert_array_equal(next(batches)["label"], data.load(config.data)[0].labels[order])


def test_the_first_step_never_deletes_the_models_own_arrays(tiny_data):
    run_trainer = trainer.Trainer(smoke_config(tiny_data), data.DATASETS["cifar10"], steps_per_epoch=6)
    state = run_trainer.create_state()
    batch = next(data.train_batches(data.load(smoke_config(tiny_data).data)[0], 16, seed=0, epoch=1))
    sharded = run_trainer.shard(batch, 16)
    run_trainer.train_steps[0](state, run_trainer.zero_totals(0, state, sharded), sharded)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))  # donated, as on any device count
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(run_trainer.net.initial_params))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(run_trainer.create_state()))


def test_a_workdir_with_a_bracketed_name_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded before the workdir was checked"))
    workdir = tmp_path / "greedy_dib[entropy+0.001]-s0"
    with pytest.raises(errors.WorkdirError, match=r"greedy_dib\[entropy\+0\.001\]-s0: a path holding '\[\.\.\.\]'"):
        train.train_and_evaluate(smoke_config(tmp_path / "data"), workdir)
    assert not workdir.exists()
    # One bracket alone is no character class.
    workdir_lib.Workdir(tmp_path / "run[1").check(smoke_config(tmp_path / "data"))


@pytest.mark.parametrize("name", ["plain", "run[a]"])
def test_orbax_restores_from_a_path_with_brackets_only_when_they_hold_no_character_class(tmp_path, name):
    """Why the refusal above: if orbax ever reads "run[a]" back, the refusal can go."""
    tree = {"x": jnp.arange(3.0)}
    with ocp.CheckpointManager(tmp_path / name) as manager:
        manager.save(1, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
        if name == "plain":
            restored = manager.restore(1, args=ocp.args.StandardRestore(tree))
            np.testing.assert_array_equal(restored["x"], tree["x"])
        else:
            with pytest.raises(ValueError, match="does not exist"):
                manager.restore(1, args=ocp.args.StandardRestore(tree))
