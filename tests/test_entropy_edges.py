"""Edges of dibjax.entropy: sharded and half-precision inputs, the unit-trace requirement, stacks of matrices,
keyword-only α, the label kernel's dtype and the median width without index constants."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dibjax import entropy as E
from tests import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def features(n=12, d=5, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def normalized(x, **kw):
    return E.normalize_gram(E.gram_matrix(x, **kw))


# ----------------------------------------------------------------------------- sharded inputs

# Runs with 4 host devices (set before jax is imported). Every quantity is computed on unsharded inputs and on
# batch-sharded ones, eagerly and under jit with an explicit-axes mesh, under jit with an Auto mesh; it prints the
# largest relative difference of each against the unsharded computation run the same way (eager or jit).
SHARDING_SCRIPT = """
import json

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)
from dibjax import entropy as E

rng = np.random.default_rng(0)
x = rng.normal(size=(8, 2, 3))
y = rng.integers(0, 3, 8).astype(np.int32)
a = np.asarray(E.normalize_gram(E.gram_matrix(x)))


def quantities(x, y, a):
    A = E.normalize_gram(E.gram_matrix(x))
    B = E.normalize_gram(E.label_gram(y, dtype=A.dtype))

    def mi(v):
        return E.mutual_information(E.normalize_gram(E.gram_matrix(v)), B, alpha=0.5)

    return {
        "pairwise_sq_distances": E.pairwise_sq_distances(x),
        "kernel_width": E.kernel_width(x),
        "gram_matrix": E.gram_matrix(x),
        "gram_matrix_linear": E.gram_matrix(x, kernel="linear"),
        "label_gram": E.label_gram(y),
        "label_gram_one_hot": E.label_gram(jax.nn.one_hot(y, 3)),
        "renyi_entropy": E.renyi_entropy(A),
        "renyi_entropy_alpha_2": E.renyi_entropy(A, alpha=2.0),
        "mutual_information": E.mutual_information(A, B),
        "gradient": jax.grad(mi)(x),
        "renyi_entropy_of_sharded_gram": E.renyi_entropy(a),
        "gradient_of_sharded_gram": jax.grad(lambda m: E.renyi_entropy(m, alpha=0.5))(a),
    }


expected = {"eager": quantities(x, y, a), "jit": jax.jit(quantities)(x, y, a)}
report = {"devices": jax.device_count(), "differences": {}, "gradient_specs": {}}
for axis_type in ("Explicit", "Auto"):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(AxisType, axis_type),))
    with jax.set_mesh(mesh):
        shard = NamedSharding(mesh, P("data"))
        xs, ys, as_ = (jax.device_put(v, shard) for v in (x, y, a))
        runs = {"jit": jax.jit(quantities)}
        if axis_type == "Explicit":
            runs["eager"] = quantities
        for how, fn in runs.items():
            got = fn(xs, ys, as_)
            report["gradient_specs"][f"{axis_type}/{how}"] = str(jax.typeof(got["gradient"]).sharding.spec)
            for name, value in got.items():
                want = np.asarray(expected[how][name])
                scale = max(float(np.abs(want).max()), 1e-300)
                difference = float(np.abs(np.asarray(value) - want).max()) / scale
                report["differences"][f"{axis_type}/{how}/{name}"] = difference
