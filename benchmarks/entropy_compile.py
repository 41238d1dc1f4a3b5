"""Compile time and program size of the median kernel width, against the upper-triangle index form it replaced.

    python -m benchmarks.entropy_compile                    # n = 256, 1024, 2048; feature dimension 64
    python -m benchmarks.entropy_compile --sizes 256 --repeats 1     # a smoke run

``kernel_width(x)`` (median rule) is lowered and compiled with ``jax.jit`` for each batch size ``n``. The baseline,
run in the same process, is the former implementation, reimplemented here: it gathered the ``n(n-1)/2`` distances
above the diagonal with ``np.triu_indices(n, 1)``, whose two index arrays become constants in the program. The
current one gathers them with indices computed from iota (each row rotated, half the columns kept), with no index
constant. Both must return the same width (checked). Reported: the StableHLO text size
of the lowered program, the wall time of lowering plus compiling (median over ``--repeats`` fresh functions; the
persistent compilation cache is off) and the run time of the compiled function (median of ``--repeats`` runs after
a warm-up), float32.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dibjax import cli
from dibjax import entropy as E


def old_kernel_width(x):
    """The former median rule of ``kernel_width``: distances, the upper triangle by index, median, fallback."""
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    x = x - jnp.mean(x, axis=0)
    sq_norms = jnp.sum(x * x, axis=1)
    inner = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * inner, 0)
    distances = jnp.sqrt(jnp.where(jnp.eye(n, dtype=bool), 0, sq_dist))
    off_diagonal = distances[np.triu_indices(n, 1)]
    count = off_diagonal.shape[0]
    upper = E._kth_smallest_nonnegative(off_diagonal, count // 2)
    median = upper if count % 2 else (E._kth_smallest_nonnegative(off_diagonal, count // 2 - 1) + upper) / 2
    sigma = median / math.sqrt(2)
    mean_distance = jnp.mean(off_diagonal)
    sigma = jnp.where(sigma > 0, sigma, mean_distance)
    return jax.lax.stop_gradient(jnp.where(sigma > 0, sigma, jnp.ones_like(sigma)))


def new_kernel_width(x):
    return E.kernel_width(x)


def measure(fn, x, repeats: int) -> tuple[int, float, float, float]:
    """HLO text bytes, lower + compile seconds (median), run milliseconds (median), and the value."""
    compile_times = []
    for _ in range(repeats):
        jitted = jax.jit(lambda v: fn(v))  # a fresh function: no in-memory cache hit
        start = time.perf_counter()
        lowered = jitted.lower(x)
        compiled = lowered.compile()
        compile_times.append(time.perf_counter() - start)
    size = len(lowered.as_text().encode())
    value = float(jax.block_until_ready(compiled(x)))
    run_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x))
        run_times.append(time.perf_counter() - start)
    return size, statistics.median(compile_times), 1e3 * statistics.median(run_times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--dim", type=int, default=64, help="feature dimension")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)

    print(
        f"kernel_width compile benchmark: JAX {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores; median width of (n, {args.dim}) float32 normal samples; "
        f"median of {args.repeats} compilations"
    )
    print()
    print(
        "| n | HLO text, triu indices (KB) | HLO text, iota gather (KB) | triu / iota "
        "| compile, triu indices (s) | compile, iota gather (s) | triu / iota "
        "| run, triu indices (ms) | run, iota gather (ms) | triu / iota |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        x = jnp.asarray(np.random.default_rng(n).normal(size=(n, args.dim)), jnp.float32)
        old_size, old_compile, old_run, old_value = measure(old_kernel_width, x, args.repeats)
        new_size, new_compile, new_run, new_value = measure(new_kernel_width, x, args.repeats)
        if old_value != new_value:
            raise AssertionError(f"n = {n}: the widths differ, {old_value!r} (triu) against {new_value!r}")
        print(
            f"| {n} | {old_size / 1e3:.0f} | {new_size / 1e3:.0f} | {old_size / new_size:.0f} "
            f"| {old_compile:.2f} | {new_compile:.2f} | {old_compile / new_compile:.2f} "
            f"| {old_run:.1f} | {new_run:.1f} | {old_run / new_run:.2f} |"
        )


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
