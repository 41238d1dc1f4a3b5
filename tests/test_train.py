import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dibjax import config_lib, errors, train, trainer, workdir
from tests.runs import ROOT, smoke_config, stop_at_evaluation

RECORD_KEYS = {
    "stage",
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "images_per_second",
    "seconds",
    "learning_rate",
    "phase_epoch",
    "format_phase",
    "elapsed_seconds",
    "train_step_bytes",
}


def final_state(workdir):
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
        restored = manager.restore(manager.latest_step())
    return restored


def interrupted_then_resumed(config, workdir, monkeypatch):
    """Runs ``config`` until the second evaluation (after the first epoch's checkpoint), stops it, reruns it."""
    restore = stop_at_evaluation(monkeypatch, 2)
    with pytest.raises(errors.RunInterrupted, match=r"stopped by SIGINT in .*epoch 2.*checkpoint of epoch 1 is intact"):
        train.train_and_evaluate(config, workdir)
    restore()
    return train.train_and_evaluate(config, workdir)


def test_smoke_run_through_the_cli(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "dibjax.main",
        "--config=configs/cifar10.py:smoke,sgd",
        f"--workdir={workdir}",
        "--config.data.source=npz",
        f"--config.data.dir={tiny_data}",
        "--config.data.image_size=16",
        "--config.train.batch_size=16",
        "--config.train.eval_batch_size=16",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["phase_epoch"] for r in records] == [1, 2]
    assert all(set(r) == RECORD_KEYS | {"grad_norms", "ce"} for r in records)
    assert all(len(r["grad_norms"]) == 4 and min(r["grad_norms"]) > 0 for r in records)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["train_step_peak_bytes"] == records[-1]["train_step_bytes"] > 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dibjax: cifar10 smoke,sgd · scheduler end_to_end, objective ce")
    assert lines[1].startswith("devices: 1 × cpu") and "96 training / 40 test images" in lines[1]
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert lines[-1] == (
        f"finished: test accuracy {100 * summary['test_accuracy']:.2f}% after 2 epochs, "
        f"{summary['wall_seconds']:.0f} s of training; summary: {workdir / 'summary.json'}"
    )
    # No progress bar where the console is not a terminal.
    assert "\r" not in result.stderr and "it/s" not in result.stderr

    # Rerunning the finished run prints its summary without loading data or compiling.
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.splitlines() == [f"{workdir} holds this finished run: {lines[-1].removeprefix('finished: ')}"]


def test_resuming_continues_exactly_as_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    config = smoke_config(tiny_data, **{"train.num_epochs": 3})
    train.train_and_evaluate(config, tmp_path / "straight")

    interrupted_then_resumed(config, tmp_path / "resumed", monkeypatch)  # stopped during epoch 2

    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # The wall time carries over from the interrupted invocation's kept epoch.
    records = [json.loads(line) for line in lines]
    elapsed = [r["elapsed_seconds"] for r in records]
    assert all(elapsed[i] >= elapsed[i - 1] + records[i]["seconds"] for i in (1, 2))
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["wall_seconds"] >= elapsed[-1]


