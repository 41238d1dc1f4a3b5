"""What the information terms cost: a greedy stage's step with the DIB objective against the same step with CE.

    python -m benchmarks.objective_cost                       # the small CNN (cpu size), every stage, batch 128
    python -m benchmarks.objective_cost --model vgg11 --width 64 --stages 0 3 7

Both steps train the same stage with the same head, optimizer, augmentation and batches; only the objective
differs (``ce``, or ``dib`` with the default settings of ``configs/*.py``, which can be changed with
``--compression``, ``--pool``, ``--gamma``). The two alternate in rounds and the table gives the median step time
over rounds, so that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from dibjax import cli, config_lib, data, train, trainer


def make_trainer(objective: str, args) -> trainer.Trainer:
    config = config_lib.get_config("cifar10", "cpu,greedy_dib")
    config.model.name = args.model
    config.model.width = args.width
    config.train.batch_size = args.batch
    config.objective.name = objective
    config.objective.dib.compression = args.compression
    config.objective.dib.pool = args.pool
    config.objective.dib.gamma = args.gamma
    return trainer.Trainer(config, data.DATASETS["cifar10"], steps_per_epoch=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stages", nargs="+", type=int, default=None)
    parser.add_argument("--compression", default="entropy")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    trainers = {name: make_trainer(name, args) for name in ("ce", "dib")}
    stages = args.stages if args.stages is not None else list(range(trainers["ce"].num_stages))
    batches = random_batches(args.batch, args.steps)

    print(
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, {args.model} width {args.width}, batch {args.batch}"
    )
    print(f"dib: compression {args.compression}, pool {args.pool}, gamma {args.gamma}")
    print()
    print("(BLAS limited to one thread, as dibjax.train does on CPU)")
    print()
    print("| stage | ce step (ms) | dib step (ms) | dib / ce |")
    print("|---:|---:|---:|---:|")
    for k in stages:
        times = stage_step_seconds(trainers, k, batches, args.rounds)
        ce, dib = (times[name] * 1e3 for name in ("ce", "dib"))
        print(f"| {k} | {ce:.1f} | {dib:.1f} | {dib / ce:.3f} |", flush=True)


def random_batches(batch_size: int, count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
        for _ in range(count)
    ]


def stage_step_seconds(trainers: dict[str, trainer.Trainer], k: int, batches: list[dict], rounds: int) -> dict:
    """The median over ``rounds`` of each trainer's mean time per step of stage ``k``'s training step; the trainers
    alternate within every round, so that drift on a shared machine hits them alike."""
    steps, states = {}, {}
    for name, stage_trainer in trainers.items():
        states[name] = stage_trainer.create_state()
        sharded = [stage_trainer.shard(b, len(b["label"])) for b in batches]
        totals = stage_trainer.zero_totals(k, states[name], sharded[0])
        compiled = stage_trainer.train_steps[k].lower(states[name], totals, sharded[0]).compile()
        steps[name] = (compiled, sharded)
        states[name] = compiled(states[name], totals, sharded[0])[:2]  # warm-up
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name in trainers:
            step, sharded = steps[name]
            state, totals = states[name]
            jax.block_until_ready(state)
            start = time.perf_counter()
            for batch in sharded:
                state, totals, _ = step(state, totals, batch)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / len(sharded))
            states[name] = state, totals
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    with cli.errors_as_lines(), train.single_threaded_blas():
        main()
