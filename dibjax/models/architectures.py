"""The architectures, each written as a list of its smallest trainable units.

An architecture is described by its units (what ``split="layer"`` puts in one stage each) and by how those units
form its natural blocks (what ``split="block"`` puts in one stage each). :func:`dibjax.models.build_model` turns
that description into a :class:`~dibjax.models.StagedModel`.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from dibjax.models.layers import BasicBlock, ConvUnit


@dataclasses.dataclass(frozen=True)
class Unit:
    """One smallest trainable unit: its layers, applied in order, the channels of its output and how many times
    smaller its output map is than the network's input (``out_stride``, 2 after one 2×2 max-pool)."""

    name: str
    layers: tuple[nnx.Module, ...]
    out_features: int
    out_stride: int = 1


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The units of a network and the sizes of its natural blocks (consecutive runs of units)."""

    units: tuple[Unit, ...]
    block_sizes: tuple[int, ...]

    def __post_init__(self):
        if sum(self.block_sizes) != len(self.units):
            raise ValueError(f"block sizes {self.block_sizes} do not cover the {len(self.units)} units")


def small_cnn(width: int, *, batchnorm: bool, dtype=None, rngs: nnx.Rngs) -> Architecture:
    """Four conv 3×3 → BatchNorm → ReLU → max-pool 2×2 units with widths ``w, 2w, 4w, 8w``.

    A 32×32 input leaves the last unit as a 2×2 map. Each unit is its own block.
    """
    units, in_features = [], 3
    for i, mult in enumerate((1, 2, 4, 8)):
        unit = ConvUnit(in_features, mult * width, pool=True, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
        units.append(Unit(f"conv{i + 1}+pool", (unit,), mult * width, out_stride=2 ** (i + 1)))
        in_features = mult * width
    return Architecture(tuple(units), BLOCK_SIZES["small_cnn"])


# Convolutions per pooling block in the configurations of Simonyan & Zisserman (2015), Table 1: A, B and D.
VGG_BLOCKS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
}
# The ImageNet channel counts 64/128/256/512/512 relative to the base width.
VGG_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)


def vgg(name: str, width: int, *, batchnorm: bool, dtype=None, rngs: nnx.Rngs) -> Architecture:
    """VGG-11/13/16 (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
    ICLR 2015, configurations A, B and D) with BatchNorm after every convolution, in the CIFAR form.

    Every convolution is 3×3 with stride 1 and is followed by BatchNorm and ReLU; each of the five blocks ends in a
    2×2 max-pool, so a 32×32 input leaves a 1×1 map with ``8 * width`` channels. The three fully connected layers of
    the ImageNet network are replaced by the last stage's head (global pooling of the 1×1 map and one linear layer,
    for ``head="linear"``), as is usual for 32×32 inputs. A unit is one convolution; the max-pool that closes a
    block belongs to the block's last convolution.
    """
    units, in_features = [], 3
    for b, (n_convs, mult) in enumerate(zip(VGG_BLOCKS[name], VGG_WIDTH_MULTIPLIERS, strict=True)):
        for c in range(n_convs):
            pool = c == n_convs - 1
            unit = ConvUnit(in_features, mult * width, pool=pool, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
            label = f"conv{b + 1}_{c + 1}" + ("+pool" if pool else "")
            units.append(Unit(label, (unit,), mult * width, out_stride=2 ** (b + 1 if pool else b)))
            in_features = mult * width
    return Architecture(tuple(units), BLOCK_SIZES[name])


# Residual blocks per resolution and the shortcut type: He et al. (2016), Section 4.2 for the CIFAR networks of
# depth 6n + 2 (option A shortcuts), Table 1 for the 18-layer network (option B where the shape changes).
RESNET_LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), "B"),
    "resnet20": ((3, 3, 3), "A"),
    "resnet32": ((5, 5, 5), "A"),
    "resnet56": ((9, 9, 9), "A"),
    "resnet110": ((18, 18, 18), "A"),
}


def resnet(name: str, width: int, *, batchnorm: bool, dtype=None, rngs: nnx.Rngs) -> Architecture:
    """Residual networks of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    ``resnet20``/``resnet32``/``resnet56``/``resnet110`` are the CIFAR-10 networks of Section 4.2: a 3×3 stem
    convolution with ``width`` (16) channels, then three groups of n = 3, 5, 9, 18 basic blocks with ``width,
    2 width, 4 width`` channels at 32×32, 16×16 and 8×8 (the first block of the second and third groups has stride
    2), 6n + 2 layers in all, with parameter-free option-A shortcuts. ``resnet18`` is the 18-layer network of
    Table 1 (basic blocks 2, 2, 2, 2 with ``width, 2, 4, 8 × width`` channels, option-B projection shortcuts) with
    the usual CIFAR stem: one 3×3 convolution with stride 1 and no max-pool in place of the 7×7 stride-2 convolution
    and max-pool. The classifier (global average pooling and a linear layer) is the last stage's head when
    ``head="linear"``.

    A residual block is the smallest unit that keeps its skip connection intact, so every residual block is one
    unit and one block (``split="layer"`` and ``split="block"`` coincide); the stem convolution is part of the
    first unit.
    """
    blocks_per_group, shortcut = RESNET_LAYOUTS[name]
    stem = ConvUnit(3, width, pool=False, batchnorm=batchnorm, dtype=dtype, rngs=rngs)
    units, in_features = [], width
    for g, n_blocks in enumerate(blocks_per_group):
        out_features = width * 2**g
        for b in range(n_blocks):
            stride = 2 if g > 0 and b == 0 else 1
            block = BasicBlock(
                in_features, out_features, stride=stride, shortcut=shortcut, batchnorm=batchnorm, dtype=dtype, rngs=rngs
            )
            label = f"block{g + 1}_{b + 1}"
            if not units:
                units.append(Unit(f"stem+{label}", (stem, block), out_features, out_stride=2**g))
            else:
                units.append(Unit(label, (block,), out_features, out_stride=2**g))
            in_features = out_features
    return Architecture(tuple(units), BLOCK_SIZES[name])


# Where InfoPro's K local modules of its CIFAR ResNets end (Wang et al., ICLR 2021; blackfeather-wang/InfoPro-Pytorch,
# networks/configs.py, the table `InfoPro`): [group, block] is a cut after block `block` (from 0) of residual group
# `group` (from 1); group 0 is the stem alone.
INFOPRO_CUTS = {
    "resnet32": {
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4], [3, 0], [3, 1]]
        + [[3, 2], [3, 3]],
    },
    "resnet110": {
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7], [2, 11], [2, 15], [3, 1]]
        + [[3, 5], [3, 9], [3, 13]],
    },
}


def infopro_module_sizes(name: str, num_modules: int) -> tuple[int, ...] | None:
    """Residual blocks in each of InfoPro's ``num_modules`` local modules of ``name`` (the stem goes with the first
    block), or ``None`` where InfoPro publishes no split. Raises ``ValueError`` for a split whose first module
    is the stem alone (ResNet-32 in 16 modules): here the stem is part of the first block's unit."""
    cuts = INFOPRO_CUTS.get(name, {}).get(num_modules)
    if cuts is None:
        return None
    blocks_per_group = RESNET_LAYOUTS[name][0]
    ends = [sum(blocks_per_group[: group - 1]) + block + 1 if group else 0 for group, block in cuts]
    sizes = tuple(b - a for a, b in zip([0, *ends], [*ends, sum(blocks_per_group)], strict=True))
    if sizes[0] == 0:
        raise ValueError(
            f"InfoPro's {num_modules} modules of {name} start with the stem alone, which this package cannot cut "
            "off (the stem belongs to the first residual block's unit)"
        )
    return sizes


