"""Matrix-based Rényi α-order entropy, joint entropy and mutual information in JAX.

This module implements the entropy functional of Sánchez Giraldo, Rao & Príncipe,
*Measures of Entropy From Data Using Infinitely Divisible Kernels*, IEEE Trans.
Information Theory 61(1), 2015, and the multivariate (joint) extension of Yu, Sánchez
Giraldo, Jenssen & Príncipe, *Multivariate Extension of Matrix-based Rényi's α-order
Entropy Functional*, IEEE TPAMI 42(11), 2020. It imports only JAX, NumPy and matfree,
so it can be used on its own.

Conventions (part of the public API)
------------------------------------
For a batch of ``n`` samples ``x_1 .. x_n`` (any shape; flattened per sample):

* Gaussian kernel ``K_ij = exp(-||x_i - x_j||^2 / (2 σ^2))``; linear kernel
  ``K_ij = x_i · x_j``; label kernel ``K_ij = [y_i == y_j]``.
* Normalisation ``A_ij = K_ij / (n sqrt(K_ii K_jj))``, so ``tr(A) = 1``.
* Entropy ``S_α(A) = 1/(1-α) log_b(Σ_i λ_i(A)^α)`` in bits by default (``b = 2``);
  ``α = 1`` is the von Neumann limit ``-Σ λ log_b λ``; ``α = 2`` is exactly
  ``-log_b ||A||_F^2``.
* Joint entropy ``S_α(A_1, .., A_k) = S_α(A_1 ∘ .. ∘ A_k / tr(A_1 ∘ .. ∘ A_k))``.
* Mutual information ``I_α(A; B) = S_α(A) + S_α(B) - S_α(A, B)``; conditional entropy
  ``S_α(A | B) = S_α(A, B) - S_α(B)``.
* A width chosen by a rule (``sigma=None``) is wrapped in ``jax.lax.stop_gradient``.
* ``renyi_entropy`` requires ``tr(A) = 1`` (see *Unit trace* below); ``α`` is a keyword-only
  argument of every function (``renyi_entropy(A, alpha=2.0)``).

Shapes, dtypes and devices
--------------------------
* The entropy functions take ``(..., n, n)`` matrices, as ``jnp.linalg`` does, and return
  an array of shape ``...``; the sample functions (``gram_matrix``, ...) take one batch
  ``(n, ...)``.
* Half-precision inputs (float16, bfloat16, or any floating type narrower than float32)
  are computed in float32; results are float32. Gradients flow back in the input's dtype.
  Integer and bool samples are computed in the default floating dtype.
* Samples (or matrices) sharded over an explicit-axes mesh axis are gathered before the
  ``(n, n)`` matrix is formed: every entry pairs two samples, and the result would have to
  be sharded twice over one mesh axis, which explicit sharding refuses. Under an automatic
  (``Auto``) mesh the compiler partitions the computation as it sees fit. Either way the
  values are those of the unsharded computation.

Converting numbers from other implementations: some write the Gaussian kernel as
``exp(-d^2 / s)`` (for instance the yuxi120407/DIB code, with ``s = σ_dib^2``), so their
``s`` is our ``2 σ^2``; others as ``exp(-d^2 / σ^2)`` (our σ times √2). Entropies in nats
are ours times ``ln 2`` (or pass ``base=math.e``). Normalising by ``tr(K)`` instead of
``n sqrt(K_ii K_jj)`` is the same for the Gaussian kernel, whose diagonal is 1.

Unit trace
----------
The functional is defined for unit-trace matrices. For ``t = tr(A) ≠ 1``,
``S_α(A) = S_α(A/t) + α/(1-α) log_b t`` (``t S_1(A/t) - t log_b t`` at ``α = 1``): a
plausible-looking but wrong number. ``renyi_entropy`` therefore checks
``|tr(A) - 1| <= sqrt(eps)``, ``eps`` of ``A``'s dtype (before any upcast of a
half-precision ``A``): on concrete input a violation raises ``ValueError``; under tracing
(``jit``, ``vmap``, ``grad``) the result is NaN, by the policy below. Normalise with
:func:`normalize_gram`; the joint quantities normalise their Hadamard product themselves.

Numerical guards
----------------
* Eigenvalues of a normalised Gram matrix are non-negative in exact arithmetic; rounding
  makes some slightly negative. They are clamped to 0.
* For ``α <= 1`` the derivative of ``λ^α`` (or of ``-λ log λ``) is infinite at ``λ = 0``,
  so the exact gradient of a singular matrix does not exist and a rounding-level
  eigenvalue would produce an arbitrarily large one. Eigenvalues at or below the
  numerical-rank tolerance ``τ = n · eps(dtype) · λ_max`` are therefore treated as exactly
  zero in the value and in the gradient: the functional is evaluated on the numerical
  range of ``A``. For ``α > 1`` no tolerance is needed (the derivative is 0 at 0).
* Gradients are taken in closed form: ``Σ_i f(λ_i)`` is a spectral function whose
  gradient is ``V f'(Λ) Vᵀ``, well defined for repeated eigenvalues, with the guard above
  applied to ``f'``. (Differentiating ``λ^α`` through ``eigvalsh`` gives NaN as soon as
  an eigenvalue is exactly 0 and α < 1, as for duplicated samples.)
* A failed eigendecomposition (JAX reports it as NaN, without an exception) and NaN/Inf
  inputs always give a NaN result, never a plausible number. To get an exception
  instead, run the computation under ``jax.experimental.checkify`` with
  ``checkify.float_checks``, or wrap it with :func:`checked`.
* Pairwise distances are computed from centred samples with
  ``precision=jax.lax.Precision.HIGHEST``, so TPU (bf16) and A100 (TF32) matmul defaults
  do not corrupt them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import PartitionSpec

KERNELS = ("gaussian", "linear")
WIDTH_RULES = ("median", "silverman", "knn", "dib")
METHODS = ("auto", "eigh", "frobenius", "slq")

_HIGHEST = jax.lax.Precision.HIGHEST

Array = jax.Array


# ----------------------------------------------------------------------------- validation


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _static_float(name: str, value: Any) -> float:
    if not _is_concrete(value):
        raise ValueError(
            f"{name} must be a static Python number, got a traced value {value!r}; "
            f"mark it static (e.g. jax.jit(..., static_argnames={name!r}))"
        )
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def _check_alpha(alpha: Any) -> float:
    alpha = _static_float("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (α = 1 is the von Neumann limit), got {alpha!r}")
    return alpha


def _check_base(base: Any) -> float:
    base = _static_float("base", base)
    if base <= 0 or base == 1:
        raise ValueError(f"base must be > 0 and != 1 (2 for bits, math.e for nats), got {base!r}")
    return base


def _computation_dtype(dtype: Any) -> Any:
    """float32 for floating types narrower than float32: eigh has no half-precision kernel, and a
    half-precision Gram matrix would keep only 2 to 4 significant digits of each kernel value."""
    if jnp.dtype(dtype).itemsize < 4:
        return jnp.float32
    return dtype


def _float_dtype(dtype: Any) -> Any:
    if jnp.issubdtype(dtype, jnp.floating):
        return _computation_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        return jnp.result_type(float)
    raise ValueError(f"expected real (floating, integer or bool) values, got dtype {dtype}")


def _replicated(x: Array) -> Array:
    """``x`` gathered onto every device of its mesh when one of its axes is sharded over an explicit mesh axis.

    Every entry of an ``(n, n)`` matrix pairs two samples: ``x @ x.T`` of a sample-sharded ``x`` would be sharded
    twice over one mesh axis, which explicit sharding refuses, and each device needs all samples anyway. Under an
    ``Auto`` mesh the aval carries no explicit axis and the compiler's partitioner decides.
    """
    typeof = getattr(jax, "typeof", None)
    sharding = getattr(typeof(x), "sharding", None) if typeof is not None else None
    explicit = set(getattr(getattr(sharding, "mesh", None), "explicit_axes", ()) or ())
    if not explicit:
        return x
    used = set()
    for entry in sharding.spec:
        if isinstance(entry, str):
            used.add(entry)
        elif isinstance(entry, tuple):
            used.update(entry)
    if not used & explicit:
        return x
    return jax.sharding.reshard(x, sharding.update(spec=PartitionSpec()))


def _as_samples(x: Any) -> Array:
    """Returns x as a floating (n, d) array, one flattened sample per row, on every device of its mesh."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading sample axis (shape (n, ...)), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least n = 2 samples to estimate an entropy, got shape {x.shape}")
    x = _replicated(x).astype(_float_dtype(x.dtype))
    return x.reshape(x.shape[0], -1)


