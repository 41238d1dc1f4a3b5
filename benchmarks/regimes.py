"""Where does the information bottleneck help? Greedy DIB against the other methods where greedy training falls short.

    python -m benchmarks.regimes --cifar10 ../shared/data/cifar10 --gtsrb ../shared/data/gtsrb
    python -m benchmarks.regimes --cifar10 ../shared/data/cifar10 --regimes data10 --phases search
    python -m benchmarks.regimes --cifar10 ../shared/data/cifar10 --gtsrb ../shared/data/gtsrb --table-only

On the ``cpu`` protocol greedy CE already matches end-to-end SGD, so no objective has a gap to close there. The
literature puts greedy training's shortfall in many thin modules with weak heads (Wang et al., ICLR 2021, Table 2;
Nøkland & Eidnes, ICML 2019), and a bottleneck term could pay off where a network overfits (little data, noisy
labels). Each regime (:data:`REGIMES`) changes the ``cpu`` recipe in one of these directions:

* ``thin``: VGG-11 at width 8 (8 stages, 8/16/32/64/64 channels) with linear heads (global pool → linear);
* ``data10`` / ``data25``: 10% / 25% of the CIFAR-10 subset, trained long enough to fit it;
* ``noise20`` / ``noise40``: ``data25`` with 20% / 40% of its training labels replaced by another class
  (``data.label_noise``), ``data25`` being their clean control;
* ``gtsrb10``: 10% of the GTSRB training images.

Every method of a regime trains the same number of epochs ``E`` per stage it trains (the accuracy protocol's
budget: each stage of a ``sequential`` method ``E`` epochs, a ``simultaneous`` or end-to-end run ``E`` epochs in
all), from the ``cpu`` recipe (SGD Nesterov 0.1, cosine, weight decay 5e-4, label smoothing 0.1, batch 128).

Two phases, each resumable (a finished run's record in ``--ledger`` or folder in ``--workdir`` is read back, not
rerun):

1. ``search`` (seed 0, on ``--validation`` images held out of the training data; the test set is not read): ``sgd``,
   greedy CE (``ce``) and greedy DIB in three rounds (:data:`ROUND_1`, :data:`ROUND_2_CHANGES`, β). Round 1 varies β of
   the entropy compression over a log grid of both signs (β > 0 compresses, the DIB direction; β < 0 keeps
   information, InfoPro's direction); where the best β is at an end of the grid, the grid goes on past that end
   (:data:`EDGE_FACTOR`, at most :data:`MAX_EDGE_STEPS` steps). Round 2 starts from round 1's best β and changes one
   thing at a time: the compression (``mi_input``, ``mi_prev``), α = 2, the relevance term γ, and β growing or
   shrinking tenfold from the first stage to the last. Round 3 tries the best setting so far at β/3 and 3β, going
   on past an end the same way. The best setting of the three rounds is the regime's ``greedy_dib``.
2. ``final`` (seeds ``--seeds``, test set): every method of the regime, ``greedy_dib`` at the chosen setting and at
   the default the study started from (:data:`DEFAULT_DIB`: entropy, β = 0.001); for the chosen and the default
   setting and greedy CE, the first seed is also analysed (:mod:`dibjax.analysis`, at its last epoch on 512
   training images) for each stage's H(T), I(X;T) and I(T;Y). ``--arms`` runs only some arms, so that one
   regime's final phase can be split over processes.

In the small-data regimes the validation images come from outside the small training set (the held-out images
are split off first, then the training part is cut to the regime's size), so the search measures what each
setting can do, not how well it can be chosen from a small labelled set. With label noise the held-out labels are
as noisy as the training labels (:func:`dibjax.data.noisy_labels`: accuracy on them ranks settings as the true labels
would); the test labels are never changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pathlib
import statistics
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from dibjax import analysis, cli, config_lib, train
from dibjax.workdir import ANALYSIS_FILE


@dataclasses.dataclass(frozen=True)
class Regime:
    """A change of the ``cpu`` recipe: its data set, epochs per stage, and config overrides (dotted paths)."""

    description: str
    dataset: str
    epochs: int
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Fraction of the training images kept (resolved to a count from the data folder).
    train_fraction: float = 1.0
    # Arms beyond the common ones: "dgl_dib", the DIB objective under the simultaneous scheduler.
    extra_methods: tuple[str, ...] = ()


NARROW_CNN = {"model.width": 16}
REGIMES = {
    "thin": Regime(
        "VGG-11 at width 8, 8 stages, linear heads",
        "cifar10",
        6,
        {"model.name": "vgg11", "model.width": 8, "model.head": "linear"},
        extra_methods=("dgl_dib",),
    ),
    "data10": Regime("small CNN (width 16), 10% of the CIFAR-10 subset", "cifar10", 60, NARROW_CNN, 0.10),
    "data25": Regime("small CNN (width 16), 25% of the CIFAR-10 subset", "cifar10", 30, NARROW_CNN, 0.25),
    # Label noise on data25's images and budget, so that data25 is its clean control; long enough on 6,000 images
    # for the network to start fitting the wrong labels.
    "noise20": Regime(
        "data25 with 20% of its labels noisy", "cifar10", 30, {**NARROW_CNN, "data.label_noise": 0.2}, 0.25
    ),
    "noise40": Regime(
        "data25 with 40% of its labels noisy", "cifar10", 30, {**NARROW_CNN, "data.label_noise": 0.4}, 0.25
    ),
    "gtsrb10": Regime("small CNN (width 16), 10% of the GTSRB training images", "gtsrb", 40, NARROW_CNN, 0.10),
}
METHODS = ("sgd", "greedy_ce", "dgl", "infopro", "random", "greedy_dib")
# InfoPro's (λ1 first, λ1 of module K − 1, λ2 first, λ2 of module K − 1) for ResNet-32 in K modules, from their
# command list: VGG-11's 8 stages take their K = 8 values, the small CNN's 4 stages the defaults (K = 4).
INFOPRO_LAMBDAS = {"vgg11": (5.0, 0.0, 0.0, 2.0)}
# The default the study compared (``greedy_dib_default``): dibjax's default before the study chose entropy, β = −0.01.
DEFAULT_DIB = {"compression": "entropy", "beta": 0.001}


def _entropy(beta: float) -> dict:
    return {"compression": "entropy", "beta": beta}


# Round 1: greedy CE (None), then the entropy compression's β on a log grid of both signs.
ROUND_1 = (None, *(_entropy(beta) for beta in (-0.01, -0.001, 0.001, 0.01, 0.03)))
# A best β at an end of a line of β is not a choice but a bound: the line goes on past that end, each step
# EDGE_FACTOR times further out, while the newest β is the best and at most MAX_EDGE_STEPS times (round 1's grid,
# and round 3's line β/3, β, 3β around round 2's best setting).
EDGE_FACTOR = 3.0
MAX_EDGE_STEPS = 3
ROUND_2_CHANGES = (
    {"compression": "mi_input"},
    {"compression": "mi_prev"},
    {"alpha": 2.0},
    {"gamma": 0.01},
    {"beta_growth": 10.0},
    {"beta_growth": 0.1},
)


def round_2(best: Mapping[str, Any]) -> list[dict]:
    """Round 2's settings: round 1's best DIB setting changed in one field each."""
    return [{**best, **change} for change in ROUND_2_CHANGES]


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def training_size(data_dir: str) -> int:
    with np.load(pathlib.Path(data_dir) / "train.npz") as stored:
        return len(stored["label"])


def configure(
    regime: Regime, method: str, setting: Mapping[str, Any] | None, data_dir: str, *, validation: int, train_size: int
) -> ml_collections.ConfigDict:
    """The run of ``method`` in ``regime``; for the DIB methods, ``setting`` overrides ``config.objective.dib``.

    With ``validation`` > 0 the run holds that many of the ``train_size`` training images out and is scored on
    them; the regime's fraction of ``train_size`` images is then taken from the rest.
    """
    config = config_lib.get_config(regime.dataset, f"cpu,{'dgl' if method == 'dgl_dib' else method}")
    for path, value in regime.overrides.items():
        if method == "infopro" and path == "model.head":
            continue  # InfoPro keeps its linear probes beside its own auxiliary networks.
        set_path(config, path, value)
    if method == "dgl_dib":
        config.objective.name = "dib"
    if method in ("greedy_dib", "dgl_dib"):
        config.objective.dib.update(dict(DEFAULT_DIB if setting is None else setting))
    if method == "infopro" and config.model.name in INFOPRO_LAMBDAS:
        keys = ("lambda_1_first", "lambda_1_last", "lambda_2_first", "lambda_2_last")
        config.objective.infopro.update(dict(zip(keys, INFOPRO_LAMBDAS[config.model.name], strict=True)))
    config.train.num_epochs = regime.epochs
    config.data.source = "npz"
    config.data.dir = data_dir
    config.data.validation_size = validation
    if regime.train_fraction < 1:
        # The same number of images with and without the held-out split, so that the search's choice transfers.
        config.data.train_limit = round(regime.train_fraction * train_size)
    # The results are each phase's last evaluation; a long run on few images would spend most of its time scoring
    # 10,000 test images after every epoch.
    config.train.eval_every_epochs = max(1, regime.epochs // 4)
    config.train.progress = False
    return config


class Ledger:
    """The study's finished runs, a compact record each (accuracies, wall time, and for analysed runs each stage's
    final H(T), I(X;T), I(T;Y)), kept in one JSON file beside the docs: the tables can be rebuilt, and the study
    continued on another machine, without the run folders. ``None`` keeps nothing.

    Several processes may share one file (regimes split over cores): each write takes a lock, reads the records
    the others wrote since, and replaces the file with the union."""

    def __init__(self, path: str | pathlib.Path | None):
        self.path = pathlib.Path(path) if path else None
        self.records = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def add(self, key: str, record: dict) -> None:
        if not self.path:
            self.records[key] = record
            return
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.records = {**self.records, **self._read(), key: record}
            partial = self.path.with_suffix(f".partial{os.getpid()}")
            partial.write_text(json.dumps(dict(sorted(self.records.items())), indent=1) + "\n")
            partial.replace(self.path)


def finished(args, key: str) -> bool:
    return key in args.ledger or (pathlib.Path(args.workdir) / key / "summary.json").exists()


def run(config: ml_collections.ConfigDict, args, key: str, *, analyse: bool = False) -> dict:
    """The record of run ``key`` (a path under ``args.workdir``), trained unless finished; with ``analyse``, its
    last epoch analysed as well (:func:`dibjax.analysis.analyze_workdir`)."""
    if key in args.ledger and (not analyse or "information" in args.ledger[key]):
        return args.ledger[key]
    workdir = pathlib.Path(args.workdir) / key
    if not (workdir / "summary.json").exists():
        train.train_and_evaluate(config, workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    fields = ("test_accuracy", "stage_accuracies", "num_epochs", "wall_seconds")
    record = {name: summary[name] for name in fields}
    if analyse:
        if not (workdir / ANALYSIS_FILE).exists():
            analysis.analyze_workdir(workdir, epochs=[summary["num_epochs"]], figures=False)
        result = json.loads((workdir / ANALYSIS_FILE).read_text())
        record["information"] = {name: result[name][-1] for name in ("H_T", "I_XT", "I_TY")}
    args.ledger.add(key, record)
    return record


def setting_label(setting: Mapping[str, Any]) -> str:
    """``entropy+0.001`` for the round-1 form; other fields appended as ``,name=value``."""
    rest = ",".join(f"{key}={setting[key]:g}" for key in sorted(setting) if key not in ("compression", "beta"))
    return f"{setting['compression']}{setting['beta']:+g}" + (f",{rest}" if rest else "")


@dataclasses.dataclass
class Search:
    """One regime's search: every validation run by label, in order, and the chosen DIB setting."""

    runs: dict[str, dict]
    settings: dict[str, dict | None]
    chosen: dict


