"""Training throughput of dibjax's train step against a minimal hand-written Flax/optax loop.

    python -m benchmarks.throughput                 # small CNN and VGG-11, batch 128
    python -m benchmarks.throughput --models small_cnn --steps 5

Both loops train the same model (``dibjax.models``) with the same optimizer, the same on-device
augmentation and normalisation, on the same batches. The hand-written loop is the textbook NNX
one (``nnx.Optimizer`` + ``nnx.jit``); dibjax's step adds what the trainer needs (a functional
state that orbax checkpoints, the batch sharded over a device mesh, the non-finite-loss guard,
on-device metric sums). The two alternate in rounds and the table gives the median over rounds,
so that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dibjax import cli, config_lib, data, host_memory, models, optim, streams, trainer

WIDTHS = {"small_cnn": 32, "vgg11": 64}


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        idx = rng.choice(len(images), batch_size, replace=False)
        out.append({"image": images[idx], "label": labels[idx].astype(np.int32)})
    return out


def hand_written(config, info, steps_per_epoch):
    """The textbook NNX training step for the same model and optimizer."""
    rngs = nnx.Rngs(streams.init_key(config.seed))
    model = models.build_model(config_lib.model_fields(config), info.num_classes, rngs)
    learning_rate = optim.learning_rate_schedule(
        config, steps_per_epoch, config.train.num_epochs, config.optimizer.learning_rate
    )
    tx = optim.make_optimizer(config, learning_rate)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels, key):
        images = data.normalize(data.augment(images, key, crop_padding=4, flip=info.flip), info)

        def loss_fn(model):
            logits = model(images)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(1)

    def run(batch, i):
        return step(model, optimizer, batch["image"], batch["label"], jax.random.fold_in(key, i))

    return run


def dibjax_step(config, info, steps_per_epoch):
    run_trainer = trainer.Trainer(config, info, steps_per_epoch)
    state = {"value": run_trainer.create_state(), "totals": None}

    def run(batch, i):
        sharded = run_trainer.shard(batch, len(batch["label"]))
        if state["totals"] is None:
            state["totals"] = run_trainer.zero_totals(0, state["value"], sharded)
        state["value"], state["totals"], _ = run_trainer.train_steps[0](state["value"], state["totals"], sharded)
        return state["totals"]["loss"]

    return run


def images_per_second(run, batch_list, batch_size) -> float:
    jax.block_until_ready(run(batch_list[0], 0))  # compile
    start = time.perf_counter()
    out = None
    for i, batch in enumerate(batch_list):
        out = run(batch, i)
    jax.block_until_ready(out)
    return len(batch_list) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")
    parser.add_argument("--data", default=default_data)
    parser.add_argument("--models", default="small_cnn,vgg11")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--host-memory",
        choices=("keep", "release"),
        default="keep",
        help="keep freed host memory in the process, as `python -m dibjax.main` does on CPU (dibjax.host_memory), "
        "or leave glibc's malloc as it is",
    )
    args = parser.parse_args()
    if args.host_memory == "keep":
        host_memory.keep_freed_memory()

    path = os.path.join(args.data, "train.npz")
    if os.path.exists(path):
        with np.load(path) as npz:
            images, labels = npz["image"][:4096], npz["label"][:4096]
        source = os.path.normpath(os.path.relpath(path))
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 1024)
        source = f"random images ({path} not found)"
    info = data.DATASETS["cifar10"]
    print(
        f"throughput benchmark: JAX {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, "
        f"{jax.device_count()} device(s); data: {source}; batch {args.batch_size}; {args.steps} steps x {args.rounds} "
        f"rounds; freed host memory: {args.host_memory}"
    )
    print()
    print("| model | hand-written NNX loop (img/s) | dibjax train step (img/s) | dibjax / hand-written |")
    print("|---|---:|---:|---:|")
    for name in args.models.split(","):
        config = config_lib.get_config("cifar10", "cpu,sgd")
        config.model.name = name
        config.model.width = WIDTHS.get(name, 0)
        config.model.split = "block"
        config.train.batch_size = args.batch_size
        batch_list = batches(images, labels, args.batch_size, args.steps)
        runs = {"hand": hand_written(config, info, 100), "dibjax": dibjax_step(config, info, 100)}
        speeds = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                speeds[key].append(images_per_second(run, batch_list, args.batch_size))
        hand, ours = statistics.median(speeds["hand"]), statistics.median(speeds["dibjax"])
        print(f"| {name} | {hand:.0f} | {ours:.0f} | {ours / hand:.3f} |")


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
