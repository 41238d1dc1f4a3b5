"""What JAX's persistent compilation cache saves a rerun: the same run with an empty cache, then with a full one.

    python -m benchmarks.compile_cache --data ../shared/data/cifar10
    python -m benchmarks.compile_cache --data ../shared/data/cifar10 --variant cpu,sgd --epochs 1

Each run is ``python -m dibjax.main`` in a fresh process with ``--compilation_cache_dir`` pointing to a new
folder: the first fills it, the second (in another workdir, so it trains from scratch again) reads it. The table
gives, per run, the seconds the console reports for compiling the training steps, and the process's wall time
(start-up, data, model construction, training and evaluation included). A sequential (greedy) run compiles one
training step per stage, each of which the cache keeps.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def run(args: argparse.Namespace, workdir: str, cache: str) -> tuple[float, float]:
    command = [
        sys.executable,
        "-m",
        "dibjax.main",
        f"--config=configs/cifar10.py:{args.variant}",
        f"--workdir={workdir}",
        "--config.data.source=npz",
        f"--config.data.dir={args.data}",
        f"--config.data.train_limit={args.train_limit}",
        f"--config.train.num_epochs={args.epochs}",
        "--config.train.checkpoint=False",
        f"--compilation_cache_dir={cache}",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"run failed:\n{result.stderr[-3000:]}")
    compile_seconds = sum(float(s) for s in re.findall(r"^compiled in ([\d.]+) s", result.stdout, re.MULTILINE))
    return compile_seconds, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with CIFAR-10 train.npz and test.npz")
    parser.add_argument("--variant", default="cpu,greedy_dib")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    parser.add_argument("--train_limit", type=int, default=1024)
    args = parser.parse_args()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        sys.exit("unset JAX_COMPILATION_CACHE_DIR: it would override the cache this benchmark sets")
    with tempfile.TemporaryDirectory() as scratch:
        cache = os.path.join(scratch, "cache")
        cold = run(args, os.path.join(scratch, "first"), cache)
        warm = run(args, os.path.join(scratch, "second"), cache)
    print(f"compilation cache: {args.variant}, {args.epochs} epoch(s) per stage, {args.train_limit} training images")
    print()
    print("| run | training-step compilation (s) | wall time (s) |")
    print("|---|---:|---:|")
    print(f"| empty cache | {cold[0]:.1f} | {cold[1]:.1f} |")
    print(f"| full cache | {warm[0]:.1f} | {warm[1]:.1f} |")
    print(f"| full / empty | {warm[0] / cold[0]:.3f} | {warm[1] / cold[1]:.3f} |")


if __name__ == "__main__":
    main()