def search(name: str, regime: Regime, data_dir: str, args, *, run_missing: bool = True) -> Search | None:
    """The regime's search on the validation split (seed 0); None if ``run_missing`` is False and it is unfinished."""
    size = training_size(data_dir)
    runs: dict[str, dict] = {}
    settings: dict[str, dict | None] = {}

    def validation_run(label: str, method: str, setting: Mapping[str, Any] | None) -> bool:
        key = f"{name}/search/{label}"
        if not run_missing and not finished(args, key):
            return False
        config = configure(regime, method, setting, data_dir, validation=args.validation, train_size=size)
        runs[label], settings[label] = run(config, args, key), None if setting is None else dict(setting)
        print(f"{name} search {label}: {runs[label]['test_accuracy']:.4f}", file=sys.stderr, flush=True)
        return True

    complete = validation_run("sgd", "sgd", None)
    for setting in ROUND_1:
        label = "ce" if setting is None else setting_label(setting)
        complete &= validation_run(label, "greedy_ce" if setting is None else "greedy_dib", setting)
    if not complete:
        return None

    def best_label() -> str:
        return max((k for k, v in settings.items() if v is not None), key=lambda k: runs[k]["test_accuracy"])

    def beta_line(base: Mapping[str, Any], betas: list[float]) -> bool:
        """Runs ``base`` at ``betas``, then goes on past an end of that line of β while the best setting is there:
        each step :data:`EDGE_FACTOR` times further from the line's other values, at most :data:`MAX_EDGE_STEPS`."""
        others = {k: v for k, v in base.items() if k != "beta"}
        for beta in betas:
            if not validation_run(setting_label({**others, "beta": beta}), "greedy_dib", {**others, "beta": beta}):
                return False
        line = sorted({base["beta"], *betas})
        for _ in range(MAX_EDGE_STEPS):
            best = settings[best_label()]
            if {k: v for k, v in best.items() if k != "beta"} != others or best["beta"] not in (line[0], line[-1]):
                break
            edge = best["beta"]
            neighbour = line[1] if edge == line[0] else line[-2]
            factor = EDGE_FACTOR if abs(edge) > abs(neighbour) else 1 / EDGE_FACTOR
            beta = float(f"{edge * factor:.3g}")
            line = sorted((*line, beta))
            if not validation_run(setting_label({**others, "beta": beta}), "greedy_dib", {**others, "beta": beta}):
                return False
        return True

    round_1_betas = [setting["beta"] for setting in ROUND_1 if setting is not None]
    if not beta_line(_entropy(round_1_betas[0]), round_1_betas[1:]):
        return None
    for setting in round_2(settings[best_label()]):
        complete &= validation_run(setting_label(setting), "greedy_dib", setting)
    if not complete:
        return None
    best = settings[best_label()]
    if not beta_line(best, [float(f"{best['beta'] * f:.3g}") for f in (1 / EDGE_FACTOR, EDGE_FACTOR)]):
        return None
    return Search(runs, settings, dict(settings[best_label()]))


