"""Staged CNNs for greedy layer-wise training: a network as a sequence of stages, each with a classifier head.

:func:`build_model` builds any of :data:`MODELS` from a configuration; every model is a :class:`StagedModel`.
"""

from dibjax.models.factory import (
    COMPUTE_DTYPES,
    DEFAULT_WIDTHS,
    HEAD_EXTRAS,
    HEADS,
    MODELS,
    SPLITS,
    architecture_for,
    build_model,
    stage_sizes,
)
from dibjax.models.layers import (
    BasicBlock,
    Chain,
    ConvHead,
    ConvUnit,
    Decoder,
    HeadWithExtras,
    InfoProHead,
    LinearHead,
    PredictionHead,
    adaptive_avg_pool,
    materialize,
    native_convolutions,
)
from dibjax.models.staged import StagedModel, count_params, split_balanced, split_evenly

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_WIDTHS",
    "HEAD_EXTRAS",
    "HEADS",
    "MODELS",
    "SPLITS",
    "BasicBlock",
    "Chain",
    "ConvHead",
    "ConvUnit",
    "Decoder",
    "HeadWithExtras",
    "InfoProHead",
    "LinearHead",
    "PredictionHead",
    "StagedModel",
    "adaptive_avg_pool",
    "architecture_for",
    "build_model",
    "count_params",
    "materialize",
    "native_convolutions",
    "split_balanced",
    "split_evenly",
    "stage_sizes",
]
