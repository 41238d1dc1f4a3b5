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
  order from ``np.random.default_rng([seed, epoch])``, so a run resumed at epoch ``e`` sees
  the same batches as an uninterrupted one.
* Augmentation (:func:`augment`) and normalisation (:func:`normalize`) are pure JAX and run
  inside the jitted step: augment the uint8 images first (the crop pads with black, as
  torchvision's ``RandomCrop(32, padding=4)`` does), then normalise.

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
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import hashlib
import http.client
import io
import os
import pathlib
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

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
    "normalize",
    "prepare_tfds_cifar",
    "steps_per_epoch",
    "train_batches",
]


# --------------------------------------------------------------------------- data types


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
            raise ValueError(f"ArrayDataset: labels must be int32, got {self.labels.dtype}")

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

#: Accepted ``config.source`` values and the data sets each can serve.
SOURCES: dict[str, tuple[str, ...]] = {
    "tfds": ("cifar10", "cifar100"),
    "npz": ("cifar10", "cifar100", "gtsrb"),
    "gtsrb": ("gtsrb",),
}

_NPZ_HELP = "a folder with train.npz and test.npz holding `image` uint8 N×H×W×3 and `label` int"


def _check_arrays(images: Any, labels: Any, *, source: str, num_classes: int | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{source}: images must be a uint8 NumPy array, got {dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{source}: images must have shape (N, H, W, 3), got {images.shape}")
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        dtype = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"{source}: labels must be an integer NumPy array, got {dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{source}: labels must have shape (N,), got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels")
    if num_classes is not None and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{source}: labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]")


def checked_dataset(images: Any, labels: Any, *, num_classes: int, source: str) -> ArrayDataset:
    """Validates raw arrays and wraps them as an :class:`ArrayDataset`.

    Args:
        images: uint8 array ``(N, H, W, 3)``.
        labels: integer array ``(N,)`` of any integer dtype; converted to int32.
        num_classes: labels must lie in ``[0, num_classes)``.
        source: where the arrays came from (a file or data set name), used in error messages.

    Raises:
        ValueError: naming ``source``, for a wrong dtype or shape, a length mismatch, labels
            out of range, or an empty data set.
    """
    _check_arrays(images, labels, source=source, num_classes=num_classes)
    if labels.shape[0] == 0:
        raise ValueError(f"{source}: holds no samples")
    return ArrayDataset(images, labels.astype(np.int32, copy=False))


# --------------------------------------------------------------------------- load


def _field(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _limit(config: Any, name: str) -> int | None:
    value = _field(config, name)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"config.{name} must be a non-negative int or None (0/None: no limit), got {value!r}")
    return int(value)


def _subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """Indices of the first ``limit`` samples of a fixed (seed 0) shuffle of ``range(n)``."""
    if limit is None:
        return None
    # Class-agnostic shuffle: the stored files are ordered by class, so a plain prefix
    # would hold only the first classes.
    return np.random.default_rng(0).permutation(n)[:limit]


