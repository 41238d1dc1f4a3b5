"""The ``tfds`` source for CIFAR-10/100, and preparing the tfds data set from the official python archive.

tensorflow-datasets is imported only inside the functions that need it: it takes a second to import.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import io
import os
import pathlib
import pickle
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from dibjax import errors
from dibjax.data.dataset import ArrayDataset, checked_dataset
from dibjax.data.download import fetch, md5
from dibjax.data.npz import NPZ_HELP
from dibjax.data.pipeline import subset_indices

__all__ = ["download_cifar", "load_tfds", "prepare_tfds_cifar"]


def load_tfds(
    name: str,
    directory: pathlib.Path | None,
    num_classes: int,
    train_limit: int | None,
    test_limit: int | None,
    *,
    download: bool,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Loads a CIFAR data set through tfds' data source, preparing it first where needed (see :func:`load`)."""
    if directory is not None and not directory.is_dir():
        raise errors.DataNotFoundError(
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
            raise errors.DataError(f"{where}: holds no samples")
        indices = subset_indices(n, limit)
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
        raise errors.ConfigError(f"unknown CIFAR data set {name!r}; accepted: {', '.join(_CIFAR_ARCHIVES)}")


def _entries(value: Any, keys: list[bytes], where: str) -> list[Any]:
    if not isinstance(value, dict) or not all(key in value for key in keys):
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise errors.DataError(f"{where}: expected a dict with the keys {keys}, found {found}")
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
        raise errors.DataError(f"{archive}: not a readable CIFAR python archive ({type(e).__name__}: {e})") from e
    missing = [f"{spec.folder}/{member}" for member in members if member not in pickles]
    if missing:
        raise errors.DataError(
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
                raise errors.DataError(f"{where}: data must be a uint8 array of shape (N, 3072), got {found}")
            # A row holds the red, then the green, then the blue plane, each 32×32 in row-major order.
            images.append(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            for (feature, key), value in zip(spec.labels.items(), values, strict=True):
                value = np.asarray(value, dtype=np.int64)
                if value.shape != (len(rows),):
                    raise errors.DataError(f"{where}: {len(rows)} images but {key.decode()} of shape {value.shape}")
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


def _cifar_archive(name: str, directory: pathlib.Path, *, timeout: float, download: bool) -> pathlib.Path:
    """The official archive in ``directory``, MD5-checked; downloaded first where absent and allowed."""
    filename, expected = _CIFAR_ARCHIVES[name].filename, _CIFAR_MD5[name]
    url, archive = _CIFAR_URL + filename, directory / filename
    instead = (
        f"download {url} elsewhere and place it in {directory} (dibjax then prepares {name} from it without network "
        f"access), or use source='npz' with {NPZ_HELP}"
    )
    if archive.is_file():
        digest = md5(archive)
        if digest != expected:
            raise errors.DataError(
                f"{archive}: MD5 {digest}, expected {expected} (that of {url}); delete the file and try again"
            )
        return archive
    if not download:
        raise errors.DataNotFoundError(
            f"tfds data set {name} is not prepared in {directory}, and downloading it is off (config.download is "
            f"False): {instead}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    partial = fetch(url, archive, timeout=timeout, instead=instead)
    digest = md5(partial)
    if digest != expected:
        partial.unlink()
        raise errors.DataError(f"downloading {url} gave a file with MD5 {digest}, expected {expected}; try again")
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
        errors.DataNotFoundError: when the archive is missing.
        errors.ConfigError: for an unknown name.
        errors.DataError: for an archive that is not a CIFAR python archive.
    """
    _check_cifar_name(name)
    data_dir = pathlib.Path(data_dir).expanduser()
    path = data_dir / _CIFAR_ARCHIVES[name].filename if archive is None else pathlib.Path(archive).expanduser()

    def archive_fn() -> pathlib.Path:
        if not path.is_file():
            raise errors.DataNotFoundError(
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
        errors.DownloadError: when the download fails (no network, HTTP error); the message gives
            the URL, the reason and what to do instead.
        errors.ConfigError: for an unknown name.
        errors.DataError: for an archive whose MD5 sum is wrong.
    """
    _check_cifar_name(name)
    data_dir = pathlib.Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_cifar(name, data_dir, lambda: _cifar_archive(name, data_dir, timeout=timeout, download=True))
    return data_dir
