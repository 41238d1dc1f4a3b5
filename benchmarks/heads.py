"""Which auxiliary head? Accuracy on a validation split against the memory of the largest greedy stage.

    python -m benchmarks.heads --data ../shared/data/cifar10                     # small CNN and ResNet-20
    python -m benchmarks.heads --data ../shared/data/cifar10 --models small_cnn --heads conv128 linear

Every head of ``benchmarks.memory`` (``conv128``, ``conv128_pool8``, ``stage``, ``stage_pool8``, ``linear``) trains
each network greedily (``cpu,greedy_dib``: the sequential scheduler, the default DIB objective; ResNet-20 one stage
per residual block) for ``--epochs`` epochs per stage on the training images minus ``--validation`` held-out ones,
and is scored on those held-out images (``config.data.validation_size``; the test set is not used). The table
gives the final accuracy (mean ± standard deviation over seeds), the per-stage head accuracies and the wall time
(means over seeds) and the compiled memory of the largest greedy stage's step (``train_step_peak_bytes`` of the
run's summary: the compiled estimate of the step the run trains with, on CPU the patches × kernel form;
``benchmarks.memory`` gives the native-convolution figures). Finished runs are kept in ``--workdir`` and not
rerun, so the comparison can be stopped and continued.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.dib_sweep import validation_run
from benchmarks.memory import HEADS
from dibjax import cli, config_lib


def run(model: str, head: str, seed: int, args) -> dict:
    def configure(config):
        config.model.name = model
        if model != "small_cnn":
            config.model.width = 0  # the published width
            config.model.split = "block"
        config.model.update(HEADS[head])

    return validation_run(f"{model}-{head}", seed, args, configure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="npz folder (train.npz, test.npz)")
    parser.add_argument("--dataset", default="cifar10", choices=config_lib.DATASETS)
    parser.add_argument("--workdir", default="runs/heads")
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet20"])
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    parser.add_argument("--validation", type=int, default=4000, help="training images held out for validation")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()

    rows = []
    for model in args.models:
        for head in args.heads:
            runs = [run(model, head, seed, args) for seed in args.seeds]
            print(f"{model} {head}: validation accuracy {[r['test_accuracy'] for r in runs]}", file=sys.stderr)
            rows.append((model, head, runs))

    print(
        f"\n{args.dataset}, greedy_dib (sequential), {args.epochs} epochs per stage, {args.validation} held-out "
        f"training images, seeds {args.seeds}\n"
    )
    print("| network | head | validation accuracy | head accuracy per stage (%) | wall (s) | largest stage (MiB) |")
    print("|---|---|---:|---|---:|---:|")
    for model, head, runs in rows:
        accuracy = statistics.mean(r["test_accuracy"] for r in runs)
        spread = f" ± {100 * statistics.stdev(r['test_accuracy'] for r in runs):.2f}" if len(runs) > 1 else ""
        per_stage = zip(*(r["stage_accuracies"] for r in runs), strict=True)
        stages = " / ".join(f"{100 * statistics.mean(a):.1f}" for a in per_stage)
        wall = statistics.mean(r["wall_seconds"] for r in runs)
        memory = max(r["train_step_peak_bytes"] for r in runs) / 2**20
        print(f"| {model} | {head} | {100 * accuracy:.2f}%{spread} | {stages} | {wall:.0f} | {memory:.0f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
