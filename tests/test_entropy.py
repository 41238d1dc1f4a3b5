import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from dibjax import entropy as E
from tests import reference as ref

# Every expected value is computed in float64 and most tests feed float64 arrays, which need x64 mode; the
# float32 cases pass float32 arrays explicitly, so they still run the float32 path.
pytestmark = pytest.mark.usefixtures("x64")


ALPHAS = (0.5, 1.0, 1.01, 2.0, 3.0)
N = 16


def entropy_of(x, alpha, sigma=None, **kw):
    return E.renyi_entropy(E.normalize_gram(E.gram_matrix(x, sigma)), alpha=alpha, **kw)


def random_features(n=N, d=6, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_gram_gives_log2_n(alpha, dtype):
    A = np.eye(N, dtype=dtype) / N
    np.testing.assert_allclose(
        E.renyi_entropy(A, alpha=alpha), math.log2(N), rtol=1e-6 if dtype == np.float64 else 1e-5
    )


@pytest.mark.parametrize("alpha", ALPHAS)
def test_identical_samples_give_zero(alpha):
    x = np.tile(np.arange(5.0), (N, 1))
    K = E.gram_matrix(x)
    np.testing.assert_array_equal(K, np.ones((N, N)))
    assert abs(float(E.renyi_entropy(E.normalize_gram(K), alpha=alpha))) < 1e-12


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("groups", [2, 4, 8])
def test_equal_groups_of_identical_samples_give_log2_m(alpha, groups):
    centres = 100.0 * np.eye(groups, 8)
    x = np.repeat(centres, N // groups, axis=0)
    value = entropy_of(x, alpha, sigma=1.0)
    np.testing.assert_allclose(value, math.log2(groups), rtol=1e-10)


def test_alpha_to_one_is_continuous():
    A = E.normalize_gram(E.gram_matrix(random_features()))
    von_neumann = float(E.renyi_entropy(A, alpha=1.0))
    np.testing.assert_allclose(von_neumann, ref.entropy(np.asarray(A), 1.0), rtol=1e-10)
    gaps = []
    for delta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        below = float(E.renyi_entropy(A, alpha=1 - delta))
        above = float(E.renyi_entropy(A, alpha=1 + delta))
        assert below >= von_neumann >= above  # S_α is non-increasing in α
        gaps.append(max(below - von_neumann, von_neumann - above))
    assert all(b < a / 5 for a, b in zip(gaps[:-1], gaps[1:], strict=True))  # O(δ) convergence
    assert gaps[-1] < 1e-4


def test_frobenius_equals_eigh_at_alpha_2():
    A = E.normalize_gram(E.gram_matrix(ref.photo_patches(24).astype(np.float64)))
    frob = float(E.renyi_entropy(A, alpha=2.0, method="frobenius"))
    eig = float(E.renyi_entropy(A, alpha=2.0, method="eigh"))
    assert abs(frob - eig) < 1e-10
    assert float(E.renyi_entropy(A, alpha=2.0)) == frob  # auto picks frobenius


def test_base_converts_bits_to_nats():
    A = E.normalize_gram(E.gram_matrix(random_features()))
    np.testing.assert_allclose(
        E.renyi_entropy(A, alpha=1.01, base=math.e), E.renyi_entropy(A, alpha=1.01) * math.log(2), rtol=1e-12
    )


# ----------------------------------------------------------------------------- invariants


def test_permutation_invariance():
    x = random_features()
    perm = np.random.default_rng(1).permutation(N)
    for alpha in ALPHAS:
        np.testing.assert_allclose(entropy_of(x[perm], alpha), entropy_of(x, alpha), rtol=1e-10)


@pytest.mark.parametrize("width", ["median", "knn", "dib"])
def test_joint_scaling_of_x_and_sigma(width):
    x = random_features()
    np.testing.assert_allclose(entropy_of(7.5 * x, 1.01, sigma=3.0), entropy_of(x, 1.01, sigma=0.4), rtol=1e-10)
    # Data-driven widths scale with x, so the entropy is scale invariant.
    scaled = E.renyi_entropy(E.normalize_gram(E.gram_matrix(7.5 * x, width=width)), alpha=1.01)
    plain = E.renyi_entropy(E.normalize_gram(E.gram_matrix(x, width=width)), alpha=1.01)
    np.testing.assert_allclose(scaled, plain, rtol=1e-10)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_joint_entropy_bounds_and_mutual_information_range(alpha):
    rng = np.random.default_rng(2)
    for trial in range(4):
        x = rng.normal(size=(N, 5))
        y = x[:, :2] + rng.normal(scale=0.5 * trial, size=(N, 2))
        A, B = (E.normalize_gram(E.gram_matrix(v)) for v in (x, y))
        sa, sb = float(E.renyi_entropy(A, alpha=alpha)), float(E.renyi_entropy(B, alpha=alpha))
        sab = float(E.joint_entropy(A, B, alpha=alpha))
        assert max(sa, sb) - 1e-9 <= sab <= sa + sb + 1e-9
        mi = float(E.mutual_information(A, B, alpha=alpha))
        assert -1e-9 <= mi <= min(sa, sb) + 1e-9
        np.testing.assert_allclose(mi, float(E.mutual_information(B, A, alpha=alpha)), atol=1e-12)
        np.testing.assert_allclose(float(E.conditional_entropy(A, B, alpha=alpha)), sab - sb, atol=1e-12)


def test_mutual_information_matrix_matches_pairwise_calls():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, 8))
    layers = [x, np.tanh(x @ rng.normal(size=(8, 6))), np.maximum(x[:, :3], 0)]
    grams = [E.normalize_gram(E.gram_matrix(v)) for v in layers]
    grams.append(E.normalize_gram(E.label_gram(np.arange(N) % 4)))
    matrix = np.asarray(E.mutual_information_matrix(jnp.stack(grams), alpha=1.01))
    chex.assert_shape(matrix, (4, 4))
    np.testing.assert_array_equal(matrix, matrix.T)
    for i in range(4):
        np.testing.assert_allclose(matrix[i, i], E.renyi_entropy(grams[i], alpha=1.01), rtol=1e-10)
        for j in range(i + 1, 4):
            np.testing.assert_allclose(matrix[i, j], E.mutual_information(grams[i], grams[j], alpha=1.01), rtol=1e-9)


