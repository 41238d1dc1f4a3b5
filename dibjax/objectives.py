"""Per-stage training objectives for greedy layer-wise training, keyed by name in :data:`OBJECTIVES`.

Every objective is a frozen dataclass whose ``__call__`` is a pure function of one stage's batch:

    loss, terms = objective(features, logits, labels, stage_input=..., network_input=...)

* ``features``: ``T_k``, the stage output (``(n, H, W, C)`` or ``(n, d)``);
* ``logits``: the stage's auxiliary head applied to ``T_k`` (``(n, num_classes)``); the gradient of the loss with
  respect to the head's input reaches the stage multiplied by the objective's ``head_gradient`` (1: the head's
  loss trains the stage; 0: the head learns on ``stop_gradient(T_k)``);
* ``labels``: integer labels ``(n,)``;
* ``stage_input``: ``T_{k-1}``, the input of the stage (the network input for the first stage);
* ``network_input``: ``X``, the normalised image batch;
* ``extras``: the outputs of the head's extra modules on ``T_k`` (:class:`~dibjax.models.HeadWithExtras`), by
  name; an objective that needs one names it in its ``head_extras``;
* ``pixels``: the same (augmented) images before normalisation, in ``[0, 1]``.

``terms`` maps names (``ce``, ``H_T``, ``I_XT``, ``I_prev``, ``I_TY``, ``sim``, ``hsic_x``, ``hsic_y``) to the scalar
values that make up the loss, for logging. Information quantities are in bits, estimated with
:mod:`dibjax.entropy` (matrix-based Rényi α-order entropy; Gaussian kernel ``exp(-d²/(2σ²))``, σ from the
configured width rule under ``stop_gradient``, Gram matrices normalised to unit trace), on the batch.

The objectives:

* ``ce``: ``CE(g_k(T_k), Y)``, the auxiliary head's cross-entropy alone (greedy CE / DGL training).
* ``dib``: ``CE(g_k(T_k), Y) + β C(T_k) − γ I_α(T_k; Y)``, the deterministic information bottleneck
  (Strouse & Schwab, "The Deterministic Information Bottleneck", Neural Computation 29(6), 2017) with the
  compression ``C`` one of ``S_α(T_k)`` (``"entropy"``: for a deterministic map ``I(X; T) = H(T)``),
  ``I_α(X; T_k)`` (``"mi_input"``), ``I_α(T_{k-1}; T_k)`` (``"mi_prev"``, along the Markov chain) or nothing
  (``"none"``), as in Lyu, Wu & Du, "Information-Theoretic Greedy Layer-wise Training for Traffic Sign
  Recognition" (arXiv:2510.27651, 2025). β may change from stage to stage (:class:`DIB`) and may be negative,
  which rewards information kept rather than compressing it.
* ``predsim``: ``(1 − β) CE(g_k(T_k), Y) + β ||S(c_k(T_k)) − S(Y)||²`` (mean over the ``n²`` entries), the local
  loss of Nøkland & Eidnes, "Training Neural Networks with Local Error Signals" (ICML 2019), ``S`` being the cosine
  similarity matrix of centred rows and ``c_k`` a 3×3 convolution carried by the head; a feature map enters as the
  standard deviation of each channel over the spatial positions, as in the authors' code. Its gradients are those
  the authors' Adam gives (:class:`PredSim`).
* ``infopro``: ``λ1(k) L_recon + λ2(k) L_task`` of InfoPro (Wang et al., ICLR 2021), weights interpolated over the
  stages (:class:`InfoPro`); an objective with ``for_stage(k, K)`` gives each stage its own loss.
* ``head_only``: ``CE(g_k(T_k), Y)`` for the head alone; the stage is never updated (``trains_stage`` is False),
  so with it a run trains classifiers on the stages as initialised: the random-feature control that any
  layer-wise objective's per-stage accuracies must clear.
* ``hsic``: ``nHSIC(T_k, X) − β nHSIC(T_k, Y)``, the HSIC bottleneck of Ma, Lewis & Kleijn, "The HSIC
  Bottleneck: Deep Learning without Back-Propagation" (AAAI 2020), with their normalised estimator and fixed
  kernel widths (:class:`HSICBottleneck`). The head is trained by its cross-entropy on ``stop_gradient(T_k)``: the
  stage learns from the HSIC terms alone. ``hsic_unnormalized``: ``HSIC(T_k, X) − λ HSIC(T_k, Y)`` with the biased
  estimator ``HSIC(K, L) = tr(K H L H) / (n − 1)²`` (:class:`UnnormalizedHSIC`).

Feature maps enter a Gram matrix average-pooled to ``pool × pool`` positions (``pool=0``: flattened as they are);
the Gram matrix of a 32×32×64 map costs more than the convolution that made it, and pooling keeps the kernel
distances from being dominated by the dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from dibjax import entropy
from dibjax.errors import ConfigError
from dibjax.models.layers import adaptive_avg_pool

Array = jax.Array

COMPRESSIONS = ("entropy", "mi_input", "mi_prev", "none")


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Per-sample softmax cross-entropy (nats) with optional label smoothing, in float32 or wider.

    bfloat16 logits (mixed precision) are scored in float32: a bfloat16 log-softmax keeps 3 significant digits.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def reduce_features(x: Array, pool: int) -> Array:
    """A batch as the ``(n, d)`` rows that enter a Gram matrix, in float32 or wider.

    A feature map ``(n, H, W, C)`` is average-pooled to ``pool × pool`` positions first when ``pool > 0`` and its
    spatial size is larger; other arrays are flattened per sample.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if pool > 0 and x.ndim == 4 and (x.shape[1] > pool or x.shape[2] > pool):
        x = adaptive_avg_pool(x, pool)
    return x.reshape(x.shape[0], -1)