def _take(dataset: ArrayDataset, indices: np.ndarray | None) -> ArrayDataset:
    if indices is None:
        return dataset
    return ArrayDataset(dataset.images[indices], dataset.labels[indices])


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

    Returns:
        ``(train, test, info)``, where ``info.image_shape`` is the shape actually loaded (with a
        validation split, ``test`` is the held-out part of the training data).

    Raises:
        ValueError: for an unknown name or source, or a combination the source cannot
            serve (checked before any work), or data of the wrong form.
        FileNotFoundError: when the data is not where ``config.dir`` says; the message says
            where it looked and how to get the data.
        ConnectionError: when the ``tfds`` source must download its archive and cannot; the
            message gives the URL, the reason and what to do instead.
    """
    name, source = _field(config, "name"), _field(config, "source")
    if name not in DATASETS:
        raise ValueError(f"unknown data set name {name!r}; accepted: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; accepted: {', '.join(SOURCES)}")
    if name not in SOURCES[source]:
        raise ValueError(f"source {source!r} cannot serve {name!r}; it serves: {', '.join(SOURCES[source])}")
    train_limit, test_limit = _limit(config, "train_limit"), _limit(config, "test_limit")
    image_size = _field(config, "image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"config.image_size must be a positive int or None, got {image_size!r}")
    download = _field(config, "download")
    if download is None:
        download = True
    elif not isinstance(download, bool):
        raise ValueError(f"config.download must be a bool or None (None: True), got {download!r}")
    directory = _field(config, "dir") or None
    if directory is None and source != "tfds":
        raise ValueError(f"config.dir must name the data folder for source {source!r}")
    directory = pathlib.Path(directory).expanduser() if directory is not None else None
    info = DATASETS[name]

    validation_size = _limit(config, "validation_size")
    if validation_size is not None:
        # The limits then apply to the two parts of the training data, after the split.
        limits, train_limit, test_limit = (train_limit, test_limit), None, None
    if source == "npz":
        train, test = _load_npz(directory, info.num_classes, train_limit, test_limit)
    elif source == "tfds":
        train, test = _load_tfds(name, directory, info.num_classes, train_limit, test_limit, download=download)
    else:
        train, test = _load_gtsrb(directory, image_size or 32, train_limit, test_limit)
    if validation_size is not None:
        train, test = split_validation(train, validation_size)
        train, test = (
            _take(part, _subset_indices(len(part), limit)) for part, limit in zip((train, test), limits, strict=True)
        )

    shape = train.images.shape[1:]
    if test.images.shape[1:] != shape:
        raise ValueError(f"{name} from {source}: train images are {shape} but test images are {test.images.shape[1:]}")
    if image_size is not None and shape[:2] != (image_size, image_size):
        raise ValueError(
            f"{name} from {source}: config.image_size is {image_size} but the images are {shape[0]}×{shape[1]}; "
            "only the gtsrb source resizes"
        )
    return train, test, dataclasses.replace(info, image_shape=tuple(int(s) for s in shape))


def _take(dataset: ArrayDataset, indices: np.ndarray | None) -> ArrayDataset:
    if indices is None:
        return dataset
    return ArrayDataset(dataset.images[indices], dataset.labels[indices])


def split_validation(train: ArrayDataset, size: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Splits ``size`` images off a training set, chosen by a fixed (seed 0) shuffle: ``(rest, held_out)``."""
    if not 0 < size < len(train):
        raise ValueError(
            f"validation_size={size} must be between 1 and {len(train) - 1} (the training set has {len(train)})"
        )
    order = np.random.default_rng(0).permutation(len(train))
    return _take(train, np.sort(order[size:])), _take(train, np.sort(order[:size]))


# --------------------------------------------------------------------------- npz


def _load_npz(
    directory: pathlib.Path, num_classes: int, train_limit: int | None, test_limit: int | None
) -> tuple[ArrayDataset, ArrayDataset]:
    if not directory.is_dir():
        raise FileNotFoundError(f"npz data folder {directory} does not exist; expected {_NPZ_HELP}")
    splits = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        path = directory / f"{split}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected {_NPZ_HELP}")
        with np.load(path, allow_pickle=False) as npz:
            missing = {"image", "label"} - set(npz.files)
            if missing:
                raise ValueError(
                    f"{path}: missing key(s) {sorted(missing)} (has {sorted(npz.files)}); expected {_NPZ_HELP}"
                )
            images, labels = npz["image"], npz["label"]
        dataset = checked_dataset(images, labels, num_classes=num_classes, source=str(path))
        splits.append(_take(dataset, _subset_indices(len(dataset), limit)))
    return splits[0], splits[1]


# --------------------------------------------------------------------------- tfds


