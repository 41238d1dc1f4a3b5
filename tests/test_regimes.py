"""The regimes study's bookkeeping: what each run is, that the search reads only held-out images, the verdict."""

import argparse
import json
import pathlib
import shutil

import numpy as np
import pytest

from benchmarks import regimes
from dibjax import config_lib, objectives


@pytest.fixture
def data_dir(tmp_path):
    np.savez(tmp_path / "train.npz", label=np.zeros(20_000, np.int64), image=np.zeros((1, 1, 1, 3), np.uint8))
    return str(tmp_path)


def _configure(regime_name, method, setting=None, validation=0):
    return regimes.configure(
        regimes.REGIMES[regime_name], method, setting, "/data", validation=validation, train_size=20_000
    )


def test_every_run_is_a_valid_config_of_its_regime():
    for name, regime in regimes.REGIMES.items():
        for method in (*regimes.METHODS, *regime.extra_methods):
            config = _configure(name, method, {"compression": "mi_prev", "beta": -0.01})
            assert config.train.num_epochs == regime.epochs and config.data.validation_size == 0
            assert config.data.name == regime.dataset and config.data.source == "npz"
            objective = objectives.from_config(config.objective)
            assert config_lib.METHOD_RECIPES[method if method != "dgl_dib" else "dgl"][0] == config.scheduler
            if method in ("greedy_dib", "dgl_dib"):
                assert isinstance(objective, objectives.DIB) and objective.beta == -0.01
            expected_limit = round(regime.train_fraction * 20_000) if regime.train_fraction < 1 else 0
            assert config.data.train_limit == expected_limit


def test_regimes_change_what_they_say():
    thin = _configure("thin", "dgl")
    assert (thin.model.name, thin.model.width, thin.model.head) == ("vgg11", 8, "linear")
    infopro = _configure("thin", "infopro")
    assert infopro.model.head == "linear" and infopro.model.head_extras == ("decoder", "projection")
    assert (infopro.objective.infopro.lambda_1_first, infopro.objective.infopro.lambda_2_last) == (5.0, 2.0)
    assert _configure("noise40", "sgd").data.label_noise == 0.4
    assert _configure("data10", "greedy_ce").data.train_limit == 2_000
    # The search trains on as many images as the final runs, taken from outside the held-out ones.
    held_out = _configure("data25", "greedy_ce", validation=4_000)
    assert (held_out.data.train_limit, held_out.data.validation_size) == (5_000, 4_000)
    assert _configure("thin", "greedy_dib").objective.dib.beta == regimes.DEFAULT_DIB["beta"]


def test_round_2_changes_one_field_of_the_best_setting():
    best = {"compression": "entropy", "beta": -0.001}
    settings = regimes.round_2(best)
    assert len(settings) == len(regimes.ROUND_2_CHANGES)
    for setting, change in zip(settings, regimes.ROUND_2_CHANGES, strict=True):
        assert setting == best | change
    assert len({regimes.setting_label(s) for s in settings}) == len(settings)
    assert regimes.setting_label({"compression": "entropy", "beta": 0.01, "alpha": 2.0}) == "entropy+0.01,alpha=2"


def test_the_search_reads_only_held_out_images_and_chooses_the_best_validation_setting(data_dir, tmp_path, monkeypatch):
    seen = []
    score = {"entropy-0.001": 0.6, "entropy-0.001,beta_growth=10": 0.7}

    def fake_train(config, workdir):
        seen.append(config)
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True)
        accuracy = score.get(workdir.name, 0.5)
        summary = {"test_accuracy": accuracy, "stage_accuracies": [accuracy], "num_epochs": 1, "wall_seconds": 1.0}
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(regimes.train, "train_and_evaluate", fake_train)
    ledger_path = tmp_path / "ledger.json"
    args = argparse.Namespace(
        workdir=str(tmp_path / "runs"), validation=4_000, seeds=[0, 1, 2], ledger=regimes.Ledger(ledger_path)
    )
    found = regimes.search("data10", regimes.REGIMES["data10"], data_dir, args)
    assert all(config.data.validation_size == 4_000 for config in seen)
    # Round 3: the best setting at β/3 and 3β, neither better.
    assert len(seen) == 1 + len(regimes.ROUND_1) + len(regimes.ROUND_2_CHANGES) + 2
    assert [c.objective.dib.beta for c in seen[-2:]] == [-0.000333, -0.003]
    assert all(c.objective.dib.beta_growth == 10.0 for c in seen[-2:])
    assert found.chosen == {"compression": "entropy", "beta": -0.001, "beta_growth": 10.0}
    assert list(found.runs)[:2] == ["sgd", "ce"]
    # Read back from the ledger alone (the run folders gone), nothing runs again.
    shutil.rmtree(args.workdir)
    args.ledger = regimes.Ledger(ledger_path)
    seen.clear()
    again = regimes.search("data10", regimes.REGIMES["data10"], data_dir, args)
    assert again.chosen == found.chosen and again.runs == found.runs and not seen
    # An unfinished search chooses nothing and runs nothing.
    args.ledger = regimes.Ledger(None)
    assert regimes.search("data10", regimes.REGIMES["data10"], data_dir, args, run_missing=False) is None
    assert not seen