def _check_number(owner: str, name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigError(f"{owner}: {name} must be {relation} {minimum}, got {value!r}")


def _check_pool(owner: str, pool: Any) -> None:
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
        raise ConfigError(f"{owner}: pool must be an int >= 0 (0 = flatten), got {pool!r}")


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """``CE(g_k(T_k), Y)``: the auxiliary head's cross-entropy (nats), optionally with label smoothing."""

    label_smoothing: float = 0.0
    head_gradient: ClassVar[float] = 1.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        _check_number("ce", "label_smoothing", self.label_smoothing)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class HeadOnly(CrossEntropy):
    """``CE(g_k(T_k), Y)`` for the head; the stage is never updated and keeps its initial parameters.

    Trained with it, the heads measure what the stages compute at initialisation (their BatchNorm statistics still
    follow the data): the random-feature floor that a layer-wise objective's per-stage head accuracies must clear.
    """

    head_gradient: ClassVar[float] = 0.0
    trains_stage: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class DIB:
    """``CE(g_k(T_k), Y) + β_k C(T_k) − γ I_α(T_k; Y)`` with the compression ``C`` named by ``compression``.

    ``β_k = β · r^(k / (K − 1))`` for stage ``k`` of ``K`` (from 0), ``r`` being ``beta_growth``: β at the first
    stage, ``β·r`` at the last, geometric in between (``r > 1``: stronger compression in later stages).

    Attributes:
      beta: weight β of the compression term (bits) at the first stage. β > 0 compresses ``T_k`` (the DIB
        direction); β < 0 rewards keeping information in it (the direction of InfoPro's reconstruction term).
        The default, −0.01 with ``compression="entropy"``, is the setting chosen on held-out data by the study in
        docs/regimes.md, in which no β > 0 helped.
      beta_growth: ratio r > 0 of the last stage's β to the first's (1: the same β at every stage).
      gamma: weight γ >= 0 of the matrix-based relevance ``I_α(T_k; Y)`` (label kernel ``[y_i = y_j]``).
      compression: ``"entropy"`` (``S_α(T_k)``), ``"mi_input"`` (``I_α(X; T_k)``), ``"mi_prev"``
        (``I_α(T_{k-1}; T_k)``) or ``"none"``.
      alpha: Rényi order α > 0 (static).
      width: the kernel-width rule of :func:`dibjax.entropy.kernel_width`.
      pool: spatial size feature maps are average-pooled to before their Gram matrix (0: flatten).
      label_smoothing: label smoothing of the cross-entropy term.
    """

    beta: float = -0.01
    beta_growth: float = 1.0
    gamma: float = 0.0
    compression: str = "entropy"
    alpha: float = 1.01
    width: str = "median"
    pool: int = 4
    label_smoothing: float = 0.0
    head_gradient: ClassVar[float] = 1.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"dib: unknown compression {self.compression!r}; accepted: {', '.join(COMPRESSIONS)}")
        if self.width not in entropy.WIDTH_RULES:
            raise ConfigError(f"dib: unknown width rule {self.width!r}; accepted: {', '.join(entropy.WIDTH_RULES)}")
        _check_number("dib", "beta", self.beta, minimum=-math.inf)
        _check_number("dib", "beta_growth", self.beta_growth, strict=True)
        _check_number("dib", "gamma", self.gamma)
        _check_number("dib", "alpha", self.alpha, strict=True)
        _check_number("dib", "label_smoothing", self.label_smoothing)
        _check_pool("dib", self.pool)

    def for_stage(self, stage: int, num_stages: int) -> DIB:
        """The loss of stage ``stage`` (from 0) of ``num_stages``: this one with β replaced by ``β_k``."""
        if self.beta_growth == 1.0 or num_stages == 1:
            return self
        beta = self.beta * self.beta_growth ** (stage / (num_stages - 1))
        return dataclasses.replace(self, beta=beta, beta_growth=1.0)

    def _gram(self, x: Array) -> Array:
        return entropy.normalize_gram(entropy.gram_matrix(reduce_features(x, self.pool), width=self.width))

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        terms = {"ce": ce}
        loss = ce
        needs_t = self.compression != "none" or self.gamma > 0
        if not needs_t:
            return loss, terms
        a_t = self._gram(features)
        h_t = entropy.renyi_entropy(a_t, alpha=self.alpha)
        terms["H_T"] = h_t
        if self.compression == "entropy":
            loss = loss + self.beta * h_t
        elif self.compression in ("mi_input", "mi_prev"):
            source = network_input if self.compression == "mi_input" else stage_input
            if source is None:
                raise ValueError(f"dib: compression {self.compression!r} needs the stage's input; none was given")
            # The stages before this one are frozen (or behind a stop_gradient): their entropy is a constant.
            a_s = jax.lax.stop_gradient(self._gram(source))
            mi = entropy.renyi_entropy(a_s, alpha=self.alpha) + h_t - entropy.joint_entropy(a_s, a_t, alpha=self.alpha)
            terms["I_XT" if self.compression == "mi_input" else "I_prev"] = mi
            loss = loss + self.beta * mi
        if self.gamma > 0:
            a_y = entropy.normalize_gram(entropy.label_gram(labels, dtype=a_t.dtype))
            i_ty = (
                h_t + entropy.renyi_entropy(a_y, alpha=self.alpha) - entropy.joint_entropy(a_t, a_y, alpha=self.alpha)
            )
            terms["I_TY"] = i_ty
            loss = loss - self.gamma * i_ty
        return loss, terms


