"""Does the full-size recipe train from its first epoch? First-epoch training loss with and without warm-up.

    python -m benchmarks.first_epoch --data ../shared/data/cifar10
    python -m benchmarks.first_epoch --data ../shared/data/cifar10 --models vgg11 --width 8 --train_limit 4096

For each network, the ``full`` configuration of ``sgd`` (end to end, SGD with Nesterov momentum, peak learning
rate 0.1, cosine schedule over the recipe's epochs) narrowed to ``--width`` channels is trained for one epoch on
the first ``--train_limit`` images, once with the recipe's warm-up (``optimizer.warmup_epochs``) and once without
it, from the same initial state and batches. The table gives the mean training loss of that epoch against
chance, ``ln 10`` nats for 10 classes.
"""

from __future__ import annotations

import argparse
import math

import jax

from dibjax import cli, config_lib, data, trainer


def first_epoch_loss(config, train_ds, info) -> float:
    steps = data.steps_per_epoch(len(train_ds), config.train.batch_size)
    run = trainer.Trainer(config, info, steps)
    state = run.create_state()
    batches = data.train_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=1)
    totals = None
    for batch in batches:
        batch = run.shard(batch, config.train.batch_size)
        if totals is None:
            totals = run.zero_totals(0, state, batch)
        state, totals, _ = run.train_steps[0](state, totals, batch)
    # End to end, the network's classifier is the last stage's head.
    return float(jax.device_get(totals["loss"])[run.num_stages - 1]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with CIFAR-10 train.npz and test.npz")
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--train_limit", type=int, default=4096)
    args = parser.parse_args()

    recipe = config_lib.get_config("cifar10", "full,sgd")
    print(
        f"first epoch: JAX {jax.__version__} on {jax.devices()[0].device_kind}; full,sgd at width {args.width}, "
        f"{args.train_limit} CIFAR-10 images, batch {recipe.train.batch_size}, peak learning rate "
        f"{recipe.optimizer.learning_rate}, {recipe.train.num_epochs} epochs"
    )
    print()
    print(f"| model | no warm-up | warm-up {recipe.optimizer.warmup_epochs:g} epochs | chance (ln 10) |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        losses = []
        for warmup in (0, recipe.optimizer.warmup_epochs):
            config = config_lib.get_config("cifar10", "full,sgd")
            config.model.name = name
            config.model.width = args.width
            config.data.source = "npz"
            config.data.dir = args.data
            config.data.train_limit = args.train_limit
            config.optimizer.warmup_epochs = warmup
            train_ds, _, info = data.load(config.data)
            losses.append(first_epoch_loss(config, train_ds, info))
        print(f"| {name} | {losses[0]:.3f} | {losses[1]:.3f} | {math.log(10):.3f} |", flush=True)


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
