"""The ``gtsrb`` source: the GTSRB release on disk (official or folder layout), its decoding and cache, and its
download."""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import warnings
import zipfile

import numpy as np
from PIL import Image

from dibjax import errors
from dibjax.data.dataset import ArrayDataset, checked_dataset
from dibjax.data.download import fetch, md5
from dibjax.data.pipeline import subset_indices, take

__all__ = ["download_gtsrb", "load_gtsrb"]

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
        raise errors.DataNotFoundError(f"GTSRB annotation file {path} not found; {_GTSRB_HELP}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise errors.DataError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        return list(reader)


def _sign(row: dict[str, str], path: pathlib.Path, csv_path: pathlib.Path) -> _Sign:
    try:
        x1, y1, x2, y2, label = (int(row[c]) for c in _ROI_COLUMNS)
    except ValueError as e:
        raise errors.DataError(f"{csv_path}: non-integer ROI or ClassId in row for {path.name}: {e}") from e
    if x2 <= x1 or y2 <= y1:
        raise errors.DataError(f"{csv_path}: empty ROI ({x1}, {y1}, {x2}, {y2}) for {path.name}")
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
        raise errors.DataNotFoundError(f"GTSRB folder {directory} does not exist; {_GTSRB_HELP}")
    if _official_root(directory) is not None:
        return "official"
    if (directory / "Train.csv").is_file():
        return "folder"
    raise errors.DataNotFoundError(f"no GTSRB data found in {directory}; {_GTSRB_HELP}")


def _gtsrb_official(directory: pathlib.Path) -> tuple[list[_Sign], list[_Sign]]:
    root = _official_root(directory)
    train = []
    class_dirs = sorted(p for p in (root / "Final_Training" / "Images").iterdir() if p.is_dir() and p.name.isdigit())
    if not class_dirs:
        raise errors.DataNotFoundError(
            f"no class folders (00000 ...) in {root / 'Final_Training' / 'Images'}; {_GTSRB_HELP}"
        )
    for class_dir in class_dirs:
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        for row in _read_rows(csv_path, ";", ("Filename", *_ROI_COLUMNS)):
            train.append(_sign(row, class_dir / row["Filename"], csv_path))
    test_csv = _official_test_csv(directory, root)
    if test_csv is None:
        looked = [directory, root, root / "Final_Test", root / "Final_Test" / "Images"]
        raise errors.DataNotFoundError(
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
            raise errors.DataNotFoundError(f"GTSRB image {sign.path} listed in the annotations is missing")
        with Image.open(sign.path) as image:
            # PIL's crop box is exclusive at X2/Y2, which gives the symmetric border the
            # annotation describes.
            crop = image.convert("RGB").crop(sign.box)
            images[i] = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    labels = np.array([s.label for s in signs], dtype=np.int64)
    return checked_dataset(images, labels, num_classes=_GTSRB_NUM_CLASSES, source=f"GTSRB in {signs[0].path.parent}")


def load_gtsrb(
    directory: pathlib.Path, size: int, train_limit: int | None, test_limit: int | None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Loads GTSRB from ``directory`` at ``size``², through the cache of the full splits (see :func:`load`)."""
    layout = _gtsrb_layout(directory)
    cache = directory / f"dibjax_cache_{layout}_{size}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as npz:
            try:
                arrays = [npz[k] for k in ("train_image", "train_label", "test_image", "test_label")]
            except KeyError as e:
                raise errors.DataError(f"{cache}: not a dibjax GTSRB cache ({e}); delete it to rebuild it") from e
        where = f"{cache} (delete it to rebuild it)"
        train = checked_dataset(*arrays[:2], num_classes=_GTSRB_NUM_CLASSES, source=where)
        test = checked_dataset(*arrays[2:], num_classes=_GTSRB_NUM_CLASSES, source=where)
        return (
            take(train, subset_indices(len(train), train_limit)),
            take(test, subset_indices(len(test), test_limit)),
        )

    train_signs, test_signs = _gtsrb_official(directory) if layout == "official" else _gtsrb_folder(directory)
    # Class, then track, then frame: both layouts' file names are zero-padded track_frame
    # numbers within a class.
    train_signs.sort(key=lambda s: (s.label, s.path.name))
    for signs, kind in ((train_signs, "training"), (test_signs, "test")):
        if not signs:
            raise errors.DataError(f"GTSRB in {directory}: the {kind} annotations list no images")
    train_idx = subset_indices(len(train_signs), train_limit)
    test_idx = subset_indices(len(test_signs), test_limit)
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
        # stacklevel=3: the line of dibjax.data.load that calls load_gtsrb.
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
        errors.DownloadError: when a download fails (no network, HTTP error); the message gives
            the URL and how to place the files by hand.
        errors.DataError: when an archive's MD5 sum is wrong.
    """
    directory = pathlib.Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    for name, expected in _GTSRB_ARCHIVES.items():
        archive = directory / name
        if not archive.is_file():
            instead = (
                f"place the files by hand: download {', '.join(_GTSRB_ARCHIVES)} from {_GTSRB_URL} elsewhere, put "
                f"them in {directory} and call download_gtsrb again to unzip them (or unzip them there yourself)"
            )
            partial = fetch(_GTSRB_URL + name, archive, timeout=timeout, instead=instead)
            os.replace(partial, archive)
        if expected is not None:
            digest = md5(archive)
            if digest != expected:
                raise errors.DataError(
                    f"{archive}: MD5 {digest}, expected {expected}; delete the file and download it again"
                )
        with zipfile.ZipFile(archive) as z:
            z.extractall(directory)
    return directory