def final_arms(regime: Regime, chosen: Mapping[str, Any]) -> dict[str, tuple[str, dict | None]]:
    """The final comparison's arms by label: every method, greedy DIB at the chosen and the default setting."""
    arms: dict[str, tuple[str, dict | None]] = {m: (m, None) for m in METHODS if m != "greedy_dib"}
    for label, setting in (("greedy_dib", chosen), ("greedy_dib_default", DEFAULT_DIB)):
        if label == "greedy_dib" or dict(setting) != dict(chosen):
            arms[label] = ("greedy_dib", dict(setting))
    for method in regime.extra_methods:
        arms[method] = (method, dict(chosen))
    return arms


def final(
    name: str, regime: Regime, chosen: Mapping[str, Any], data_dir: str, args, *, run_missing: bool = True
) -> dict[str, list[dict]]:
    """Every arm of the regime on the test set, over ``args.seeds`` (seeds outermost); finished runs only if not
    ``run_missing``. The first seed's greedy runs also carry their analysis."""
    size = training_size(data_dir)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for label, (method, setting) in final_arms(regime, chosen).items():
            if args.arms and label not in args.arms:
                continue
            # The chosen setting's label is in the folder's name, so a changed choice is a new run.
            tag = label if setting is None else f"{label}({setting_label(setting)})"
            key = f"{name}/final/{tag}-s{seed}"
            if not run_missing and not finished(args, key):
                continue
            config = configure(regime, method, setting, data_dir, validation=0, train_size=size)
            config.seed = seed
            analyse = seed == args.seeds[0] and method in ("greedy_dib", "greedy_ce")
            results.setdefault(label, []).append(run(config, args, key, analyse=analyse) | {"seed": seed})
            print(f"{name} final {tag} seed {seed}: {results[label][-1]['test_accuracy']:.4f}", file=sys.stderr)
    return results