def _check_gram(A: Any, name: str = "A") -> Array:
    """``A`` as a floating ``(..., n, n)`` array (half precision upcast to float32), on every device of its mesh."""
    A = jnp.asarray(A)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"{name} must be a square (n, n) Gram matrix or a stack (..., n, n) of them, got shape {A.shape}"
        )
    if A.shape[-1] < 2:
        raise ValueError(f"{name} must be at least 2 x 2 (n >= 2 samples), got shape {A.shape}")
    if not jnp.issubdtype(A.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {A.dtype}")
    return _replicated(A).astype(_computation_dtype(A.dtype))


def _trace_violation(A: Array, input_dtype: Any) -> Array | None:
    """Refuses a matrix whose trace is not 1: ``ValueError`` on concrete input, else a mask of the violations.

    ``A`` is ``(..., n, n)`` in its computation dtype; the tolerance ``sqrt(eps)`` is that of ``input_dtype``.
    A NaN trace passes: NaN input gives a NaN result anyway.
    """
    trace = jnp.trace(A, axis1=-2, axis2=-1)
    tolerance = math.sqrt(float(jnp.finfo(input_dtype).eps))
    if _is_concrete(trace):
        deviation = np.abs(np.asarray(trace, np.float64) - 1)
        bad = deviation > tolerance
        if np.any(bad):
            worst = np.unravel_index(np.argmax(np.where(bad, deviation, -1)), deviation.shape)
            where = f" (matrix {tuple(int(i) for i in worst)} of the stack)" if deviation.ndim else ""
            raise ValueError(
                f"renyi_entropy needs a normalised Gram matrix with unit trace, got tr(A) = "
                f"{float(np.asarray(trace)[worst]):.6g}{where}, off by more than {tolerance:.2g}; "
                "pass normalize_gram(K)"
            )
        return None
    return jnp.abs(trace - 1) > tolerance


# ----------------------------------------------------------------------------- Gram matrices


def pairwise_sq_distances(x: Any) -> Array:
    """Squared Euclidean distances ``D_ij = ||x_i - x_j||^2`` between flattened samples.

    Computed as ``||x_i||^2 + ||x_j||^2 - 2 x_i·x_j`` on samples centred at their mean
    (distances are translation invariant; centring removes most of the cancellation), with
    the matmul at ``Precision.HIGHEST``, clamped at 0, with an exact zero diagonal; exactly
    symmetric (the upper triangle mirrored).

    Args:
      x: array of shape ``(n, ...)``; half precision is computed in float32.

    Returns:
      ``(n, n)`` array of squared distances.
    """
    x = _as_samples(x)
    x = x - jnp.mean(x, axis=0)
    sq_norms = jnp.sum(x * x, axis=1)
    inner = jnp.matmul(x, x.T, precision=_HIGHEST)
    sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * inner, 0)
    n = x.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    # A matmul need not round x_i·x_j and x_j·x_i alike. Mirroring the upper triangle makes D
    # exactly symmetric, so that either copy of a distance is the same number (kernel_width's
    # median reads each pair from one side or the other).
    sq_dist = jnp.where(row < col, sq_dist, sq_dist.T)
    return jnp.where(row == col, 0, sq_dist)