def _load_tfds(
    name: str,
    directory: pathlib.Path | None,
    num_classes: int,
    train_limit: int | None,
    test_limit: int | None,
    *,
    download: bool,
) -> tuple[ArrayDataset, ArrayDataset]:
    if directory is not None and not directory.is_dir():
        raise FileNotFoundError(
            f"tfds data folder {directory} does not exist. Create it (dibjax downloads {name} and prepares it there "
            "on first use), or leave config.dir empty for tfds' default folder"
        )
    # Imported here: tensorflow-datasets takes a second to import and only this source needs it.
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=None if directory is None else os.fspath(directory))
    if not builder.is_prepared():
        # tfds' own CIFAR builder needs TensorFlow to prepare the data; dibjax's writes the same data set without.
        root = pathlib.Path(os.fspath(builder.data_dir_root))
        _prepare_cifar(name, root, lambda: _cifar_archive(name, root, timeout=60.0, download=download))
        builder = tfds.builder(name, data_dir=os.fspath(root))
    splits = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        data_source = builder.as_data_source(split=split)
        where = f"tfds {name} {split} split in {builder.data_dir}"
        n = len(data_source)
        if n == 0:
            raise ValueError(f"{where}: holds no samples")
        indices = _subset_indices(n, limit)
        indices = np.arange(n) if indices is None else indices
        first = data_source[int(indices[0])]
        images = np.empty((len(indices), *np.shape(first["image"])), dtype=np.uint8)
        labels = np.empty((len(indices),), dtype=np.int64)
        # One record at a time: per-record reads are what every tfds data source supports.
        for i, index in enumerate(indices):
            example = first if i == 0 else data_source[int(index)]
            images[i] = example["image"]
            labels[i] = example["label"]
        splits.append(checked_dataset(images, labels, num_classes=num_classes, source=where))
    return splits[0], splits[1]


# --------------------------------------------------------------------------- CIFAR archives