def _heads(runs: list[dict]) -> str:
    if not runs[0].get("stage_accuracies"):
        return "—"
    columns = zip(*(r["stage_accuracies"] for r in runs), strict=True)
    return " / ".join(f"{100 * statistics.mean(column):.1f}" for column in columns)


def _mean_std(values: list[float], sign: str = "") -> str:
    mean = f"{statistics.mean(values):{sign}.2f}"
    return f"{mean} ± {statistics.stdev(values):.2f}" if len(values) > 1 else mean


def search_table(search_result: Search) -> list[str]:
    runs, settings = search_result.runs, search_result.settings
    ce = 100 * runs["ce"]["test_accuracy"]
    lines = [
        "| setting | validation accuracy (%) | − ce (points) | head accuracy per stage (%) | wall (s) |",
        "|---|---:|---:|---|---:|",
    ]
    for label, summary in runs.items():
        accuracy = 100 * summary["test_accuracy"]
        chosen = " (chosen)" if settings[label] == search_result.chosen else ""
        lines.append(
            f"| {label}{chosen} | {accuracy:.2f} | {accuracy - ce:+.2f} | {_heads([summary])} | "
            f"{summary['wall_seconds']:.0f} |"
        )
    return lines


def final_table(results: dict[str, list[dict]]) -> list[str]:
    """Test accuracy over seeds (mean ± std), and each arm's paired difference to greedy CE (same seed)."""
    ce_by_seed = {r["seed"]: 100 * r["test_accuracy"] for r in results.get("greedy_ce", [])}
    lines = [
        "| arm | test accuracy (%) | per seed | − greedy_ce, paired (points) | heads per stage (%) | wall (s) |",
        "|---|---:|---|---|---|---:|",
    ]
    for label, runs in results.items():
        accuracies = [100 * r["test_accuracy"] for r in runs]
        paired = [100 * r["test_accuracy"] - ce_by_seed[r["seed"]] for r in runs if r["seed"] in ce_by_seed]
        difference = (
            "—"
            if label == "greedy_ce" or not paired
            else f"{_mean_std(paired, '+')} ({' / '.join(f'{d:+.2f}' for d in paired)})"
        )
        per_seed = " / ".join(f"{a:.2f}" for a in accuracies)
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        lines.append(f"| {label} | {_mean_std(accuracies)} | {per_seed} | {difference} | {_heads(runs)} | {wall:.0f} |")
    return lines


