"""Image classification data: loading into host memory, batching, and on-device augmentation.

Conventions (part of the public API)
------------------------------------
* A data set lives in host memory as an :class:`ArrayDataset`: ``images`` uint8 of shape
  ``(N, H, W, 3)`` in RGB order, ``labels`` int32 of shape ``(N,)`` with values in
  ``[0, num_classes)``.
* :func:`load` returns ``(train, test, info)``; :class:`DatasetInfo` carries the class count,
  the image shape and the per-channel normalisation constants in ``[0, 1]`` units.
* Batches are dicts of NumPy arrays: ``{"image": uint8 (B, H, W, 3), "label": int32 (B,)}``,
  plus ``"mask"`` bool ``(B,)`` for evaluation batches. :func:`train_batches` draws its
  order from the run's seed and the epoch (:func:`dibjax.streams.order_rng`), so a run resumed
  at epoch ``e`` sees the same batches as an uninterrupted one.
* Augmentation (:func:`augment`) and normalisation (:func:`normalize`) are pure JAX and run
  inside the jitted step: augment the uint8 images first (the crop pads with black, as
  torchvision's ``RandomCrop(32, padding=4)`` does), then normalise.
* Errors are those of :mod:`dibjax.errors`: ``ConfigError`` for a bad configuration value or
  argument, ``DataError`` for data of the wrong form, ``DataNotFoundError`` for data that is
  not where the configuration says, ``DownloadError`` for a failed download. Each derives from
  the built-in exception raised before (``ValueError``, ``FileNotFoundError``, ``ConnectionError``).

Sources (``config.source``)
---------------------------
* ``"npz"``: ``dir/train.npz`` and ``dir/test.npz``, each with ``image`` (uint8 N×H×W×3)
  and ``label`` (any integer dtype).
* ``"tfds"``: CIFAR-10/100 through tensorflow-datasets' random-access ``array_record``
  data source, which needs no TensorFlow to read. tfds' own CIFAR builder needs TensorFlow to
  prepare the data, so when the data set is not prepared yet, dibjax does it instead: it
  downloads the official CIFAR python archive (:func:`download_cifar`) and writes it with tfds'
  writer under tfds' name, version and features (:func:`prepare_tfds_cifar`), giving the data
  set ``tfds.data_source(name, data_dir=dir)`` reads. ``config.download = False`` forbids the
  download; an archive placed in the data folder by hand is still converted. See :func:`load`.
* ``"gtsrb"``: the GTSRB release on disk, official (``Final_Training/Images/000CC/*.ppm``)
  or folder (``Train/<ClassId>/*.png`` with ``Train.csv``/``Test.csv``) layout, detected
  automatically. Each image is cropped to its annotated ROI and resized to
  ``image_size``² with PIL's bicubic filter. The decoded full splits are cached as
  ``dir/dibjax_cache_{layout}_{image_size}.npz``; delete that file after changing the data.
  :func:`download_gtsrb` fetches the official archives.

Modules
-------
This package re-exports the public names of its modules; import them from ``dibjax.data``.

* :mod:`dibjax.data.dataset`: :class:`ArrayDataset`, :class:`DatasetInfo`, :data:`DATASETS`,
  :func:`checked_dataset`.
* :mod:`dibjax.data.npz`, :mod:`dibjax.data.cifar` (the ``tfds`` source), :mod:`dibjax.data.gtsrb`:
  the sources; :mod:`dibjax.data.download`: the download helper they share.
* :mod:`dibjax.data.pipeline`: fixed-shuffle subsets, :func:`split_validation`, :func:`noisy_labels` and the
  batches.
* :mod:`dibjax.data.augmentation`: :func:`augment` and :func:`normalize`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from dibjax import errors
from dibjax.data import cifar, gtsrb, npz, pipeline
from dibjax.data.augmentation import augment, normalize
from dibjax.data.cifar import download_cifar, prepare_tfds_cifar
from dibjax.data.dataset import DATASETS, ArrayDataset, DatasetInfo, checked_dataset
from dibjax.data.gtsrb import download_gtsrb
from dibjax.data.pipeline import (
    eval_batches,
    noisy_labels,
    prefetch,
    split_validation,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "DATASETS",
    "SOURCES",
    "ArrayDataset",
    "DatasetInfo",
    "augment",
    "checked_dataset",
    "download_cifar",
    "download_gtsrb",
    "eval_batches",
    "load",
    "noisy_labels",
    "normalize",
    "prefetch",
    "prepare_tfds_cifar",
    "split_validation",
    "steps_per_epoch",
    "train_batches",
]

#: Accepted ``config.source`` values and the data sets each can serve.
SOURCES: dict[str, tuple[str, ...]] = {
    "tfds": ("cifar10", "cifar100"),
    "npz": ("cifar10", "cifar100", "gtsrb"),
    "gtsrb": ("gtsrb",),
}


def _field(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _limit(config: Any, name: str) -> int | None:
    value = _field(config, name)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise errors.ConfigError(f"config.{name} must be a non-negative int or None (0/None: no limit), got {value!r}")
    return int(value)


def load(config: Any) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """Loads a data set's train and test splits into host memory.

    Args:
        config: an ``ml_collections.ConfigDict``, a mapping, or any object with the fields

            * ``name``: ``"cifar10"``, ``"cifar100"`` or ``"gtsrb"``.
            * ``source``: ``"tfds"`` (cifar10, cifar100), ``"npz"`` (any) or ``"gtsrb"``.
            * ``dir``: the data folder. For ``tfds``, None or ``""`` means tfds' default
              (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
            * ``train_limit``, ``test_limit`` (optional, None or 0 for all): keep the first
              ``k`` samples of a shuffle with the fixed seed 0, for quick smoke runs. A limit
              at or above the split size keeps the whole split, in that shuffled order.
            * ``image_size`` (optional): side of the square images the ``gtsrb`` source
              resizes to (default 32). With other sources, the data must already be of this
              size.
            * ``download`` (optional, default True): for ``tfds``, whether a data set that is
              not prepared in the data folder may be downloaded (see :func:`download_cifar`).
              With False, only an archive already placed there is converted.
            * ``validation_size`` (optional, None or 0 for none): hold out this many training
              images (a fixed seed-0 shuffle, the same for every run) and return them in place of
              the test split, for choosing hyper-parameters without looking at the test set.
              Applied before ``train_limit``/``test_limit``.
            * ``label_noise`` (optional, None or 0 for none): the fraction of training labels
              replaced by a different class drawn uniformly (:func:`noisy_labels`, one fixed draw).
              Applied to the training split as loaded, before the validation split, so the held-out
              labels are as noisy as the rest; the test split is never changed.

    Returns:
        ``(train, test, info)``, where ``info.image_shape`` is the shape actually loaded (with a
        validation split, ``test`` is the held-out part of the training data).

    Raises:
        errors.ConfigError: (a ``ValueError``) for an unknown name or source, or a combination the
            source cannot serve (checked before any work), a bad field value, a ``validation_size``
            the training set cannot spare, or an ``image_size`` the loaded images do not have.
        errors.DataError: (a ``ValueError``) for data of the wrong form.
        errors.DataNotFoundError: (a ``FileNotFoundError``) when the data is not where
            ``config.dir`` says; the message says where it looked and how to get the data.
        errors.DownloadError: (a ``ConnectionError``) when the ``tfds`` source must download its
            archive and cannot; the message gives the URL, the reason and what to do instead.
    """
    name, source = _field(config, "name"), _field(config, "source")
    if name not in DATASETS:
        raise errors.ConfigError(f"unknown data set name {name!r}; accepted: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise errors.ConfigError(f"unknown data source {source!r}; accepted: {', '.join(SOURCES)}")
    if name not in SOURCES[source]:
        raise errors.ConfigError(f"source {source!r} cannot serve {name!r}; it serves: {', '.join(SOURCES[source])}")
    train_limit, test_limit = _limit(config, "train_limit"), _limit(config, "test_limit")
    image_size = _field(config, "image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise errors.ConfigError(f"config.image_size must be a positive int or None, got {image_size!r}")
    download = _field(config, "download")
    if download is None:
        download = True
    elif not isinstance(download, bool):
        raise errors.ConfigError(f"config.download must be a bool or None (None: True), got {download!r}")
    label_noise = _field(config, "label_noise") or 0.0
    pipeline.check_noise_rate(label_noise, "config.label_noise")
    directory = _field(config, "dir") or None
    if directory is None and source != "tfds":
        raise errors.ConfigError(f"config.dir must name the data folder for source {source!r}")
    directory = pathlib.Path(directory).expanduser() if directory is not None else None
    info = DATASETS[name]

    validation_size = _limit(config, "validation_size")
    if validation_size is not None:
        # The limits then apply to the two parts of the training data, after the split.
        limits, train_limit, test_limit = (train_limit, test_limit), None, None
    if source == "npz":
        train, test = npz.load_npz(directory, info.num_classes, train_limit, test_limit)
    elif source == "tfds":
        train, test = cifar.load_tfds(name, directory, info.num_classes, train_limit, test_limit, download=download)
    else:
        train, test = gtsrb.load_gtsrb(directory, image_size or 32, train_limit, test_limit)
    if label_noise:
        train = ArrayDataset(train.images, noisy_labels(train.labels, label_noise, info.num_classes))
    if validation_size is not None:
        train, test = split_validation(train, validation_size)
        train, test = (
            pipeline.take(part, pipeline.subset_indices(len(part), limit))
            for part, limit in zip((train, test), limits, strict=True)
        )

    shape = train.images.shape[1:]
    if test.images.shape[1:] != shape:
        raise errors.DataError(
            f"{name} from {source}: train images are {shape} but test images are {test.images.shape[1:]}"
        )
    if image_size is not None and shape[:2] != (image_size, image_size):
        raise errors.ConfigError(
            f"{name} from {source}: config.image_size is {image_size} but the images are {shape[0]}×{shape[1]}; "
            "only the gtsrb source resizes"
        )
    return train, test, dataclasses.replace(info, image_shape=tuple(int(s) for s in shape))
