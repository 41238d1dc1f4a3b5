"""Peak memory of one training step: every greedy stage against end-to-end backpropagation.

    python -m benchmarks.memory                        # VGG-11 and ResNet-18, batch 128 and 1024
    python -m benchmarks.memory --models vgg11 --batches 128

For each network the script builds the ``greedy_dib`` configuration (one stage per layer, convolutional auxiliary
heads, the DIB objective) and the ``sgd`` one (end to end, the network's linear classifier), compiles the training
step of every sequential phase and the end-to-end step, and prints XLA's compiled memory analysis of each (arguments
+ outputs + temporaries − donated buffers): the whole training state (every stage's parameters, BatchNorm
statistics and optimizer state) plus what the step keeps alive for its backward pass. Nothing is run, so the
figures come from the compiler alone; the convolutions are compiled as XLA's native convolution, the one
accelerators run (on CPU dibjax trains with a patches × kernel form whose 9× larger patch matrices would dominate).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from dibjax import config_lib, data, models, trainer

MB = 2**20


def phase_peaks(method: str, model: str, batch: int) -> list[int]:
    config = config_lib.get_config("cifar10", method)
    config.model.name = model
    config.model.width = 0
    config.train.batch_size = batch
    run_trainer = trainer.Trainer(config, data.DATASETS["cifar10"], steps_per_epoch=100)
    state = run_trainer.abstract_state()
    sample = {
        "image": jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    peaks = []
    for index, step in enumerate(run_trainer.train_steps):
        totals = jax.eval_shape(functools.partial(run_trainer.zero_totals, index), state, sample)
        with models.native_convolutions():
            compiled = step.lower(state, totals, sample).compile()
        peaks.append(run_trainer.peak_memory_bytes(compiled))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg11", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 1024])
    args = parser.parse_args()

    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; compiled peak memory of one training step, MiB")
    print()
    print("| network | batch | end to end | greedy stages (1 … L) | largest stage | largest / end to end |")
    print("|---|---:|---:|---|---:|---:|")
    for model in args.models:
        for batch in args.batches:
            (e2e,) = phase_peaks("sgd", model, batch)
            stages = phase_peaks("greedy_dib", model, batch)
            largest = max(stages)
            shown = " / ".join(f"{p / MB:.0f}" for p in stages)
            print(
                f"| {model} | {batch} | {e2e / MB:.0f} | {shown} | {largest / MB:.0f} | {largest / e2e:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
