"""Training speed on the CPU: dibjax with and without keeping freed host memory, against PyTorch.

    python -m benchmarks.cpu_speed --rounds 3
    python -m benchmarks.cpu_speed --rounds 3 --torch-python /path/to/venv-with-torch/bin/python

Each round starts, one after another, ``python -m benchmarks.throughput --models small_cnn`` with freed host memory
kept in the process (:mod:`dibjax.host_memory`, what ``python -m dibjax.main`` does on CPU) and left to glibc, and,
when a Python with PyTorch is given, ``benchmarks/torch_small_cnn.py``: the allocator is a setting of the whole
process, so every variant runs in its own, and alternating them spreads the drift of a shared machine over all.
The table gives the median over rounds and ratios against PyTorch (or, without it, against glibc's default).
The dibjax step includes the on-device augmentation and metric sums; PyTorch's trains on one fixed batch.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(HERE), check=False)
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def dibjax_speeds(host_memory: str, steps: int) -> tuple[float, float]:
    """Images per second of the hand-written NNX loop and of dibjax's step, from one throughput run."""
    out = run(
        [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--models",
            "small_cnn",
            "--steps",
            str(steps),
            "--rounds",
            "1",
            "--host-memory",
            host_memory,
        ]
    )
    row = re.search(r"^\| small_cnn \| (\d+) \| (\d+) \|", out, re.M)
    return float(row.group(1)), float(row.group(2))


def torch_speed(python: str, steps: int) -> float:
    out = run([python, os.path.join(HERE, "torch_small_cnn.py"), "--steps", str(steps), "--rounds", "1"])
    return float(re.search(r"([\d.]+) img/s", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--torch-python", help="a Python interpreter with PyTorch installed")
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for host_memory in ("keep", "release"):
            hand, ours = dibjax_speeds(host_memory, args.steps)
            speeds.setdefault(f"hand-written NNX loop, freed host memory {host_memory}", []).append(hand)
            speeds.setdefault(f"dibjax train step, freed host memory {host_memory}", []).append(ours)
        if args.torch_python:
            speeds.setdefault("PyTorch (channels-last, oneDNN)", []).append(torch_speed(args.torch_python, args.steps))
    baseline_name = (
        "PyTorch (channels-last, oneDNN)" if args.torch_python else "dibjax train step, freed host memory release"
    )
    baseline = statistics.median(speeds[baseline_name])
    print(
        f"CPU speed, small CNN (`cpu` size), batch 128, {os.cpu_count()} CPU cores: median of {args.rounds} rounds of "
        f"{args.steps} steps, each variant in its own process"
    )
    print()
    print(f"| variant | images/s | rounds | / {baseline_name} |")
    print("|---|---:|---|---:|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {median / baseline:.2f} |")


if __name__ == "__main__":
    main()
