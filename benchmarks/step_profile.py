"""Where the time of one CPU training step goes: XLA's operations, grouped by kind, from a JAX profiler trace.

    python -m benchmarks.step_profile                        # small CNN, batch 128, freed host memory kept
    python -m benchmarks.step_profile --host-memory release --threads 1

Traces a few steps of dibjax's train step (`cpu` small CNN, `sgd`) and prints, per kind of XLA operation (the name
of a thunk without its number: ``ynn_fusion`` for the YNNPACK matrix products, ``dot`` for Eigen's, ``concatenate``
for the 3×3 patches of the CPU convolutions, loop fusions for BatchNorm, ReLU, pooling and their gradients), its
milliseconds per step and share of the total. With two threads, operations overlap, so the shares are of the summed
operation time rather than of the wall time; ``--threads 1`` (the process pinned to one core) gives a serial
account. Also prints the wall time and the minor page faults of an untraced step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--host-memory", choices=("keep", "release"), default="keep")
    parser.add_argument("--threads", type=int, choices=(1, 2), default=2, help="1: pin the process to one core")
    parser.add_argument("--top", type=int, default=15, help="rows of the table")
    args = parser.parse_args()
    if args.threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from dibjax import host_memory

    if args.host_memory == "keep":
        host_memory.keep_freed_memory()
    import jax

    from benchmarks.throughput import dibjax_step
    from dibjax import config_lib, data

    config = config_lib.get_config("cifar10", "cpu,sgd")
    config.train.batch_size = args.batch_size
    info = data.DATASETS["cifar10"]
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
    }
    run = dibjax_step(config, info, 100)
    for i in range(10):  # compiles, then lets the heap grow to what a step needs
        jax.block_until_ready(run(batch, i))
    # Wall time and page faults are measured untraced: the profiler allocates memory of its own.
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for i in range(args.steps):
        out = run(batch, i)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - start) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for i in range(args.steps):
                out = run(batch, i)
            jax.block_until_ready(out)
        (path,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_kind = collections.Counter()
    for event in events:
        name = event.get("name", "")
        # Thunks are XLA's operations; the executor's own spans and Python's are the frames around them.
        if event.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "end: ")) or "::" in name:
            continue
        if not re.match(r"^[a-z_]+(\.\d+)?$", name):
            continue
        per_kind[re.sub(r"\.\d+$", "", name)] += event["dur"] / 1000 / args.steps
    total = sum(per_kind.values())
    print(
        f"step profile: JAX {jax.__version__}, small CNN (`cpu` size), batch {args.batch_size}, {args.threads} "
        f"thread(s), freed host memory {args.host_memory}: {wall * 1000:.0f} ms per untraced step, "
        f"{faults:.0f} minor page faults per step"
    )
    print()
    print("| XLA operation kind | ms per step | share |")
    print("|---|---:|---:|")
    for kind, ms in per_kind.most_common(args.top):
        print(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")
    rest = total - sum(ms for _, ms in per_kind.most_common(args.top))
    print(f"| other | {rest:.1f} | {rest / total:.0%} |")
    print(f"| sum of operations | {total:.1f} | |")


if __name__ == "__main__":
    main()
