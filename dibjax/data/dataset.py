"""The in-memory data set type, the static facts about each known data set, and the array checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dibjax import errors

__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "checked_dataset"]


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled image data set held in host memory.

    Attributes:
        images: uint8 array of shape ``(N, H, W, 3)``, RGB.
        labels: int32 array of shape ``(N,)``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        _check_arrays(self.images, self.labels, source="ArrayDataset")
        if self.labels.dtype != np.int32:
            raise errors.DataError(f"ArrayDataset: labels must be int32, got {self.labels.dtype}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set.

    Attributes:
        name: data set name (a key of :data:`DATASETS`).
        num_classes: number of classes; labels lie in ``[0, num_classes)``.
        image_shape: ``(H, W, 3)``.
        mean: per-channel mean of the training images in ``[0, 1]`` units (R, G, B).
        std: per-channel standard deviation, same units.
        flip: whether a horizontal flip keeps the label. False for traffic signs, where a
            flipped "keep left" is "keep right".
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool


#: Known data sets. ``image_shape`` is the native one; :func:`load` returns the loaded one.
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    # Mean/std of the ROI-cropped 32×32 training images.
    "gtsrb": DatasetInfo("gtsrb", 43, (32, 32, 3), (0.3586, 0.3175, 0.3354), (0.2739, 0.2577, 0.2679), False),
}


def _check_arrays(images: Any, labels: Any, *, source: str, num_classes: int | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise errors.DataError(f"{source}: images must be a uint8 NumPy array, got {dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise errors.DataError(f"{source}: images must have shape (N, H, W, 3), got {images.shape}")
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise errors.DataError(f"{source}: labels must be an integer NumPy array, got {dtype}")
    if labels.ndim != 1:
        raise errors.DataError(f"{source}: labels must have shape (N,), got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise errors.DataError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels")
    if num_classes is not None and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise errors.DataError(f"{source}: labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]")


def checked_dataset(images: Any, labels: Any, *, num_classes: int, source: str) -> ArrayDataset:
    """Validates raw arrays and wraps them as an :class:`ArrayDataset`.

    Args:
        images: uint8 array ``(N, H, W, 3)``.
        labels: integer array ``(N,)`` of any integer dtype; converted to int32.
        num_classes: labels must lie in ``[0, num_classes)``.
        source: where the arrays came from (a file or data set name), used in error messages.

    Raises:
        errors.DataError: naming ``source``, for a wrong dtype or shape, a length mismatch, labels
            out of range, or an empty data set.
    """
    _check_arrays(images, labels, source=source, num_classes=num_classes)
    if labels.shape[0] == 0:
        raise errors.DataError(f"{source}: holds no samples")
    return ArrayDataset(images, labels.astype(np.int32, copy=False))