def test_mutual_information_matrix_is_batched_not_a_loop():
    grams = jnp.stack([np.eye(N) / N] * 5)
    jaxpr = str(jax.make_jaxpr(lambda g: E.mutual_information_matrix(g, alpha=1.01))(grams))
    # One batched decomposition for the 5 marginals, one for the 10 pairs (per platform branch).
    calls = re.findall(r"(f64\[[\d,]+\])[^\n=]*= (eigh|tridiagonal)\[", jaxpr)
    assert sorted(calls) == [
        ("f64[10,16,16]", "eigh"),
        ("f64[10,16,16]", "tridiagonal"),
        ("f64[5,16,16]", "eigh"),
        ("f64[5,16,16]", "tridiagonal"),
    ], calls


# ----------------------------------------------------------------------------- NumPy reference


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-6), (np.float32, 1e-3)])
@pytest.mark.parametrize("data", ["random", "photo"])
def test_agrees_with_numpy_float64_reference(dtype, rtol, data):
    if data == "random":
        x, y = random_features(24, 10, seed=4), random_features(24, 3, seed=5)
    else:
        x = ref.photo_patches(24, seed=0).astype(np.float64) / 255
        y = ref.photo_patches(24, seed=1).astype(np.float64) / 255
    x32, y32 = x.astype(dtype), y.astype(dtype)
    A, B = E.normalize_gram(E.gram_matrix(x32)), E.normalize_gram(E.gram_matrix(y32))
    assert A.dtype == dtype
    A_ref = ref.normalize(ref.gaussian_gram(x, ref.median_sigma(x)))
    B_ref = ref.normalize(ref.gaussian_gram(y, ref.median_sigma(y)))
    np.testing.assert_allclose(A, A_ref, rtol=rtol, atol=rtol / 24)
    for alpha in ALPHAS:
        np.testing.assert_allclose(
            E.renyi_entropy(A, alpha=alpha), ref.entropy(A_ref, alpha, tol_dtype=dtype), rtol=rtol
        )
        np.testing.assert_allclose(
            E.joint_entropy(A, B, alpha=alpha), ref.joint(A_ref, B_ref, alpha=alpha, tol_dtype=dtype), rtol=rtol
        )
        np.testing.assert_allclose(
            E.mutual_information(A, B, alpha=alpha),
            ref.mutual_information(A_ref, B_ref, alpha, tol_dtype=dtype),
            rtol=rtol,
            atol=rtol,
        )


