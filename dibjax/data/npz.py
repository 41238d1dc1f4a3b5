"""The ``npz`` source: a folder with ``train.npz`` and ``test.npz``."""

from __future__ import annotations

import pathlib

import numpy as np

from dibjax import errors
from dibjax.data.dataset import ArrayDataset, checked_dataset
from dibjax.data.pipeline import subset_indices, take

__all__ = ["NPZ_HELP", "load_npz"]

#: What the ``npz`` source expects, for error messages.
NPZ_HELP = "a folder with train.npz and test.npz holding `image` uint8 N×H×W×3 and `label` int"


def load_npz(
    directory: pathlib.Path, num_classes: int, train_limit: int | None, test_limit: int | None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Loads ``directory/train.npz`` and ``directory/test.npz``, each cut to its limit (see :func:`load`)."""
    if not directory.is_dir():
        raise errors.DataNotFoundError(f"npz data folder {directory} does not exist; expected {NPZ_HELP}")
    splits = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        path = directory / f"{split}.npz"
        if not path.is_file():
            raise errors.DataNotFoundError(f"{path} not found; expected {NPZ_HELP}")
        with np.load(path, allow_pickle=False) as npz:
            missing = {"image", "label"} - set(npz.files)
            if missing:
                raise errors.DataError(
                    f"{path}: missing key(s) {sorted(missing)} (has {sorted(npz.files)}); expected {NPZ_HELP}"
                )
            images, labels = npz["image"], npz["label"]
        dataset = checked_dataset(images, labels, num_classes=num_classes, source=str(path))
        splits.append(take(dataset, subset_indices(len(dataset), limit)))
    return splits[0], splits[1]
