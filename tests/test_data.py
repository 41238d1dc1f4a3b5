import functools
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dibjax import data, errors, streams
from dibjax.data import cifar as data_cifar
from dibjax.data import gtsrb as data_gtsrb


def _config(**fields):
    defaults = {"name": "cifar10", "source": "npz", "dir": None, "train_limit": None, "test_limit": None}
    return ml_collections.ConfigDict({**defaults, **fields})


def _write_npz(path, n, num_classes=10, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    np.savez(path, image=images, label=labels)
    return images, labels


def _tiny(n=10, num_classes=10, size=4):
    """Sample i is an image filled with the value i."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    return data.ArrayDataset(images, (np.arange(n) % num_classes).astype(np.int32))


# --------------------------------------------------------------------------- config errors


def test_unknown_name_and_source_list_accepted_values_before_any_work(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10, cifar100, gtsrb"):
        data.load(_config(name="mnist", dir=str(missing)))
    with pytest.raises(ValueError, match=r"'hdf5'.*tfds, npz, gtsrb"):
        data.load(_config(source="hdf5", dir=str(missing)))
    with pytest.raises(ValueError, match=r"'gtsrb' cannot serve 'cifar10'.*gtsrb"):
        data.load(_config(name="cifar10", source="gtsrb", dir=str(missing)))
    with pytest.raises(ValueError, match=r"'tfds' cannot serve 'gtsrb'"):
        data.load(_config(name="gtsrb", source="tfds", dir=str(missing)))
    with pytest.raises(ValueError, match="train_limit"):
        data.load(_config(dir=str(missing), train_limit=-1))
    with pytest.raises(ValueError, match="config.dir"):
        data.load(_config(dir=""))


def test_dataset_info_constants():
    assert data.DATASETS["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert data.DATASETS["cifar100"].std == (0.2673, 0.2564, 0.2762)
    assert data.DATASETS["gtsrb"].num_classes == 43
    assert data.DATASETS["cifar10"].flip and data.DATASETS["cifar100"].flip
    assert not data.DATASETS["gtsrb"].flip  # a mirrored "keep left" is "keep right"


def test_errors_are_the_project_classes(tmp_path, monkeypatch):
    """Each failure raises its dibjax.errors class, a subclass of the built-in exception raised before."""
    with pytest.raises(errors.ConfigError, match="unknown data set name 'mnist'"):
        data.load(_config(name="mnist", dir=str(tmp_path)))
    with pytest.raises(errors.ConfigError, match="'tfds' cannot serve 'gtsrb'"):
        data.load(_config(name="gtsrb", source="tfds", dir=str(tmp_path)))
    with pytest.raises(errors.ConfigError, match="config.train_limit"):
        data.load(_config(dir=str(tmp_path), train_limit=-1))
    with pytest.raises(errors.ConfigError, match="unknown CIFAR data set 'gtsrb'"):
        data.download_cifar("gtsrb", tmp_path)
    with pytest.raises(errors.DataNotFoundError, match="npz data folder .* does not exist"):
        data.load(_config(dir=str(tmp_path / "absent")))
    with pytest.raises(errors.DataNotFoundError, match="GTSRB folder .* does not exist"):
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path / "absent")))
    _write_npz(tmp_path / "train.npz", 4)
    np.savez(tmp_path / "test.npz", image=np.zeros((4, 8, 8, 3), np.float32), label=np.zeros(4, np.int64))
    with pytest.raises(errors.DataError, match="images must be a uint8 NumPy array, got float32"):
        data.load(_config(dir=str(tmp_path)))
    with pytest.raises(errors.DataError, match="labels must be int32"):
        data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    dataset = _tiny(n=8)
    with pytest.raises(errors.ConfigError, match=r"batch_size must lie in \[1, 8\]"):
        next(data.train_batches(dataset, 9, seed=0, epoch=1))
    with pytest.raises(errors.ConfigError, match="batch_size must be positive"):
        next(data.eval_batches(dataset, 0))
    with pytest.raises(errors.ConfigError, match="validation_size=8 must be between 1 and 7"):
        data.split_validation(dataset, 8)
    with pytest.raises(errors.ConfigError, match="crop_padding must be non-negative"):
        data.augment(dataset.images, jax.random.key(0), crop_padding=-1)
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(errors.DownloadError, match="GTSRB_Final_Training_Images.zip failed"):
        data.download_gtsrb(tmp_path / "gtsrb")


# --------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path):
    train_images, train_labels = _write_npz(tmp_path / "train.npz", 30, seed=1)
    test_images, test_labels = _write_npz(tmp_path / "test.npz", 12, seed=2)
    train, test, info = data.load(_config(dir=str(tmp_path)))
    assert len(train) == 30 and len(test) == 12
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    np.testing.assert_array_equal(train.images, train_images)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert info.name == "cifar10" and info.num_classes == 10 and info.image_shape == (32, 32, 3)


def test_npz_limits_take_a_fixed_shuffle(tmp_path):
    train_images, train_labels = _write_npz(tmp_path / "train.npz", 40)
    _write_npz(tmp_path / "test.npz", 20)
    train, test, _ = data.load(_config(dir=str(tmp_path), train_limit=15, test_limit=0))
    again, _, _ = data.load(_config(dir=str(tmp_path), train_limit=15))
    assert len(train) == 15 and len(test) == 20
    np.testing.assert_array_equal(train.images, again.images)
    expected = np.random.default_rng(0).permutation(40)[:15]
    np.testing.assert_array_equal(train.images, train_images[expected])
    np.testing.assert_array_equal(train.labels, train_labels[expected])
    # Class-agnostic: a prefix of the class-ordered file would not look like this.
    assert len(np.unique(train.labels)) > 5


def test_validation_split_is_held_out_of_train_and_replaces_test(tmp_path):
    train_images, _ = _write_npz(tmp_path / "train.npz", 40)
    _write_npz(tmp_path / "test.npz", 20)
    train, validation, _ = data.load(_config(dir=str(tmp_path), validation_size=10))
    assert len(train) == 30 and len(validation) == 10
    rows = lambda d: {img.tobytes() for img in d.images}  # noqa: E731
    assert not rows(train) & rows(validation)
    assert rows(train) | rows(validation) == rows(data.ArrayDataset(train_images, np.zeros(40, np.int32)))
    again_train, again_validation, _ = data.load(_config(dir=str(tmp_path), validation_size=10))
    np.testing.assert_array_equal(again_validation.images, validation.images)
    limited, limited_validation, _ = data.load(_config(dir=str(tmp_path), validation_size=10, train_limit=5))
    assert len(limited) == 5 and rows(limited) <= rows(train) and len(limited_validation) == 10
    with pytest.raises(ValueError, match="validation_size=40 must be between 1 and 39"):
        data.load(_config(dir=str(tmp_path), validation_size=40))


def test_noisy_labels_change_the_stated_fraction_to_other_classes_uniformly():
    num_classes, n = 5, 20_000
    labels = (np.arange(n) % num_classes).astype(np.int32)
    noisy = data.noisy_labels(labels, 0.4, num_classes)
    changed = noisy != labels
    assert changed.sum() == 8_000 and noisy.dtype == labels.dtype
    np.testing.assert_array_equal(labels, np.arange(n) % num_classes)  # the input is left alone
    # Each wrong label is one of the C − 1 other classes with equal probability: the offsets are uniform on 1…C−1.
    offsets = np.bincount((noisy[changed] - labels[changed]) % num_classes, minlength=num_classes)
    assert offsets[0] == 0
    np.testing.assert_allclose(offsets[1:] / changed.sum(), 1 / (num_classes - 1), atol=0.02)
    # The changed samples are spread over the classes, not a block of them.
    np.testing.assert_allclose(np.bincount(labels[changed]) / changed.sum(), 1 / num_classes, atol=0.02)
    np.testing.assert_array_equal(data.noisy_labels(labels, 0.4, num_classes), noisy)  # one fixed draw
    np.testing.assert_array_equal(data.noisy_labels(labels, 0.0, num_classes), labels)
    for rate in (1.0, -0.1, "0.2", True):
        with pytest.raises(errors.ConfigError, match=r"label_noise must be a fraction in \[0, 1\)"):
            data.noisy_labels(labels, rate, num_classes)


def test_label_noise_is_applied_before_the_validation_split_and_never_to_test(tmp_path):
    train_images, train_labels = _write_npz(tmp_path / "train.npz", 40)
    _, test_labels = _write_npz(tmp_path / "test.npz", 20)
    by_image = {img.tobytes(): label for img, label in zip(train_images, train_labels, strict=True)}
    noisy_train, test, _ = data.load(_config(dir=str(tmp_path), label_noise=0.25))
    assert (noisy_train.labels != train_labels).sum() == 10
    np.testing.assert_array_equal(test.labels, test_labels)
    # Held-out labels carry the same noise as in the full noisy training set: the split does not redraw it.
    noisy_by_image = {img.tobytes(): label for img, label in zip(noisy_train.images, noisy_train.labels, strict=True)}
    train, validation, _ = data.load(_config(dir=str(tmp_path), label_noise=0.25, validation_size=10))
    for part in (train, validation):
        assert all(noisy_by_image[img.tobytes()] == label for img, label in zip(part.images, part.labels, strict=True))
    wrong = sum(
        by_image[img.tobytes()] != label for img, label in zip(validation.images, validation.labels, strict=True)
    )
    assert 0 < wrong < 10
    with pytest.raises(
        errors.ConfigError, match=r"config.label_noise must be a fraction in \[0, 1\) \(0: none\), got 1.5"
    ):
        data.load(_config(dir=str(tmp_path / "absent"), label_noise=1.5))


def test_npz_image_size_mismatch(tmp_path):
    _write_npz(tmp_path / "train.npz", 4, size=8)
    _write_npz(tmp_path / "test.npz", 4, size=8)
    _, _, info = data.load(_config(dir=str(tmp_path)))
    assert info.image_shape == (8, 8, 3)
    with pytest.raises(ValueError, match="image_size is 32 but the images are 8×8"):
        data.load(_config(dir=str(tmp_path), image_size=32))


@pytest.mark.parametrize(
    ("image", "label", "message"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int64), "images must be a uint8 NumPy array, got float32"),
        (
            np.zeros((4, 8, 8), np.uint8),
            np.zeros(4, np.int64),
            r"images must have shape \(N, H, W, 3\), got \(4, 8, 8\)",
        ),
        (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), r"\(N, H, W, 3\), got \(4, 8, 8, 1\)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.float32), "labels must be an integer NumPy array"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 1), np.int64), r"labels must have shape \(N,\)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, np.int64), "4 images but 3 labels"),
        (
            np.zeros((4, 8, 8, 3), np.uint8),
            np.array([0, 1, 10, 2]),
            r"labels must lie in \[0, 10\), found values in \[0, 10\]",
        ),
        (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, -1, 3, 2]), r"\[0, 10\)"),
    ],
)
def test_npz_bad_contents_name_the_file(tmp_path, image, label, message):
    _write_npz(tmp_path / "train.npz", 4)
    np.savez(tmp_path / "test.npz", image=image, label=label)
    with pytest.raises(ValueError, match=message) as error:
        data.load(_config(dir=str(tmp_path)))
    assert str(tmp_path / "test.npz") in str(error.value)


def test_npz_missing_key_and_missing_files(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match="train.npz and test.npz") as error:
        data.load(_config(dir=str(missing)))
    assert str(missing) in str(error.value)
    _write_npz(tmp_path / "train.npz", 4)
    with pytest.raises(FileNotFoundError, match="test.npz not found") as error:
        data.load(_config(dir=str(tmp_path)))
    assert str(tmp_path / "test.npz") in str(error.value)
    np.savez(tmp_path / "test.npz", images=np.zeros((4, 8, 8, 3), np.uint8), label=np.zeros(4))
    with pytest.raises(ValueError, match=r"test.npz: missing key\(s\) \['image'\]"):
        data.load(_config(dir=str(tmp_path)))


def test_array_dataset_refuses_wrong_arrays():
    with pytest.raises(ValueError, match="labels must be int32"):
        data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="ArrayDataset: images must be a uint8"):
        data.ArrayDataset(np.zeros((2, 4, 4, 3), np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="somewhere: holds no samples"):
        data.checked_dataset(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int32), num_classes=2, source="somewhere")
    assert len(data.ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int32))) == 2


# --------------------------------------------------------------------------- GTSRB

# (class, track, frame) of the training images; listed out of order on purpose.
_TRAIN_SIGNS = [(10, 0, 1), (2, 1, 0), (0, 0, 1), (10, 0, 0), (2, 0, 0), (0, 0, 0), (2, 0, 1), (0, 1, 0)]
_TEST_SIGNS = [(4, 2), (0, 0), (2, 1), (10, 3)]  # (file number, class), in CSV order
_BORDER = (255, 0, 255)


def _sign_image(index, width, height):
    """An image with a solid ROI colour that identifies it, inside a magenta border."""
    colour = (index * 20 % 256, 255 - index * 20 % 256, 7 * index % 256)
    array = np.empty((height, width, 3), np.uint8)
    array[:] = _BORDER
    x1, y1, x2, y2 = 5, 4, width - 5, height - 4
    array[y1:y2, x1:x2] = colour
    return Image.fromarray(array), (x1, y1, x2, y2), colour


def _sign_size(index):
    return 34 + 3 * index, 30 + 2 * index  # varying, non-square sizes


def _write_official(root, gt_folder=None):
    """Writes the official layout under ``root``; GT-final_test.csv goes to ``gt_folder``."""
    colours = {}
    by_class = {}
    for index, (label, track, frame) in enumerate(_TRAIN_SIGNS):
        by_class.setdefault(label, []).append((index, track, frame))
    for label, entries in by_class.items():
        folder = root / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for index, track, frame in entries:
            width, height = _sign_size(index)
            image, (x1, y1, x2, y2), colour = _sign_image(index, width, height)
            name = f"{track:05d}_{frame:05d}.ppm"
            image.save(folder / name, format="PPM")
            rows.append(f"{name};{width};{height};{x1};{y1};{x2};{y2};{label}")
            colours[(label, track, frame)] = colour
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(rows) + "\n")
    images = root / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for number, label in _TEST_SIGNS:
        index = 50 + number
        width, height = _sign_size(number)
        image, (x1, y1, x2, y2), colour = _sign_image(index, width, height)
        image.save(images / f"{number:05d}.ppm", format="PPM")
        rows.append(f"{number:05d}.ppm;{width};{height};{x1};{y1};{x2};{y2};{label}")
        colours[("test", number)] = colour
    gt_folder = gt_folder or images
    gt_folder.mkdir(parents=True, exist_ok=True)
    (gt_folder / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return colours


def _write_folder_layout(root):
    colours = {}
    rows = ["Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path"]
    for index, (label, track, frame) in enumerate(_TRAIN_SIGNS):
        width, height = _sign_size(index)
        image, (x1, y1, x2, y2), colour = _sign_image(index, width, height)
        path = f"Train/{label}/{label:05d}_{track:05d}_{frame:05d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / path)
        rows.append(f"{width},{height},{x1},{y1},{x2},{y2},{label},{path}")
        colours[(label, track, frame)] = colour
    (root / "Train.csv").write_text("\n".join(rows) + "\n")
    rows = ["Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path"]
    (root / "Test").mkdir()
    for number, label in _TEST_SIGNS:
        width, height = _sign_size(number)
        image, (x1, y1, x2, y2), colour = _sign_image(50 + number, width, height)
        image.save(root / "Test" / f"{number:05d}.png")
        rows.append(f"{width},{height},{x1},{y1},{x2},{y2},{label},Test/{number:05d}.png")
        colours[("test", number)] = colour
    (root / "Test.csv").write_text("\n".join(rows) + "\n")
    return colours


def _check_gtsrb(train, test, info, colours, size=32):
    expected_train = sorted(_TRAIN_SIGNS)  # class, then track, then frame
    assert len(train) == len(_TRAIN_SIGNS) and len(test) == len(_TEST_SIGNS)
    assert train.images.shape == (len(_TRAIN_SIGNS), size, size, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (len(_TEST_SIGNS), size, size, 3) and test.labels.dtype == np.int32
    np.testing.assert_array_equal(train.labels, [label for label, _, _ in expected_train])
    np.testing.assert_array_equal(test.labels, [label for _, label in _TEST_SIGNS])
    # Cropped exactly to the ROI: every pixel is the ROI colour, none of the border.
    for image, key in zip(train.images, expected_train, strict=True):
        assert np.abs(image.astype(int) - colours[key]).max() <= 1, key
    for image, (number, _) in zip(test.images, _TEST_SIGNS, strict=True):
        assert np.abs(image.astype(int) - colours[("test", number)]).max() <= 1, number
    assert info.name == "gtsrb" and info.num_classes == 43 and not info.flip
    assert info.image_shape == (size, size, 3)


@pytest.mark.parametrize("variant", ["official", "official_unzipped", "folder"])
def test_gtsrb_layouts(tmp_path, variant):
    if variant == "official":
        colours = _write_official(tmp_path)
    elif variant == "official_unzipped":  # as the official zips unpack
        colours = _write_official(tmp_path / "GTSRB", gt_folder=tmp_path)
    else:
        colours = _write_folder_layout(tmp_path)
    train, test, info = data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path)))
    _check_gtsrb(train, test, info, colours)
    layout = "folder" if variant == "folder" else "official"
    assert (tmp_path / f"dibjax_cache_{layout}_32.npz").is_file()


def test_gtsrb_cache_size_and_limits(tmp_path):
    colours = _write_folder_layout(tmp_path)
    small_train, _, small_info = data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path), image_size=16))
    assert small_info.image_shape == (16, 16, 3) and small_train.images.shape[1:] == (16, 16, 3)
    cache = tmp_path / "dibjax_cache_folder_16.npz"
    assert cache.is_file()
    # A cached load reads no image file.
    for png in (tmp_path / "Train").rglob("*.png"):
        png.unlink()
    train, test, info = data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path), image_size=16))
    _check_gtsrb(train, test, info, colours, size=16)
    limited, limited_test, _ = data.load(
        _config(name="gtsrb", source="gtsrb", dir=str(tmp_path), image_size=16, train_limit=3, test_limit=2)
    )
    order = np.random.default_rng(0).permutation(len(train))[:3]
    np.testing.assert_array_equal(limited.images, train.images[order])
    assert len(limited_test) == 2


def test_gtsrb_limit_decodes_a_subset_without_caching(tmp_path):
    _write_official(tmp_path)
    full, _, _ = data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path), train_limit=0))
    (tmp_path / "dibjax_cache_official_32.npz").unlink()
    train, test, _ = data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path), train_limit=5, test_limit=None))
    assert not list(tmp_path.glob("dibjax_cache_*"))
    np.testing.assert_array_equal(train.images, full.images[np.random.default_rng(0).permutation(len(full))[:5]])
    assert len(test) == len(_TEST_SIGNS)


def test_gtsrb_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*download_gtsrb\(dir\)"):
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path / "absent")))
    with pytest.raises(FileNotFoundError, match=r"no GTSRB data found in .*download_gtsrb\(dir\)"):
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path)))
    _write_official(tmp_path)
    (tmp_path / "Final_Test" / "Images" / "GT-final_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="GT-final_test.csv") as error:
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path)))
    assert "GTSRB_Final_Test_GT.zip" in str(error.value)
    assert str(tmp_path / "Final_Test" / "Images") in str(error.value)


def test_gtsrb_bad_annotations(tmp_path):
    _write_folder_layout(tmp_path)
    text = (tmp_path / "Test.csv").read_text().replace(",4,Test/00000.png", ",43,Test/00000.png")
    (tmp_path / "Test.csv").write_text(text.replace(",2,Test/00004.png", ",43,Test/00004.png"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 43\)"):
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path)))
    (tmp_path / "Test.csv").write_text("Width,Height,Path\n")
    with pytest.raises(ValueError, match=r"Test.csv: missing column\(s\)"):
        data.load(_config(name="gtsrb", source="gtsrb", dir=str(tmp_path)))


def _zip_folder(folder, members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member in members:
            for path in sorted([member] if member.is_file() else member.rglob("*")):
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_download_gtsrb_unzips_the_official_archives(tmp_path, monkeypatch):
    source = tmp_path / "source"
    colours = _write_official(source / "GTSRB", gt_folder=source)
    served = {
        "GTSRB_Final_Training_Images.zip": _zip_folder(source, [source / "GTSRB" / "Final_Training"]),
        "GTSRB_Final_Test_Images.zip": _zip_folder(source, [source / "GTSRB" / "Final_Test"]),
        "GTSRB_Final_Test_GT.zip": _zip_folder(source, [source / "GT-final_test.csv"]),
    }
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(data_gtsrb, "_GTSRB_ARCHIVES", dict.fromkeys(served))  # no MD5 for fake archives
    target = tmp_path / "gtsrb"
    assert data.download_gtsrb(target) == target
    assert requested == [data_gtsrb._GTSRB_URL + name for name in served]
    train, test, info = data.load(_config(name="gtsrb", source="gtsrb", dir=str(target)))
    _check_gtsrb(train, test, info, colours)

    monkeypatch.setattr(data_gtsrb, "_GTSRB_ARCHIVES", {"GTSRB_Final_Test_GT.zip": "0" * 32})
    with pytest.raises(ValueError, match="GTSRB_Final_Test_GT.zip: MD5 .*expected 0000"):
        data.download_gtsrb(target)


def test_download_gtsrb_offline_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as error:
        data.download_gtsrb(tmp_path / "gtsrb")
    message = str(error.value)
    assert (
        "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/GTSRB_Final_Training_Images.zip"
        in message
    )
    assert "failed" in message and "by hand" in message and "Name or service not known" in message
    assert list((tmp_path / "gtsrb").iterdir()) == []  # no partial download left behind


# --------------------------------------------------------------------------- tfds


@pytest.fixture
def tfds(tmp_path, monkeypatch):
    """tensorflow-datasets, with the empty temporary folders it leaves behind kept inside tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return pytest.importorskip("tensorflow_datasets")


def _offline(url, timeout=None):
    raise urllib.error.URLError("Name or service not known")


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None


def test_tfds_with_mock_data(tfds, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)  # mocked data needs no download
    with tfds.testing.mock_data(num_examples=12):
        train, test, info = data.load(_config(name="cifar100", source="tfds", train_limit=5))
    assert len(train) == 5 and len(test) == 12
    assert train.images.shape == (5, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.labels.dtype == np.int32 and 0 <= test.labels.min() and test.labels.max() < 100
    assert info.num_classes == 100 and info.image_shape == (32, 32, 3)
    assert "tensorflow" not in sys.modules


# The layout of the official python archives: folder, {pickled batch: images in this fake}, class names pickle.
_FAKE_CIFAR = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        {
            "data_batch_1": 3,
            "data_batch_2": 2,
            "data_batch_3": 1,
            "data_batch_4": 2,
            "data_batch_5": 1,
            "test_batch": 4,
        },
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", {"train": 5, "test": 3}, "meta"),
}
# A row stores the red, green and blue 32×32 planes one after the other, each row-major (the CIFAR page).
_RAMP = (np.arange(1024) % 256).astype(np.uint8)
_PLANES_ROW = np.concatenate([_RAMP, np.full(1024, 200, np.uint8), np.full(1024, 100, np.uint8)])


def _check_planes(images):
    """Exactly one image is _PLANES_ROW, read as H×W×C."""
    red = _RAMP.reshape(32, 32)
    found = [i for i, image in enumerate(images) if np.array_equal(image[..., 0], red)]
    assert len(found) == 1
    image = images[found[0]]
    assert image[0, 1, 0] == 1 and image[1, 0, 0] == 32  # row-major within the plane
    assert (image[..., 1] == 200).all() and (image[..., 2] == 100).all()


def _write_fake_cifar(folder, name="cifar10"):
    """Writes a tiny archive laid out like the official python one; returns its path and contents.

    The contents are ``{split: [(image H×W×3, label, coarse label or None), ...]}`` in the
    archive's order, and the class names.
    """
    filename, top, batches, meta_name = _FAKE_CIFAR[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(len(name))
    expected = {"train": [], "test": []}
    members = {f"{top}/readme.html": b"<html></html>"}
    for batch, n in batches.items():
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
        if batch in ("data_batch_2", "train"):
            rows[1] = _PLANES_ROW
            images[1] = np.stack([_RAMP.reshape(32, 32), np.full((32, 32), 200), np.full((32, 32), 100)], axis=-1)
        labels = rng.integers(0, num_classes, n).tolist()
        content = {b"batch_label": batch.encode(), b"data": rows, b"filenames": [b"x.png"] * n}
        if name == "cifar10":
            content[b"labels"], coarse = labels, [None] * n
        else:
            coarse = [label // 5 for label in labels]
            content[b"fine_labels"], content[b"coarse_labels"] = labels, coarse
        members[f"{top}/{batch}"] = pickle.dumps(content, protocol=2)
        split = "test" if batch.startswith("test") else "train"
        expected[split] += list(zip(images, labels, coarse, strict=True))
    names = {"label": [f"class{i}" for i in range(num_classes)]}
    if name == "cifar10":
        meta = {b"label_names": [x.encode() for x in names["label"]], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    else:
        names["coarse_label"] = [f"super{i}" for i in range(20)]
        meta = {b"fine_label_names": [x.encode() for x in names["label"]]}
        meta[b"coarse_label_names"] = [x.encode() for x in names["coarse_label"]]
    members[f"{top}/{meta_name}"] = pickle.dumps(meta, protocol=2)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    with tarfile.open(path, "w:gz") as archive:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path, expected, names


def _check_loaded(dataset, expected):
    """``dataset`` holds exactly the ``expected`` images and labels (in tfds' record order)."""
    by_image = {image.tobytes(): label for image, label, _ in expected}
    assert len(by_image) == len(expected) == len(dataset)
    assert {image.tobytes() for image in dataset.images} == set(by_image)
    assert [by_image[image.tobytes()] for image in dataset.images] == dataset.labels.tolist()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_prepare_tfds_cifar_writes_a_genuine_tfds_dataset(tfds, tmp_path, name):
    """The python archive becomes the data set tfds' registered builder and data_source read."""
    archive, expected, names = _write_fake_cifar(tmp_path / "download", name)
    data_dir = tmp_path / "tfds"
    assert data.prepare_tfds_cifar(name, data_dir, archive=archive) == data_dir
    registered = tfds.builder(name, data_dir=str(data_dir))
    assert registered.is_prepared() and str(registered.version) == "3.0.2"
    assert registered.info.file_format.value == "array_record"
    features = set(registered.info.features.keys())
    assert features == set(tfds.builder(name, data_dir=str(tmp_path / "empty")).info.features.keys())
    assert features == {"id", "image", "label"} | ({"coarse_label"} if name == "cifar100" else set())
    for feature, feature_names in names.items():
        assert registered.info.features[feature].names == feature_names
    sources = tfds.data_source(name, data_dir=str(data_dir))
    for split in ("train", "test"):
        assert registered.info.splits[split].num_examples == len(expected[split])
        records = [sources[split][i] for i in range(len(sources[split]))]
        ids = [record["id"].decode() if isinstance(record["id"], bytes) else record["id"] for record in records]
        # Ids number the images in archive order, as tfds' own builder does.
        assert sorted(ids) == [f"{split}_{i:05d}" for i in range(len(expected[split]))]
        for record, id_ in zip(records, ids, strict=True):
            image, label, coarse = expected[split][int(id_.rsplit("_", 1)[1])]
            np.testing.assert_array_equal(record["image"], image)
            assert record["label"] == label
            if name == "cifar100":
                assert record["coarse_label"] == coarse
        if split == "train":
            _check_planes(np.stack([record["image"] for record in records]))

    train, test, info = data.load(_config(name=name, source="tfds", dir=str(data_dir)))
    assert info.num_classes == (10 if name == "cifar10" else 100)
    _check_loaded(train, expected["train"])
    _check_loaded(test, expected["test"])
    limited, _, _ = data.load(_config(name=name, source="tfds", dir=str(data_dir), train_limit=4))
    order = np.random.default_rng(0).permutation(len(train))[:4]
    np.testing.assert_array_equal(limited.images, train.images[order])
    assert data.prepare_tfds_cifar(name, data_dir, archive=tmp_path / "absent.tar.gz") == data_dir  # already prepared
    assert "tensorflow" not in sys.modules


def test_tfds_downloads_and_prepares_on_first_use(tfds, tmp_path, monkeypatch):
    archive, expected, _ = _write_fake_cifar(tmp_path / "server")
    payload = archive.read_bytes()
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(data_cifar._CIFAR_MD5, "cifar10", _md5(archive))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    train, test, _ = data.load(_config(name="cifar10", source="tfds", dir=str(data_dir)))
    assert requested == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 60.0)]
    _check_loaded(train, expected["train"])
    _check_loaded(test, expected["test"])
    _check_planes(train.images)
    assert (data_dir / "cifar-10-python.tar.gz").read_bytes() == payload  # the archive is kept
    assert not list(data_dir.glob("*.partial"))
    # Prepared now: no second download, whether through load or download_cifar.
    again, _, _ = data.load(_config(name="cifar10", source="tfds", dir=str(data_dir)))
    np.testing.assert_array_equal(again.images, train.images)
    assert data.download_cifar("cifar10", data_dir) == data_dir
    assert len(requested) == 1
    assert "tensorflow" not in sys.modules


def test_download_cifar_checks_the_md5(tfds, tmp_path, monkeypatch):
    archive, expected, _ = _write_fake_cifar(tmp_path / "server")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(archive.read_bytes()))
    data_dir = tmp_path / "data"
    # The real MD5: the fake archive does not match it.
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz gave a file with MD5 .*expected c58f30108f718f92"):
        data.download_cifar("cifar10", data_dir, timeout=5.0)
    assert not (data_dir / "cifar-10-python.tar.gz").exists() and not list(data_dir.glob("*.partial"))
    assert not tfds.builder("cifar10", data_dir=str(data_dir)).is_prepared()
    # An archive placed by hand is checked too, and is used without network access.
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    shutil.copy(archive, data_dir / archive.name)
    with pytest.raises(ValueError, match=r"data/cifar-10-python.tar.gz: MD5 .*expected c58f30108f718f92.*delete"):
        data.download_cifar("cifar10", data_dir)
    monkeypatch.setitem(data_cifar._CIFAR_MD5, "cifar10", _md5(archive))
    train, _, _ = data.load(_config(name="cifar10", source="tfds", dir=str(data_dir), download=False))
    _check_loaded(train, expected["train"])


def test_tfds_offline_and_download_off(tfds, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for load in (
        lambda: data.load(_config(name="cifar100", source="tfds", dir=str(data_dir))),
        lambda: data.download_cifar("cifar100", data_dir),
    ):
        with pytest.raises(ConnectionError) as error:
            load()
        assert isinstance(error.value, errors.DownloadError)
        message = str(error.value)
        assert "downloading https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz failed" in message
        assert "Name or service not known" in message
        assert f"place it in {data_dir}" in message and "source='npz'" in message
        assert not list(data_dir.glob("*.tar.gz*"))  # no partial download left behind
        assert not tfds.builder("cifar100", data_dir=str(data_dir)).is_prepared()
    with pytest.raises(FileNotFoundError, match=r"not prepared in .*config.download is False.*cifar-100-python.tar.gz"):
        data.load(_config(name="cifar100", source="tfds", dir=str(data_dir), download=False))
    with pytest.raises(errors.DataNotFoundError, match="config.download is False"):
        data.load(_config(name="cifar100", source="tfds", dir=str(data_dir), download=False))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*first use") as error:
        data.load(_config(name="cifar10", source="tfds", dir=str(tmp_path / "absent")))
    assert str(tmp_path / "absent") in str(error.value)
    with pytest.raises(ValueError, match="config.download must be a bool"):
        data.load(_config(name="cifar10", source="tfds", dir=str(data_dir), download="no"))
    with pytest.raises(ValueError, match=r"unknown CIFAR data set 'gtsrb'"):
        data.download_cifar("gtsrb", data_dir)
    assert "tensorflow" not in sys.modules


def test_prepare_tfds_cifar_refuses_other_archives(tfds, tmp_path):
    archive, _, _ = _write_fake_cifar(tmp_path / "download", "cifar100")
    with pytest.raises(ValueError, match=r"holds no cifar-10-batches-py/data_batch_1.*cifar-10-python.tar.gz"):
        data.prepare_tfds_cifar("cifar10", tmp_path / "a", archive=archive)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python.tar.gz not found.*download_cifar"):
        data.prepare_tfds_cifar("cifar10", tmp_path / "b")
    # A pickle may run code: only plain data and NumPy arrays are loaded.
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        payload = pickle.dumps({b"data": os.getcwd}, protocol=2)
        for member in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match=r"refusing to load posix.getcwd|refusing to load nt.getcwd"):
        data.prepare_tfds_cifar("cifar10", tmp_path / "c", archive=evil)
    assert not tfds.builder("cifar10", data_dir=str(tmp_path / "c")).is_prepared()


# --------------------------------------------------------------------------- batching


def test_train_batches_order_is_a_function_of_seed_and_epoch():
    dataset = _tiny(n=23)

    def order(seed, epoch):
        batches = list(data.train_batches(dataset, 5, seed=seed, epoch=epoch))
        return np.concatenate([b["image"][:, 0, 0, 0] for b in batches]), batches

    first, batches = order(0, 3)
    np.testing.assert_array_equal(first, order(0, 3)[0])
    assert not np.array_equal(first, order(0, 4)[0])
    assert not np.array_equal(first, order(1, 3)[0])
    assert len(batches) == data.steps_per_epoch(23, 5) == 4  # the last 3 samples are dropped
    for batch in batches:
        assert batch["image"].shape == (5, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
        assert set(batch) == {"image", "label"}
    ids = first.astype(int)
    assert len(set(ids.tolist())) == 20
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, dataset.labels[ids])
    expected = streams.order_rng(0, 3).permutation(23)[:20]
    np.testing.assert_array_equal(ids, expected)
    with pytest.raises(errors.ConfigError, match="epoch positive, got seed=0, epoch=0"):
        next(data.train_batches(dataset, 5, seed=0, epoch=0))


def test_train_batches_rejects_bad_batch_sizes():
    dataset = _tiny(n=8)
    for batch_size in (0, -1, 9):
        with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 8\]"):
            next(data.train_batches(dataset, batch_size, seed=0, epoch=1))
    assert len(list(data.train_batches(dataset, 8, seed=0, epoch=1))) == 1