def similarity_matrix(x: Array) -> Array:
    """Cosine similarities of the centred rows of ``x``, the ``S`` of Nøkland & Eidnes (2019).

    A feature map ``(n, H, W, C)`` with more than 3 channels and more than one position is first reduced to the
    standard deviation of each channel over the positions, as in the authors' code; other arrays are flattened.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim == 4 and x.shape[-1] > 3 and x.shape[1] * x.shape[2] > 1:
        x = jnp.std(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1, ddof=1)
    x = x.reshape(x.shape[0], -1)
    centred = x - jnp.mean(x, axis=1, keepdims=True)
    rows = centred / (1e-8 + jnp.linalg.norm(centred, axis=1, keepdims=True))
    return jnp.clip(rows @ rows.T, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PredSim:
    """The local loss ``(1 − β) CE(g_k(T_k), Y) + β mean((S(c_k(T_k)) − S(Y))²)`` of Nøkland & Eidnes (2019), with
    their β = 0.99 and ``c_k`` the extra 3×3 convolution of their code (``conv_loss``), carried by the head.

    The authors train with Adam, whose step does not change when a parameter's loss is multiplied by a constant:
    the head learns from CE at full strength and the stage from the mixture. Under SGD the factor 1 − β = 0.01 on
    the head would all but stop it learning, so the gradients are set to what Adam's invariance gives: the head
    and ``c_k`` receive the gradients of ``CE`` and ``β · sim``, and the stage receives
    ``(1 − β) ∇CE + β ∇sim`` (``head_gradient = 1 − β`` scales the head's gradient on its way into ``T_k``).
    The loss reported is therefore ``CE + β sim``. With ``similarity_conv=False`` the similarity matrix is taken on
    ``T_k`` itself.
    """

    beta: float = 0.99
    similarity_conv: bool = True
    label_smoothing: float = 0.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        _check_number("predsim", "beta", self.beta)
        if self.beta > 1:
            raise ConfigError(f"predsim: beta must be in [0, 1], got {self.beta!r}")
        if not isinstance(self.similarity_conv, bool):
            raise ConfigError(f"predsim: similarity_conv must be True or False, got {self.similarity_conv!r}")
        _check_number("predsim", "label_smoothing", self.label_smoothing)

    @property
    def head_gradient(self) -> float:
        return 1.0 - self.beta

    @property
    def head_extras(self) -> tuple[str, ...]:
        """The modules the heads must carry (``model.head_extras``)."""
        return ("similarity",) if self.similarity_conv else ()

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        if self.similarity_conv:
            if not extras or "similarity" not in extras:
                raise ValueError("predsim: similarity_conv=True needs heads built with head_extras=('similarity',)")
            features = extras["similarity"]
        target = similarity_matrix(jax.nn.one_hot(labels, logits.shape[-1]))
        sim = jnp.mean((similarity_matrix(features) - target) ** 2)
        return ce + self.beta * sim, {"ce": ce, "sim": sim}


def hsic(K: Array, L: Array) -> Array:
    """The biased HSIC estimator ``tr(K H L H) / (n − 1)²`` with ``H = I − 11ᵀ/n`` (Gretton et al., 2005)."""
    n = K.shape[0]
    K_centred = K - jnp.mean(K, axis=0, keepdims=True) - jnp.mean(K, axis=1, keepdims=True) + jnp.mean(K)
    return jnp.sum(K_centred * L) / (n - 1) ** 2


def scaled_gaussian_gram(x: Array, sigma: float) -> Array:
    """``K_ij = exp(−||x_i − x_j||² / (2 σ² d))`` for the ``(n, d)`` rows of ``x``: a Gaussian kernel of width
    ``σ √d``, the fixed widths of the HSIC bottleneck's code (choasma/HSIC-bottleneck, ``kernelmat``)."""
    return entropy.gram_matrix(x, sigma * math.sqrt(x.shape[1]))


def normalized_hsic_factor(K: Array, epsilon: float) -> Array:
    """``R = K̃ (K̃ + ε n I)⁻¹`` with the right-centred ``K̃ = K H``, ``H = I − 11ᵀ/n``: one factor of the
    normalised HSIC ``nHSIC(a, b) = tr(R_a R_b)`` of Ma, Lewis & Kleijn (2020) (their ``hsic_normalized_cca``)."""
    n = K.shape[0]
    centred = K - jnp.mean(K, axis=1, keepdims=True)
    regularised = centred + epsilon * n * jnp.eye(n, dtype=K.dtype)
    # R M = K̃ with M = K̃ + εnI, so Rᵀ = M⁻ᵀ K̃ᵀ: one solve, no explicit inverse.
    return jnp.linalg.solve(regularised.T, centred.T).T


@dataclasses.dataclass(frozen=True)
class HSICBottleneck:
    """``nHSIC(T_k, X) − β nHSIC(T_k, Y)`` for the stage, the HSIC bottleneck as Ma, Lewis & Kleijn (2020) compute
    it (choasma/HSIC-bottleneck, ``hsic_objective``); the head learns ``CE`` on ``stop_gradient(T_k)``.

    ``nHSIC(a, b) = tr(R_a R_b)`` (:func:`normalized_hsic_factor`, ε = 1e-5), each kernel
    :func:`scaled_gaussian_gram` with the same ``sigma`` on the flattened rows: ``T_k`` whole, ``X`` the images'
    pixels in ``[0, 1]`` (not normalised, as in their code) and ``Y`` the one-hot labels. Their CIFAR-10 run uses
    σ = 5 and β = 500.
    """

    beta: float = 500.0
    sigma: float = 5.0
    epsilon: float = 1e-5
    label_smoothing: float = 0.0
    head_gradient: ClassVar[float] = 0.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        _check_number("hsic", "beta", self.beta)
        _check_number("hsic", "sigma", self.sigma, strict=True)
        _check_number("hsic", "epsilon", self.epsilon, strict=True)
        _check_number("hsic", "label_smoothing", self.label_smoothing)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        if pixels is None:
            raise ValueError("hsic: needs the images' pixels; none were given")
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        t = reduce_features(features, 0)
        factor = lambda x: normalized_hsic_factor(scaled_gaussian_gram(x, self.sigma), self.epsilon)  # noqa: E731
        r_t = factor(t)
        r_x = jax.lax.stop_gradient(factor(reduce_features(pixels, 0)))
        r_y = factor(jax.nn.one_hot(labels, logits.shape[-1], dtype=t.dtype))
        hsic_x = jnp.sum(r_t * r_x.T)
        hsic_y = jnp.sum(r_t * r_y.T)
        # The head's cross-entropy only reaches the head: its input is stop_gradient(T_k).
        return ce + hsic_x - self.beta * hsic_y, {"ce": ce, "hsic_x": hsic_x, "hsic_y": hsic_y}


@dataclasses.dataclass(frozen=True)
class UnnormalizedHSIC:
    """``HSIC(T_k, X) − λ HSIC(T_k, Y)`` for the stage with the unnormalised, biased estimator :func:`hsic`; the
    head learns ``CE`` on ``stop_gradient(T_k)``.

    A variant of :class:`HSICBottleneck`: Gaussian kernels on the pooled ``T_k`` and normalised ``X`` with the
    ``width`` rule, the label kernel ``[y_i = y_j]`` on ``Y``. Without the normalisation nothing keeps a stage from
    shrinking its output onto a few directions that carry the labels.
    """

    lam: float = 100.0
    width: str = "median"
    pool: int = 4
    label_smoothing: float = 0.0
    head_gradient: ClassVar[float] = 0.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        if self.width not in entropy.WIDTH_RULES:
            raise ConfigError(
                f"hsic_unnormalized: unknown width rule {self.width!r}; accepted: {', '.join(entropy.WIDTH_RULES)}"
            )
        _check_number("hsic_unnormalized", "lam", self.lam)
        _check_number("hsic_unnormalized", "label_smoothing", self.label_smoothing)
        _check_pool("hsic_unnormalized", self.pool)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        if network_input is None:
            raise ValueError("hsic_unnormalized: needs the network input X; none was given")
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        k_t = entropy.gram_matrix(reduce_features(features, self.pool), width=self.width)
        k_x = jax.lax.stop_gradient(entropy.gram_matrix(reduce_features(network_input, self.pool), width=self.width))
        hsic_x = hsic(k_t, k_x)
        hsic_y = hsic(k_t, entropy.label_gram(labels, dtype=k_t.dtype))
        # The head's cross-entropy only reaches the head: its input is stop_gradient(T_k).
        return ce + hsic_x - self.lam * hsic_y, {"ce": ce, "hsic_x": hsic_x, "hsic_y": hsic_y}


def supervised_contrastive_loss(features: Array, labels: Array, temperature: float = 0.07) -> Array:
    """The supervised contrastive loss of Khosla et al. (NeurIPS 2020) with one view per sample, as InfoPro's code
    computes it (``SupConLoss``):

        −mean_i (1/|P(i)|) Σ_{p ∈ P(i)} log( exp(z_i·z_p/τ) / Σ_{j ≠ i} exp(z_i·z_j/τ) )

    over the L2-normalised rows ``z`` of ``features``, ``P(i)`` the other samples with ``i``'s label; an anchor with
    no positive adds 0 and still counts in the mean."""
    z = features.astype(jnp.promote_types(features.dtype, jnp.float32))
    # rsqrt of the clamped squared norm: a zero row (all of a head's ReLUs off) keeps a finite gradient.
    z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-24))
    n = z.shape[0]
    scores = (z @ z.T) / temperature
    not_self = ~jnp.eye(n, dtype=bool)
    log_prob = scores - jax.nn.logsumexp(jnp.where(not_self, scores, -jnp.inf), axis=1, keepdims=True)
    positives = (labels[:, None] == labels[None, :]) & not_self
    counts = jnp.maximum(jnp.sum(positives, axis=1), 1)
    return -jnp.mean(jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / counts)


