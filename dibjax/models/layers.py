"""Building blocks shared by the staged models: conv units, residual blocks, pooling and heads."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# PyTorch's BatchNorm momentum of 0.1 in Flax's convention. Flax's default of 0.99 makes the running statistics
# lag far behind the weights when a stage is trained for only a few epochs, so evaluation would use stale statistics.
BATCHNORM_MOMENTUM = 0.9
BATCHNORM_EPSILON = 1e-5

# He et al. (2015) initialisation keeps activation variance constant through ReLU layers; this matters most for the
# networks built without BatchNorm, which have nothing else to hold the scale of the signal in place.
CONV_INIT = nnx.initializers.he_normal()


def batch_norm(num_features: int, rngs: nnx.Rngs, dtype=None) -> nnx.BatchNorm:
    """A BatchNorm layer with the momentum and epsilon used throughout this package, built in training mode.

    ``dtype`` is the dtype of the computation (``None``: that of the input); the parameters, the running statistics
    and the reductions that give the batch statistics stay in float32.
    """
    return nnx.BatchNorm(
        num_features,
        use_running_average=False,
        momentum=BATCHNORM_MOMENTUM,
        epsilon=BATCHNORM_EPSILON,
        dtype=dtype,
        rngs=rngs,
    )


# (N, H, W, C) inputs, (3, 3, C_in, C_out) kernels, (N, H, W, C) outputs: what nnx.Conv passes for 2-D images.
_NHWC_HWIO = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _native_conv3x3(lhs: jax.Array, rhs: jax.Array, precision) -> jax.Array:
    return jax.lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME", dimension_numbers=_NHWC_HWIO, precision=precision)


def _patches(lhs: jax.Array) -> jax.Array:
    """The nine shifted views of a 'SAME'-padded NHWC batch, as rows of a (N·H·W, 9·C) matrix."""
    n, h, w, c = lhs.shape
    padded = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(views, axis=-1).reshape(n * h * w, 9 * c)


def _patches_times_kernel(lhs: jax.Array, rhs: jax.Array, precision) -> jax.Array:
    """A 3×3, stride-1, 'SAME' convolution as one matmul; rows of ``rhs.reshape(9C, C_out)`` follow the patches."""
    n, h, w, _ = lhs.shape
    out = jnp.dot(_patches(lhs), rhs.reshape(-1, rhs.shape[-1]), precision=precision)
    return out.reshape(n, h, w, -1)


_trace_options = threading.local()


@contextlib.contextmanager
def native_convolutions() -> Iterator[None]:
    """Within this context, convolutions traced on CPU use XLA's native convolution instead of patches × kernel.

    The patches path pays off only when gradients are taken; a forward pass alone (evaluation, the frozen stages of
    greedy training, feature extraction) is about twice as fast with the native convolution on CPU. It is also the
    convolution accelerators run, so memory benchmarks compiled on CPU use it to estimate their memory. The choice is
    made when a function is traced, so wrap the body of the jitted function, not its call: ``jax.jit`` caches what
    it traced the first time.
    """
    previous = getattr(_trace_options, "native_convolutions", False)
    _trace_options.native_convolutions = True
    try:
        yield
    finally:
        _trace_options.native_convolutions = previous


def materialize(x: jax.Array, guard: jax.Array | None = None) -> jax.Array:
    """``x`` itself, written to a buffer of its own that later operations read instead of recomputing it.

    XLA fuses a cheap elementwise producer into each of its consumers and recomputes it there. Down a chain of
    residual blocks run forward only (the frozen stages of greedy training), a block's output is BatchNorm's affine
    map, the shortcut's sum and a ReLU of its convolution: fused into the next block's sum, then into the one after,
    so the last block's sum recomputes the whole chain and every earlier convolution's output stays alive, and the
    memory of a frozen prefix grows with its depth. A boundary no fusion crosses keeps it flat: an optimization
    barrier on accelerators, where XLA keeps barriers until after fusion; on CPU, where XLA removes them before
    fusing, a conditional. Its predicate must be read at run time, or XLA folds it: it is whether ``guard`` (by
    default ``x``'s first element) is NaN, and the branch taken then returns NaN everywhere; it only differs from
    the other so that XLA does not merge the two. Pass a replicated ``guard`` (a parameter) when ``x`` is sharded:
    reading an element of a sharded array costs a collective.
    """
    guard = x.ravel()[0] if guard is None else guard.ravel()[0]

    def on_cpu(x, guard):
        return jax.lax.cond(jnp.isnan(guard), lambda v: jnp.full_like(v, jnp.nan), lambda v: v, x)

    return jax.lax.platform_dependent(x, guard, cpu=on_cpu, default=lambda x, _: jax.lax.optimization_barrier(x))


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``jax.lax.conv_general_dilated`` with a CPU path for 3×3 stride-1 'SAME' convolutions of NHWC images.

    XLA:CPU computes a convolution's gradients more slowly than the same work written as matmuls of the input's
    3×3 patches (docs/benchmarks.md). On CPU such a convolution is therefore computed as patches times kernel, the
    same convolution, except when traced inside :func:`native_convolutions`. Other platforms, and every other
    convolution, use the native one.
    """

    def native(lhs, rhs):
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )

    same_padding = padding == "SAME" or [tuple(p) for p in padding] == [(1, 1), (1, 1)]
    simple = (
        lhs.ndim == 4
        and rhs.shape[:2] == (3, 3)
        and tuple(window_strides) == (1, 1)
        and same_padding
        and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and dimension_numbers == _NHWC_HWIO
        and not kwargs.get("preferred_element_type")
    )
    if not simple or getattr(_trace_options, "native_convolutions", False):
        return native(lhs, rhs)
    return jax.lax.platform_dependent(lhs, rhs, cpu=lambda a, b: _patches_times_kernel(a, b, precision), default=native)


