"""Independent NumPy float64 implementation of the matrix-based Rényi functional.

Written from the conventions in the dibjax.entropy docstring, with none of its code:
distances by explicit differences, eigenvalues by numpy.linalg.eigvalsh, gradients by
the closed form ∂S/∂A = α / ((1-α) ln b) · A^(α-1) / tr(A^α).
"""

import math

import matplotlib.cbook
import matplotlib.image
import numpy as np


def sq_distances(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def median_sigma(x):
    d = np.sqrt(sq_distances(x))
    return np.median(d[np.triu_indices(len(d), 1)]) / math.sqrt(2)


def gaussian_gram(x, sigma):
    return np.exp(-sq_distances(x) / (2 * sigma**2))


def normalize(K):
    d = np.sqrt(np.diag(K))
    return K / (len(K) * np.outer(d, d))


def kept_eigen(A, alpha, tol_dtype=np.float64):
    lam, vec = np.linalg.eigh(np.asarray(A, np.float64))
    if alpha <= 1:
        keep = lam > len(lam) * np.finfo(tol_dtype).eps * lam.max()
    else:
        keep = lam > 0
    return lam[keep], vec[:, keep]


def entropy(A, alpha, base=2.0, tol_dtype=np.float64):
    lam, _ = kept_eigen(A, alpha, tol_dtype)
    if alpha == 1:
        return -np.sum(lam * np.log(lam)) / math.log(base)
    return np.log(np.sum(lam**alpha)) / ((1 - alpha) * math.log(base))


def joint(*mats, alpha, tol_dtype=np.float64):
    prod = np.ones_like(np.asarray(mats[0], np.float64))
    for m in mats:
        prod = prod * np.asarray(m, np.float64)
    return entropy(prod / np.trace(prod), alpha, tol_dtype=tol_dtype)


def mutual_information(A, B, alpha, tol_dtype=np.float64):
    return (
        entropy(A, alpha, tol_dtype=tol_dtype)
        + entropy(B, alpha, tol_dtype=tol_dtype)
        - joint(A, B, alpha=alpha, tol_dtype=tol_dtype)
    )


def entropy_gradient(A, alpha, base=2.0):
    """Closed-form ∂S_α/∂A on the kept eigenspace (the documented guard)."""
    lam, vec = kept_eigen(A, alpha)
    if alpha == 1:
        return (vec * -(np.log(lam) + 1)) @ vec.T / math.log(base)
    power = (vec * lam ** (alpha - 1)) @ vec.T
    return alpha / ((1 - alpha) * math.log(base)) * power / np.sum(lam**alpha)


def photo_patches(n, size=8, seed=0):
    """n real-image patches (size x size x 3, uint8) cut from matplotlib's sample photograph."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        image = matplotlib.image.imread(f, format="jpg")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, image.shape[0] - size, n)
    cols = rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)])
