"""The accuracy protocol: every method on the small CNN (``cpu`` size), test accuracy and wall time over seeds.

    python -m benchmarks.accuracy --cifar10 ../shared/data/cifar10 --gtsrb ../shared/data/gtsrb
    python -m benchmarks.accuracy --cifar10 ../shared/data/cifar10 --methods sgd greedy_ce --seeds 0

Each run is ``python -m dibjax.main --config=configs/DATASET.py:cpu,METHOD --config.seed=SEED`` on the npz data,
with the epochs of that config: every stage of a layer-wise method trains for as many epochs as ``sgd`` trains in
total. Finished runs are kept in ``--workdir`` (one folder per data set, method and seed) and not rerun, so the
protocol can be stopped and continued; the table is printed from whatever has finished. Accuracy is the mean over
seeds ± half the range; the heads' accuracies (each stage's auxiliary classifier, for the layer-wise methods)
and the wall time are means over seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from dibjax import cli, config_lib, train


def run(dataset: str, data_dir: str, method: str, seed: int, workdir: pathlib.Path) -> dict:
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    config = config_lib.get_config(dataset, f"cpu,{method}")
    config.seed = seed
    config.data.source = "npz"
    config.data.dir = data_dir
    config.train.progress = False
    return train.train_and_evaluate(config, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10", help="CIFAR-10 npz folder")
    parser.add_argument("--gtsrb", help="GTSRB npz folder")
    parser.add_argument("--methods", nargs="+", choices=config_lib.METHODS, default=list(config_lib.METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--workdir", default="runs/accuracy")
    parser.add_argument("--table-only", action="store_true", help="print the table of finished runs, run nothing")
    args = parser.parse_args()

    folders = {name: path for name, path in (("cifar10", args.cifar10), ("gtsrb", args.gtsrb)) if path}
    if not folders:
        parser.error("give --cifar10 and/or --gtsrb")
    results: dict[tuple[str, str], list[dict]] = {}
    # Seeds outermost, so that a protocol stopped early has every method at least once.
    for seed in args.seeds:
        for dataset, data_dir in folders.items():
            for method in args.methods:
                workdir = pathlib.Path(args.workdir) / f"{dataset}-{method}-s{seed}"
                if args.table_only and not (workdir / "summary.json").exists():
                    continue
                summary = run(dataset, data_dir, method, seed, workdir)
                results.setdefault((dataset, method), []).append(summary)
                print(f"{dataset} {method} seed {seed}: {summary['test_accuracy']:.4f}", file=sys.stderr, flush=True)

    print("\n| data set | method | epochs | test accuracy | per seed (%) | head accuracy per stage (%) | wall (s) |")
    print("|---|---|---:|---:|---|---|---:|")
    for (dataset, method), runs in results.items():
        accuracies = [100 * r["test_accuracy"] for r in runs]
        spread = (max(accuracies) - min(accuracies)) / 2
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        per_seed = " / ".join(f"{a:.2f}" for a in accuracies)
        # End-to-end runs have one classifier and no per-stage heads.
        if runs[0].get("stage_accuracies"):
            per_stage = zip(*(r["stage_accuracies"] for r in runs), strict=True)
            stage_means = [100 * statistics.mean(column) for column in per_stage]
            heads = " / ".join(f"{a:.1f}" for a in stage_means)
        else:
            heads = "—"
        accuracy = f"{statistics.mean(accuracies):.2f} ± {spread:.2f}%" if len(runs) > 1 else f"{accuracies[0]:.2f}%"
        print(f"| {dataset} | {method} | {runs[0]['num_epochs']} | {accuracy} | {per_seed} | {heads} | {wall:.0f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
