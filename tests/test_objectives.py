"""Per-stage objectives against independent NumPy float64 implementations of their formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dibjax import objectives
from tests import reference

# The NumPy references are float64 and most tests feed float64 arrays, which need x64 mode.
pytestmark = pytest.mark.usefixtures("x64")


def batch(seed=0, n=24, shape=(6, 6, 5), classes=4):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, *shape))
    logits = rng.normal(size=(n, classes))
    labels = rng.integers(0, classes, n)
    stage_input = rng.normal(size=(n, 8, 8, 3))
    network_input = rng.normal(size=(n, 8, 8, 3))
    return features, logits, labels, stage_input, network_input


def np_cross_entropy(logits, labels, smoothing=0.0):
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.eye(logits.shape[1])[labels] * (1 - smoothing) + smoothing / logits.shape[1]
    return float(np.mean(-(target * logp).sum(1)))


def np_pool(x, size):
    """Average pooling of an NHWC map to size×size with the bins of adaptive_avg_pool, then flatten."""
    n, h, w, c = x.shape
    if h <= size and w <= size:
        return x.reshape(n, -1)
    out = np.zeros((n, size, size, c))
    for i in range(size):
        for j in range(size):
            h0, h1 = i * h // size, -(-(i + 1) * h // size)
            w0, w1 = j * w // size, -(-(j + 1) * w // size)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out.reshape(n, -1)


def np_gram(x):
    return reference.normalize(reference.gaussian_gram(x, reference.median_sigma(x)))


def np_label_gram(labels):
    return reference.normalize((labels[:, None] == labels[None, :]).astype(float))


def call(objective, features, logits, labels, stage_input, network_input):
    return objective(
        jnp.asarray(features),
        jnp.asarray(logits),
        jnp.asarray(labels),
        stage_input=jnp.asarray(stage_input),
        network_input=jnp.asarray(network_input),
    )


class TestCrossEntropy:
    @pytest.mark.parametrize("smoothing", [0.0, 0.1])
    def test_matches_numpy(self, smoothing):
        f, logits, y, s, x = batch()
        loss, terms = call(objectives.CrossEntropy(smoothing), f, logits, y, s, x)
        assert float(loss) == pytest.approx(np_cross_entropy(logits, y, smoothing), rel=1e-10)
        assert set(terms) == {"ce"}

    def test_bfloat16_logits_are_scored_in_float32(self):
        logits = jnp.asarray([[4.0, -3.0, 0.5]], jnp.bfloat16)
        ce = objectives.cross_entropy(logits, jnp.asarray([2]))
        assert ce.dtype == jnp.float32
        assert float(ce[0]) == pytest.approx(np_cross_entropy(np.asarray(logits, np.float64), np.asarray([2])))


class TestDIB:
    @pytest.mark.parametrize("alpha", [1.01, 2.0])
    @pytest.mark.parametrize("pool", [0, 3])
    def test_entropy_compression_matches_numpy(self, alpha, pool):
        f, logits, y, s, x = batch()
        objective = objectives.DIB(beta=0.3, compression="entropy", alpha=alpha, pool=pool)
        loss, terms = call(objective, f, logits, y, s, x)
        reduced = np_pool(f, pool) if pool else f.reshape(len(f), -1)
        h_t = reference.entropy(np_gram(reduced), alpha)
        ce = np_cross_entropy(logits, y)
        assert float(terms["H_T"]) == pytest.approx(h_t, rel=1e-8)
        assert float(terms["ce"]) == pytest.approx(ce, rel=1e-10)
        assert float(loss) == pytest.approx(ce + 0.3 * h_t, rel=1e-8)

    @pytest.mark.parametrize("compression,source_index,name", [("mi_input", 4, "I_XT"), ("mi_prev", 3, "I_prev")])
    def test_mutual_information_compressions_match_numpy(self, compression, source_index, name):
        data = batch(seed=1)
        f, logits, y = data[:3]
        source = data[source_index]
        objective = objectives.DIB(beta=0.05, compression=compression, pool=4)
        loss, terms = call(objective, *data)
        a_t, a_s = np_gram(np_pool(f, 4)), np_gram(np_pool(source, 4))
        mi = reference.mutual_information(a_s, a_t, 1.01)
        assert float(terms[name]) == pytest.approx(mi, rel=1e-7)
        assert float(loss) == pytest.approx(np_cross_entropy(logits, y) + 0.05 * mi, rel=1e-8)

    def test_relevance_term_matches_numpy(self):
        f, logits, y, s, x = batch(seed=2)
        objective = objectives.DIB(beta=0.0, gamma=0.2, compression="none", pool=2)
        loss, terms = call(objective, f, logits, y, s, x)
        i_ty = reference.mutual_information(np_gram(np_pool(f, 2)), np_label_gram(y), 1.01)
        assert float(terms["I_TY"]) == pytest.approx(i_ty, rel=1e-7)
        assert float(loss) == pytest.approx(np_cross_entropy(logits, y) - 0.2 * i_ty, rel=1e-8)

    @pytest.mark.parametrize("compression,name", [("entropy", "H_T"), ("mi_prev", "I_prev")])
    def test_a_negative_beta_rewards_the_information_term(self, compression, name):
        data = batch(seed=6)
        loss, terms = call(objectives.DIB(beta=-0.2, compression=compression, pool=2), *data)
        assert float(terms[name]) > 0
        assert float(loss) == pytest.approx(np_cross_entropy(data[1], data[2]) - 0.2 * float(terms[name]), rel=1e-8)

    def test_beta_grows_geometrically_from_the_first_stage_to_the_last(self):
        objective = objectives.DIB(beta=0.01, beta_growth=100.0, gamma=0.3, compression="mi_input")
        betas = [objective.for_stage(k, 3).beta for k in range(3)]
        np.testing.assert_allclose(betas, [0.01, 0.1, 1.0], rtol=1e-12)
        assert objective.for_stage(1, 3) == objectives.DIB(beta=betas[1], gamma=0.3, compression="mi_input")
        assert objective.for_stage(0, 1) == objective
        negative = objectives.DIB(beta=-0.02, beta_growth=0.5)
        np.testing.assert_allclose([negative.for_stage(k, 5).beta for k in (0, 4)], [-0.02, -0.01], rtol=1e-12)

    def test_without_information_terms_it_is_the_cross_entropy(self):
        data = batch()
        loss, terms = call(objectives.DIB(beta=0.5, compression="none"), *data)
        ce_loss, _ = call(objectives.CrossEntropy(), *data)
        assert float(loss) == float(ce_loss)
        assert set(terms) == {"ce"}

    def test_compression_gradient_reaches_the_features_and_lowers_the_entropy(self):
        f, logits, y, s, x = (jnp.asarray(a, jnp.float32) for a in batch(seed=3))
        y = y.astype(jnp.int32)
        objective = objectives.DIB(beta=1.0, compression="entropy", pool=0)

        def compression(features):
            return objective(features, logits, y, stage_input=s, network_input=x)[1]["H_T"]

        grad = jax.grad(compression)(f)
        assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.linalg.norm(grad)) > 0
        # A small step against the gradient lowers S_α(T) (the width is held fixed inside the step).
        assert float(compression(f - 1e-2 * grad / jnp.linalg.norm(grad))) < float(compression(f))

    def test_mi_input_does_not_differentiate_the_input(self):
        f, logits, y, s, x = (jnp.asarray(a) for a in batch(seed=4))
        objective = objectives.DIB(beta=1.0, compression="mi_input")
        grad = jax.grad(lambda xx: objective(f, logits, y, stage_input=s, network_input=xx)[0])(x)
        assert float(jnp.max(jnp.abs(grad))) == 0.0

    @pytest.mark.parametrize(
        "options,match",
        [
            ({"compression": "mutual"}, "unknown compression 'mutual'"),
            ({"width": "scott"}, "unknown width rule 'scott'"),
            ({"beta_growth": 0.0}, "beta_growth must be > 0"),
            ({"alpha": 0.0}, "alpha must be > 0"),
            ({"pool": -1}, "pool must be an int >= 0"),
            ({"beta": float("nan")}, "beta must be a finite number"),
        ],
    )
    def test_bad_options_are_refused(self, options, match):
        with pytest.raises(ValueError, match=match):
            objectives.DIB(**options)


class DIBTransformTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        f, logits, y, s, x = (jnp.asarray(a, jnp.float32) for a in batch(seed=5))
        y = y.astype(jnp.int32)
        objective = objectives.DIB(beta=0.1, gamma=0.1, compression="mi_prev")
        fn = self.variant(lambda f, logits, y, s, x: objective(f, logits, y, stage_input=s, network_input=x)[0])
        expected = reference.mutual_information(
            np_gram(np_pool(np.asarray(s, np.float64), 4)), np_gram(np_pool(np.asarray(f, np.float64), 4)), 1.01
        )
        _, terms = objective(f, logits, y, stage_input=s, network_input=x)
        np.testing.assert_allclose(terms["I_prev"], expected, rtol=1e-3)
        np.testing.assert_allclose(
            fn(f, logits, y, s, x), objective(f, logits, y, stage_input=s, network_input=x)[0], rtol=1e-5
        )


def np_similarity(x):
    if x.ndim == 4 and x.shape[-1] > 3 and x.shape[1] * x.shape[2] > 1:
        x = x.reshape(x.shape[0], -1, x.shape[-1]).std(axis=1, ddof=1)
    x = x.reshape(x.shape[0], -1)
    xc = x - x.mean(1, keepdims=True)
    xn = xc / (1e-8 + np.sqrt((xc**2).sum(1, keepdims=True)))
    return np.clip(xn @ xn.T, -1, 1)


@pytest.mark.parametrize("similarity_conv", [True, False])
def test_predsim_matches_numpy(similarity_conv):
    f, logits, y, s, x = batch(seed=6)
    conv_output = np.random.default_rng(16).normal(size=f.shape)
    objective = objectives.PredSim(beta=0.99, similarity_conv=similarity_conv)
    loss, terms = objective(
        jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y), extras={"similarity": jnp.asarray(conv_output)}
    )
    compared = conv_output if similarity_conv else f
    sim = np.mean((np_similarity(compared) - np_similarity(np.eye(4)[y])) ** 2)
    ce = np_cross_entropy(logits, y)
    assert float(terms["sim"]) == pytest.approx(sim, rel=1e-8)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-8)
    # The head learns from the whole CE (the scheduler scales it by 1 − β on its way into the stage).
    assert float(loss) == pytest.approx(ce + 0.99 * sim, rel=1e-8)
    assert objective.head_gradient == pytest.approx(0.01)
    assert objective.head_extras == (("similarity",) if similarity_conv else ())


def test_predsim_similarity_of_one_hot_labels_is_one_within_a_class_and_minus_one_over_c_minus_one_across():
    labels = np.array([0, 1, 2, 3, 0])
    s = np.asarray(objectives.similarity_matrix(jax.nn.one_hot(jnp.asarray(labels), 10)))
    expected = np.where(labels[:, None] == labels[None, :], 1.0, -1.0 / 9.0)
    np.testing.assert_allclose(s, expected, atol=1e-7)


def test_predsim_needs_its_convolution_output():
    f, logits, y, _, _ = batch(seed=6)
    with pytest.raises(ValueError, match=r"head_extras=\('similarity',\)"):
        objectives.PredSim()(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y))


def np_normalized_hsic_factor(z, sigma, epsilon=1e-5):
    """``kernelmat`` and the inverse of ``hsic_normalized_cca`` (choasma/HSIC-bottleneck), in float64."""
    z = z.reshape(len(z), -1)
    m, d = z.shape
    sq = (z**2).sum(1)
    distances = np.abs(sq[:, None] - 2 * z @ z.T + sq[None, :])
    K = np.exp(-distances / (2.0 * sigma * sigma * d))
    Kc = K @ (np.eye(m) - np.ones((m, m)) / m)
    return Kc @ np.linalg.inv(Kc + epsilon * m * np.eye(m))


def test_hsic_bottleneck_matches_the_authors_normalised_estimator():
    f, logits, y, _, _ = batch(seed=17)
    pixels = np.random.default_rng(18).uniform(size=(len(y), 8, 8, 3))
    objective = objectives.HSICBottleneck(beta=500.0, sigma=5.0)
    loss, terms = objective(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y), pixels=jnp.asarray(pixels))
    r_t, r_x = np_normalized_hsic_factor(f, 5.0), np_normalized_hsic_factor(pixels, 5.0)
    r_y = np_normalized_hsic_factor(np.eye(4)[y], 5.0)
    hsic_x, hsic_y = np.sum(r_t * r_x.T), np.sum(r_t * r_y.T)
    assert float(terms["hsic_x"]) == pytest.approx(hsic_x, rel=1e-8)
    assert float(terms["hsic_y"]) == pytest.approx(hsic_y, rel=1e-8)
    assert float(loss) == pytest.approx(np_cross_entropy(logits, y) + hsic_x - 500.0 * hsic_y, rel=1e-8)
    # nHSIC(a, a) = tr(R²) counts the kernel's directions above εn: at most n, and about n for distinct samples.
    assert 0 < hsic_y and 0 < hsic_x <= len(y)
    assert objectives.HSICBottleneck.head_gradient == 0.0
    with pytest.raises(ValueError, match="pixels"):
        objective(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y))


def test_unnormalized_hsic_matches_the_trace_formula():
    f, logits, y, s, x = batch(seed=7)
    loss, terms = call(objectives.UnnormalizedHSIC(lam=50.0, pool=3), f, logits, y, s, x)
    n = len(y)
    H = np.eye(n) - 1.0 / n

    def gauss(z):
        return reference.gaussian_gram(z, reference.median_sigma(z))

    k_t, k_x = gauss(np_pool(f, 3)), gauss(np_pool(x, 3))
    k_y = (y[:, None] == y[None, :]).astype(float)
    hsic_x = np.trace(k_t @ H @ k_x @ H) / (n - 1) ** 2
    hsic_y = np.trace(k_t @ H @ k_y @ H) / (n - 1) ** 2
    assert float(terms["hsic_x"]) == pytest.approx(hsic_x, rel=1e-8)
    assert float(terms["hsic_y"]) == pytest.approx(hsic_y, rel=1e-8)
    assert float(loss) == pytest.approx(np_cross_entropy(logits, y) + hsic_x - 50.0 * hsic_y, rel=1e-8)
    assert objectives.UnnormalizedHSIC.head_gradient == 0.0


def test_hsic_of_independent_kernels_is_near_zero_and_of_equal_ones_positive():
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.normal(size=(200, 3)))
    b = jnp.asarray(rng.normal(size=(200, 3)))
    K = objectives.entropy.gram_matrix(a)
    assert abs(float(objectives.hsic(K, objectives.entropy.gram_matrix(b)))) < 0.1 * float(objectives.hsic(K, K))


class TestRegistry:
    def test_every_objective_is_registered_by_name(self):
        assert set(objectives.OBJECTIVES) == {
            "ce",
            "dib",
            "predsim",
            "hsic",
            "hsic_unnormalized",
            "head_only",
            "infopro",
        }
        for name in objectives.OBJECTIVES:
            assert isinstance(objectives.make_objective(name), objectives.OBJECTIVES[name])

    def test_unknown_name_and_option_are_refused(self):
        with pytest.raises(
            ValueError,
            match="unknown objective 'ib'; accepted: ce, dib, predsim, hsic, hsic_unnormalized, head_only, infopro",
        ):
            objectives.make_objective("ib")
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['lam'\] for objective 'dib'"):
            objectives.make_objective("dib", lam=1.0)

    def test_from_config_reads_the_named_section_and_the_label_smoothing(self):
        config = {"name": "dib", "dib": {"beta": 0.01, "pool": 2}, "hsic": {"lam": 3.0}}
        objective = objectives.from_config(config, label_smoothing=0.1)
        assert objective == objectives.DIB(beta=0.01, pool=2, label_smoothing=0.1)

    def test_minimum_batch_sizes(self):
        assert objectives.minimum_batch_size(objectives.CrossEntropy()) == 1
        assert objectives.minimum_batch_size(objectives.DIB(compression="none")) == 1
        assert objectives.minimum_batch_size(objectives.DIB()) == 2
        assert objectives.minimum_batch_size(objectives.DIB(width="knn")) == 11
        assert objectives.minimum_batch_size(objectives.HSICBottleneck()) == 2
        assert objectives.minimum_batch_size(objectives.UnnormalizedHSIC()) == 2


def np_supcon(features, labels, temperature=0.07):
    """SupConLoss of InfoPro's networks/losses.py (one view, contrast_mode='all', base_temperature 0.07)."""
    z = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n = len(labels)
    mask = (labels[:, None] == labels[None, :]).astype(float)
    scores = z @ z.T / temperature
    logits = scores - scores.max(axis=1, keepdims=True)
    logits_mask = 1.0 - np.eye(n)
    mask = mask * logits_mask
    log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1, keepdims=True))
    mask_sum = mask.sum(1)
    mask_sum[mask_sum == 0] += 1
    return float(np.mean(-(mask * log_prob).sum(1) / mask_sum))