@dataclasses.dataclass(frozen=True)
class _CifarArchive:
    """Where the official python archive of a CIFAR data set keeps what tfds' builder of that name writes."""

    filename: str
    folder: str  # the folder the archive unpacks to
    splits: dict[str, tuple[str, ...]]  # tfds split: its pickled batches, in order
    meta: str  # the pickle holding the class names
    labels: dict[str, bytes]  # tfds label feature: its key in a batch
    names: dict[str, bytes]  # tfds label feature: the key of its class names in `meta`


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR_ARCHIVES = {
    "cifar10": _CifarArchive(
        filename="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta",
        labels={"label": b"labels"},
        names={"label": b"label_names"},
    ),
    "cifar100": _CifarArchive(
        filename="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        splits={"train": ("train",), "test": ("test",)},
        meta="meta",
        labels={"label": b"fine_labels", "coarse_label": b"coarse_labels"},
        names={"label": b"fine_label_names", "coarse_label": b"coarse_label_names"},
    ),
}
# As published on the CIFAR page.
_CIFAR_MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays, all a CIFAR batch holds: other pickles may run any code."""

    _GLOBALS: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes written by Python 3
        ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: CIFAR batches hold only plain data and NumPy arrays"
            ) from None


def _check_cifar_name(name: str) -> None:
    if name not in _CIFAR_ARCHIVES:
        raise ValueError(f"unknown CIFAR data set {name!r}; accepted: {', '.join(_CIFAR_ARCHIVES)}")


def _entries(value: Any, keys: list[bytes], where: str) -> list[Any]:
    if not isinstance(value, dict) or not all(key in value for key in keys):
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where}: expected a dict with the keys {keys}, found {found}")
    return [value[key] for key in keys]


def _read_cifar_archive(
    name: str, archive: pathlib.Path
) -> tuple[dict[str, tuple[np.ndarray, dict[str, np.ndarray]]], dict[str, list[str]]]:
    """Reads ``{split: (images, {label feature: labels})}`` and ``{label feature: class names}``."""
    spec = _CIFAR_ARCHIVES[name]
    members = [*(batch for batches in spec.splits.values() for batch in batches), spec.meta]
    wanted = {f"{spec.folder}/{member}": member for member in members}
    pickles = {}
    try:
        # One pass in archive order: seeking back in a gzip stream would decompress it again.
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    with tar.extractfile(info) as f:
                        pickles[wanted[info.name]] = _CifarUnpickler(f, encoding="bytes").load()
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{archive}: not a readable CIFAR python archive ({type(e).__name__}: {e})") from e
    missing = [f"{spec.folder}/{member}" for member in members if member not in pickles]
    if missing:
        raise ValueError(
            f"{archive}: holds no {', '.join(missing)}; expected the CIFAR python archive {_CIFAR_URL}{spec.filename}"
        )
    splits = {}
    for split, batches in spec.splits.items():
        images, labels = [], {feature: [] for feature in spec.labels}
        for batch in batches:
            where = f"{archive}: {spec.folder}/{batch}"
            rows, *values = _entries(pickles[batch], [b"data", *spec.labels.values()], where)
            if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.shape[1:] != (3072,):
                found = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
                raise ValueError(f"{where}: data must be a uint8 array of shape (N, 3072), got {found}")
            # A row holds the red, then the green, then the blue plane, each 32×32 in row-major order.
            images.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            for (feature, key), value in zip(spec.labels.items(), values, strict=True):
                value = np.asarray(value, dtype=np.int64)
                if value.shape != (len(rows),):
                    raise ValueError(f"{where}: {len(rows)} images but {key.decode()} of shape {value.shape}")
                labels[feature].append(value)
        splits[split] = (np.concatenate(images), {feature: np.concatenate(value) for feature, value in labels.items()})
    meta = _entries(pickles[spec.meta], list(spec.names.values()), f"{archive}: {spec.folder}/{spec.meta}")
    names = {
        feature: [n.decode() if isinstance(n, bytes) else str(n) for n in value]
        for feature, value in zip(spec.names, meta, strict=True)
    }
    return splits, names


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _cifar_builder_class(name: str) -> type:
    """tfds' CIFAR builder (same name, version, features and record keys), fed from the python archive.

    tfds' own reads the binary archive with ``tf.io.gfile`` and encodes arrays with TensorFlow; this
    one reads the pickles and hands tfds PNG bytes, so it needs no TensorFlow.
    """
    import tensorflow_datasets as tfds

    base = {"cifar10": tfds.image_classification.Cifar10, "cifar100": tfds.image_classification.Cifar100}[name]
    dataset = name  # a class body reads an enclosing variable only under a name it does not assign

    class Builder(base, skip_registration=True):
        name = dataset
        code_path = None  # no checksums file to look up
        archive_fn: Callable[[], pathlib.Path]  # returns the archive; set on each instance

        def _split_generators(self, dl_manager):
            del dl_manager  # archive_fn provides the archive
            splits, names = _read_cifar_archive(dataset, self.archive_fn())
            for feature, feature_names in names.items():
                self.info.features[feature].names = feature_names
            return {split: self._generate_examples(split, *arrays) for split, arrays in splits.items()}

        def _generate_examples(self, split, images, labels):
            for index, image in enumerate(images):
                example = {feature: int(value[index]) for feature, value in labels.items()}
                # The keys and ids of tfds' own builder: tfds orders the records by key, so they match too.
                yield index, {"id": f"{split}_{index:05d}", "image": _png(image), **example}

    return Builder


def _prepare_cifar(name: str, data_dir: pathlib.Path, archive_fn: Callable[[], pathlib.Path]) -> None:
    import tensorflow_datasets as tfds

    builder = _cifar_builder_class(name)(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.archive_fn = archive_fn
    # Returns at once where the data set is prepared; archive_fn is called only otherwise. tfds writes
    # into a temporary folder and renames it when complete, so an interrupted run leaves no data set.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(file_format="array_record", download_config=config)


def _fetch(url: str, destination: pathlib.Path, *, timeout: float, instead: str) -> pathlib.Path:
    """Downloads ``url`` to ``destination`` + ``.partial`` and returns that path.

    On failure the partial file is removed and a ``ConnectionError`` names the URL, the reason and ``instead``,
    what to do without network access.
    """
    partial = destination.with_name(destination.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except (OSError, http.client.HTTPException) as e:
        partial.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise ConnectionError(f"downloading {url} failed ({reason}). Without network access here, {instead}") from e
    return partial


def _md5(path: pathlib.Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest()


def _cifar_archive(name: str, directory: pathlib.Path, *, timeout: float, download: bool) -> pathlib.Path:
    """The official archive in ``directory``, MD5-checked; downloaded first where absent and allowed."""
    filename, md5 = _CIFAR_ARCHIVES[name].filename, _CIFAR_MD5[name]
    url, archive = _CIFAR_URL + filename, directory / filename
    instead = (
        f"download {url} elsewhere and place it in {directory} (dibjax then prepares {name} from it without network "
        f"access), or use source='npz' with {_NPZ_HELP}"
    )
    if archive.is_file():
        digest = _md5(archive)
        if digest != md5:
            raise ValueError(f"{archive}: MD5 {digest}, expected {md5} (that of {url}); delete the file and try again")
        return archive
    if not download:
        raise FileNotFoundError(
            f"tfds data set {name} is not prepared in {directory}, and downloading it is off (config.download is "
            f"False): {instead}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    partial = _fetch(url, archive, timeout=timeout, instead=instead)
    digest = _md5(partial)
    if digest != md5:
        partial.unlink()
        raise ValueError(f"downloading {url} gave a file with MD5 {digest}, expected {md5}; try again")
    # Renamed only once complete and checked, so an interrupted download never passes for the archive.
    os.replace(partial, archive)
    return archive


def prepare_tfds_cifar(
    name: str, data_dir: str | os.PathLike, *, archive: str | os.PathLike | None = None
) -> pathlib.Path:
    """Writes a CIFAR python archive as the tfds data set ``name`` in ``data_dir``, without TensorFlow.

    The result is the data set tfds' own builder prepares in ``array_record`` format: same
    name and version (``data_dir/name/3.0.2``), features (``id``, ``image``, ``label`` and,
    for cifar100, ``coarse_label``, with the class names), record keys and so record order,
    written by tfds' writer. ``tfds.data_source(name, data_dir=data_dir)`` and :func:`load`
    read it. Where the data set is already prepared there, this does nothing.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the tfds data folder; created if absent.
        archive: the python archive (``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``
            layout); default: that file in ``data_dir``. Its MD5 is not checked (use
            :func:`download_cifar` for that); its pickles are read allowing only plain data
            and NumPy arrays.

    Returns:
        ``data_dir`` as a path.

    Raises:
        FileNotFoundError: when the archive is missing.
        ValueError: for an unknown name, or an archive that is not a CIFAR python archive.
    """
    _check_cifar_name(name)
    data_dir = pathlib.Path(data_dir).expanduser()
    path = data_dir / _CIFAR_ARCHIVES[name].filename if archive is None else pathlib.Path(archive).expanduser()

    def archive_fn() -> pathlib.Path:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; dibjax.data.download_cifar({name!r}, data_dir) downloads it from {_CIFAR_URL}"
            )
        return path

    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_cifar(name, data_dir, archive_fn)
    return data_dir


def download_cifar(name: str, data_dir: str | os.PathLike, *, timeout: float = 60.0) -> pathlib.Path:
    """Downloads the official CIFAR python archive and prepares the tfds data set from it.

    What :func:`load` does on first use with ``source="tfds"``, where tfds' own CIFAR builder
    would need TensorFlow. Unless the data set is already prepared in ``data_dir``, fetches
    ``cifar-10-python.tar.gz`` (about 163 MB) or ``cifar-100-python.tar.gz`` (about 161 MB)
    from https://www.cs.toronto.edu/~kriz/ into ``data_dir`` (through a ``.partial`` file,
    renamed once its MD5 sum is verified), then writes it as :func:`prepare_tfds_cifar` does.
    An archive already in ``data_dir`` (placed by hand, say) is MD5-checked and used without
    network access. The archive is kept; delete it once the data set is prepared if space matters.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the tfds data folder; created if absent.
        timeout: seconds to wait for the server on each network operation.

    Returns:
        ``data_dir`` as a path.

    Raises:
        ConnectionError: when the download fails (no network, HTTP error); the message gives
            the URL, the reason and what to do instead.
        ValueError: for an unknown name, or an archive whose MD5 sum is wrong.
    """
    _check_cifar_name(name)
    data_dir = pathlib.Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_cifar(name, data_dir, lambda: _cifar_archive(name, data_dir, timeout=timeout, download=True))
    return data_dir


# --------------------------------------------------------------------------- GTSRB

_GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
# MD5 as published with torchvision's GTSRB loader; the training archive's is not verified here.
_GTSRB_ARCHIVES = {
    "GTSRB_Final_Training_Images.zip": None,
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}
_GTSRB_NUM_CLASSES = 43
_GTSRB_HELP = (
    "expected the official layout (Final_Training/Images/000CC/*.ppm with GT-000CC.csv, Final_Test/Images/*.ppm, "
    "GT-final_test.csv; also accepted under a GTSRB/ subfolder, as the official zips unpack) or the folder layout "
    "(Train/<ClassId>/*.png, Train.csv, Test.csv). Run dibjax.data.download_gtsrb(dir) to fetch the official release"
)
_ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


@dataclasses.dataclass(frozen=True)
class _Sign:
    path: pathlib.Path
    box: tuple[int, int, int, int]
    label: int


def _read_rows(path: pathlib.Path, delimiter: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"GTSRB annotation file {path} not found; {_GTSRB_HELP}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        return list(reader)


def _sign(row: dict[str, str], path: pathlib.Path, csv_path: pathlib.Path) -> _Sign:
    try:
        x1, y1, x2, y2, label = (int(row[c]) for c in _ROI_COLUMNS)
    except ValueError as e:
        raise ValueError(f"{csv_path}: non-integer ROI or ClassId in row for {path.name}: {e}") from e
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{csv_path}: empty ROI ({x1}, {y1}, {x2}, {y2}) for {path.name}")
    return _Sign(path, (x1, y1, x2, y2), label)


def _official_root(directory: pathlib.Path) -> pathlib.Path | None:
    for root in (directory, directory / "GTSRB"):
        if (root / "Final_Training" / "Images").is_dir():
            return root
    return None


def _official_test_csv(directory: pathlib.Path, root: pathlib.Path) -> pathlib.Path | None:
    for folder in (directory, root, root / "Final_Test", root / "Final_Test" / "Images"):
        if (folder / "GT-final_test.csv").is_file():
            return folder / "GT-final_test.csv"
    return None


def _gtsrb_layout(directory: pathlib.Path) -> str:
    if not directory.is_dir():
        raise FileNotFoundError(f"GTSRB folder {directory} does not exist; {_GTSRB_HELP}")
    if _official_root(directory) is not None:
        return "official"
    if (directory / "Train.csv").is_file():
        return "folder"
    raise FileNotFoundError(f"no GTSRB data found in {directory}; {_GTSRB_HELP}")


def _gtsrb_official(directory: pathlib.Path) -> tuple[list[_Sign], list[_Sign]]:
    root = _official_root(directory)
    train = []
    class_dirs = sorted(p for p in (root / "Final_Training" / "Images").iterdir() if p.is_dir() and p.name.isdigit())
    if not class_dirs:
        raise FileNotFoundError(f"no class folders (00000 ...) in {root / 'Final_Training' / 'Images'}; {_GTSRB_HELP}")
    for class_dir in class_dirs:
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        for row in _read_rows(csv_path, ";", ("Filename", *_ROI_COLUMNS)):
            train.append(_sign(row, class_dir / row["Filename"], csv_path))
    test_csv = _official_test_csv(directory, root)
    if test_csv is None:
        looked = [directory, root, root / "Final_Test", root / "Final_Test" / "Images"]
        raise FileNotFoundError(
            "GT-final_test.csv (the test labels, shipped separately as GTSRB_Final_Test_GT.zip; "
            "GT-final_test.test.csv has no ClassId) not found in any of: " + ", ".join(map(str, dict.fromkeys(looked)))
        )
    images = root / "Final_Test" / "Images"
    rows = _read_rows(test_csv, ";", ("Filename", *_ROI_COLUMNS))
    test = [_sign(row, images / row["Filename"], test_csv) for row in rows]
    return train, test


def _gtsrb_folder(directory: pathlib.Path) -> tuple[list[_Sign], list[_Sign]]:
    splits = []
    for split in ("Train", "Test"):
        csv_path = directory / f"{split}.csv"
        rows = _read_rows(csv_path, ",", ("Path", *_ROI_COLUMNS))
        splits.append([_sign(row, directory / row["Path"], csv_path) for row in rows])
    return splits[0], splits[1]


def _decode(signs: list[_Sign], size: int) -> ArrayDataset:
    images = np.empty((len(signs), size, size, 3), dtype=np.uint8)
    for i, sign in enumerate(signs):
        if not sign.path.is_file():
            raise FileNotFoundError(f"GTSRB image {sign.path} listed in the annotations is missing")
        with Image.open(sign.path) as image:
            # PIL's crop box is exclusive at X2/Y2, which gives the symmetric border the
            # annotation describes.
            crop = image.convert("RGB").crop(sign.box)
            images[i] = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    labels = np.array([s.label for s in signs], dtype=np.int64)
    return checked_dataset(images, labels, num_classes=_GTSRB_NUM_CLASSES, source=f"GTSRB in {signs[0].path.parent}")


def _load_gtsrb(
    directory: pathlib.Path, size: int, train_limit: int | None, test_limit: int | None
) -> tuple[ArrayDataset, ArrayDataset]:
    layout = _gtsrb_layout(directory)
    cache = directory / f"dibjax_cache_{layout}_{size}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as npz:
            try:
                arrays = [npz[k] for k in ("train_image", "train_label", "test_image", "test_label")]
            except KeyError as e:
                raise ValueError(f"{cache}: not a dibjax GTSRB cache ({e}); delete it to rebuild it") from e
        where = f"{cache} (delete it to rebuild it)"
        train = checked_dataset(*arrays[:2], num_classes=_GTSRB_NUM_CLASSES, source=where)
        test = checked_dataset(*arrays[2:], num_classes=_GTSRB_NUM_CLASSES, source=where)
        return (
            _take(train, _subset_indices(len(train), train_limit)),
            _take(test, _subset_indices(len(test), test_limit)),
        )

    train_signs, test_signs = _gtsrb_official(directory) if layout == "official" else _gtsrb_folder(directory)
    # Class, then track, then frame: both layouts' file names are zero-padded track_frame
    # numbers within a class.
    train_signs.sort(key=lambda s: (s.label, s.path.name))
    for signs, kind in ((train_signs, "training"), (test_signs, "test")):
        if not signs:
            raise ValueError(f"GTSRB in {directory}: the {kind} annotations list no images")
    train_idx = _subset_indices(len(train_signs), train_limit)
    test_idx = _subset_indices(len(test_signs), test_limit)
    if train_idx is not None or test_idx is not None:
        # A subset is decoded directly and not cached: the cache holds full splits only.
        train = _decode([train_signs[i] for i in train_idx] if train_idx is not None else train_signs, size)
        test = _decode([test_signs[i] for i in test_idx] if test_idx is not None else test_signs, size)
        return train, test
    train, test = _decode(train_signs, size), _decode(test_signs, size)
    _write_cache(cache, train, test)
    return train, test


def _write_cache(cache: pathlib.Path, train: ArrayDataset, test: ArrayDataset) -> None:
    partial = cache.with_name(cache.name + ".partial")
    try:
        with open(partial, "wb") as f:
            arrays = {"train_image": train.images, "train_label": train.labels}
            np.savez(f, **arrays, test_image=test.images, test_label=test.labels)
        # Renamed only once complete, so an interrupted write never leaves a truncated cache.
        os.replace(partial, cache)
    except OSError as e:
        partial.unlink(missing_ok=True)
        message = f"could not write the GTSRB cache {cache} ({e}); the images will be decoded again next time"
        warnings.warn(message, stacklevel=3)


def download_gtsrb(directory: str | os.PathLike, *, timeout: float = 60.0) -> pathlib.Path:
    """Downloads and unpacks the official GTSRB release into ``directory``.

    Fetches ``GTSRB_Final_Training_Images.zip``, ``GTSRB_Final_Test_Images.zip`` and
    ``GTSRB_Final_Test_GT.zip`` (about 300 MB together) from the benchmark's archive,
    verifies the test archives' MD5 sums, and unzips them in place (giving
    ``directory/GTSRB/Final_Training``, ``directory/GTSRB/Final_Test`` and
    ``directory/GT-final_test.csv``), the layout :func:`load` reads with ``source="gtsrb"``.
    Archives already in ``directory`` are not fetched again; the archives are kept.

    Returns:
        ``directory`` as a path.

    Raises:
        ConnectionError: when a download fails (no network, HTTP error); the message gives
            the URL and how to place the files by hand.
        ValueError: when an archive's MD5 sum is wrong.
    """
    directory = pathlib.Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in _GTSRB_ARCHIVES.items():
        archive = directory / name
        if not archive.is_file():
            instead = (
                f"place the files by hand: download {', '.join(_GTSRB_ARCHIVES)} from {_GTSRB_URL} elsewhere, put "
                f"them in {directory} and call download_gtsrb again to unzip them (or unzip them there yourself)"
            )
            partial = _fetch(_GTSRB_URL + name, archive, timeout=timeout, instead=instead)
            os.replace(partial, archive)
        if md5 is not None:
            digest = _md5(archive)
            if digest != md5:
                raise ValueError(f"{archive}: MD5 {digest}, expected {md5}; delete the file and download it again")
        with zipfile.ZipFile(archive) as z:
            z.extractall(directory)
    return directory


# --------------------------------------------------------------------------- batching


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of full batches :func:`train_batches` yields per epoch for ``n`` samples."""
    if batch_size <= 0 or batch_size > n:
        raise ValueError(f"batch_size must lie in [1, {n}] (the data set size), got {batch_size}")
    return n // batch_size