def test_eval_batches_cover_every_sample_once():
    dataset = _tiny(n=23)
    batches = list(data.eval_batches(dataset, 10))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (10, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (10,) and batch["label"].dtype == np.int32
        assert batch["mask"].shape == (10,) and batch["mask"].dtype == np.bool_
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 23 and masks[:23].all() and not masks[23:].any()
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]), dataset.labels)
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]), dataset.images)
    assert (batches[-1]["image"][3:] == 0).all() and (batches[-1]["label"][3:] == 0).all()
    # A batch larger than the data set is one padded batch; an exact fit has no padding.
    (single,) = data.eval_batches(dataset, 30)
    assert single["mask"].sum() == 23 and single["image"].shape[0] == 30
    assert all(b["mask"].all() for b in data.eval_batches(_tiny(n=20), 10))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        next(data.eval_batches(dataset, 0))


# --------------------------------------------------------------------------- augmentation


def _images(n=32, size=6, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, size, size, 3), dtype=np.uint8)


def test_augment_shapes_dtypes_and_determinism():
    images = _images()
    key = jax.random.key(0)
    out = data.augment(images, key)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, data.augment(images, key))
    assert not np.array_equal(out, data.augment(images, jax.random.key(1)))
    jitted = jax.jit(functools.partial(data.augment, crop_padding=4, flip=True))
    np.testing.assert_array_equal(jitted(images, key), out)
    floats = images.astype(np.float32) / 255
    assert data.augment(floats, key).dtype == jnp.float32
    with pytest.raises(ValueError, match="crop_padding must be non-negative, got -1"):
        data.augment(images, key, crop_padding=-1)