def test_workdir_of_another_config_is_refused_unless_overwrite(tiny_data, tmp_path):
    train.train_and_evaluate(smoke_config(tiny_data, **{"train.num_epochs": 1}), tmp_path)
    other = smoke_config(tiny_data, **{"train.num_epochs": 1, "optimizer.learning_rate": 0.01})
    with pytest.raises(errors.WorkdirError, match=r"optimizer.learning_rate: 0.1 -> 0.01.*overwrite=True"):
        train.train_and_evaluate(other, tmp_path)
    other.train.overwrite = True
    summary = train.train_and_evaluate(other, tmp_path)
    assert summary["num_epochs"] == 1


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    config = smoke_config(tiny_data, **{"train.num_epochs": 2})
    real_step = trainer.Trainer._step_metrics

    def poisoned_step(self, phase, state, batch):
        # From the 8th step on (epoch 2, whose 6 steps start at 6), images are NaN.
        batch = dict(batch, image=jax.numpy.where(state.step >= 7, jax.numpy.nan, batch["image"].astype("float32")))
        return real_step(self, phase, state, batch)

    monkeypatch.setattr(trainer.Trainer, "_step_metrics", poisoned_step)
    with pytest.raises(errors.NonFiniteLossError, match=r"in epoch 2/2, step 2 of that epoch \(global step 8\)"):
        train.train_and_evaluate(config, tmp_path)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.all_steps() == [1]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "vgg99", r"unknown model.name 'vgg99'; accepted: small_cnn, vgg11"),
        ("data.name", "mnist", r"unknown data.name 'mnist'; accepted: cifar10"),
        ("data.source", "http", r"unknown data.source 'http'; accepted: tfds"),
        ("scheduler", "sideways", r"unknown scheduler 'sideways'"),
        ("optimizer.lr_schedule", "linear", r"unknown optimizer.lr_schedule 'linear'; accepted: cosine, multistep"),
        ("train.batch_size", 0, r"train.batch_size must be a positive integer, got 0"),
        ("seed", -1, r"seed must be a non-negative integer, got -1"),
        (
            "objective.name",
            "ib",
            r"unknown objective 'ib'; accepted: ce, dib, predsim, hsic, hsic_unnormalized, head_only, infopro",
        ),
        ("objective.dib.compression", "mutual", r"unknown compression 'mutual'"),
        ("model.dtype", "float16", r"unknown model.dtype 'float16'; accepted: float32, bfloat16"),
        ("train.stage_epochs", (1, 2), r"stage_epochs=\(1, 2\) has 2 entries; the model has 4 stages"),
        ("optimizer.name", "lamb", r"unknown optimizer.name 'lamb'; accepted: sgd, adam"),
        ("train.stage_dropout", 1.0, r"train.stage_dropout must be a number in \[0, 1\), got 1.0"),
        ("objective.name", "predsim", r"objective 'predsim' needs model.head_extras to include \('similarity',\)"),
    ],
)
def test_unknown_names_are_refused_before_any_work(tmp_path, field, value, message):
    config = smoke_config(tmp_path / "does-not-exist", "greedy_dib", **{field: value})
    with pytest.raises(errors.ConfigError, match=message):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_says_where_it_looked(tmp_path):
    with pytest.raises(errors.DataNotFoundError, match="does-not-exist"):
        train.train_and_evaluate(smoke_config(tmp_path / "does-not-exist"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset", config_lib.DATASETS)
def test_config_variants(dataset):
    for arg in (None, "", "sgd", "cpu", "smoke", "cpu,sgd", "sgd,smoke", "cpu,dgl", "hsic,smoke", "full,predsim"):
        config = config_lib.get_config(dataset, arg)
        config_lib.check_config(config)
        assert config.data.name == dataset
    for method, (scheduler, objective) in config_lib.METHOD_RECIPES.items():
        config = config_lib.get_config(dataset, f"cpu,{method}")
        assert (config.scheduler, config.objective.name, config.method) == (scheduler, objective, method)
        assert config.model.head == {"sgd": "linear", "predsim": "prediction", "infopro": "linear"}.get(method, "conv")
    default = config_lib.get_config(dataset)
    assert (default.method, default.scheduler, default.objective.name) == ("greedy_dib", "sequential", "dib")
    assert default.model.name == "vgg11" and default.model.split == "layer"
    assert config_lib.get_config(dataset, "cpu").model.name == "small_cnn"
    with pytest.raises(errors.ConfigError, match=r"unknown config variant 'tpu'.*sizes: \('full', 'cpu', 'smoke'\)"):
        config_lib.get_config(dataset, "tpu")
    with pytest.raises(errors.ConfigError, match="two sizes"):
        config_lib.get_config(dataset, "cpu,smoke")


def test_greedy_run_records_every_term_and_resumes_inside_a_stage(tiny_data, tmp_path, monkeypatch):
    overrides = {"model.split": "groups", "model.num_groups": 2, "train.stage_epochs": (2, 1)}
    config = smoke_config(tiny_data, "greedy_dib", **overrides)
    config.objective.dib.gamma = 0.1
    straight = train.train_and_evaluate(config, tmp_path / "straight")

    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["phase_epoch"]) for r in records] == [(1, 1, 1), (1, 2, 2), (2, 3, 1)]
    for r in records:
        assert set(r) == RECORD_KEYS | {"grad_norm", "ce", "H_T", "I_TY"}
        assert r["grad_norm"] > 0 and r["H_T"] > 0 and r["ce"] > 0
    assert straight["stage_accuracies"] == [records[1]["test_accuracy"], records[2]["test_accuracy"]]
    assert straight["test_accuracy"] == records[2]["test_accuracy"]
    assert straight["phase_peak_bytes"] == [records[1]["train_step_bytes"], records[2]["train_step_bytes"]]
    assert straight["num_epochs"] == 3

    # Stopped during stage 0's second epoch, after its first checkpoint.
    resumed = interrupted_then_resumed(config, tmp_path / "resumed", monkeypatch)
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    assert resumed["stage_accuracies"] == straight["stage_accuracies"]