def train_batches(dataset: ArrayDataset, batch_size: int, *, seed: int, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled training batches.

    The order is a permutation drawn from ``np.random.default_rng([seed, epoch])``: the same
    ``(seed, epoch)`` always gives the same batches. The last partial batch is dropped, so
    every batch has exactly ``batch_size`` samples and each sample appears at most once.

    Yields:
        ``{"image": uint8 (B, H, W, 3), "label": int32 (B,)}``.

    Raises:
        ValueError: when ``batch_size`` is not in ``[1, len(dataset)]`` or seed/epoch is negative.
    """
    steps = steps_per_epoch(len(dataset), batch_size)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    for step in range(steps):
        indices = order[step * batch_size : (step + 1) * batch_size]
        yield {"image": dataset.images[indices], "label": dataset.labels[indices]}


def eval_batches(dataset: ArrayDataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields every sample once, in order, in batches of a fixed size.

    The last batch is padded with black images of label 0 up to ``batch_size``, so every
    batch has the same shape (one jit compilation). ``"mask"`` is True for real samples:
    weight per-sample metrics by it.

    Yields:
        ``{"image": uint8 (B, H, W, 3), "label": int32 (B,), "mask": bool (B,)}``.

    Raises:
        ValueError: when ``batch_size`` is not positive.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
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
        yield {"image": images, "label": labels, "mask": mask}


# --------------------------------------------------------------------------- augmentation


def augment(images: jax.Array, key: jax.Array, *, crop_padding: int = 4, flip: bool = True) -> jax.Array:
    """Random crop with zero padding and, if ``flip``, random horizontal flip, per image.

    Each image is padded by ``crop_padding`` zero pixels on every side and an ``H×W``
    window is cut at an offset drawn uniformly from ``[0, 2 crop_padding]`` in each axis;
    then, if ``flip``, mirrored left-right with probability 1/2. Pass uint8 images (before
    :func:`normalize`) so the padding is black. Jit-able; ``crop_padding`` and ``flip``
    are static.

    Args:
        images: ``(B, H, W, C)``, any dtype (kept).
        key: a JAX PRNG key; the same key gives the same result.
        crop_padding: padding in pixels; 0 disables the crop.
        flip: whether to flip; False for data whose label a mirror changes (traffic signs).

    Returns:
        An array of the same shape and dtype as ``images``.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be non-negative, got {crop_padding}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1, dtype=jnp.int32)
        zero = jnp.zeros((), jnp.int32)

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], zero), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def normalize(images: jax.Array, info: DatasetInfo) -> jax.Array:
    """Maps uint8 images to float32 ``(x / 255 - mean) / std`` with ``info``'s per-channel constants."""
    mean = jnp.asarray(info.mean, dtype=jnp.float32)
    std = jnp.asarray(info.std, dtype=jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std