def conv3x3(
    in_features: int, out_features: int, *, stride: int = 1, use_bias: bool, dtype=None, rngs: nnx.Rngs
) -> nnx.Conv:
    """A 3×3 convolution with 'SAME' padding, computed in ``dtype`` (``None``: the input's) with float32 weights."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding="SAME",
        use_bias=use_bias,
        kernel_init=CONV_INIT,
        conv_general_dilated=conv_general_dilated,
        dtype=dtype,
        rngs=rngs,
    )


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Non-overlapping 2×2 max-pooling of an NHWC batch.

    Written as a reshape and a max for even sizes: its gradient is elementwise, where the gradient of
    ``reduce_window`` (``select_and_scatter``) is slower on CPU (docs/benchmarks.md).
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC batch, giving (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """Average-pool an NHWC batch to a fixed spatial size, like PyTorch's ``AdaptiveAvgPool2d``.

    Output cell ``i`` along an axis of input length ``n`` and output length ``m`` averages the input cells
    ``floor(i n / m)`` to ``ceil((i + 1) n / m) - 1``. The bins are fixed by the static input shape, so the result
    works under ``jax.jit``; when ``n < m`` the input cells are repeated, so a 1×1 map pools to a constant 2×2 map.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    n, in_h, in_w, c = x.shape
    if in_h % out_h == 0 and in_w % out_w == 0:
        # Equal bins: one reshape and mean, whose gradient is far cheaper than that of the slices below.
        return jnp.mean(x.reshape(n, out_h, in_h // out_h, out_w, in_w // out_w, c), axis=(2, 4))
    rows = []
    for i in range(out_h):
        h0, h1 = (i * in_h) // out_h, math.ceil((i + 1) * in_h / out_h)
        cols = []
        for j in range(out_w):
            w0, w1 = (j * in_w) // out_w, math.ceil((j + 1) * in_w / out_w)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class ConvUnit(nnx.Module):
    """Conv 3×3 → BatchNorm → ReLU, optionally followed by a 2×2 max-pool.

    The convolution has no bias when BatchNorm follows it, because BatchNorm's shift makes a bias redundant.
    """

    def __init__(self, in_features: int, out_features: int, *, pool: bool, batchnorm: bool, dtype=None, rngs: nnx.Rngs):
        self.conv = conv3x3(in_features, out_features, use_bias=not batchnorm, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(out_features, rngs, dtype) if batchnorm else None
        self.pool = pool
        self.out_features = out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        x = nnx.relu(x)
        return max_pool_2x2(x) if self.pool else x


class BasicBlock(nnx.Module):
    """The two-layer residual block of He et al. (2016), "Deep Residual Learning for Image Recognition", Fig. 2.

    ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3×3 convolutions, the first one carrying the stride.
    When the shape changes the shortcut is either option A of Section 3.3 (``shortcut="A"``: subsample the identity
    and pad the new channels with zeros, parameter-free, the paper's choice for its CIFAR-10 networks) or option B
    (``shortcut="B"``: a strided 1×1 convolution with BatchNorm, the paper's choice for its ImageNet networks).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stride: int,
        shortcut: str,
        batchnorm: bool,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is not supported; expected one of ('A', 'B')")
        self.conv1 = conv3x3(in_features, out_features, stride=stride, use_bias=not batchnorm, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(out_features, rngs, dtype) if batchnorm else None
        self.conv2 = conv3x3(out_features, out_features, use_bias=not batchnorm, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs, dtype) if batchnorm else None
        self.stride = stride
        self.in_features = in_features
        self.out_features = out_features
        self.shortcut_kind = shortcut
        project = shortcut == "B" and (stride != 1 or in_features != out_features)
        self.projection = (
            nnx.Conv(
                in_features,
                out_features,
                kernel_size=(1, 1),
                strides=(stride, stride),
                padding="VALID",
                use_bias=not batchnorm,
                kernel_init=CONV_INIT,
                dtype=dtype,
                rngs=rngs,
            )
            if project
            else None
        )
        self.projection_bn = batch_norm(out_features, rngs, dtype) if project and batchnorm else None

    def _shortcut(self, x: jax.Array) -> jax.Array:
        if self.projection is not None:
            x = self.projection(x)
            return self.projection_bn(x) if self.projection_bn is not None else x
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride, :]
        extra = self.out_features - self.in_features
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv1(x)
        if self.bn1 is not None:
            y = self.bn1(y)
        y = nnx.relu(y)
        y = self.conv2(y)
        if self.bn2 is not None:
            y = self.bn2(y)
        return nnx.relu(y + self._shortcut(x))


class LinearHead(nnx.Module):
    """Global average pooling followed by one linear layer: the classifier of the CIFAR ResNets of He et al. (2016)."""

    def __init__(self, in_features: int, num_classes: int, *, dtype=None, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.linear(global_avg_pool(t))


class ConvHead(nnx.Module):
    """A small convolutional auxiliary classifier, modelled on those of the greedy layer-wise literature.

    [adaptive average pool to at most ``pool``×``pool``] → conv 3×3 (``width`` channels) → BatchNorm → ReLU →
    adaptive average pool to 2×2 → flatten → [Linear(``hidden``) → ReLU] → Linear(``num_classes``); the first
    bracket applies only when ``pool > 0`` and the stage's map is larger, the second only when ``hidden > 0``.
    Belilovsky, Eickenberg & Oyallon (2019, "Greedy Layerwise Learning Can Scale to ImageNet"; 2020, "Decoupled
    Greedy Learning of CNNs") use auxiliary networks of this shape: a few convolutions, spatial averaging to 2×2 and
    a small MLP, the convolutions as wide as the stage. A head with its own convolution lets a stage's
    representation be judged by more than its linear separability, which a linear head on an early, low-level stage
    would understate.

    The head's activations, not the stage's, set a greedy step's memory when the head is wider than the stage or
    works at the stage's full resolution: ``width`` equal to the stage's channels and a ``pool`` of 8 or less keep
    them no larger than the stage's own.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        width: int = 128,
        hidden: int = 0,
        pool: int = 0,
        batchnorm: bool = True,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.pool = pool
        self.conv = conv3x3(in_features, width, use_bias=not batchnorm, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(width, rngs, dtype) if batchnorm else None
        self.hidden = nnx.Linear(4 * width, hidden, dtype=dtype, rngs=rngs) if hidden > 0 else None
        self.linear = nnx.Linear(hidden if hidden > 0 else 4 * width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        if self.pool and (t.shape[1] > self.pool or t.shape[2] > self.pool):
            t = adaptive_avg_pool(t, (min(t.shape[1], self.pool), min(t.shape[2], self.pool)))
        y = self.conv(t)
        if self.bn is not None:
            y = self.bn(y)
        y = nnx.relu(y)
        y = adaptive_avg_pool(y, 2)
        y = y.reshape(y.shape[0], -1)
        if self.hidden is not None:
            y = nnx.relu(self.hidden(y))
        return self.linear(y)


def prediction_pool(channels: int, size: int, max_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel and padding of the average pool before the prediction head of Nøkland & Eidnes (2019).

    The rule of the authors' code (anokland/local-loss, ``LocalLossBlockConv``): starting from 1×1, the kernel's
    height and then its width are doubled in turn until ``channels × H' × W' <= max_features`` (or the kernel's
    height reaches ``size``), with ``H' = ceil(size / kernel)``; the padding centres the last window. The stride
    equals the kernel, and padded cells count as zeros in the average (PyTorch's ``count_include_pad``).
    """
    ks_h = ks_w = 1
    out_h = out_w = size
    while channels * out_h * out_w > max_features and ks_h < size:
        ks_h *= 2
        out_h = math.ceil(size / ks_h)
        if channels * out_h * out_w > max_features:
            ks_w *= 2
            out_w = math.ceil(size / ks_w)
    pad = ((ks_h * (out_h - size // ks_h)) // 2, (ks_w * (out_w - size // ks_w)) // 2)
    return (ks_h, ks_w), pad


def _pooled_size(size: int, kernel: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // kernel + 1


class PredictionHead(nnx.Module):
    """The prediction head of Nøkland & Eidnes, "Training Neural Networks with Local Error Signals" (ICML 2019):
    average pool (:func:`prediction_pool`) to at most ``max_features`` values per sample → flatten → linear, whose
    weights start at zero as in the authors' code.

    The pool depends on the stage's map, so the head is built for one ``in_size`` × ``in_size`` input.
    """

    def __init__(
        self, in_features: int, in_size: int, num_classes: int, *, max_features: int = 2048, dtype=None, rngs: nnx.Rngs
    ):
        self.kernel, self.padding = prediction_pool(in_features, in_size, max_features)
        out = [_pooled_size(in_size, k, p) for k, p in zip(self.kernel, self.padding, strict=True)]
        self.linear = nnx.Linear(
            in_features * out[0] * out[1], num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        (kh, kw), (ph, pw) = self.kernel, self.padding
        if (kh, kw) != (1, 1):
            t = nnx.avg_pool(t, (kh, kw), strides=(kh, kw), padding=((ph, ph), (pw, pw)), count_include_pad=True)
        return self.linear(t.reshape(t.shape[0], -1))


class InfoProHead(nnx.Module):
    """The auxiliary network ``1c2f`` of InfoPro (Wang et al., "Revisiting Locally Supervised Learning: an
    Alternative to End-to-end Training", ICLR 2021; blackfeather-wang/InfoPro-Pytorch, ``AuxClassifier``):
    conv 3×3 (no bias) → BatchNorm → ReLU → global average pool → Linear(``hidden``) → ReLU → Linear(``out``).

    The convolution doubles the channels with stride 2 on maps larger than 8×8 and keeps them with stride 1
    otherwise, which is the authors' rule for the 16-, 32- and 64-channel stages of their CIFAR ResNets (at 32×32,
    16×16 and 8×8). ``out`` is the number of classes (``cross_entropy`` mode) or the contrastive feature size.
    """

    def __init__(
        self,
        in_features: int,
        in_size: int,
        out_features: int,
        *,
        hidden: int = 128,
        batchnorm: bool = True,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        stride = 2 if in_size > 8 else 1
        width = in_features * stride
        self.conv = conv3x3(in_features, width, stride=stride, use_bias=not batchnorm, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(width, rngs, dtype) if batchnorm else None
        self.hidden = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
        self.linear = nnx.Linear(hidden, out_features, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        y = self.conv(t)
        if self.bn is not None:
            y = self.bn(y)
        y = global_avg_pool(nnx.relu(y))
        return self.linear(nnx.relu(self.hidden(y)))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of 1-D bilinear interpolation with aligned corners (PyTorch's
    ``interpolate(mode="bilinear", align_corners=True)``): output ``i`` samples the input at
    ``i (in_size − 1) / (out_size − 1)``."""
    matrix = np.zeros((out_size, in_size), np.float32)
    if in_size == 1 or out_size == 1:
        matrix[:, 0] = 1.0
        return matrix
    positions = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    low = np.minimum(np.floor(positions).astype(int), in_size - 2)
    frac = positions - low
    matrix[np.arange(out_size), low] = 1.0 - frac
    matrix[np.arange(out_size), low + 1] += frac
    return matrix


class Decoder(nnx.Module):
    """InfoPro's decoder (``Decoder`` of blackfeather-wang/InfoPro-Pytorch): bilinear upsampling with aligned
    corners to ``image_size`` × ``image_size`` → conv 3×3 (12 channels) → BatchNorm → ReLU → conv 3×3 (3 channels)
    → sigmoid, an image in ``[0, 1]`` whose cross-entropy against the input estimates ``I(h, x)``.
    """

    def __init__(self, in_features: int, image_size: int, *, batchnorm: bool = True, dtype=None, rngs: nnx.Rngs):
        self.image_size = image_size
        self.conv1 = conv3x3(in_features, 12, use_bias=True, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(12, rngs, dtype) if batchnorm else None
        self.conv2 = conv3x3(12, 3, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        size = self.image_size
        rows = jnp.asarray(bilinear_matrix(t.shape[1], size), t.dtype)
        cols = jnp.asarray(bilinear_matrix(t.shape[2], size), t.dtype)
        y = jnp.einsum("oh,nhwc,pw->nopc", rows, t, cols)
        # Many channels in, few out, at the image's full resolution: there the patches form of a convolution holds
        # 9 × in_features values per pixel and is slower on CPU than XLA's own convolution
        # (``python -m benchmarks.decoder_speed``).
        with native_convolutions():
            y = self.conv1(y)
            if self.bn is not None:
                y = self.bn(y)
            return nnx.sigmoid(self.conv2(nnx.relu(y)))


class HeadWithExtras(nnx.Module):
    """A classifier head and extra modules on the same stage output, all trained by the stage's objective.

    ``head(t)`` is the classifier's logits, so the model classifies as the plain head would; the schedulers call
    :meth:`outputs`, which also applies each extra module to the stage output (e.g. the convolution before the
    similarity matrix of ``predsim``, or InfoPro's decoder), for the objective to use.
    """

    def __init__(self, classifier: nnx.Module, extras: dict[str, nnx.Module]):
        self.classifier = classifier
        self.extras = nnx.Dict(extras)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.classifier(t)

    def outputs(self, classifier_input: jax.Array, t: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The classifier's logits on ``classifier_input`` and every extra module's output on ``t``."""
        return self.classifier(classifier_input), {name: module(t) for name, module in self.extras.items()}


class Chain(nnx.Module):
    """Applies its layers in order; the container for one stage of a :class:`~dibjax.models.StagedModel`."""

    def __init__(self, layers: Sequence[nnx.Module]):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x
