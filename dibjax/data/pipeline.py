"""The host pipeline: fixed-shuffle subsets, the validation split, and training and evaluation batches."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

from dibjax import errors, streams
from dibjax.data.dataset import ArrayDataset

__all__ = [
    "eval_batches",
    "noisy_labels",
    "prefetch",
    "split_validation",
    "steps_per_epoch",
    "subset_indices",
    "take",
    "train_batches",
]


def subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """Indices of the first ``limit`` samples of a fixed (seed 0) shuffle of ``range(n)``."""
    if limit is None:
        return None
    # Class-agnostic shuffle: the stored files are ordered by class, so a plain prefix
    # would hold only the first classes.
    return np.random.default_rng(0).permutation(n)[:limit]


def take(dataset: ArrayDataset, indices: np.ndarray | None) -> ArrayDataset:
    """The samples of ``dataset`` at ``indices``, in that order; ``dataset`` itself for None."""
    if indices is None:
        return dataset
    return ArrayDataset(dataset.images[indices], dataset.labels[indices])


def split_validation(train: ArrayDataset, size: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Splits ``size`` images off a training set, chosen by a fixed (seed 0) shuffle: ``(rest, held_out)``."""
    if not 0 < size < len(train):
        raise errors.ConfigError(
            f"validation_size={size} must be between 1 and {len(train) - 1} (the training set has {len(train)})"
        )
    order = np.random.default_rng(0).permutation(len(train))
    return take(train, np.sort(order[size:])), take(train, np.sort(order[:size]))


# A stream of its own, not the seed-0 shuffle of the subsets and the validation split: which labels are wrong must
# not follow which images are held out. Fixed forever, since changing it changes every noisy run's data.
_LABEL_NOISE_STREAM = 5


def check_noise_rate(rate: float, name: str) -> None:
    """Refuses a label-noise rate outside [0, 1), naming the field ``name``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise errors.ConfigError(f"{name} must be a fraction in [0, 1) (0: none), got {rate!r}")


def noisy_labels(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    """Symmetric label noise: ``round(rate · n)`` labels, each replaced by a different class drawn uniformly.

    Which labels change, and to what, is one fixed draw (independent of the run's seed), so that every seed and
    every method trains on the same noisy data. Each changed label is wrong, so a fraction ``rate`` of the labels
    is wrong; a classifier's expected accuracy on such labels is ``(1 − rate)·a + rate·(1 − a)/(C − 1)`` for its
    accuracy ``a`` on the true labels, increasing in ``a`` while ``rate < (C − 1)/C``, so accuracy on noisy
    held-out labels ranks settings as the true labels would.
    """
    check_noise_rate(rate, "label_noise")
    if num_classes < 2:
        raise errors.ConfigError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    rng = np.random.default_rng([_LABEL_NOISE_STREAM, 0])
    changed = rng.permutation(len(labels))[: round(rate * len(labels))]
    noisy = labels.copy()
    # Adding 1 … C−1 modulo C moves a label to each other class with equal probability.
    noisy[changed] = (labels[changed] + rng.integers(1, num_classes, len(changed))) % num_classes
    return noisy


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of full batches :func:`train_batches` yields per epoch for ``n`` samples."""
    if batch_size <= 0 or batch_size > n:
        raise errors.ConfigError(f"batch_size must lie in [1, {n}] (the data set size), got {batch_size}")
    return n // batch_size


def train_batches(
    dataset: ArrayDataset, batch_size: int, *, seed: int, epoch: int, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled training batches, or this process's rows of each.

    The order is a permutation drawn from :func:`dibjax.streams.order_rng` ``(seed, epoch)``
    (epochs count from 1): the same ``(seed, epoch)`` always gives the same batches. The last
    partial batch is dropped, so every batch has exactly ``batch_size`` samples and each sample
    appears at most once.

    With ``rows`` (a slice of ``range(batch_size)``, :func:`dibjax.distributed.local_rows`) only those rows of
    each global batch are gathered: every process of a multi-process run holds the same data set and takes its
    own share of the same global batches.

    Yields:
        ``{"image": uint8 (B, H, W, 3), "label": int32 (B,)}``, ``B`` the batch size or the rows' count.

    Raises:
        errors.ConfigError: when ``batch_size`` is not in ``[1, len(dataset)]`` or seed is negative or epoch below 1.
    """
    steps = steps_per_epoch(len(dataset), batch_size)
    if seed < 0 or epoch < 1:
        raise errors.ConfigError(f"seed must be non-negative and epoch positive, got seed={seed}, epoch={epoch}")
    order = streams.order_rng(seed, epoch).permutation(len(dataset))
    for step in range(steps):
        indices = order[step * batch_size : (step + 1) * batch_size]
        if rows is not None:
            indices = indices[rows]
        yield {"image": dataset.images[indices], "label": dataset.labels[indices]}


def eval_batches(
    dataset: ArrayDataset, batch_size: int, *, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every sample once, in order, in batches of a fixed size (or this process's rows of each).

    The last batch is padded with black images of label 0 up to ``batch_size``, so every
    batch has the same shape (one jit compilation). ``"mask"`` is True for real samples:
    weight per-sample metrics by it. ``rows`` as in :func:`train_batches`: across the processes'
    rows every sample is counted exactly once.

    Yields:
        ``{"image": uint8 (B, H, W, 3), "label": int32 (B,), "mask": bool (B,)}``.

    Raises:
        errors.ConfigError: when ``batch_size`` is not positive.
    """
    if batch_size <= 0:
        raise errors.ConfigError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)
    for start in range(0, n, batch_size):
        images = dataset.images[start : start + batch_size]
        labels = dataset.labels[start : start + batch_size]
        real = len(labels)
        mask = np.ones((batch_size,), dtype=bool)
        if real < batch_size:
            pad = batch_size - real
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), dtype=images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), dtype=labels.dtype)])
            mask[real:] = False
        batch = {"image": images, "label": labels, "mask": mask}
        yield batch if rows is None else {name: array[rows] for name, array in batch.items()}


Item = TypeVar("Item")


def prefetch(items: Iterable[Item], size: int = 2) -> Iterator[Item]:
    """Yields ``items`` in order, keeping ``size`` of them produced ahead of the one being used.

    With items made by ``jax.make_array_from_process_local_data`` (or ``jax.device_put``), whose host-to-device
    copies run asynchronously, the next batches travel to the devices while the current step runs.
    """
    iterator = iter(items)
    queue = collections.deque(itertools.islice(iterator, size))
    while queue:
        yield queue.popleft()
        queue.extend(itertools.islice(iterator, 1))
