"""Choosing the default DIB setting on a validation split carved from the training data (never the test set).

    python -m benchmarks.dib_sweep --data ../shared/data/cifar10                  # the whole grid
    python -m benchmarks.dib_sweep --data ../shared/data/cifar10 --only ce entropy-0.005

Every setting trains the small CNN (``configs/cifar10.py:cpu,greedy_dib``) greedily, stage by stage, for
``--epochs`` epochs per stage on the training images minus ``--validation`` held-out ones, and reports the final
classifier's accuracy on those held-out images (``config.data.validation_size``). ``ce`` is the same run with the
heads' cross-entropy alone (β = γ = 0), the reference every information term must beat. Finished runs are kept in
``--workdir`` (one folder per setting and seed) and not rerun, so the sweep can be stopped and continued.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from collections.abc import Callable

import ml_collections

from dibjax import cli, config_lib, train

# name: (objective, overrides of config.objective.dib)
SETTINGS = {
    "ce": ("ce", {}),
    "entropy-0.001": ("dib", {"compression": "entropy", "beta": 0.001}),
    "entropy-0.005": ("dib", {"compression": "entropy", "beta": 0.005}),
    "entropy-0.02": ("dib", {"compression": "entropy", "beta": 0.02}),
    "mi_input-0.005": ("dib", {"compression": "mi_input", "beta": 0.005}),
    "mi_input-0.02": ("dib", {"compression": "mi_input", "beta": 0.02}),
    "mi_prev-0.005": ("dib", {"compression": "mi_prev", "beta": 0.005}),
    "mi_prev-0.02": ("dib", {"compression": "mi_prev", "beta": 0.02}),
    "relevance-0.02": ("dib", {"compression": "none", "gamma": 0.02}),
    "relevance-0.1": ("dib", {"compression": "none", "gamma": 0.1}),
    "entropy-0.005+relevance-0.02": ("dib", {"compression": "entropy", "beta": 0.005, "gamma": 0.02}),
    "entropy-0.005-alpha2": ("dib", {"compression": "entropy", "beta": 0.005, "alpha": 2.0}),
    "entropy-0.005-pool2": ("dib", {"compression": "entropy", "beta": 0.005, "pool": 2}),
    "entropy-0.005-silverman": ("dib", {"compression": "entropy", "beta": 0.005, "width": "silverman"}),
    # The information-keeping direction (β < 0) that benchmarks.regimes found best where greedy CE falls short.
    "entropy-minus-0.01": ("dib", {"compression": "entropy", "beta": -0.01}),
    "mi_input-minus-0.03": ("dib", {"compression": "mi_input", "beta": -0.03}),
}


def validation_run(run_name: str, seed: int, args, configure: Callable[[ml_collections.ConfigDict], None]) -> dict:
    """The summary of a ``cpu,greedy_dib`` run scored on ``args.validation`` held-out training images, changed by
    ``configure``; a run already finished in ``args.workdir`` is read back, not rerun."""
    workdir = pathlib.Path(args.workdir) / f"{args.dataset}-{run_name}-s{seed}"
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    config = config_lib.get_config(args.dataset, "cpu,greedy_dib")
    config.seed = seed
    config.data.source = "npz"
    config.data.dir = args.data
    config.data.validation_size = args.validation
    config.train.num_epochs = args.epochs
    config.train.progress = False
    configure(config)
    return train.train_and_evaluate(config, workdir)


def run(name: str, seed: int, args) -> dict:
    objective, options = SETTINGS[name]

    def configure(config):
        config.objective.name = objective
        for key, value in options.items():
            config.objective.dib[key] = value

    return validation_run(name, seed, args, configure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="npz folder (train.npz, test.npz)")
    parser.add_argument("--dataset", default="cifar10", choices=config_lib.DATASETS)
    parser.add_argument("--workdir", default="runs/dib-sweep")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    parser.add_argument("--validation", type=int, default=4000, help="training images held out for validation")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()

    results = {}
    for name in args.only:
        results[name] = [run(name, seed, args) for seed in args.seeds]
        accuracies = [r["test_accuracy"] for r in results[name]]
        print(f"{name}: validation accuracy {accuracies}", file=sys.stderr, flush=True)

    reference = statistics.mean(r["test_accuracy"] for r in results["ce"]) if "ce" in results else None
    print(
        f"\n{args.dataset}, small CNN, greedy (sequential), {args.epochs} epochs per stage, "
        f"{args.validation} held-out training images, seeds {args.seeds}\n"
    )
    print("| setting | validation accuracy | − ce (points) | stage accuracies | wall (s) |")
    print("|---|---:|---:|---|---:|")
    for name, runs in results.items():
        accuracy = statistics.mean(r["test_accuracy"] for r in runs)
        delta = f"{100 * (accuracy - reference):+.2f}" if reference is not None else "—"
        stages = " / ".join(f"{100 * a:.1f}" for a in runs[0]["stage_accuracies"])
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        print(f"| {name} | {100 * accuracy:.2f}% | {delta} | {stages} | {wall:.0f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
