"""Peak memory of one training step: every greedy stage against end-to-end backpropagation, per head.

    python -m benchmarks.memory                                          # the table of docs/benchmarks.md
    python -m benchmarks.memory --networks resnet56:block --heads stage_pool8 --batches 128

For each network (``model:split``, where split is ``layer``, ``block``, ``groups=K`` for K modules of as many
units as can be, or ``activations=K`` for K modules balanced by their activations) the script
builds the ``sgd`` configuration (end to end, the network's linear classifier) and the ``greedy_dib`` one (the
sequential scheduler, the DIB objective) with each auxiliary head of ``--heads``:

* ``conv128``: conv 3×3 with 128 channels at the stage's resolution → BatchNorm → ReLU → pool to 2×2 → linear;
* ``conv128_pool8``: that, after average-pooling maps larger than 8×8 to 8×8 (``model.head_pool=8``);
* ``stage``: the conv head with as many channels as the stage (``model.head_width=0``);
* ``stage_pool8``: that, after average-pooling maps larger than 8×8 to 8×8 (``model.head_pool=8``);
* ``linear``: global average pooling and one linear layer (``model.head="linear"``).

It compiles the training step of every sequential phase and the end-to-end step, and prints XLA's compiled memory
analysis of each (arguments + outputs + temporaries − donated buffers): the whole training state (every stage's
parameters, BatchNorm statistics and optimizer state) plus what the step keeps alive for its backward pass.
Nothing is run, so the figures come from the compiler alone; the convolutions are compiled as XLA's native
convolution, the one accelerators run (on CPU dibjax trains with a patches × kernel form whose 9× larger patch
matrices would dominate).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from dibjax import cli, config_lib, data, models, trainer

MB = 2**20
HEADS = {
    "conv128": {"head": "conv", "head_width": 128, "head_pool": 0},
    "conv128_pool8": {"head": "conv", "head_width": 128, "head_pool": 8},
    "stage": {"head": "conv", "head_width": 0, "head_pool": 0},
    "stage_pool8": {"head": "conv", "head_width": 0, "head_pool": 8},
    "linear": {"head": "linear"},
}
NETWORKS = ["vgg11:layer", "resnet18:block", "resnet56:block", "resnet110:groups=2", "resnet110:groups=4"]
NETWORKS += ["resnet110:groups=8"]


def parse_network(spec: str) -> dict:
    name, _, split = spec.partition(":")
    fields = {"name": name, "width": 0, "split": split or "layer", "num_groups": 0}
    for split in ("groups", "activations"):
        if fields["split"].startswith(f"{split}="):
            fields["split"], fields["num_groups"] = split, int(fields["split"].removeprefix(f"{split}="))
    return fields


def phase_peaks(method: str, model_fields: dict, batch: int) -> list[int]:
    config = config_lib.get_config("cifar10", method)
    config.model.update(model_fields)
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


def shown(stages: list[int]) -> str:
    if len(stages) <= 9:
        return " / ".join(f"{p / MB:.0f}" for p in stages)
    return f"{min(stages) / MB:.0f} … {max(stages) / MB:.0f} ({len(stages)} stages)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=NETWORKS, help="model:split, split layer, block or groups=K")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 1024])
    args = parser.parse_args()

    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; compiled peak memory of one training step, MiB")
    print()
    print(
        "| network | split | head | batch | end to end | greedy stages (1 … L) | largest stage | largest / end to end |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|")
    for spec in args.networks:
        fields = parse_network(spec)
        split = {"groups": f"K = {fields['num_groups']}", "activations": f"K = {fields['num_groups']}, activations"}
        split = split.get(fields["split"], fields["split"])
        for batch in args.batches:
            # End to end, the network's own classifier is the only head: one figure for every head of the table.
            (e2e,) = phase_peaks("sgd", {**fields, "split": "layer", "num_groups": 0}, batch)
            for head in args.heads:
                stages = phase_peaks("greedy_dib", {**fields, **HEADS[head]}, batch)
                largest = max(stages)
                print(
                    f"| {fields['name']} | {split} | {head} | {batch} | {e2e / MB:.0f} | {shown(stages)} | "
                    f"{largest / MB:.0f} | {largest / e2e:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