def binary_cross_entropy(probabilities: Array, targets: Array) -> Array:
    """``−mean(t log p + (1 − t) log(1 − p))``, with the logarithms clamped at −100 as PyTorch's ``BCELoss``."""
    p = probabilities.astype(jnp.promote_types(probabilities.dtype, jnp.float32))

    def clamped_log(x):
        # A saturated sigmoid gives exactly 0 or 1 in float32; the safe argument keeps its gradient finite (zero).
        inside = x > 0
        return jnp.where(inside, jnp.maximum(jnp.log(jnp.where(inside, x, 1.0)), -100.0), -100.0)

    return -jnp.mean(targets * clamped_log(p) + (1.0 - targets) * clamped_log(1.0 - p))


INFOPRO_TASKS = ("softmax", "contrast")


@dataclasses.dataclass(frozen=True)
class InfoPro:
    """InfoPro's local loss (Wang et al., "Revisiting Locally Supervised Learning: an Alternative to End-to-end
    Training", ICLR 2021): for stage ``k`` of ``K``, ``λ1(k) L_recon + λ2(k) L_task``, the weights interpolated
    linearly from (``lambda_1_first``, ``lambda_2_first``) at the first stage to (``lambda_1_last``,
    ``lambda_2_last``) at stage ``K − 2`` (``ratio = k / (K − 2)``, as in their code); the last stage learns the
    network's classifier's cross-entropy alone.

    ``L_recon``: the binary cross-entropy between the head's decoder output (``extras["decoder"]``) and the
    images' pixels in ``[0, 1]``, an estimate of ``I(h, x)``. ``L_task``, an estimate of ``I(h, y)``: with
    ``task="softmax"`` the cross-entropy of the head (InfoPro's auxiliary network as classifier); with
    ``task="contrast"`` the supervised contrastive loss (:func:`supervised_contrastive_loss`) of the head's
    projection (``extras["projection"]``), while the classifier, a probe that reports the stage's accuracy, learns
    its cross-entropy on ``stop_gradient(T_k)``. The defaults are the authors' for ResNet-32 in K = 4 modules.
    """

    task: str = "contrast"
    lambda_1_first: float = 6.0
    lambda_1_last: float = 1.0
    lambda_2_first: float = 0.0
    lambda_2_last: float = 2.0
    temperature: float = 0.07
    label_smoothing: float = 0.0
    trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        if self.task not in INFOPRO_TASKS:
            raise ConfigError(f"infopro: unknown task {self.task!r}; accepted: {', '.join(INFOPRO_TASKS)}")
        for name in ("lambda_1_first", "lambda_1_last", "lambda_2_first", "lambda_2_last", "label_smoothing"):
            _check_number("infopro", name, getattr(self, name))
        _check_number("infopro", "temperature", self.temperature, strict=True)

    @property
    def head_extras(self) -> tuple[str, ...]:
        return ("decoder", "projection") if self.task == "contrast" else ("decoder",)

    @property
    def head_gradient(self) -> float:
        return 0.0 if self.task == "contrast" else 1.0

    def weights(self, stage: int, num_stages: int) -> tuple[float, float]:
        """(λ1, λ2) of stage ``stage`` (from 0) of ``num_stages``; (0, 0) for the last stage."""
        if stage == num_stages - 1:
            return 0.0, 0.0
        ratio = stage / (num_stages - 2) if num_stages > 2 else 0.0
        return (
            self.lambda_1_first * (1 - ratio) + self.lambda_1_last * ratio,
            self.lambda_2_first * (1 - ratio) + self.lambda_2_last * ratio,
        )

    def for_stage(self, stage: int, num_stages: int):
        """The loss of stage ``stage`` of ``num_stages``: :class:`InfoProStage`, or the last stage's CE."""
        if stage == num_stages - 1:
            return CrossEntropy(self.label_smoothing)
        lambda_1, lambda_2 = self.weights(stage, num_stages)
        return InfoProStage(self.task, lambda_1, lambda_2, self.temperature, self.label_smoothing)


