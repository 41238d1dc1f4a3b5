"""Speed (and SLQ accuracy) of dibjax.entropy against baselines run in the same process.

    python -m benchmarks.entropy                  # full tables (several minutes on 2 CPU cores)
    python -m benchmarks.entropy --quick          # small sizes, a smoke run

Gram matrices come from real images: ``--data`` names a folder with ``train.npz``
(``image`` uint8 N×H×W×3), by default ``../shared/data/cifar10``; without it, patches of
matplotlib's sample photograph. Everything runs in float32. Times are medians over
``--repeats`` runs after a warm-up (compilation excluded), in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dibjax import cli
from dibjax import entropy as E

ALPHA = 1.01


def load_images(folder: str, count: int) -> tuple[np.ndarray, str]:
    path = os.path.join(folder, "train.npz")
    if os.path.exists(path):
        with np.load(path) as data:
            images = data["image"]
        order = np.random.default_rng(0).permutation(len(images))[:count]
        return images[order], f"{count} images from {os.path.normpath(os.path.relpath(path))}"
    from tests.reference import photo_patches

    return photo_patches(count, size=32), f"{count} patches of matplotlib's grace_hopper.jpg ({path} not found)"


def timed(fn, *args, repeats: int) -> float:
    """Median wall time in ms of fn(*args), results blocked on."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def numpy_entropy(A: np.ndarray, alpha: float = ALPHA) -> float:
    lam = np.clip(np.linalg.eigvalsh(A), 0, None)
    return float(np.log2(np.sum(lam**alpha)) / (1 - alpha))


def numpy_entropy_grad(A: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    lam, vec = np.linalg.eigh(A)
    lam = np.clip(lam, 0, None)
    power = (vec * lam ** (alpha - 1)) @ vec.T
    return alpha / ((1 - alpha) * math.log(2)) * power / np.sum(lam**alpha)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    sizes = [128, 256] if args.quick else [128, 256, 512, 1024, 2048]
    slq_sizes = [512] if args.quick else [2048, 4096]
    mi_sizes = [128] if args.quick else [128, 256, 512]
    images, source = load_images(args.data, max(sizes + slq_sizes))
    features = jnp.asarray(images.reshape(len(images), -1), jnp.float32) / 255
    print(
        f"dibjax.entropy benchmark: JAX {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores; data: {source}; float32; median of {args.repeats} runs"
    )

    gram = jax.jit(lambda x: E.normalize_gram(E.gram_matrix(x)))
    entropy = jax.jit(functools.partial(E.renyi_entropy, alpha=ALPHA))
    entropy_grad = jax.jit(jax.grad(functools.partial(E.renyi_entropy, alpha=ALPHA)))
    frobenius = jax.jit(functools.partial(E.renyi_entropy, alpha=2.0, method="frobenius"))
    eigh_2 = jax.jit(functools.partial(E.renyi_entropy, alpha=2.0, method="eigh"))

    rows, frob_rows = [], []
    for n in sizes:
        A = gram(features[:n])
        A_np = np.asarray(A)
        t_np = timed(numpy_entropy, A_np, repeats=args.repeats)
        t_jax = timed(entropy, A, repeats=args.repeats)
        t_np_grad = timed(numpy_entropy_grad, A_np, repeats=args.repeats)
        t_jax_grad = timed(entropy_grad, A, repeats=args.repeats)
        rows.append(
            [
                str(n),
                f"{t_np:.2f}",
                f"{t_jax:.2f}",
                f"{t_np / t_jax:.2f}",
                f"{t_np_grad:.2f}",
                f"{t_jax_grad:.2f}",
                f"{t_np_grad / t_jax_grad:.2f}",
            ]
        )
        t_frob = timed(frobenius, A, repeats=args.repeats)
        t_eigh2 = timed(eigh_2, A, repeats=args.repeats)
        frob_rows.append([str(n), f"{t_eigh2:.2f}", f"{t_frob:.3f}", f"{t_eigh2 / t_frob:.0f}"])
    table(
        f"renyi_entropy (α = {ALPHA}, jit) vs NumPy eigvalsh; its gradient vs NumPy eigh + V f'(Λ) Vᵀ"
        " (ms; ratio > 1: dibjax faster)",
        ["n", "NumPy S", "dibjax S", "ratio", "NumPy ∇S", "dibjax ∇S", "ratio"],
        rows,
    )
    table("α = 2: 'frobenius' vs 'eigh' (ms)", ["n", "eigh", "frobenius", "speed-up"], frob_rows)

    layers = 8
    mi_matrix = jax.jit(functools.partial(E.mutual_information_matrix, alpha=ALPHA))
    pairwise = jax.jit(functools.partial(E.mutual_information, alpha=ALPHA))
    single = jax.jit(functools.partial(E.renyi_entropy, alpha=ALPHA))

    def python_loop(stack):
        out = np.zeros((layers, layers))
        for i, j in itertools.product(range(layers), repeat=2):
            if i == j:
                out[i, i] = single(stack[i])
            elif i < j:
                out[i, j] = out[j, i] = pairwise(stack[i], stack[j])
        return out

    mi_rows = []
    for n in mi_sizes:
        # Eight "layers": the images and seven random nonlinear maps of them.
        keys = jax.random.split(jax.random.key(0), layers)
        x = features[:n]
        reps = [x] + [jnp.tanh(x @ jax.random.normal(k, (x.shape[1], 64)) / 30) for k in keys[1:]]
        stack = jnp.stack([gram(r) for r in reps])
        np.testing.assert_allclose(np.asarray(mi_matrix(stack)), python_loop(stack), rtol=2e-3, atol=2e-3)
        t_loop = timed(python_loop, stack, repeats=args.repeats)
        t_vmap = timed(mi_matrix, stack, repeats=args.repeats)
        mi_rows.append([str(n), f"{t_loop:.1f}", f"{t_vmap:.1f}", f"{t_loop / t_vmap:.2f}"])
    table(
        f"mutual_information_matrix, L = {layers} (ms)",
        ["n", "Python loop of pairwise calls", "batched", "speed-up"],
        mi_rows,
    )

    slq = jax.jit(lambda a, key: E.renyi_entropy(a, alpha=ALPHA, method="slq", key=key))
    slq_rows = []
    for n in slq_sizes:
        A = gram(features[:n])
        exact = float(entropy(A))
        t_eigh = timed(entropy, A, repeats=max(2, args.repeats // 2))
        t_slq = timed(slq, A, jax.random.key(0), repeats=args.repeats)
        errors = [abs(float(slq(A, jax.random.key(s))) - exact) / exact for s in range(10)]
        slq_rows.append(
            [
                str(n),
                f"{exact:.4f}",
                f"{t_eigh:.0f}",
                f"{t_slq:.0f}",
                f"{t_eigh / t_slq:.1f}",
                f"{100 * statistics.mean(errors):.2f}%",
                f"{100 * max(errors):.2f}%",
            ]
        )
    table(
        f"'slq' (16 probes, 12 Lanczos steps, deflation rank 64) vs 'eigh', α = {ALPHA};"
        " relative error over 10 keys (ms)",
        ["n", "S (eigh, bits)", "eigh", "slq", "speed-up", "mean error", "max error"],
        slq_rows,
    )


if __name__ == "__main__":
    with cli.errors_as_lines():
        main()