def test_width_rules_match_their_definitions():
    x = random_features(20, 4, seed=6)
    dist = np.sqrt(ref.sq_distances(x))
    np.testing.assert_allclose(E.kernel_width(x, "median"), ref.median_sigma(x), rtol=1e-10)
    np.testing.assert_allclose(E.kernel_width(x, "knn", k=3), np.mean(np.sort(dist, axis=1)[:, 3]), rtol=1e-10)
    np.testing.assert_allclose(E.kernel_width(x, "dib"), np.mean(dist[:, :10]) / math.sqrt(2), rtol=1e-10)
    np.testing.assert_allclose(E.kernel_width(x, "silverman"), 20 ** (-1 / 8), rtol=1e-12)
    np.testing.assert_allclose(
        E.kernel_width(x, "silverman", gamma=0.8, scale_by_dim=True), 0.8 * 2 * 20 ** (-1 / 8), rtol=1e-12
    )
    # The DIB code's kernel exp(-d^2 / σ_dib^2) is ours with σ = σ_dib / √2.
    sigma_dib = np.mean(dist[:, :10])
    np.testing.assert_allclose(E.gram_matrix(x, width="dib"), np.exp(-(dist**2) / sigma_dib**2), rtol=1e-10)
    # Coinciding samples: the median is 0, the rule falls back to the mean distance.
    dup = np.concatenate([np.repeat(x[:1], 15, axis=0), x[1:6]])  # 105 of 190 pairs coincide
    d_dup = np.sqrt(ref.sq_distances(dup))
    np.testing.assert_allclose(E.kernel_width(dup), np.mean(d_dup[np.triu_indices(20, 1)]), rtol=1e-10)


def test_label_and_linear_kernels():
    labels = np.array([0, 1, 1, 2, 0, 2])
    K = E.label_gram(labels)
    np.testing.assert_array_equal(K, labels[:, None] == labels[None, :])
    np.testing.assert_array_equal(E.label_gram(np.eye(3)[labels], num_classes=3), K)
    np.testing.assert_allclose(E.renyi_entropy(E.normalize_gram(K), alpha=1.01), math.log2(3), rtol=1e-10)
    x = random_features(8, 3)
    np.testing.assert_allclose(E.gram_matrix(x, kernel="linear"), x @ x.T, rtol=1e-12)
    cosine = E.normalize_gram(E.gram_matrix(x, kernel="linear"))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine, unit @ unit.T / 8, rtol=1e-12)


def test_distances_use_highest_matmul_precision():
    jaxpr = str(jax.make_jaxpr(E.gram_matrix)(np.ones((4, 3), np.float32)))
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr
    assert "DEFAULT" not in jaxpr


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_matches_closed_form(alpha):
    A = E.normalize_gram(E.gram_matrix(random_features(seed=7)))
    grad = jax.grad(functools.partial(E.renyi_entropy, alpha=alpha))(A)
    np.testing.assert_allclose(grad, ref.entropy_gradient(np.asarray(A), alpha), rtol=1e-7, atol=1e-9)
    # Finite differences need a spectrum well away from 0 (λ^α is steep there for α <= 1).
    well_conditioned = E.normalize_gram(E.gram_matrix(random_features(d=40, seed=7)))
    # Normalised inside: a finite-difference step off the unit-trace matrices would give NaN (renyi_entropy's
    # policy). A step of 1e-6 keeps the central difference's O(step^2) error below the tolerance.
    check_grads(
        lambda a: E.renyi_entropy(a / jnp.trace(a), alpha=alpha, method="eigh"),
        (well_conditioned,),
        order=1,
        modes=("fwd", "rev"),
        eps=1e-6,
    )


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_through_the_kernel_matches_finite_differences(alpha):
    x, y = random_features(10, 3, seed=8), random_features(10, 2, seed=9)

    def mi(x):  # fixed widths: a data-chosen width is stop_gradient-ed by design
        return E.mutual_information(
            E.normalize_gram(E.gram_matrix(x, 1.5)), E.normalize_gram(E.gram_matrix(y, 1.0)), alpha=alpha
        )

    check_grads(mi, (x,), order=1, modes=("rev",))


def test_data_chosen_width_is_not_differentiated():
    x = random_features()
    sigma = float(E.kernel_width(x))
    grad_rule = jax.grad(lambda v: entropy_of(v, 1.01))(x)
    grad_fixed = jax.grad(lambda v: entropy_of(v, 1.01, sigma=sigma))(x)
    np.testing.assert_allclose(grad_rule, grad_fixed, rtol=1e-10, atol=1e-14)
    assert float(jnp.abs(jax.grad(lambda v: E.kernel_width(v))(x)).max()) == 0