print(json.dumps(report))
"""


@pytest.mark.slow
def test_batch_sharded_inputs_give_the_unsharded_values():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    differences = report["differences"]
    assert len(differences) == 3 * 12, sorted(differences)
    bad = {name: d for name, d in differences.items() if not d <= 1e-12}
    assert not bad, bad
    # Under explicit sharding the gradient comes back sharded like the input.
    assert report["gradient_specs"]["Explicit/eager"] == report["gradient_specs"]["Explicit/jit"]
    assert report["gradient_specs"]["Explicit/jit"].startswith("P('data'")


# ----------------------------------------------------------------------------- half precision

HALF = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_is_computed_in_float32(dtype):
    x = jnp.asarray(features(seed=1), dtype)
    x32 = x.astype(jnp.float32)
    for fn in (
        E.pairwise_sq_distances,
        E.kernel_width,
        E.gram_matrix,
        lambda v: E.gram_matrix(v, kernel="linear"),
        lambda v: E.gram_matrix(v, width="knn", k=3),
        lambda v: E.renyi_entropy(normalized(v)),
        lambda v: E.renyi_entropy(normalized(v), alpha=2.0),
    ):
        got, want = fn(x), fn(x32)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)
    # Matrices given in half precision.
    A = normalized(x32)
    B = E.normalize_gram(E.label_gram(np.arange(12) % 3))
    for fn in (
        E.normalize_gram,
        lambda a: E.renyi_entropy(E.normalize_gram(a)),
        lambda a: E.mutual_information(E.normalize_gram(a), B.astype(dtype), alpha=0.5),
        lambda a: E.joint_entropy(E.normalize_gram(a), B, alpha=3.0),
    ):
        got, want = fn(A.astype(dtype)), fn(A.astype(dtype).astype(jnp.float32))
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_gradients_flow_back_in_the_input_dtype(dtype):
    x = jnp.asarray(features(seed=2), dtype)

    def loss(v):
        return E.renyi_entropy(E.normalize_gram(E.gram_matrix(v, 1.3)), alpha=1.01)

    grad = jax.grad(loss)(x)
    assert grad.dtype == dtype
    grad32 = jax.grad(loss)(x.astype(jnp.float32))
    np.testing.assert_array_equal(grad, grad32.astype(dtype))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# ----------------------------------------------------------------------------- unit trace


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_matrix_without_unit_trace_is_refused(dtype):
    K = E.gram_matrix(features(dtype=dtype))
    A = E.normalize_gram(K)
    with pytest.raises(ValueError, match=r"unit trace.*tr\(A\) = 12\b.*normalize_gram"):
        E.renyi_entropy(K)
    for call in (
        lambda: E.mutual_information(K, A),
        lambda: E.conditional_entropy(A, K),
        lambda: E.renyi_entropy(jnp.stack([A, K]), alpha=2.0),
        lambda: E.renyi_entropy(K, method="slq", key=jax.random.key(0)),
        lambda: E.mutual_information_matrix(jnp.stack([A, K])),
    ):
        with pytest.raises(ValueError, match="unit trace"):
            call()
    # Traced: NaN, in the value and in the gradient.
    for alpha in (0.5, 2.0):
        entropy = functools.partial(E.renyi_entropy, alpha=alpha)
        assert np.isnan(float(jax.jit(entropy)(K)))
        np.testing.assert_array_equal(np.isnan(jax.vmap(entropy)(jnp.stack([A, K, A]))), [False, True, False])
        assert np.all(np.isnan(np.asarray(jax.grad(entropy)(K))))
        assert np.all(np.isfinite(np.asarray(jax.grad(entropy)(A))))
    # The tolerance is sqrt(eps) of the dtype.
    tolerance = math.sqrt(np.finfo(dtype).eps)
    diagonal_shift = np.eye(12, dtype=dtype) / 12
    inside = A + 0.5 * tolerance * diagonal_shift
    outside = A + 2 * tolerance * diagonal_shift
    # Within the tolerance the functional is evaluated on the matrix as given (near α = 1 a trace off by δ shifts
    # the value by about α δ / ((1 - α) ln 2)).
    want = ref.entropy(np.asarray(inside, np.float64), 1.01, tol_dtype=dtype)
    np.testing.assert_allclose(E.renyi_entropy(inside), want, rtol=1e-4 if dtype == np.float32 else 1e-10)
    with pytest.raises(ValueError, match="unit trace"):
        E.renyi_entropy(outside)
    assert np.isnan(float(jax.jit(E.renyi_entropy)(outside)))
    assert np.isfinite(float(jax.jit(E.renyi_entropy)(inside)))


def test_half_precision_trace_tolerance_is_that_of_the_input_dtype():
    A = np.eye(16, dtype=np.float32) / 16
    off = jnp.asarray(1.02 * A, jnp.bfloat16)  # |tr - 1| about 0.02 < sqrt(eps_bf16) = 0.088
    upcast = np.asarray(off, np.float32)
    assert abs(np.trace(upcast) - 1) > math.sqrt(np.finfo(np.float32).eps)
    np.testing.assert_allclose(E.renyi_entropy(off, alpha=2.0), ref.entropy(upcast, 2.0), rtol=1e-6)
    np.testing.assert_allclose(E.renyi_entropy(off), ref.entropy(upcast, 1.01, tol_dtype=np.float32), rtol=1e-4)
    with pytest.raises(ValueError, match="unit trace"):
        E.renyi_entropy(jnp.asarray(upcast))  # the same numbers in float32 are refused
    with pytest.raises(ValueError, match="unit trace"):
        E.renyi_entropy(jnp.asarray(1.2 * A, jnp.bfloat16))


def test_a_zero_sample_under_the_linear_kernel_is_refused():
    x = features(8, 3, dtype=np.float32)
    x[2] = 0
    A = E.normalize_gram(E.gram_matrix(x, kernel="linear"))
    np.testing.assert_allclose(np.trace(A), 7 / 8, rtol=1e-6)
    with pytest.raises(ValueError, match=r"tr\(A\) = 0\.875"):
        E.renyi_entropy(A)


def test_no_objective_passes_a_matrix_without_unit_trace():
    # The objectives' Gram matrices under jit: a non-unit trace would make their entropies NaN.
    objectives = pytest.importorskip("dibjax.objectives")
    rng = np.random.default_rng(3)
    features_ = jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32)
    stage_input = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(16, 10)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    for compression in ("entropy", "mi_prev"):
        objective = objectives.DIB(beta=0.1, gamma=0.5, compression=compression)
        _, terms = jax.jit(lambda f, o=objective: o(f, logits, labels, stage_input=stage_input))(features_)
        assert all(np.isfinite(float(v)) for v in terms.values()), terms


# ----------------------------------------------------------------------------- stacks of matrices


@pytest.mark.usefixtures("x64")
def test_stacks_of_matrices_match_a_loop():
    xs = [features(10, 4, seed=s) for s in range(6)]
    stack = jnp.stack([normalized(x) for x in xs]).reshape(2, 3, 10, 10)
    other = jnp.stack([normalized(x[:, :2]) for x in xs]).reshape(2, 3, 10, 10)
    flat, flat_other = stack.reshape(6, 10, 10), other.reshape(6, 10, 10)
    for alpha in (0.5, 1.0, 1.01, 2.0, 3.0):
        entropy = functools.partial(E.renyi_entropy, alpha=alpha)
        for batched, single in (
            (entropy(stack), [entropy(a) for a in flat]),
            (
                E.joint_entropy(stack, other, alpha=alpha),
                [E.joint_entropy(a, b, alpha=alpha) for a, b in zip(flat, flat_other, strict=True)],
            ),
            (
                E.mutual_information(stack, other, alpha=alpha),
                [E.mutual_information(a, b, alpha=alpha) for a, b in zip(flat, flat_other, strict=True)],
            ),
            (
                E.conditional_entropy(stack, other, alpha=alpha),
                [E.conditional_entropy(a, b, alpha=alpha) for a, b in zip(flat, flat_other, strict=True)],
            ),
            (jax.jit(entropy)(stack), [entropy(a) for a in flat]),
        ):
            assert batched.shape == (2, 3)
            np.testing.assert_allclose(np.ravel(batched), [float(v) for v in single], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            np.ravel(entropy(stack)), [ref.entropy(np.asarray(a), alpha) for a in flat], rtol=1e-9
        )
    # Gradients of the sum are the per-matrix gradients.
    grad = jax.grad(lambda s: jnp.sum(E.renyi_entropy(s, alpha=0.5)))(stack)
    for i, a in enumerate(flat):
        np.testing.assert_allclose(
            grad.reshape(6, 10, 10)[i], ref.entropy_gradient(np.asarray(a), 0.5), rtol=1e-7, atol=1e-9
        )
    # SLQ: one split of the key per matrix, in the flattened order.
    key = jax.random.key(4)
    slq = functools.partial(E.renyi_entropy, alpha=1.01, method="slq", deflation_rank=2, num_matvecs=3)
    keys = jax.random.split(key, 6)
    np.testing.assert_allclose(
        np.ravel(jax.jit(slq)(stack, key=key)),
        [float(jax.jit(slq)(a, key=k)) for a, k in zip(flat, keys, strict=True)],
        rtol=1e-12,
    )
    assert E.renyi_entropy(stack[0, 0]).shape == ()
    assert E.normalize_gram(E.gram_matrix(xs[0])[None]).shape == (1, 10, 10)


# ----------------------------------------------------------------------------- keyword-only alpha


def test_alpha_is_keyword_only():
    A = np.eye(4, dtype=np.float32) / 4
    for call in (
        lambda: E.renyi_entropy(A, 2.0),
        lambda: E.mutual_information(A, A, 2.0),
        lambda: E.conditional_entropy(A, A, 2.0),
        lambda: E.joint_entropy(A, A, 2.0),
        lambda: E.mutual_information_matrix(A[None], 2.0),
    ):
        with pytest.raises(TypeError):
            call()
    np.testing.assert_allclose(E.renyi_entropy(A, alpha=2.0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(E.joint_entropy(A, A, alpha=2.0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(E.mutual_information(A, A, alpha=2.0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(E.conditional_entropy(A, A, alpha=2.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(E.mutual_information_matrix(A[None], alpha=2.0), [[2.0]], rtol=1e-6)


# ----------------------------------------------------------------------------- label kernel dtype


@pytest.mark.usefixtures("x64")
def test_label_gram_in_the_features_dtype():
    labels = np.array([0, 2, 1, 2, 0])
    expected = labels[:, None] == labels[None, :]
    for dtype in (jnp.float32, jnp.float64, jnp.bfloat16):
        for K in (E.label_gram(labels, dtype=dtype), E.label_gram(np.eye(3)[labels], 3, dtype=dtype)):
            assert K.dtype == dtype
            np.testing.assert_array_equal(np.asarray(K, np.float64), expected)
    assert E.label_gram(labels).dtype == jnp.result_type(float)
    with pytest.raises(ValueError, match="floating dtype"):
        E.label_gram(labels, dtype=jnp.int32)
    # Next to float32 feature Grams (x64 on), the DIB objective stays in float32.
    objectives = pytest.importorskip("dibjax.objectives")
    rng = np.random.default_rng(5)
    feats = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    _, terms = objectives.DIB(gamma=1.0)(feats, logits, jnp.asarray(labels.tolist() + [1, 1, 0]))
    assert terms["I_TY"].dtype == jnp.float32, terms


# ----------------------------------------------------------------------------- median width


def _triu_median(distances):
    return np.median(distances[np.triu_indices(len(distances), 1)])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
def test_upper_triangle_holds_each_pair_once(n):
    # Distinct entries: D_ij = D_ji = 1 + i + n j for i < j, so every pair is identified by its value.
    i, j = np.triu_indices(n, 1)
    D = np.zeros((n, n), np.float32)
    D[i, j] = D[j, i] = 1 + i + n * j
    values = np.asarray(E._upper_triangle(jnp.asarray(D)))
    finite = values[np.isfinite(values)]
    np.testing.assert_array_equal(np.sort(finite), np.sort(D[i, j]))
    assert np.all(np.isposinf(values[~np.isfinite(values)]))


def _summing_to_zero(rows):
    # Integer rows whose mean is exactly 0: centring and every distance are then exact, so coinciding samples are
    # at distance exactly 0 (in general rounding leaves them a tiny positive distance).
    rows = np.asarray(rows, np.float64)
    return np.concatenate([rows, -rows.sum(axis=0, keepdims=True)])


@pytest.mark.usefixtures("x64")  # float32 arrays still run the float32 path
@pytest.mark.parametrize("n", [4, 5, 6, 7])  # n(n-1)/2 = 6, 10 (even), 15, 21 (odd) distances
@pytest.mark.parametrize("data", ["normal", "ties", "coinciding"])
def test_median_width_equals_the_numpy_median(n, data):
    rng = np.random.default_rng(n)
    if data == "normal":
        x = rng.normal(size=(n, 3))
    elif data == "ties":
        x = _summing_to_zero(rng.integers(0, 2, size=(n - 1, 3)))  # near a cube's vertices: many equal distances
    else:
        x = _summing_to_zero(rng.integers(-3, 4, size=(n - 1, 3)))
        x[1] = x[0]  # one coinciding pair, well under half of the pairs
        x[-1] = -x[:-1].sum(axis=0)
        assert np.sqrt(ref.sq_distances(x))[0, 1] == 0
    x32 = x.astype(np.float32)
    # float32: the median is bit-exact against NumPy's float32 median of the same float32 distances, eagerly and
    # under jit. The width divides it by √2, which XLA may compile as a product with 1/√2, and under jit fuses the
    # distances differently: an ulp each.
    distances = jnp.sqrt(E.pairwise_sq_distances(x32))
    median = np.float32(_triu_median(np.asarray(distances)))
    assert median > 0

    def median_of_distances(d):
        return E._median_of_smallest(E._upper_triangle(d), n * (n - 1) // 2)

    for got in (median_of_distances(distances), jax.jit(median_of_distances)(distances)):
        assert got.dtype == np.float32
        assert float(got) == float(median)
    for width in (E.kernel_width(x32), jax.jit(E.kernel_width)(x32)):
        assert width.dtype == np.float32
        np.testing.assert_allclose(width, median / np.float32(math.sqrt(2)), rtol=2 * float(np.finfo(np.float32).eps))
    # float64: the independent reference.
    np.testing.assert_allclose(E.kernel_width(x), ref.median_sigma(x), rtol=1e-12)


@pytest.mark.usefixtures("x64")
def test_median_width_falls_back_to_the_mean_when_most_samples_coincide():
    v, w = np.array([1.0, -2.0, 3.0]), np.array([2.0, 0.0, -1.0])
    x = _summing_to_zero([v] * 5 + [w])  # 10 of 21 pairs coincide, 11 do not: the median is positive
    np.testing.assert_allclose(E.kernel_width(x), ref.median_sigma(x), rtol=1e-12)
    x = _summing_to_zero([v] * 6)  # 15 of 21 coincide: the median is 0, the mean distance is used
    d = np.sqrt(ref.sq_distances(x))
    assert _triu_median(d) == 0
    np.testing.assert_allclose(E.kernel_width(x), np.mean(d[np.triu_indices(7, 1)]), rtol=1e-12)
    np.testing.assert_array_equal(E.kernel_width(np.ones((6, 2))), 1.0)


def test_kernel_width_embeds_no_quadratic_constant():
    def hlo_bytes(n):
        x = jax.ShapeDtypeStruct((n, 8), jnp.float32)
        return len(jax.jit(lambda v: E.kernel_width(v)).lower(x).as_text())

    small, large = hlo_bytes(8), hlo_bytes(512)
    # With O(n^2) index constants the program at n = 512 would hold 2 x 130,816 integers (about 1 MB of text).
    assert large < 1.2 * small, (small, large)
