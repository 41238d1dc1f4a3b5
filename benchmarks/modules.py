"""InfoPro's comparison on a CPU-sized ResNet: the network cut into K local modules, trained by local losses.

    python -m benchmarks.modules --data ../shared/data/cifar10                 # K = 4 and 8, seed 0
    python -m benchmarks.modules --data ../shared/data/cifar10 --modules 4 --seeds 0 1 --epochs 10

Wang et al. (ICLR 2021, Table 2) cut ResNet-32 into K = 4, 8, 16 modules trained at once, each on its own loss with
the gradient stopped between modules, and report (CIFAR-10 test error) InfoPro (Contrast) < DGL < greedy SL:
8.58 / 11.48 / 16.07% at K = 4, 11.13 / 14.17 / 21.19% at K = 8 (end to end 7.37%). This script runs the same
comparison on a ResNet-32 narrowed to ``--width`` channels in its first group, on the npz data, at a budget a
2-core CPU affords: every arm trains ``--epochs`` epochs, all modules at once (dibjax's ``simultaneous``
scheduler), from the ``cpu`` size's recipe (SGD with Nesterov momentum 0.1, cosine decay, weight decay 5e-4,
label smoothing 0.1, batch 128) and the same data; the arms differ only in their local loss and auxiliary network:

* ``sgd``: end-to-end backpropagation through the network's own classifier (global pool + linear);
* ``greedy_sl``: each module learns the cross-entropy of InfoPro's auxiliary network (conv → BN → ReLU → global
  pool → FC 128 → ReLU → FC; ``model.head="infopro"``), InfoPro's "greedy SL";
* ``dgl``: each module learns the cross-entropy of dibjax's convolutional head (maps pooled to at most 8×8, a
  3×3 convolution with 128 channels, BN, ReLU, global pool, linear), the DGL-style head of the ``dgl`` method;
* ``infopro``: InfoPro (Contrast), with their λ for ResNet-32 at this K (``LAMBDAS``, from their command list)
  and linear probes reporting each module's accuracy.

The modules are InfoPro's cut points (``model.split="groups"``). Every arm is scored on the test set with fixed
settings (nothing here is chosen on it). Finished runs are kept in ``--workdir`` and not rerun, so the comparison
can be stopped and continued.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import ml_collections

from dibjax import cli, config_lib, train

ARMS = ("sgd", "greedy_sl", "dgl", "infopro")
# (λ1 of the first module, λ1 of the (K−1)-th, λ2 of the first, λ2 of the (K−1)-th): --ixx_1, --ixx_2, --ixy_1,
# --ixy_2 of Wang et al.'s ResNet-32 CIFAR-10 commands (InfoPro-Pytorch, comand.sh).
LAMBDAS = {2: (5.0, 0.0, 1.0, 0.0), 4: (6.0, 1.0, 0.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0)}
# InfoPro (Contrast) / DGL / greedy SL / end to end, CIFAR-10 test error (%), ResNet-32 (their Table 2).
PUBLISHED_ERROR = {4: (8.58, 11.48, 16.07, 7.37), 8: (11.13, 14.17, 21.19, 7.37)}


def configure(arm: str, modules: int, args) -> ml_collections.ConfigDict:
    method = {"sgd": "sgd", "greedy_sl": "dgl", "dgl": "dgl", "infopro": "infopro"}[arm]
    config = config_lib.get_config("cifar10", f"cpu,{method}")
    config.model.name = "resnet32"
    config.model.width = args.width
    if arm != "sgd":
        config.model.split = "groups"
        config.model.num_groups = modules
    if arm == "greedy_sl":
        config.model.head = "infopro"
    if arm == "infopro":
        lambda_1_first, lambda_1_last, lambda_2_first, lambda_2_last = LAMBDAS[modules]
        config.objective.infopro.update(
            lambda_1_first=lambda_1_first,
            lambda_1_last=lambda_1_last,
            lambda_2_first=lambda_2_first,
            lambda_2_last=lambda_2_last,
        )
    config.train.num_epochs = args.epochs
    config.data.source = "npz"
    config.data.dir = args.data
    config.data.train_limit = args.train_limit
    config.train.progress = False
    return config


def run(arm: str, modules: int, seed: int, args) -> dict:
    name = "sgd" if arm == "sgd" else f"{arm}-k{modules}"
    size = f"-n{args.train_limit}" if args.train_limit else ""
    workdir = pathlib.Path(args.workdir) / f"resnet32-w{args.width}-e{args.epochs}{size}-{name}-s{seed}"
    summary_path = workdir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    config = configure(arm, modules, args)
    config.seed = seed
    return train.train_and_evaluate(config, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 npz folder (train.npz, test.npz)")
    parser.add_argument("--workdir", default="runs/modules")
    parser.add_argument("--modules", nargs="+", type=int, choices=sorted(LAMBDAS), default=[4, 8])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--width", type=int, default=8, help="channels of the first group (published: 16)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-limit", type=int, default=0, help="train on the first N images (0: all)")
    args = parser.parse_args()

    results: dict[tuple[str, int], list[dict]] = {}
    # Seeds outermost, so that a comparison stopped early has every arm at least once.
    for seed in args.seeds:
        for arm in args.arms:
            for modules in [1] if arm == "sgd" else args.modules:
                summary = run(arm, modules, seed, args)
                results.setdefault((arm, modules), []).append(summary)
                print(f"{arm} K={modules} seed {seed}: {summary['test_accuracy']:.4f}", file=sys.stderr, flush=True)

    print(f"\nResNet-32, width {args.width}, CIFAR-10 npz, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| arm | K | test accuracy | per seed (%) | module accuracy (%) | published error (%) | wall (s) |")
    print("|---|---:|---:|---|---|---:|---:|")
    for (arm, modules), runs in results.items():
        accuracies = [100 * r["test_accuracy"] for r in runs]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(runs) > 1 else ""
        per_seed = " / ".join(f"{a:.2f}" for a in accuracies)
        if runs[0].get("stage_accuracies"):
            per_stage = zip(*(r["stage_accuracies"] for r in runs), strict=True)
            stages = " / ".join(f"{100 * statistics.mean(column):.1f}" for column in per_stage)
        else:
            stages = "—"
        published = PUBLISHED_ERROR.get(modules, (7.37,) * 4)[("infopro", "dgl", "greedy_sl", "sgd").index(arm)]
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        row = f"| {arm} | {modules} | {statistics.mean(accuracies):.2f}%{spread} | {per_seed} | {stages} | "
        print(row + f"{published:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