# The natural blocks of every network, as unit counts; their sum is the number of units (stages for split="layer").
BLOCK_SIZES = {
    "small_cnn": (1, 1, 1, 1),
    **VGG_BLOCKS,
    **{name: (1,) * sum(blocks) for name, (blocks, _) in RESNET_LAYOUTS.items()},
}
NUM_UNITS = {name: sum(sizes) for name, sizes in BLOCK_SIZES.items()}


def unit_activation_sizes(name: str) -> tuple[int, ...]:
    """How many activations each unit of network ``name`` computes, relative to the others: the sum over the unit's
    convolutions of their output channels × output pixels, for base width 1 and a 32×32 input.

    A greedy stage keeps these outputs (and the BatchNorm and ReLU maps of the same size) for its backward pass, so
    they are what a stage's step memory grows with. They fall with depth in every network here, since each halving of
    the resolution at most doubles the channels: a ResNet's blocks go 4 : 2 : 1 over its three groups. Used by
    ``split="activations"`` (:func:`dibjax.models.split_balanced`).
    """
    if name == "small_cnn":
        return tuple(mult * (32 // 2**i) ** 2 for i, mult in enumerate((1, 2, 4, 8)))
    if name in VGG_BLOCKS:
        sizes = []
        for b, (n_convs, mult) in enumerate(zip(VGG_BLOCKS[name], VGG_WIDTH_MULTIPLIERS, strict=True)):
            sizes += [mult * (32 // 2**b) ** 2] * n_convs  # each block's convolutions run before its max-pool
        return tuple(sizes)
    blocks_per_group, shortcut = RESNET_LAYOUTS[name]
    sizes = []
    for g, n_blocks in enumerate(blocks_per_group):
        # resnet18 keeps 32×32 in its first group and halves the map in each later one, as the CIFAR ResNets do
        output = 2**g * (32 // 2**g) ** 2
        sizes += [2 * output] * n_blocks  # two convolutions
        if g > 0 and shortcut == "B":
            sizes[-n_blocks] += output  # the 1×1 projection where the shape changes
    sizes[0] += 32 * 32  # the stem convolution, width channels at 32×32
    return tuple(sizes)