DEGENERATE = {
    "tiny_sigma": (lambda x: E.gram_matrix(x, 1e-3)),  # A = I/n to machine precision
    "huge_sigma": (lambda x: E.gram_matrix(x, 1e3)),  # rank 1 up to O(1/σ^2)
    "duplicates": (lambda x: E.gram_matrix(jnp.repeat(x[:4], 4, axis=0))),  # rank 4
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_correct_gradients_on_degenerate_spectra(case, alpha, dtype):
    x = random_features(dtype=dtype)
    A = E.normalize_gram(DEGENERATE[case](x))
    grad_A = np.asarray(jax.grad(functools.partial(E.renyi_entropy, alpha=alpha))(A))
    assert np.all(np.isfinite(grad_A))
    if dtype == np.float64:
        expected = ref.entropy_gradient(np.asarray(A), alpha)
        np.testing.assert_allclose(grad_A, expected, atol=1e-7 * np.abs(expected).max() + 1e-9)
    grad_x = jax.grad(lambda v: E.renyi_entropy(E.normalize_gram(DEGENERATE[case](v)), alpha=alpha))(x)
    assert np.all(np.isfinite(np.asarray(grad_x)))


def test_naive_eigvalsh_gradient_fails_where_ours_does_not():
    A = E.normalize_gram(DEGENERATE["duplicates"](random_features()))  # 12 zero eigenvalues
    naive = jax.grad(lambda a: 2 * jnp.log2(jnp.sum(jnp.maximum(jnp.linalg.eigvalsh(a), 0) ** 0.5)))(A)
    assert not np.all(np.isfinite(np.asarray(naive)))
    np.testing.assert_allclose(
        jax.grad(functools.partial(E.renyi_entropy, alpha=0.5))(A), ref.entropy_gradient(np.asarray(A), 0.5), atol=1e-12
    )


# ----------------------------------------------------------------------------- NaN handling


def test_nan_never_passes_silently():
    A = np.eye(N) / N
    A[2, 3] = A[3, 2] = np.nan
    for method in ("eigh", "frobenius"):
        assert np.isnan(float(E.renyi_entropy(A, alpha=2.0, method=method)))
    assert np.isnan(float(E.renyi_entropy(A, alpha=0.5)))
    x = random_features()
    x[3, 1] = np.inf
    assert np.isnan(float(entropy_of(x, 1.01)))
    with pytest.raises(FloatingPointError, match="nan generated"):
        E.checked(lambda v: entropy_of(v, 1.01))(x)


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_checked_is_silent_on_valid_degenerate_input(case):
    x = random_features()

    def value_and_grad(v):
        return jax.value_and_grad(lambda w: E.renyi_entropy(E.normalize_gram(DEGENERATE[case](w)), alpha=0.5))(v)

    value, grad = E.checked(value_and_grad)(x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    err, _ = checkify.checkify(jax.jit(value_and_grad), errors=checkify.float_checks)(x)
    assert err.get() is None


# ----------------------------------------------------------------------------- transformations


class TransformTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        x = random_features(seed=10)

        @self.variant
        def info(x):
            A = E.normalize_gram(E.gram_matrix(x))
            B = E.normalize_gram(E.gram_matrix(x[:, :2], width="knn", k=3))
            return E.renyi_entropy(A, alpha=1.01), E.mutual_information(A, B, alpha=0.5), E.renyi_entropy(A, alpha=2.0)

        values = info(x)
        chex.assert_shape(values, ((), (), ()))
        A_ref = ref.normalize(ref.gaussian_gram(x, ref.median_sigma(x)))
        np.testing.assert_allclose(values[0], ref.entropy(A_ref, 1.01), rtol=1e-9)
        np.testing.assert_allclose(values[2], ref.entropy(A_ref, 2.0), rtol=1e-9)

    def test_vmap_matches_per_item(self):
        xs = np.stack([random_features(seed=s) for s in range(3)])
        batched = jax.jit(jax.vmap(lambda x: entropy_of(x, 1.01)))(xs)
        chex.assert_shape(batched, (3,))
        for i in range(3):
            np.testing.assert_allclose(batched[i], entropy_of(xs[i], 1.01), rtol=1e-10)
        grads = jax.vmap(jax.grad(lambda x: entropy_of(x, 0.5)))(xs)
        np.testing.assert_allclose(grads[1], jax.grad(lambda x: entropy_of(x, 0.5))(xs[1]), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: E.renyi_entropy(np.ones((3, 4)) / 3), r"square \(n, n\).*\(3, 4\)"),
        (lambda: E.renyi_entropy(np.ones((1, 1))), r"at least 2 x 2.*\(1, 1\)"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, alpha=0.0), r"alpha must be > 0.*0\.0"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, alpha=-1.5), r"alpha must be > 0.*-1\.5"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, method="lanczos"), r"unknown method 'lanczos'.*'eigh'.*'slq'"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, alpha=1.01, method="frobenius"), r"only for alpha = 2.*1\.01"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, method="slq"), r"needs a PRNG key"),
        (lambda: E.renyi_entropy(np.eye(3) / 3, base=1.0), r"base must be.*1\.0"),
        (lambda: E.renyi_entropy(np.eye(3, dtype=int)), r"floating dtype.*int"),
        (lambda: E.joint_entropy(np.eye(3) / 3, np.eye(4) / 4), r"share one shape.*\(3, 3\).*\(4, 4\)"),
        (lambda: E.mutual_information(np.eye(3) / 3, np.eye(4) / 4), r"share one shape"),
        (lambda: E.gram_matrix(np.ones((1, 5))), r"at least n = 2.*\(1, 5\)"),
        (lambda: E.gram_matrix(np.ones((4, 5)), kernel="rbf"), r"unknown kernel 'rbf'.*'gaussian', 'linear'"),
        (lambda: E.gram_matrix(np.ones((4, 5)), width="scott"), r"unknown width rule 'scott'.*'median'.*'dib'"),
        (lambda: E.gram_matrix(np.ones((4, 5)), sigma=-1.0), r"sigma must be > 0.*-1\.0"),
        (lambda: E.gram_matrix(np.ones((4, 5)), kernel="linear", sigma=1.0), r"linear kernel takes no sigma"),
        (lambda: E.gram_matrix(np.ones((4, 5)) * 1j), r"real.*complex"),
        (lambda: E.kernel_width(np.ones((4, 5)), "knn", k=4), r"1 <= k < n = 4.*4"),
        (lambda: E.kernel_width(np.ones((4, 5)), "median", k=4), r"unknown option.*'k'.*'median'"),
        (lambda: E.label_gram(np.array([0, 3, 1]), num_classes=3), r"\[0, 3\).*\[3\]"),
        (lambda: E.label_gram(np.array([0.0, 1.0])), r"must be integers.*float"),
        (lambda: E.mutual_information_matrix(np.ones((4, 4))), r"\(L, n, n\).*\(4, 4\)"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_traced_alpha_is_refused():
    with pytest.raises(ValueError, match="static"):
        jax.jit(E.renyi_entropy)(jnp.eye(3) / 3, alpha=1.5)


# ----------------------------------------------------------------------------- SLQ


def test_slq_is_close_to_exact_and_differentiable():
    x = ref.photo_patches(256, seed=2) / 255.0
    A = jax.jit(lambda v: E.normalize_gram(E.gram_matrix(v)))(x)

    @functools.partial(jax.jit, static_argnames="alpha")
    def slq(a, key, alpha):
        return E.renyi_entropy(a, alpha=alpha, method="slq", key=key, deflation_rank=32)

    exact = jax.jit(E.renyi_entropy, static_argnames="alpha")
    for alpha in (1.01, 0.5, 3.0):
        errors = [abs(float(slq(A, jax.random.key(s), alpha) / exact(A, alpha=alpha)) - 1) for s in range(3)]
        assert max(errors) < 0.03, (alpha, errors)
    grad = jax.grad(slq)(A, jax.random.key(0), 1.01)
    exact_grad = jax.grad(functools.partial(E.renyi_entropy, alpha=1.01))(A)
    assert np.all(np.isfinite(np.asarray(grad)))
    cosine = jnp.sum(grad * exact_grad) / (jnp.linalg.norm(grad) * jnp.linalg.norm(exact_grad))
    assert float(cosine) > 0.9  # a stochastic estimate of the gradient


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_slq_is_finite_on_degenerate_spectra(case):
    A = E.normalize_gram(DEGENERATE[case](random_features(32, 4)))
    value = jax.jit(lambda a: E.renyi_entropy(a, alpha=1.01, method="slq", key=jax.random.key(0), deflation_rank=4))(A)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(value, E.renyi_entropy(A, alpha=1.01), atol=0.25)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 7, 8128])
def test_kth_smallest_without_sorting_equals_numpy_sort(dtype, size):
    rng = np.random.default_rng(size)
    values = rng.exponential(size=size).astype(dtype)
    values[: size // 3] = values[0]  # ties
    if size > 2:
        values[1] = 0.0
        values[2] = np.inf  # the diagonal of the median's distance matrix
    ordered = np.sort(values)
    for k in sorted({0, size // 2, size - 1}):
        got = E._kth_smallest_nonnegative(jnp.asarray(values), k)
        assert got.dtype == dtype
        assert float(got) == float(ordered[k]), k