def information_table(results: dict[str, list[dict]]) -> list[str]:
    """Each stage's H(T), I(X;T), I(T;Y) (bits, α = 1.01, 512 training images) at the end of seed 0's runs."""
    lines = ["| arm | H(T) per stage | I(X;T) per stage | I(T;Y) per stage |", "|---|---|---|---|"]
    for label, runs in results.items():
        found = [r["information"] for r in runs if "information" in r]
        if not found:
            continue
        cells = [" / ".join(f"{v:.2f}" for v in found[0][key]) for key in ("H_T", "I_XT", "I_TY")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def verdict(results: dict[str, list[dict]]) -> str:
    """The target: greedy CE ≥ 3 points below sgd, greedy DIB ≥ greedy CE + 1 on every seed and within 1 of sgd."""
    need = ("sgd", "greedy_ce", "greedy_dib")
    if any(label not in results for label in need) or len({len(results[label]) for label in need}) != 1:
        return "target: not decided (runs missing)"
    mean = {label: 100 * statistics.mean(r["test_accuracy"] for r in results[label]) for label in need}
    ce_by_seed = {r["seed"]: r["test_accuracy"] for r in results["greedy_ce"]}
    gains = [100 * (r["test_accuracy"] - ce_by_seed[r["seed"]]) for r in results["greedy_dib"]]
    gap = mean["sgd"] - mean["greedy_ce"]
    met = gap >= 3 and all(g >= 1 for g in gains) and mean["sgd"] - mean["greedy_dib"] <= 1
    return (
        f"target {'MET' if met else 'not met'}: sgd − greedy_ce = {gap:+.2f} (needs ≥ 3); greedy_dib − greedy_ce per "
        f"seed {' / '.join(f'{g:+.2f}' for g in gains)} (needs ≥ +1 on each); sgd − greedy_dib = "
        f"{mean['sgd'] - mean['greedy_dib']:+.2f} (needs ≤ 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10", help="CIFAR-10 npz folder")
    parser.add_argument("--gtsrb", help="GTSRB npz folder")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--phases", nargs="+", choices=("search", "final"), default=["search", "final"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--arms", nargs="+", help="final phase: only these arms (the tables' labels), to split a regime over processes"
    )
    parser.add_argument("--validation", type=int, default=4000, help="held-out training images of the search")
    parser.add_argument("--workdir", default="runs/regimes")
    parser.add_argument("--ledger", default="docs/regimes-runs.json", help="JSON record of finished runs ('' for none)")
    parser.add_argument("--table-only", action="store_true", help="print the tables of finished runs, run nothing")
    args = parser.parse_args()
    arm_labels = {*METHODS, "greedy_dib_default", *(m for regime in REGIMES.values() for m in regime.extra_methods)}
    if unknown := sorted(set(args.arms or ()) - arm_labels):
        parser.error(f"unknown --arms {', '.join(unknown)}; accepted: {', '.join(sorted(arm_labels))}")
    args.ledger = Ledger(args.ledger)

    folders = {"cifar10": args.cifar10, "gtsrb": args.gtsrb}
    for name in args.regimes:
        dataset = REGIMES[name].dataset
        if not folders[dataset]:
            parser.error(f"regime {name!r} needs --{dataset}")
        if not (pathlib.Path(folders[dataset]) / "train.npz").is_file():
            parser.error(
                f"--{dataset} {folders[dataset]!r} holds no train.npz: it takes a folder of train.npz and "
                "test.npz (the npz source of dibjax.data)"
            )
    run_missing = not args.table_only
    for name in args.regimes:
        regime = REGIMES[name]
        data_dir = folders[regime.dataset]
        found = search(name, regime, data_dir, args, run_missing=run_missing and "search" in args.phases)
        print(f"\n### {name}: {regime.description}, {regime.epochs} epochs per stage\n")
        if found is None:
            print("search unfinished: no setting chosen yet")
            continue
        print(f"Search (seed 0, {args.validation} held-out training images):\n")
        print("\n".join(search_table(found)))
        results = final(name, regime, found.chosen, data_dir, args, run_missing=run_missing and "final" in args.phases)
        if results:
            print(f"\nTest set, seeds {args.seeds}, greedy_dib = {setting_label(found.chosen)}:\n")
            print("\n".join(final_table(results)))
            print("\nAt the end of training (seed 0):\n")
            print("\n".join(information_table(results)))
            print("\n" + verdict(results))


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
