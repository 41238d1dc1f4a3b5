"""What an auxiliary head costs in time: every greedy stage's training step with each head, in one process.

    python -m benchmarks.head_speed                                   # the cpu protocol's small CNN, batch 128
    python -m benchmarks.head_speed --model resnet20 --heads conv128 conv128_pool8 stage_pool8 --stages 0 3 6

Every head of ``benchmarks.memory`` (``conv128``, ``conv128_pool8``, ``stage``, ``stage_pool8``, ``linear``) on the
same network, objective (``greedy_dib``'s defaults), optimizer and batches; the steps of the heads alternate in
rounds and the table gives the median step time over rounds, so that drift on a shared machine hits all alike,
and each step's ratio to the first head's. The sequential scheduler trains every stage for the same number of
epochs, so the last row, the sum over all the stages, is in proportion to a greedy run's training time.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.memory import HEADS
from benchmarks.objective_cost import random_batches, stage_step_seconds
from dibjax import cli, config_lib, data, train, trainer


def make_trainer(head: str, args) -> trainer.Trainer:
    config = config_lib.get_config("cifar10", "cpu,greedy_dib")
    config.model.name = args.model
    config.model.width = args.width
    if args.model != "small_cnn":
        config.model.split = "block"
    config.model.update(HEADS[head])
    config.train.batch_size = args.batch
    return trainer.Trainer(config, data.DATASETS["cifar10"], steps_per_epoch=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--width", type=int, default=0, help="base width; 0: the network's published one")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=["conv128", "conv128_pool8"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stages", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    trainers = {head: make_trainer(head, args) for head in args.heads}
    baseline = args.heads[0]
    stages = args.stages if args.stages is not None else list(range(trainers[baseline].num_stages))
    batches = random_batches(args.batch, args.steps)

    width = args.width or "published"
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, {args.model} width {width}, batch {args.batch}")
    print("(BLAS limited to one thread, as dibjax.train does on CPU; step time in ms, ratio to the first head)")
    print()
    print("| stage | " + " | ".join(args.heads) + " |")
    print("|---:|" + "---:|" * len(args.heads))
    sums = dict.fromkeys(args.heads, 0.0)
    for k in stages:
        times = stage_step_seconds(trainers, k, batches, args.rounds)
        for head in args.heads:
            sums[head] += times[head]
        cells = [f"{1e3 * times[h]:.1f} ({times[h] / times[baseline]:.2f})" for h in args.heads]
        print(f"| {k + 1} | " + " | ".join(cells) + " |", flush=True)
    cells = [f"{1e3 * sums[h]:.1f} ({sums[h] / sums[baseline]:.2f})" for h in args.heads]
    print(f"| sum of {'all stages' if args.stages is None else 'these stages'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with cli.errors_as_lines(), train.single_threaded_blas():
        main()