def _kth_smallest_nonnegative(values: Array, k: int) -> Array:
    """The ``k``-th smallest (0-based) of a 1-D array of non-negative floats, exactly, without sorting.

    Non-negative IEEE floats order like their bit patterns read as integers, so a bisection over the integers
    finds the smallest bit pattern with more than ``k`` values at or below it, in one counting pass per bit.
    XLA:CPU sorts slowly, more slowly than the rest of an entropy and its gradient at batch sizes used in
    training; this needs only ``bits`` comparisons per element (docs/benchmarks.md).
    """
    int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[values.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(jnp.maximum(values, 0), int_dtype)

    def step(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = jnp.sum(bits <= middle) > k
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    low, _ = jax.lax.fori_loop(
        0, 8 * values.dtype.itemsize, step, (jnp.zeros((), int_dtype), jnp.max(bits).astype(int_dtype))
    )
    return jax.lax.bitcast_convert_type(low, values.dtype)


def _upper_triangle(distances: Array) -> Array:
    """Each ``D_ij``, ``i < j``, of a symmetric ``(n, n)`` matrix once, padded with ``+inf``; no index constant.

    Row ``i`` rotated left by ``i + 1`` reads ``D_{i,i+1} .. D_{i,n-1}, D_{i,0} .. D_{i,i}``, so the pair
    ``a < b`` at offset ``d = b - a`` sits in row ``a`` at column ``d - 1`` and in row ``b`` at column
    ``n - 1 - d``. The first ``⌊n/2⌋`` columns therefore hold every pair exactly once for odd ``n``; for even
    ``n`` the pairs at ``d = n/2`` appear twice in column ``n/2 - 1`` (rows ``a`` and ``a + n/2``), and the
    copies in rows ``>= n/2`` are replaced by ``+inf``, which orders after every distance. The gather indices
    come from iota: ``distances[np.triu_indices(n, 1)]`` would embed ``n(n-1)`` integers in the program.
    """
    n = distances.shape[0]
    width = n // 2
    row = jax.lax.broadcasted_iota(jnp.int32, (n, width), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (n, width), 1)
    rotated = jnp.take_along_axis(distances, (row + col + 1) % n, axis=1)
    if n % 2 == 0:
        rotated = jnp.where((col == width - 1) & (row >= width), jnp.inf, rotated)
    return rotated.ravel()


def _median_of_smallest(values: Array, count: int) -> Array:
    """``jnp.median`` of the ``count`` smallest of non-negative ``values`` (the others being ``+inf``)."""
    lower = _kth_smallest_nonnegative(values, (count - 1) // 2)
    if count % 2:
        return lower
    # The next order statistic is `lower` again when more than count/2 values lie at or below it, else the
    # smallest value above it: one pass instead of a second bisection.
    next_larger = jnp.min(jnp.where(values > lower, values, jnp.inf))
    upper = jnp.where(jnp.sum(values <= lower) > count // 2, lower, next_larger)
    return (lower + upper) / 2


def _positive_or_fallback(sigma: Array, distances: Array) -> Array:
    # A rule yields 0 only when (more than half of) the samples coincide. The mean distance
    # keeps σ equivariant to a scaling of x; if it is 0 too, every sample is the same and
    # any σ gives the same all-ones kernel. `distances` is the symmetric (n, n) matrix with a
    # zero diagonal: the mean over i<j is its sum over n(n-1).
    n = distances.shape[0]
    mean_distance = jnp.sum(distances) / (n * (n - 1))
    sigma = jnp.where(sigma > 0, sigma, mean_distance)
    return jnp.where(sigma > 0, sigma, jnp.ones_like(sigma))


def kernel_width(x: Any, rule: str = "median", **options: Any) -> Array:
    """Gaussian kernel width σ (for ``exp(-d^2 / (2σ^2))``) chosen from a batch.

    Rules, for ``n`` samples of dimension ``d`` and pairwise distances ``d_ij``:

    * ``"median"``: ``σ = median_{i<j} d_ij / √2``, so that ``2σ^2`` is the squared
      median distance (Schölkopf & Smola's median heuristic).
    * ``"silverman"``: ``σ = γ n^(-1/(4+d))``, times ``√d`` if ``scale_by_dim=True``
      (the Silverman/Scott-style rule of Yu et al., *Understanding Convolutional Neural
      Networks with Information Theory*, IEEE TNNLS 2021). Options: ``gamma=1.0``,
      ``scale_by_dim=False``.
    * ``"knn"``: the mean over samples of the distance to the k-th nearest other sample.
      Option: ``k=10`` (needs ``k < n``).
    * ``"dib"``: the yuxi120407/DIB convention. That code takes ``σ_dib`` as the mean of
      the first ``num_columns=10`` columns of the distance matrix (the mean distance of
      every sample to the first 10 samples of the batch; ``np.sort`` there sorts those
      columns, it picks no neighbours) and uses the kernel ``exp(-d^2 / σ_dib^2)``; in our
      convention ``σ = σ_dib / √2``.

    A rule that yields 0 (coinciding samples) falls back to the mean pairwise distance,
    then to 1 (all samples equal: every width gives the same kernel).

    The result is wrapped in ``jax.lax.stop_gradient``: the width is a property of the
    estimator, not a parameter to optimise.

    Args:
      x: samples, shape ``(n, ...)``.
      rule: one of ``"median"``, ``"silverman"``, ``"knn"``, ``"dib"``.
      **options: rule options, listed above.

    Returns:
      scalar σ with the floating dtype of ``x`` (float32 for half-precision ``x``).
    """
    _check_choice("width rule", rule, WIDTH_RULES)
    accepted_options = {
        "median": (),
        "silverman": ("gamma", "scale_by_dim"),
        "knn": ("k",),
        "dib": ("num_columns",),
    }[rule]
    unknown = sorted(set(options) - set(accepted_options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for width rule {rule!r}; accepted: {list(accepted_options)}")
    x = jax.lax.stop_gradient(_as_samples(x))
    n, dim = x.shape

    if rule == "silverman":
        gamma = _static_float("gamma", options.get("gamma", 1.0))
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        scale = math.sqrt(dim) if options.get("scale_by_dim", False) else 1.0
        return jnp.asarray(gamma * scale * n ** (-1.0 / (4 + dim)), dtype=x.dtype)

    distances = jnp.sqrt(pairwise_sq_distances(x))
    if rule == "median":
        sigma = _median_of_smallest(_upper_triangle(distances), n * (n - 1) // 2) / math.sqrt(2)
    elif rule == "knn":
        k = options.get("k", 10)
        if not isinstance(k, int | np.integer) or not 1 <= k < n:
            raise ValueError(f"k must be an integer with 1 <= k < n = {n}, got {k!r}")
        # Column 0 of each sorted row is the sample itself (distance 0).
        sigma = jnp.mean(jnp.sort(distances, axis=1)[:, k])
    else:  # dib
        num_columns = options.get("num_columns", 10)
        if not isinstance(num_columns, int | np.integer) or num_columns < 1:
            raise ValueError(f"num_columns must be a positive integer, got {num_columns!r}")
        sigma = jnp.mean(distances[:, :num_columns]) / math.sqrt(2)
    return jax.lax.stop_gradient(_positive_or_fallback(sigma, distances))


def gram_matrix(
    x: Any,
    sigma: Any = None,
    *,
    kernel: str = "gaussian",
    width: str = "median",
    **width_options: Any,
) -> Array:
    """Kernel Gram matrix of a batch (not normalised; see :func:`normalize_gram`).

    * ``kernel="gaussian"``: ``K_ij = exp(-||x_i - x_j||^2 / (2 σ^2))``. With
      ``sigma=None`` the rule ``width`` (see :func:`kernel_width`, which takes
      ``**width_options``) picks σ from the batch, under ``stop_gradient``. An explicit
      ``sigma`` is used as given (so a learnt width stays differentiable).
    * ``kernel="linear"``: ``K_ij = x_i · x_j`` (takes no σ).

    Half-precision inputs are computed in float32; results are float32. Samples sharded over
    an explicit mesh axis are gathered first (module notes).

    Args:
      x: samples, shape ``(n, ...)``; each sample is flattened.
      sigma: Gaussian kernel width, or ``None`` for the rule ``width``.
      kernel: ``"gaussian"`` or ``"linear"``.
      width: width rule used when ``sigma`` is ``None``.
      **width_options: options of the width rule.

    Returns:
      ``(n, n)`` Gram matrix.
    """
    _check_choice("kernel", kernel, KERNELS)
    x = _as_samples(x)
    if kernel == "linear":
        if sigma is not None:
            raise ValueError(f"the linear kernel takes no sigma, got sigma={sigma!r}")
        return jnp.matmul(x, x.T, precision=_HIGHEST)
    if sigma is None:
        sigma = kernel_width(x, width, **width_options)
    else:
        if width_options:
            raise ValueError(f"width options {sorted(width_options)} given with an explicit sigma")
        if _is_concrete(sigma) and not bool(np.all(np.asarray(sigma) > 0)):
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        sigma = jnp.asarray(sigma, dtype=x.dtype)
    return jnp.exp(-pairwise_sq_distances(x) / (2 * sigma**2))


def label_gram(labels: Any, num_classes: int | None = None, *, dtype: Any = None) -> Array:
    """Label kernel ``K_ij = [y_i == y_j]``.

    Args:
      labels: integer labels of shape ``(n,)``, or one-hot rows of shape ``(n, C)`` (for
        which ``K = Y Yᵀ``: soft labels give their linear kernel).
      num_classes: optional number of classes; when given, integer labels outside
        ``[0, num_classes)`` (checked on concrete inputs) and one-hot rows of another width
        are refused.
      dtype: floating dtype of the result, e.g. that of the feature Gram matrices it is
        combined with. ``None``: the default floating dtype (for one-hot rows: their
        floating dtype, float32 for half precision).

    Returns:
      ``(n, n)`` Gram matrix.
    """
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        if not jnp.issubdtype(labels.dtype, jnp.floating) and not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"one-hot labels must be numeric, got dtype {labels.dtype}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(f"one-hot labels have {labels.shape[1]} columns but num_classes={num_classes}")
        rows = _as_samples(labels)
        if dtype is not None:
            rows = rows.astype(dtype)
        return jnp.matmul(rows, rows.T, precision=_HIGHEST)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (n,) or (n, num_classes), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels of shape (n,) must be integers, got dtype {labels.dtype}")
    if labels.shape[0] < 2:
        raise ValueError(f"need at least n = 2 labels, got shape {labels.shape}")
    if num_classes is not None and _is_concrete(labels):
        values = np.asarray(labels)
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {bad[:5].tolist()}")
    labels = _replicated(labels)
    return (labels[:, None] == labels[None, :]).astype(jnp.result_type(float) if dtype is None else dtype)


def normalize_gram(K: Any) -> Array:
    """``A_ij = K_ij / (n sqrt(K_ii K_jj))``, a unit-trace matrix; ``K`` may be a stack ``(..., n, n)``.

    A zero diagonal entry (a zero sample under the linear kernel) leaves its row and
    column at zero instead of producing NaN; ``tr(A)`` is then below 1 (by ``1/n`` per zero
    sample), which :func:`renyi_entropy` refuses (``ValueError`` on concrete input, NaN under
    tracing). Half-precision ``K`` is computed in float32; the result is float32.
    """
    K = _check_gram(K, "K")
    n = K.shape[-1]
    diagonal = jnp.maximum(jnp.diagonal(K, axis1=-2, axis2=-1), jnp.finfo(K.dtype).tiny)
    scale = jnp.sqrt(diagonal)
    return K / (n * scale[..., :, None] * scale[..., None, :])


# ----------------------------------------------------------------------------- spectra


def _spectral_terms(
    eigenvalues: Array, alpha: float, subtract_trace: bool, tolerance: Array | None = None
) -> tuple[Array, Array]:
    """``f(λ)`` and ``f'(λ)`` for ``f = λ^α`` (``-λ ln λ`` at α = 1), with the guards.

    ``subtract_trace`` gives ``f = λ^α - λ``, the control variate of the stochastic method.
    ``tolerance`` (for ``α <= 1``) defaults to ``n · eps · max(λ)`` of these eigenvalues.
    """
    if alpha <= 1:
        if tolerance is None:
            eps = jnp.finfo(eigenvalues.dtype).eps
            tolerance = eigenvalues.shape[-1] * eps * jnp.max(eigenvalues)
        keep = eigenvalues > tolerance
    else:
        keep = eigenvalues > 0
    # Evaluate only on kept eigenvalues so that no NaN/Inf is ever produced.
    lam = jnp.where(keep, eigenvalues, 1)
    if alpha == 1:
        log_lam = jnp.log(lam)
        value, slope = -lam * log_lam, -(log_lam + 1)
    else:
        value, slope = lam**alpha, alpha * lam ** (alpha - 1)
    if subtract_trace:
        value, slope = value - lam, slope - 1
    zero = jnp.zeros_like(value)
    return jnp.where(keep, value, zero), jnp.where(keep, slope, zero)


def _propagate_nan(result: Array, eigenvalues: Array) -> Array:
    # A failed eigendecomposition returns NaN eigenvalues, which the guards above would drop.
    return jnp.where(jnp.all(jnp.isfinite(eigenvalues)), result, jnp.nan)


def _tridiagonal_bisection(A: Array) -> Array:
    _, diagonal, off_diagonal, _ = jax.lax.linalg.tridiagonal(A)
    return jax.scipy.linalg.eigh_tridiagonal(diagonal, off_diagonal, eigvals_only=True)


def _eigenvalues(A: Array) -> Array:
    """Eigenvalues of symmetric ``A`` (the mean of ``A`` and ``Aᵀ``), unsorted.

    JAX's ``eigh`` always computes eigenvectors. On CPU, Householder tridiagonalisation
    (LAPACK ``sytrd``) followed by bisection gives the eigenvalues alone in about half the
    time of LAPACK's eigenvalue-only driver (see ``benchmarks/entropy.py``); other
    platforms use ``eigvalsh``.
    """
    A = (A + A.T) / 2
    return jax.lax.platform_dependent(A, cpu=_tridiagonal_bisection, default=jnp.linalg.eigvalsh)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _trace_function(A: Array, alpha: float, subtract_trace: bool) -> Array:
    """``tr f(A) = Σ_i f(λ_i(A))`` for symmetric ``A``."""
    eigenvalues = _eigenvalues(A)
    value, _ = _spectral_terms(eigenvalues, alpha, subtract_trace)
    return _propagate_nan(jnp.sum(value), eigenvalues)


@_trace_function.defjvp
def _trace_function_jvp(alpha, subtract_trace, primals, tangents):
    # d tr f(A) = tr(f'(A) dA) with f'(A) = V f'(Λ) Vᵀ (Daleckii–Krein): no eigenvector
    # derivative, hence no division by eigenvalue gaps.
    (A,), (A_dot,) = primals, tangents
    eigenvalues, vectors = jnp.linalg.eigh(A)
    value, slope = _spectral_terms(eigenvalues, alpha, subtract_trace)
    gradient = jnp.matmul(vectors * slope, vectors.T, precision=_HIGHEST)
    primal = _propagate_nan(jnp.sum(value), eigenvalues)
    return primal, jnp.sum(gradient * A_dot)


def _entropy_from_trace(trace_value: Array, alpha: float, base: float) -> Array:
    if alpha == 1:
        return trace_value / math.log(base)
    return jnp.log(trace_value) / ((1 - alpha) * math.log(base))


def _slq_trace(
    A: Array,
    alpha: float,
    key: Array,
    num_probes: int,
    num_matvecs: int,
    deflation_rank: int,
) -> Array:
    """Deflated stochastic Lanczos quadrature estimate of ``tr f(A)`` (see renyi_entropy)."""
    from matfree import decomp

    n = A.shape[0]
    rank = min(deflation_rank, n // 2)
    depth = max(1, min(num_matvecs, n - rank - 1))
    subtract_trace = alpha != 1 and alpha < 2
    range_key, probe_key = jax.random.split(key)

    # Randomised range finder with one power iteration: Q spans the dominant eigenspace,
    # where a Gram matrix keeps most of its trace.
    sketch = jax.random.rademacher(range_key, (n, rank), dtype=A.dtype)
    sketch = jnp.matmul(A, jnp.matmul(A, sketch, precision=_HIGHEST), precision=_HIGHEST)
    basis, _ = jnp.linalg.qr(sketch)
    projected = jnp.matmul(basis.T, jnp.matmul(A, basis, precision=_HIGHEST), precision=_HIGHEST)
    dominant = _trace_function((projected + projected.T) / 2, alpha, subtract_trace)

    def deflate(v):
        return v - jnp.matmul(basis, jnp.matmul(basis.T, v, precision=_HIGHEST), precision=_HIGHEST)

    def deflated_matvec(v):
        return deflate(jnp.matmul(A, deflate(v), precision=_HIGHEST))

    eps = jnp.finfo(A.dtype).eps
    tolerance = jax.lax.stop_gradient(n * eps * jnp.max(jnp.linalg.eigvalsh(projected)))
    # matfree's Lanczos adjoint builds temporaries in the default float dtype; when that is
    # not A's (float32 data with jax_enable_x64), differentiate the iteration directly.
    same_default_dtype = jnp.result_type(float) == A.dtype
    lanczos = decomp.tridiag_sym(depth, custom_vjp=same_default_dtype)

    def quadrature(probe):
        # Gauss quadrature from the Lanczos tridiagonal T: vᵀ f(A) v ≈ |v|^2 Σ_j u_j0^2 f(θ_j).
        norm_sq = jnp.sum(probe * probe)
        _, tridiagonal, *_ = lanczos(deflated_matvec, probe / jnp.sqrt(norm_sq))
        nodes, vectors = jnp.linalg.eigh(tridiagonal)
        values, _ = _spectral_terms(nodes, alpha, subtract_trace, tolerance)
        return norm_sq * jnp.sum(vectors[0] ** 2 * values)

    probes = jax.random.rademacher(probe_key, (num_probes, n), dtype=A.dtype)
    probes = jax.vmap(deflate)(probes)
    remainder = jnp.mean(jax.vmap(quadrature)(probes))
    total = dominant + remainder
    if subtract_trace:
        total = total + jnp.trace(A)
    return total


def _over_matrices(fn: Callable[..., Array], A: Array, *args: Array) -> Array:
    """``fn`` of each ``(n, n)`` matrix of ``A`` (shape ``(..., n, n)``), as an array of shape ``...``.

    ``args`` carry one entry per matrix along their leading axis (the flattened batch).
    """
    batch_shape = A.shape[:-2]
    if not batch_shape:
        return fn(A, *args)
    flat = A.reshape(math.prod(batch_shape), *A.shape[-2:])
    return jax.vmap(fn)(flat, *args).reshape(batch_shape)


def renyi_entropy(
    A: Any,
    *,
    alpha: float = 1.01,
    base: float = 2.0,
    method: str = "auto",
    key: Array | None = None,
    num_probes: int = 16,
    num_matvecs: int = 12,
    deflation_rank: int = 64,
) -> Array:
    """Matrix-based Rényi α-order entropy ``S_α(A) = 1/(1-α) log_b Σ_i λ_i(A)^α``.

    Sánchez Giraldo, Rao & Príncipe (2015), Definition 4.1. ``A`` is a normalised Gram
    matrix (unit trace, see :func:`normalize_gram`), or a stack ``(..., n, n)`` of them.
    ``α = 1`` gives the von Neumann limit ``-Σ λ log_b λ``. The value is in bits for
    ``base=2`` (default).

    ``|tr(A) - 1|`` must be at most ``sqrt(eps)`` of ``A``'s dtype: otherwise concrete input
    raises ``ValueError`` and traced input (under ``jit``, ``vmap``, ``grad``) gives NaN (see
    the module notes). Half-precision inputs are computed in float32; results are float32.

    Methods:

    * ``"eigh"``: exact, from the eigenvalues (negative ones clamped to 0; for ``α <= 1``
      eigenvalues at or below ``τ = n · eps · λ_max`` count as 0, see the module notes).
      Gradients use ``∂ Σ f(λ_i) / ∂A = V f'(Λ) Vᵀ``, finite on repeated eigenvalues.
    * ``"frobenius"``: ``α = 2`` only, ``-log_b ||A||_F^2``: no eigendecomposition,
      ``O(n^2)``.
    * ``"auto"``: ``"frobenius"`` for ``α = 2``, else ``"eigh"``.
    * ``"slq"``: stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIAM J. Matrix Anal.
      Appl. 38(4), 2017) through matfree, for large ``n``, deflated as in Hutch++ (Meyer,
      Musco, Musco & Woodruff, SOSA 2021): the trace over the dominant ``deflation_rank``
      eigenspace (a randomised range finder with one power iteration) is taken exactly, the
      rest by ``num_probes`` Rademacher probes with ``num_matvecs`` Lanczos steps each. For
      ``α < 2`` it estimates ``tr(A^α - A)`` and adds ``tr A`` (a control variate: near
      ``α = 1`` the entropy amplifies errors in ``tr A^α`` by ``1/|1-α|``). Needs ``key``;
      a stack of matrices gets one split of it per matrix. Differentiable (matfree's
      Lanczos adjoint).

    Args:
      A: ``(..., n, n)`` symmetric positive semi-definite matrices with unit trace.
      alpha: order ``α > 0``, a static Python number; keyword-only.
      base: logarithm base (2: bits, ``math.e``: nats).
      method: ``"auto"``, ``"eigh"``, ``"frobenius"`` or ``"slq"``.
      key: PRNG key, required by ``"slq"``.
      num_probes, num_matvecs, deflation_rank: ``"slq"`` settings.

    Returns:
      entropies of shape ``...`` (a scalar for one matrix); NaN where ``A`` holds NaN/Inf,
      its eigendecomposition failed or (traced) its trace is not 1.
    """
    A = jnp.asarray(A)
    input_dtype = A.dtype
    A = _check_gram(A)
    alpha = _check_alpha(alpha)
    base = _check_base(base)
    _check_choice("method", method, METHODS)
    if method == "auto":
        method = "frobenius" if alpha == 2 else "eigh"
    if method == "frobenius" and alpha != 2:
        raise ValueError(f"method 'frobenius' is exact only for alpha = 2, got alpha={alpha!r}")
    if method == "slq":
        if key is None:
            raise ValueError("method 'slq' needs a PRNG key: renyi_entropy(A, ..., key=jax.random.key(0))")
        for name, value in (
            ("num_probes", num_probes),
            ("num_matvecs", num_matvecs),
            ("deflation_rank", deflation_rank),
        ):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
    invalid = _trace_violation(A, input_dtype)
    if method == "frobenius":
        result = -jnp.log(jnp.sum(A * A, axis=(-2, -1))) / math.log(base)
    else:
        if method == "slq":

            def trace_of(a, matrix_key):
                return _slq_trace(a, alpha, matrix_key, num_probes, num_matvecs, deflation_rank)

            if A.ndim == 2:
                trace_value = trace_of(A, key)
            else:
                trace_value = _over_matrices(trace_of, A, jax.random.split(key, math.prod(A.shape[:-2])))
        else:
            trace_value = _over_matrices(lambda a: _trace_function(a, alpha, False), A)
        result = _entropy_from_trace(trace_value, alpha, base)
    if invalid is not None:
        # A product, not a select: the gradient is NaN too.
        result = result * jnp.where(invalid, jnp.nan, 1).astype(result.dtype)
    return result


# ----------------------------------------------------------------------------- joint quantities


def _entropy_keys(key: Array | None, count: int) -> list[Array | None]:
    return [None] * count if key is None else list(jax.random.split(key, count))


def _hadamard_normalized(grams: Sequence[Any]) -> Array:
    if not grams:
        raise ValueError("joint_entropy needs at least one Gram matrix")
    mats = [_check_gram(g, f"grams[{i}]") for i, g in enumerate(grams)]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        raise ValueError(f"Gram matrices must share one shape (same batch), got {[m.shape for m in mats]}")
    product = functools.reduce(jnp.multiply, mats)
    return product / jnp.trace(product, axis1=-2, axis2=-1)[..., None, None]


def joint_entropy(*grams: Any, alpha: float = 1.01, key: Array | None = None, **options: Any) -> Array:
    """Joint entropy ``S_α(A_1, .., A_k) = S_α(A_1 ∘ .. ∘ A_k / tr(A_1 ∘ .. ∘ A_k))``.

    Yu et al., TPAMI 2020, Definition 1. The matrices share one shape, ``(n, n)`` or a stack
    ``(..., n, n)`` (result of shape ``...``). ``**options`` (``base``, ``method``, ...) go to
    :func:`renyi_entropy`.
    """
    # A number among the matrices is an α given positionally, as the other functions refuse it.
    if any(isinstance(g, int | float) for g in grams):
        raise TypeError(
            "joint_entropy takes Gram matrices positionally and alpha by keyword: joint_entropy(A, B, alpha=...)"
        )
    return renyi_entropy(_hadamard_normalized(grams), alpha=alpha, key=key, **options)


def mutual_information(A: Any, B: Any, *, alpha: float = 1.01, key: Array | None = None, **options: Any) -> Array:
    """``I_α(A; B) = S_α(A) + S_α(B) - S_α(A, B)``, symmetric, in ``[0, min(S_α(A), S_α(B))]``.

    ``A`` and ``B`` are unit-trace ``(n, n)`` matrices or stacks ``(..., n, n)`` of one shape.
    ``**options`` go to :func:`renyi_entropy`; with ``method="slq"`` each of the three
    entropies gets its own split of ``key``.
    """
    keys = _entropy_keys(key, 3)
    return (
        renyi_entropy(A, alpha=alpha, key=keys[0], **options)
        + renyi_entropy(B, alpha=alpha, key=keys[1], **options)
        - joint_entropy(A, B, alpha=alpha, key=keys[2], **options)
    )


def conditional_entropy(A: Any, B: Any, *, alpha: float = 1.01, key: Array | None = None, **options: Any) -> Array:
    """``S_α(A | B) = S_α(A, B) - S_α(B)``, for ``(n, n)`` matrices or stacks ``(..., n, n)``.

    ``**options`` go to :func:`renyi_entropy`.
    """
    keys = _entropy_keys(key, 2)
    return joint_entropy(A, B, alpha=alpha, key=keys[0], **options) - renyi_entropy(
        B, alpha=alpha, key=keys[1], **options
    )


def mutual_information_matrix(grams: Any, *, alpha: float = 1.01, base: float = 2.0, method: str = "auto") -> Array:
    """Pairwise ``I_α`` between ``L`` normalised Gram matrices of one batch.

    The ``L`` entropies and the ``L(L-1)/2`` joint entropies are each computed by one
    batched call, so their eigendecompositions run as one batch.

    The diagonal holds ``S_α(A_l)``, the Shannon convention ``I(T; T) = H(T)``. (The
    Hadamard estimator applied to a pair of equal matrices would give
    ``2 S_α(A) - S_α(A ∘ A)``, which is not ``S_α(A)`` in general.)

    Args:
      grams: ``(L, n, n)`` stack of normalised Gram matrices.
      alpha, base: as in :func:`renyi_entropy` (keyword-only).
      method: ``"auto"``, ``"eigh"`` or ``"frobenius"`` (``α = 2``).

    Returns:
      symmetric ``(L, L)`` matrix.
    """
    grams = jnp.asarray(grams)
    if grams.ndim != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must be a (L, n, n) stack of Gram matrices, got shape {grams.shape}")
    _check_choice("method", method, ("auto", "eigh", "frobenius"))
    num = grams.shape[0]
    entropy = functools.partial(renyi_entropy, alpha=alpha, base=base, method=method)
    marginals = entropy(grams)
    rows, cols = np.triu_indices(num, 1)
    if rows.size == 0:
        return jnp.diag(marginals)
    joints = entropy(_hadamard_normalized([grams[rows], grams[cols]]))
    pairwise = marginals[rows] + marginals[cols] - joints
    matrix = jnp.diag(marginals)
    return matrix.at[rows, cols].set(pairwise).at[cols, rows].set(pairwise)


# ----------------------------------------------------------------------------- checking


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``fn`` so that NaN/Inf inputs or a failed eigendecomposition raise.

    ``checked(fn)(*args)`` runs ``jax.jit(fn)`` under ``jax.experimental.checkify`` with
    ``checkify.float_checks`` and raises ``FloatingPointError`` naming the first
    operation that produced a NaN. The entropy code produces no NaN on valid input, so the
    check fires only on bad data (a traced matrix without unit trace is bad data: its NaN is
    reported). On CPU, checkify cannot batch the while loop of the eigenvalue bisection, so
    ``fn`` may not take the entropy of a stack of matrices (or ``vmap`` one) with the
    ``"eigh"`` method; check one matrix at a time. Equivalent by hand::

        err, out = checkify.checkify(jax.jit(fn), errors=checkify.float_checks)(*args)
        err.throw()
    """
    checked_fn = checkify.checkify(jax.jit(fn), errors=checkify.float_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        error, out = checked_fn(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise FloatingPointError(message)
        return out

    return wrapper


__all__ = [
    "KERNELS",
    "METHODS",
    "WIDTH_RULES",
    "checked",
    "conditional_entropy",
    "gram_matrix",
    "joint_entropy",
    "kernel_width",
    "label_gram",
    "mutual_information",
    "mutual_information_matrix",
    "normalize_gram",
    "pairwise_sq_distances",
    "renyi_entropy",
]