def test_supervised_contrastive_loss_matches_the_authors_code():
    rng = np.random.default_rng(20)
    features = rng.normal(size=(12, 6))
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 1, 2, 4])  # class 3 and 4: anchors without a positive
    got = objectives.supervised_contrastive_loss(jnp.asarray(features), jnp.asarray(labels))
    assert float(got) == pytest.approx(np_supcon(features, labels), rel=1e-8)
    # Tight clusters by label give a lower loss than the same points with the labels shuffled.
    clustered = np.eye(6)[labels % 6] + 0.01 * rng.normal(size=(12, 6))
    shuffled = rng.permutation(labels)
    assert np_supcon(clustered, labels) < np_supcon(clustered, shuffled)
    # A zero row (a projection whose ReLUs are all off) has the loss of the authors' code and a finite gradient.
    features[3] = 0.0
    loss = lambda f: objectives.supervised_contrastive_loss(f, jnp.asarray(labels))  # noqa: E731
    assert float(loss(jnp.asarray(features))) == pytest.approx(np_supcon(features, labels), rel=1e-8)
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(jnp.asarray(features)))))


def test_binary_cross_entropy_matches_pytorch_bce():
    rng = np.random.default_rng(21)
    p = rng.uniform(size=(4, 5, 5, 3))
    p[0, 0, 0, 0], p[0, 0, 0, 1] = 0.0, 1.0  # log 0 clamped at −100, as BCELoss
    t = rng.uniform(size=p.shape)
    with np.errstate(divide="ignore"):
        expected = -np.mean(t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log(1 - p), -100))
    assert float(objectives.binary_cross_entropy(jnp.asarray(p), jnp.asarray(t))) == pytest.approx(expected, rel=1e-8)
    grad = jax.grad(lambda p: objectives.binary_cross_entropy(p, jnp.asarray(t)))(jnp.asarray(p))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_infopro_weights_interpolate_as_the_authors_code():
    objective = objectives.InfoPro()  # ResNet-32, K = 4: λ1 6 → 1, λ2 0 → 2 over modules 0 .. K − 2
    assert [objective.weights(k, 4) for k in range(4)] == [(6.0, 0.0), (3.5, 1.0), (1.0, 2.0), (0.0, 0.0)]
    assert objective.weights(0, 2) == (6.0, 0.0)  # K = 2: ratio 0
    assert isinstance(objective.for_stage(3, 4), objectives.CrossEntropy)
    assert objective.for_stage(1, 4) == objectives.InfoProStage("contrast", 3.5, 1.0)


