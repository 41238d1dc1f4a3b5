"""Per-stage training objectives for greedy layer-wise training, keyed by name in :data:`OBJECTIVES`.

Every objective is a frozen dataclass whose ``__call__`` is a pure function of one stage's batch:

    loss, terms = objective(features, logits, labels, stage_input=..., network_input=...)

* ``features``: ``T_k``, the stage output (``(n, H, W, C)`` or ``(n, d)``);
* ``logits``: the stage's auxiliary head applied to ``T_k`` (``(n, num_classes)``); the scheduler feeds the head
  ``stop_gradient(T_k)`` when the objective's ``head_trains_stage`` is False;
* ``labels``: integer labels ``(n,)``;
* ``stage_input``: ``T_{k-1}``, the input of the stage (the network input for the first stage);
* ``network_input``: ``X``, the normalised image batch.

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
  Recognition" (arXiv:2510.27651, 2025).
* ``predsim``: ``(1 − β) CE(g_k(T_k), Y) + β ||S(T_k) − S(Y)||²`` (mean over the ``n²`` entries), the local loss of
  Nøkland & Eidnes, "Training Neural Networks with Local Error Signals" (ICML 2019), ``S`` being the cosine
  similarity matrix of centred rows; a feature map enters as the standard deviation of each channel over the spatial
  positions, as in the authors' code.
* ``hsic``: ``HSIC(T_k, X) − λ HSIC(T_k, Y)``, the HSIC bottleneck of Ma, Lewis & Kleijn, "The HSIC Bottleneck:
  Deep Learning without Back-Propagation" (AAAI 2020), with the biased estimator
  ``HSIC(K, L) = tr(K H L H) / (n − 1)²``, Gaussian kernels on ``T_k`` and ``X`` and the label kernel on ``Y``. The
  head is trained by its cross-entropy on ``stop_gradient(T_k)``: the stage learns from the HSIC terms alone.

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
    head_trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        _check_number("ce", "label_smoothing", self.label_smoothing)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None):
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class DIB:
    """``CE(g_k(T_k), Y) + β C(T_k) − γ I_α(T_k; Y)`` with the compression ``C`` named by ``compression``.

    Attributes:
      beta: weight β >= 0 of the compression term (bits).
      gamma: weight γ >= 0 of the matrix-based relevance ``I_α(T_k; Y)`` (label kernel ``[y_i = y_j]``).
      compression: ``"entropy"`` (``S_α(T_k)``), ``"mi_input"`` (``I_α(X; T_k)``), ``"mi_prev"``
        (``I_α(T_{k-1}; T_k)``) or ``"none"``.
      alpha: Rényi order α > 0 (static).
      width: the kernel-width rule of :func:`dibjax.entropy.kernel_width`.
      pool: spatial size feature maps are average-pooled to before their Gram matrix (0: flatten).
      label_smoothing: label smoothing of the cross-entropy term.
    """

    beta: float = 0.001
    gamma: float = 0.0
    compression: str = "entropy"
    alpha: float = 1.01
    width: str = "median"
    pool: int = 4
    label_smoothing: float = 0.0
    head_trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"dib: unknown compression {self.compression!r}; accepted: {', '.join(COMPRESSIONS)}")
        if self.width not in entropy.WIDTH_RULES:
            raise ConfigError(f"dib: unknown width rule {self.width!r}; accepted: {', '.join(entropy.WIDTH_RULES)}")
        _check_number("dib", "beta", self.beta)
        _check_number("dib", "gamma", self.gamma)
        _check_number("dib", "alpha", self.alpha, strict=True)
        _check_number("dib", "label_smoothing", self.label_smoothing)
        _check_pool("dib", self.pool)

    def _gram(self, x: Array) -> Array:
        return entropy.normalize_gram(entropy.gram_matrix(reduce_features(x, self.pool), width=self.width))

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None):
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
    """``(1 − β) CE(g_k(T_k), Y) + β mean((S(T_k) − S(Y))²)`` (Nøkland & Eidnes 2019; their β = 0.99).

    The paper passes ``T_k`` through one more 3×3 convolution before the similarity matrix; here ``S`` is taken on
    ``T_k`` itself, so the similarity term shapes the stage's own output and no extra module is trained.
    """

    beta: float = 0.99
    label_smoothing: float = 0.0
    head_trains_stage: ClassVar[bool] = True

    def __post_init__(self):
        _check_number("predsim", "beta", self.beta)
        if self.beta > 1:
            raise ConfigError(f"predsim: beta must be in [0, 1], got {self.beta!r}")
        _check_number("predsim", "label_smoothing", self.label_smoothing)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None):
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        target = similarity_matrix(jax.nn.one_hot(labels, logits.shape[-1]))
        sim = jnp.mean((similarity_matrix(features) - target) ** 2)
        return (1 - self.beta) * ce + self.beta * sim, {"ce": ce, "sim": sim}


def hsic(K: Array, L: Array) -> Array:
    """The biased HSIC estimator ``tr(K H L H) / (n − 1)²`` with ``H = I − 11ᵀ/n`` (Gretton et al., 2005)."""
    n = K.shape[0]
    K_centred = K - jnp.mean(K, axis=0, keepdims=True) - jnp.mean(K, axis=1, keepdims=True) + jnp.mean(K)
    return jnp.sum(K_centred * L) / (n - 1) ** 2


@dataclasses.dataclass(frozen=True)
class HSICBottleneck:
    """``HSIC(T_k, X) − λ HSIC(T_k, Y)`` for the stage; the head learns ``CE`` on ``stop_gradient(T_k)``.

    Ma, Lewis & Kleijn (2020). Gaussian kernels on the pooled ``T_k`` and ``X`` with the ``width`` rule; the
    label kernel ``[y_i = y_j]`` on ``Y``.
    """

    lam: float = 100.0
    width: str = "median"
    pool: int = 4
    label_smoothing: float = 0.0
    head_trains_stage: ClassVar[bool] = False

    def __post_init__(self):
        if self.width not in entropy.WIDTH_RULES:
            raise ConfigError(f"hsic: unknown width rule {self.width!r}; accepted: {', '.join(entropy.WIDTH_RULES)}")
        _check_number("hsic", "lam", self.lam)
        _check_number("hsic", "label_smoothing", self.label_smoothing)
        _check_pool("hsic", self.pool)

    def __call__(self, features, logits, labels, *, stage_input=None, network_input=None):
        if network_input is None:
            raise ValueError("hsic: needs the network input X; none was given")
        ce = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
        k_t = entropy.gram_matrix(reduce_features(features, self.pool), width=self.width)
        k_x = jax.lax.stop_gradient(entropy.gram_matrix(reduce_features(network_input, self.pool), width=self.width))
        hsic_x = hsic(k_t, k_x)
        hsic_y = hsic(k_t, entropy.label_gram(labels, dtype=k_t.dtype))
        # The head's cross-entropy only reaches the head: its input is stop_gradient(T_k).
        return ce + hsic_x - self.lam * hsic_y, {"ce": ce, "hsic_x": hsic_x, "hsic_y": hsic_y}


def minimum_batch_size(objective) -> int:
    """The smallest batch the objective's estimators accept: a Gram matrix needs 2 samples, the k-NN width k + 1."""
    width = getattr(objective, "width", None)
    uses_gram = isinstance(objective, PredSim | HSICBottleneck) or (
        isinstance(objective, DIB) and (objective.compression != "none" or objective.gamma > 0)
    )
    if not uses_gram:
        return 1
    return 11 if width == "knn" else 2


OBJECTIVES: dict[str, type] = {"ce": CrossEntropy, "dib": DIB, "predsim": PredSim, "hsic": HSICBottleneck}


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