def test_augment_without_crop_or_flip_is_identity():
    images = _images()
    for seed in range(3):
        np.testing.assert_array_equal(data.augment(images, jax.random.key(seed), crop_padding=0, flip=False), images)


def test_augment_flip_only_mirrors():
    images = _images(n=64)
    out = np.asarray(data.augment(images, jax.random.key(3), crop_padding=0, flip=True))
    same = (out == images).all(axis=(1, 2, 3))
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_augment_crops_are_translations_of_the_padded_image():
    images, p = _images(n=64), 2
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    size = images.shape[1]
    for flip in (False, True):
        out = np.asarray(data.augment(images, jax.random.key(7), crop_padding=p, flip=flip))
        offsets = []
        for image, source in zip(out, padded, strict=True):
            candidates = [source, source[:, ::-1]] if flip else [source]
            matches = [
                (dy, dx)
                for candidate in candidates
                for dy in range(2 * p + 1)
                for dx in range(2 * p + 1)
                if np.array_equal(candidate[dy : dy + size, dx : dx + size], image)
            ]
            assert matches, "output is not a window of the (mirrored) padded image"
            offsets.append(matches[0])
        assert len(set(offsets)) > 5  # offsets vary per image
        if not flip:
            assert {0, 2 * p} <= {dy for dy, _ in offsets}  # both extremes are reachable


def test_normalize():
    images = _images(n=4)
    info = data.DATASETS["cifar10"]
    out = data.normalize(images, info)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    expected = (images.astype(np.float64) / 255 - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    mean_image = np.round(np.array(info.mean) * 255).astype(np.uint8)[None, None, None]
    assert np.abs(np.asarray(data.normalize(mean_image, info))).max() < 0.01
