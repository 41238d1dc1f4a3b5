"""Building a :class:`~dibjax.models.StagedModel` from a configuration."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dibjax.errors import ConfigError
from dibjax.models import architectures
from dibjax.models.layers import (
    Chain,
    ConvHead,
    Decoder,
    HeadWithExtras,
    InfoProHead,
    LinearHead,
    PredictionHead,
    conv3x3,
)
from dibjax.models.staged import StagedModel, split_balanced, split_evenly

MODELS = ("small_cnn", "vgg11", "vgg13", "vgg16", "resnet18", "resnet20", "resnet32", "resnet56", "resnet110")
SPLITS = ("layer", "block", "groups", "activations")
HEADS = ("linear", "conv", "prediction", "infopro")
# Modules a head may carry beside its classifier, for objectives that need them (HeadWithExtras):
# "similarity": the 3×3 convolution (stage channels to stage channels, no bias) before predsim's similarity matrix;
# "decoder": InfoPro's decoder; "projection": InfoPro's auxiliary network with 128 outputs, for its contrastive loss.
HEAD_EXTRAS = ("similarity", "decoder", "projection")
# InfoPro's modules, which its last stage, trained by the network's own classifier alone, does not have.
_INFOPRO_EXTRAS = ("decoder", "projection")
INFOPRO_FEATURES = 128
# Dtypes the layers may compute in; the parameters are float32 whatever this is.
COMPUTE_DTYPES = ("float32", "bfloat16")

# Base widths of the published networks; the small CNN's 32 gives widths 32/64/128/256.
DEFAULT_WIDTHS = {
    "small_cnn": 32,
    "vgg11": 64,
    "vgg13": 64,
    "vgg16": 64,
    "resnet18": 64,
    "resnet20": 16,
    "resnet32": 16,
    "resnet56": 16,
    "resnet110": 16,
}

# Fields that may be left out of the configuration, with the values they then take. `width=None` means the
# network's published width; `num_groups` is only read for split="groups" and split="activations".
DEFAULTS = {
    "split": "layer",
    "num_groups": None,
    "head": "linear",
    "width": None,
    "batchnorm": True,
    "head_width": 128,
    "head_hidden": 0,
    "head_pool": 8,
    "head_features": 2048,
    "head_extras": (),
    "image_size": 32,
    "dtype": "float32",
}


def _field(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, DEFAULTS.get(name))
    else:
        value = getattr(config, name, DEFAULTS.get(name))
    return DEFAULTS.get(name) if value is None else value


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {field} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def _check_int(field: str, value: Any, minimum: int) -> int:
    # bool is an int subclass, but `width=True` is a mistake rather than a width of 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{field} must be an int >= {minimum}, got {value!r}")
    return int(value)


def architecture_for(
    name: str, width: int, *, batchnorm: bool, dtype=None, rngs: nnx.Rngs
) -> architectures.Architecture:
    """The units and blocks of the network called ``name`` (one of :data:`MODELS`)."""
    _check_choice("model name", name, MODELS)
    if name == "small_cnn":
        return architectures.small_cnn(width, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
    if name.startswith("vgg"):
        return architectures.vgg(name, width, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
    return architectures.resnet(name, width, batchnorm=batchnorm, dtype=dtype, rngs=rngs)


def stage_sizes(config: Any) -> tuple[int, ...]:
    """The number of architectural units in each stage of the model ``config`` describes (no model is built)."""
    name = _check_choice("model name", _field(config, "name"), MODELS)
    split = _check_choice("split", _field(config, "split"), SPLITS)
    num_units = architectures.NUM_UNITS[name]
    if split == "layer":
        return (1,) * num_units
    if split == "block":
        return architectures.BLOCK_SIZES[name]
    num_groups = _field(config, "num_groups")
    if num_groups is None:
        raise ConfigError(f"split={split!r} needs num_groups, an int between 1 and {num_units} for {name}")
    if split == "activations":
        return split_balanced(architectures.unit_activation_sizes(name), num_groups)
    try:
        published = architectures.infopro_module_sizes(name, num_groups)
    except ValueError as error:
        raise ConfigError(f"split='groups' with num_groups={num_groups}: {error}") from None
    return published if published is not None else split_evenly(num_units, num_groups)


def build_model(config: Any, num_classes: int, rngs: nnx.Rngs | int) -> StagedModel:
    """Builds the staged network described by ``config``.

    Args:
      config: an ``ml_collections.ConfigDict``, a mapping or any object with these fields (all but ``name`` may be
        left out or set to ``None`` for their defaults):

        - ``name``: one of :data:`MODELS`.
        - ``split`` (``"layer"``): how the network is cut into stages. ``"layer"`` gives one stage per unit: per
          convolution (conv → BatchNorm → ReLU, with the max-pool that follows it) for the small CNN and VGG, per
          residual block for the ResNets, whose smallest unit is a residual block so that ``"layer"`` and
          ``"block"`` coincide. ``"block"`` gives one stage per VGG pooling block (the convolutions between two
          max-pools), per residual block for the ResNets (the stem convolution in the first stage) and per conv
          unit for the small CNN. ``"groups"`` cuts the ``"layer"`` units into ``num_groups`` contiguous groups:
          for ResNet-32 and ResNet-110 in 2, 3, 4, 8 or 16 groups, InfoPro's local modules (Wang et al., ICLR 2021;
          :data:`~dibjax.models.architectures.INFOPRO_CUTS`), otherwise as evenly as possible, the earlier groups
          taking the extra units (:func:`split_evenly`). ``"activations"`` cuts them into ``num_groups``
          contiguous groups balanced by the activations their units compute
          (:func:`~dibjax.models.architectures.unit_activation_sizes`, :func:`split_balanced`): the stage that
          needs the most memory needs as little as a contiguous split allows.
        - ``num_groups``: the number of stages for ``split="groups"`` and ``split="activations"``, between 1 and
          the number of units.
        - ``head`` (``"linear"``): ``"linear"`` is global average pooling and one linear layer; ``"conv"`` is
          :class:`~dibjax.models.layers.ConvHead` (conv 3×3 with ``head_width`` channels → BatchNorm → ReLU →
          average pool to 2×2 → flatten → optional hidden linear layer of ``head_hidden`` units with ReLU → linear).
          Every stage, the last included, gets a head of this type.
        - ``width`` (``None``): the base width, the channels of the first convolution; the network's published
          value when ``None``: :data:`DEFAULT_WIDTHS`.
        - ``batchnorm`` (``True``): ``False`` builds the same network, heads included, with no normalisation
          layers and with biases on the convolutions.
        - ``head_width`` (128), ``head_hidden`` (0) and ``head_pool`` (8): sizes of the ``"conv"`` head: the channels
          of its convolution (0: as many as the stage's output, so the head grows with the stage), the units of its
          hidden layer (0: none) and the largest map it convolves (8: stages with larger maps are average-pooled to
          8×8 first, so that a head on an early, high-resolution stage needs no more memory than the stage; 0: the
          stage's own map, whatever its size).
        - ``head="prediction"`` is the prediction head of Nøkland & Eidnes (2019),
          :class:`~dibjax.models.layers.PredictionHead`: average pooling to at most ``head_features`` (2048) values,
          then a linear layer whose weights start at zero; its pool is set for the stage's map at ``image_size``.
        - ``head="infopro"``: InfoPro's auxiliary network ``1c2f``
          (:class:`~dibjax.models.layers.InfoProHead`) on every stage but the last, whose head is the network's own
          linear classifier, as in InfoPro (Wang et al., ICLR 2021).
        - ``head_extras`` (``()``): modules the heads carry beside their classifier, for the objectives that use
          them (:class:`~dibjax.models.layers.HeadWithExtras`): ``"similarity"`` is the 3×3 convolution (as many
          channels as the stage, no bias) through which ``predsim`` passes the stage output before its similarity
          matrix; ``"decoder"`` (:class:`~dibjax.models.layers.Decoder`) and ``"projection"`` (an
          :class:`~dibjax.models.layers.InfoProHead` with 128 outputs) are InfoPro's, on every stage but the last.
        - ``image_size`` (32): the side of the input images, read by heads that depend on their stage's map size.
        - ``dtype`` (``"float32"``): the dtype the layers compute in, one of :data:`COMPUTE_DTYPES`. With
          ``"bfloat16"`` (mixed precision) convolutions and matmuls take bfloat16 operands and accumulate in
          float32, while the parameters, BatchNorm's statistics and the optimizer stay float32; stage outputs and
          logits are then bfloat16, so cast them to float32 before a loss or an entropy. Accelerators (TPU, recent
          GPUs) and CPUs with AMX or AVX-512 BF16 units have hardware for such matmuls.
      num_classes: the number of classes, the size of every head's output.
      rngs: the random streams for initialisation, or an int seed.

    Returns:
      The :class:`StagedModel`, with its BatchNorm layers in training mode.

    Raises:
      ValueError: a field has a value outside those accepted; the message names the value and the accepted ones.
    """
    name = _check_choice("model name", _field(config, "name"), MODELS)
    _check_choice("split", _field(config, "split"), SPLITS)
    head = _check_choice("head", _field(config, "head"), HEADS)
    width = _field(config, "width")
    width = _check_int("width", DEFAULT_WIDTHS[name] if width is None else width, 1)
    batchnorm = _field(config, "batchnorm")
    if not isinstance(batchnorm, bool):
        raise ConfigError(f"batchnorm must be True or False, got {batchnorm!r}")
    head_width = _check_int("head_width", _field(config, "head_width"), 0)
    head_hidden = _check_int("head_hidden", _field(config, "head_hidden"), 0)
    head_pool = _check_int("head_pool", _field(config, "head_pool"), 0)
    head_features = _check_int("head_features", _field(config, "head_features"), 1)
    head_extras = _field(config, "head_extras")
    if isinstance(head_extras, str) or any(extra not in HEAD_EXTRAS for extra in head_extras):
        raise ConfigError(f"unknown head_extras {head_extras!r}; expected a tuple of names from {HEAD_EXTRAS}")
    head_extras = tuple(head_extras)
    image_size = _check_int("image_size", _field(config, "image_size"), 1)
    dtype = jnp.dtype(_check_choice("dtype", _field(config, "dtype"), COMPUTE_DTYPES))
    num_classes = _check_int("num_classes", num_classes, 1)
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)

    # The stage sizes are checked before any parameter is initialised, which is slow for the full-size networks.
    sizes = stage_sizes(config)

    def construct(rngs: nnx.Rngs) -> StagedModel:
        arch = architecture_for(name, width, batchnorm=batchnorm, dtype=dtype, rngs=rngs)

        stages, heads, stage_units, unit_layers, start = [], [], [], [], 0
        for size in sizes:
            units = arch.units[start : start + size]
            start += size
            stages.append(Chain([layer for unit in units for layer in unit.layers]))
            stage_units.append(tuple(unit.name for unit in units))
            unit_layers.append(tuple(len(unit.layers) for unit in units))
            out_features = units[-1].out_features
            out_size = max(image_size // units[-1].out_stride, 1)
            last = len(stages) == len(sizes)
            if head == "linear" or (head == "infopro" and last):
                classifier = LinearHead(out_features, num_classes, dtype=dtype, rngs=rngs)
            elif head == "infopro":
                classifier = InfoProHead(
                    out_features,
                    out_size,
                    num_classes,
                    hidden=INFOPRO_FEATURES,
                    batchnorm=batchnorm,
                    dtype=dtype,
                    rngs=rngs,
                )
            elif head == "prediction":
                classifier = PredictionHead(
                    out_features, out_size, num_classes, max_features=head_features, dtype=dtype, rngs=rngs
                )
            else:
                classifier = ConvHead(
                    out_features,
                    num_classes,
                    width=head_width or out_features,
                    hidden=head_hidden,
                    pool=head_pool,
                    batchnorm=batchnorm,
                    dtype=dtype,
                    rngs=rngs,
                )
            extras = {}
            if "similarity" in head_extras:
                extras["similarity"] = conv3x3(out_features, out_features, use_bias=False, dtype=dtype, rngs=rngs)
            if "decoder" in head_extras and not last:
                extras["decoder"] = Decoder(out_features, image_size, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
            if "projection" in head_extras and not last:
                extras["projection"] = InfoProHead(
                    out_features,
                    out_size,
                    INFOPRO_FEATURES,
                    hidden=INFOPRO_FEATURES,
                    batchnorm=batchnorm,
                    dtype=dtype,
                    rngs=rngs,
                )
            heads.append(HeadWithExtras(classifier, extras) if extras else classifier)
        return StagedModel(stages, heads, stage_units=stage_units, unit_layers=unit_layers)

    # Initialised as one program compiled without LLVM's optimisations: built eagerly, every initialiser of every
    # distinct shape is compiled on its own, and XLA:CPU takes about a second for each truncated normal. The
    # program of each architecture is kept for the process, so building it again runs it at once.
    rngs_def, rngs_state = nnx.split(rngs)
    leaves = jax.tree.leaves(rngs_state)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return construct(rngs)  # inside a transformation (nnx.eval_shape, jit): traced there
    key = (name, tuple(sizes), head, width, batchnorm, head_width, head_hidden, head_pool, head_features, head_extras)
    key += (image_size, str(dtype), num_classes)
    key += (rngs_def,)
    key += tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves)
    if key not in _INITIALISERS:
        model_def, _ = nnx.split(nnx.eval_shape(lambda state: construct(nnx.merge(rngs_def, state)), rngs_state))

        def initial_states(rngs_state):
            streams = nnx.merge(rngs_def, rngs_state)
            return nnx.state(construct(streams)), nnx.state(streams)

        lowered = jax.jit(initial_states).lower(rngs_state)
        _INITIALISERS[key] = model_def, lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    model_def, initialise = _INITIALISERS[key]
    model_state, rngs_after = initialise(rngs_state)
    nnx.update(rngs, rngs_after)
    return nnx.merge(model_def, model_state)


# Compiled initialisers of the architectures built so far in this process, by architecture and random streams.
_INITIALISERS: dict[tuple, tuple[Any, jax.stages.Compiled]] = {}