def test_evaluating_every_other_epoch_scores_each_phase_at_its_end_and_changes_no_result(tiny_data, tmp_path):
    overrides = {"model.split": "groups", "model.num_groups": 2, "train.stage_epochs": (3, 1)}
    every = train.train_and_evaluate(smoke_config(tiny_data, "greedy_ce", **overrides), tmp_path / "every")
    config = smoke_config(tiny_data, "greedy_ce", **overrides, **{"train.eval_every_epochs": 2})
    sparse = train.train_and_evaluate(config, tmp_path / "sparse")
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["test_accuracy"] is not None) for r in records] == [
        (1, False),
        (2, True),
        (3, True),
        (4, True),
    ]
    assert records[0]["test_loss"] is None and set(records[0]) == RECORD_KEYS | {"grad_norm", "ce"}
    assert sparse["stage_accuracies"] == every["stage_accuracies"]
    jax.tree.map(np.testing.assert_array_equal, final_state(tmp_path / "every"), final_state(tmp_path / "sparse"))
    with pytest.raises(errors.ConfigError, match="train.eval_every_epochs must be a positive integer, got 0"):
        config_lib.check_config(smoke_config(tiny_data, "greedy_ce", **{"train.eval_every_epochs": 0}))


def test_format_phase_trains_the_heads_after_the_stages(tiny_data, tmp_path):
    overrides = {"model.split": "groups", "model.num_groups": 2, "train.num_epochs": 1, "train.format_epochs": 1}
    summary = train.train_and_evaluate(smoke_config(tiny_data, "hsic", **overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["phase_epoch"], r["format_phase"]) for r in records] == [
        (1, 1, 1, False),
        (2, 1, 1, False),
        (1, 2, 1, True),
        (2, 2, 1, True),
    ]
    assert all(set(r) == RECORD_KEYS | {"grad_norm", "ce", "hsic_x", "hsic_y"} for r in records[:2])
    # The format phase trains the heads alone: its loss is their CE and no gradient reaches a stage.
    assert all(set(r) == RECORD_KEYS | {"grad_norm", "ce"} and r["grad_norm"] == 0.0 for r in records[2:])
    assert all(r["learning_rate"] > 0 for r in records)
    assert summary["stage_accuracies"] == [r["test_accuracy"] for r in records[2:]]
    assert summary["phase_peak_bytes"] == [records[1]["train_step_bytes"], records[3]["train_step_bytes"]]


def test_infopro_run_records_its_terms_per_module(tiny_data, tmp_path):
    overrides = {"model.split": "groups", "model.num_groups": 3, "train.num_epochs": 1}
    train.train_and_evaluate(smoke_config(tiny_data, "infopro", **overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2, 3]
    for r in records[:2]:
        assert np.isfinite(r["train_loss"]) and r["recon"] > 0 and r["contrast"] > 0 and r["grad_norm"] > 0
    # The last module learns the classifier's CE alone.
    assert records[2]["recon"] == records[2]["contrast"] == 0.0 and records[2]["train_loss"] == records[2]["ce"]


def test_batch_too_small_for_the_estimator_is_refused(tiny_data, tmp_path):
    config = smoke_config(tiny_data, "greedy_dib", **{"train.batch_size": 8})
    config.objective.dib.width = "knn"
    with pytest.raises(errors.ConfigError, match=r"batch_size=8 is too small for the 'dib' objective.*at least 11"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_blas_is_single_threaded_inside_training_and_restored_after():
    import threadpoolctl

    def blas_threads():
        infos = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        return {i["filepath"]: i["num_threads"] for i in infos}

    import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's OpenBLAS, as JAX's CPU LAPACK kernels do)

    before = blas_threads()
    assert any("scipy" in path for path in before), before  # SciPy's own OpenBLAS (its name varies by release)
    with train.single_threaded_blas():
        inside = blas_threads()
    assert set(inside) == set(before) and set(inside.values()) == {1}
    assert blas_threads() == before


def test_a_run_saved_before_a_field_existed_resumes_when_the_field_keeps_its_old_value(tmp_path):
    config = config_lib.get_config("cifar10", "smoke,greedy_dib")
    saved = json.loads(config.to_json())
    for *parents, leaf in workdir.ADDED_FIELDS:
        node = saved
        for parent in parents:
            node = node[parent]
        del node[leaf]
    (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(saved))
    folder = workdir.Workdir(tmp_path)
    folder.check(config)  # the fields' old values: the same run

    config.data.label_noise = 0.2
    with pytest.raises(errors.WorkdirError, match=r"data.label_noise: 0.0 -> 0.2"):
        folder.check(config)