def test_final_runs_every_arm_per_seed_and_analyses_seed_0s_greedy_runs(data_dir, tmp_path, monkeypatch):
    trained, analysed = [], []

    def fake_train(config, workdir):
        trained.append((config.seed, config.scheduler, config.objective.name, config.data.validation_size))
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True)
        summary = {"test_accuracy": 0.5, "stage_accuracies": [0.4, 0.5], "num_epochs": 7, "wall_seconds": 1.0}
        (workdir / "summary.json").write_text(json.dumps(summary))

    def fake_analysis(workdir, *, epochs, figures):
        analysed.append((pathlib.Path(workdir).name, epochs))
        result = {"H_T": [[9.0, 9.0], [3.0, 2.5]], "I_XT": [[0.0, 0.0], [3.0, 2.5]], "I_TY": [[0.0, 0.0], [1.5, 2.0]]}
        (pathlib.Path(workdir) / regimes.ANALYSIS_FILE).write_text(json.dumps(result))

    monkeypatch.setattr(regimes.train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(regimes.analysis, "analyze_workdir", fake_analysis)
    args = argparse.Namespace(workdir=str(tmp_path / "runs"), seeds=[3, 4], arms=None, ledger=regimes.Ledger(None))
    chosen = {"compression": "mi_prev", "beta": 0.01}
    results = regimes.final("data10", regimes.REGIMES["data10"], chosen, data_dir, args)
    assert len(trained) == 2 * (len(regimes.METHODS) + 1) and all(t[3] == 0 for t in trained)
    assert {label: [r["seed"] for r in runs] for label, runs in results.items()} == {
        label: [3, 4] for label in (*regimes.METHODS, "greedy_dib_default")
    }
    assert sorted(analysed) == [
        ("greedy_ce-s3", [7]),
        ("greedy_dib(mi_prev+0.01)-s3", [7]),
        ("greedy_dib_default(entropy+0.001)-s3", [7]),
    ]
    rows = regimes.information_table(results)[2:]
    assert len(rows) == 3 and "| greedy_ce | 3.00 / 2.50 | 3.00 / 2.50 | 1.50 / 2.00 |" in rows


def test_final_runs_only_the_arms_asked_for(data_dir, tmp_path, monkeypatch):
    trained = []

    def fake_train(config, workdir):
        trained.append((config.method, config.objective.name, config.objective.dib.beta))
        pathlib.Path(workdir).mkdir(parents=True)
        summary = {"test_accuracy": 0.5, "stage_accuracies": [0.5], "num_epochs": 7, "wall_seconds": 1.0}
        (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(summary))

    def fake_analysis(workdir, *, epochs, figures):
        result = {name: [[1.0]] for name in ("H_T", "I_XT", "I_TY")}
        (pathlib.Path(workdir) / regimes.ANALYSIS_FILE).write_text(json.dumps(result))

    monkeypatch.setattr(regimes.train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(regimes.analysis, "analyze_workdir", fake_analysis)
    args = argparse.Namespace(
        workdir=str(tmp_path / "runs"), seeds=[5], arms=["sgd", "greedy_dib_default"], ledger=regimes.Ledger(None)
    )
    chosen = {"compression": "mi_prev", "beta": 0.01}
    results = regimes.final("data10", regimes.REGIMES["data10"], chosen, data_dir, args)
    assert sorted(results) == ["greedy_dib_default", "sgd"]
    assert [run[:2] for run in sorted(trained)] == [("greedy_dib", "dib"), ("sgd", "ce")]
    assert sorted(trained)[0][2] == regimes.DEFAULT_DIB["beta"]


def test_final_arms_run_the_default_once_when_it_is_chosen():
    regime = regimes.REGIMES["thin"]
    arms = regimes.final_arms(regime, regimes.DEFAULT_DIB)
    assert "greedy_dib_default" not in arms and arms["dgl_dib"] == ("dgl_dib", regimes.DEFAULT_DIB)
    chosen = {"compression": "mi_input", "beta": 0.01}
    arms = regimes.final_arms(regimes.REGIMES["data10"], chosen)
    assert arms["greedy_dib"] == ("greedy_dib", chosen)
    assert arms["greedy_dib_default"] == ("greedy_dib", regimes.DEFAULT_DIB)
    assert set(arms) == {*regimes.METHODS, "greedy_dib_default"}


def _runs(accuracies):
    return [{"seed": seed, "test_accuracy": a, "wall_seconds": 1.0} for seed, a in enumerate(accuracies)]


def test_verdict_needs_every_seed_to_gain_a_point():
    results = {"sgd": _runs([0.80, 0.80, 0.80]), "greedy_ce": _runs([0.75, 0.76, 0.74])}
    results["greedy_dib"] = _runs([0.795, 0.79, 0.80])
    assert regimes.verdict(results).startswith("target MET")
    results["greedy_dib"] = _runs([0.795, 0.765, 0.80])  # seed 1 gains only 0.5 point
    assert regimes.verdict(results).startswith("target not met")
    results["greedy_ce"] = _runs([0.78, 0.78, 0.78])  # greedy CE only 2 below sgd: nothing to close
    results["greedy_dib"] = _runs([0.80, 0.80, 0.80])
    assert regimes.verdict(results).startswith("target not met")
    del results["greedy_dib"]
    assert regimes.verdict(results).startswith("target: not decided")


def test_final_table_pairs_differences_by_seed():
    results = {"greedy_ce": _runs([0.70, 0.80]), "greedy_dib": _runs([0.72, 0.79])}
    row = regimes.final_table(results)[-1]
    assert "+0.50 ± 2.12 (+2.00 / -1.00)" in row and "| 75.50 ± 4.95 | 72.00 / 79.00 |" in row


def test_ledgers_of_two_processes_on_one_file_keep_each_others_records(tmp_path):
    path = tmp_path / "ledger.json"
    first, second = regimes.Ledger(path), regimes.Ledger(path)
    first.add("thin/search/ce", {"test_accuracy": 0.5})
    second.add("data10/final/sgd-s0", {"test_accuracy": 0.6})
    first.add("thin/search/sgd", {"test_accuracy": 0.7})
    assert set(json.loads(path.read_text())) == {"thin/search/ce", "thin/search/sgd", "data10/final/sgd-s0"}
    assert "data10/final/sgd-s0" in first and regimes.Ledger(path)["thin/search/sgd"] == {"test_accuracy": 0.7}


def test_a_best_beta_at_an_end_of_a_line_extends_the_line_past_that_end(data_dir, tmp_path, monkeypatch):
    # Round 1: accuracy rises towards negative β until β = -0.09: the grid goes on twice past -0.01, then stops.
    # Round 3 from mi_input at -0.09: β/3 is worse, 3β better, and 9β worse again.
    score = {"entropy-0.01": 0.6, "entropy-0.03": 0.65, "entropy-0.09": 0.7, "entropy-0.27": 0.55}
    score |= {"mi_input-0.09": 0.72, "mi_input-0.27": 0.74, "mi_input-0.81": 0.73}
    labels = []

    def fake_train(config, workdir):
        workdir = pathlib.Path(workdir)
        labels.append(workdir.name)
        workdir.mkdir(parents=True)
        accuracy = score.get(workdir.name, 0.5)
        summary = {"test_accuracy": accuracy, "stage_accuracies": [accuracy], "num_epochs": 1, "wall_seconds": 1.0}
        (workdir / "summary.json").write_text(json.dumps(summary))

    monkeypatch.setattr(regimes.train, "train_and_evaluate", fake_train)
    args = argparse.Namespace(workdir=str(tmp_path / "runs"), validation=4_000, ledger=regimes.Ledger(None))
    found = regimes.search("thin", regimes.REGIMES["thin"], data_dir, args)
    round_1 = 1 + len(regimes.ROUND_1)
    assert labels[round_1 : round_1 + 3] == ["entropy-0.03", "entropy-0.09", "entropy-0.27"]
    round_2 = labels[round_1 + 3 : round_1 + 3 + len(regimes.ROUND_2_CHANGES)]
    assert round_2[0] == "mi_input-0.09" and all("-0.09" in label for label in round_2)
    assert labels[round_1 + 3 + len(regimes.ROUND_2_CHANGES) :] == ["mi_input-0.03", "mi_input-0.27", "mi_input-0.81"]
    assert found.chosen == {"compression": "mi_input", "beta": -0.27}
    # An interior best β adds nothing to the lines: round 1's grid, round 2, then β/3 and 3β.
    labels.clear()
    score = {"entropy+0.001": 0.6}
    args.workdir, args.ledger = str(tmp_path / "other"), regimes.Ledger(None)
    regimes.search("thin", regimes.REGIMES["thin"], data_dir, args)
    assert len(labels) == 1 + len(regimes.ROUND_1) + len(regimes.ROUND_2_CHANGES) + 2
    assert labels[-2:] == ["entropy+0.000333", "entropy+0.003"]