@dataclasses.dataclass(frozen=True)
class InfoProStage:
    """``λ1 L_recon + λ2 L_task`` of one stage of :class:`InfoPro` (and, with ``task="contrast"``, the probe's CE)."""

    task: str
    lambda_1: float
    lambda_2: float
    temperature: float = 0.07
    label_smoothing: float = 0.0
    trains_stage: ClassVar[bool] = True

    @property
    def head_gradient(self) -> float:
        return 0.0 if self.task == "contrast" else 1.0

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None, extras=None, pixels=None):
        needed = ("decoder", "projection") if self.task == "contrast" else ("decoder",)
        if not extras or any(name not in extras for name in needed):
            raise ValueError(f"infopro: needs heads built with head_extras={needed}")
        if pixels is None:
            raise ValueError("infopro: needs the images' pixels; none were given")
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        recon = binary_cross_entropy(extras["decoder"], pixels)
        terms = {"ce": ce, "recon": recon}
        if self.task == "contrast":
            contrast = supervised_contrastive_loss(extras["projection"], labels, self.temperature)
            terms["contrast"] = contrast
            # The probe's CE reaches the probe alone (head_gradient 0).
            return self.lambda_1 * recon + self.lambda_2 * contrast + ce, terms
        return self.lambda_1 * recon + self.lambda_2 * ce, terms