@pytest.mark.parametrize("task", ["softmax", "contrast"])
def test_infopro_stage_loss_matches_numpy(task):
    f, logits, y, _, _ = batch(seed=22)
    rng = np.random.default_rng(23)
    pixels = rng.uniform(size=(len(y), 8, 8, 3))
    reconstruction = rng.uniform(0.01, 0.99, size=pixels.shape)
    projection = rng.normal(size=(len(y), 16))
    extras = {"decoder": jnp.asarray(reconstruction), "projection": jnp.asarray(projection)}
    stage = objectives.InfoPro(task=task).for_stage(1, 4)
    loss, terms = stage(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y), extras=extras, pixels=jnp.asarray(pixels))
    recon = -np.mean(pixels * np.log(reconstruction) + (1 - pixels) * np.log(1 - reconstruction))
    ce = np_cross_entropy(logits, y)
    assert float(terms["recon"]) == pytest.approx(recon, rel=1e-8)
    if task == "softmax":
        assert float(loss) == pytest.approx(3.5 * recon + 1.0 * ce, rel=1e-8)
        assert stage.head_gradient == 1.0
    else:
        supcon = np_supcon(projection, y)
        assert float(terms["contrast"]) == pytest.approx(supcon, rel=1e-8)
        # The probe's CE is in the loss but reaches only the probe (head_gradient 0).
        assert float(loss) == pytest.approx(3.5 * recon + 1.0 * supcon + ce, rel=1e-8)
        assert stage.head_gradient == 0.0
    with pytest.raises(ValueError, match="pixels"):
        stage(jnp.asarray(f), jnp.asarray(logits), jnp.asarray(y), extras=extras)