def minimum_batch_size(objective) -> int:
    """The smallest batch the objective's estimators accept: a Gram matrix needs 2 samples, the k-NN width k + 1."""
    width = getattr(objective, "width", None)
    uses_gram = isinstance(objective, PredSim | HSICBottleneck | UnnormalizedHSIC) or (
        isinstance(objective, DIB) and (objective.compression != "none" or objective.gamma > 0)
    )
    if not uses_gram:
        return 1
    return 11 if width == "knn" else 2


OBJECTIVES: dict[str, type] = {
    "ce": CrossEntropy,
    "dib": DIB,
    "predsim": PredSim,
    "hsic": HSICBottleneck,
    "hsic_unnormalized": UnnormalizedHSIC,
    "head_only": HeadOnly,
    "infopro": InfoPro,
}


def make_objective(name: str, **options: Any):
    """The objective called ``name`` (a key of :data:`OBJECTIVES`) with ``options`` as its fields.

    Raises:
      ConfigError: an unknown name, an option the objective does not have, or a value out of range.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; accepted: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for objective {name!r}; accepted: {sorted(fields)}")
    return cls(**options)


def from_config(config: Mapping[str, Any], label_smoothing: float = 0.0):
    """The objective described by ``config`` (``config.objective`` of a run).

    ``config.name`` picks the objective; its options are the fields of ``config[name]`` (so
    ``--config.objective.dib.beta=0.01`` sets β of ``dib``, and the other objectives' sections are ignored). The
    run's label smoothing (``config.train.label_smoothing``) is passed on to the cross-entropy term.
    """
    name = config["name"] if "name" in config else None
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; accepted: {', '.join(OBJECTIVES)}")
    options = dict(config[name]) if name in config and config[name] is not None else {}
    options["label_smoothing"] = float(label_smoothing)
    return make_objective(name, **options)
