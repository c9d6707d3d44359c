"""Datasets and transforms: image folders (ImageFolder tree or flat), and the built-in demo
photos that ship with scikit-image (nothing is downloaded)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, get_worker_info
from torchvision import transforms

from . import distributed
from .atomic import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# scikit-image's bundled photos (skimage/data/*, shipped in the wheel). The held-out ones are
# never used for demo training, so they can measure reconstruction on unseen images.
DEMO_TRAIN_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
                     "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
                     "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png", "retina.jpg",
                     "text.png")
DEMO_HELDOUT_PHOTOS = ("rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")


class DataError(ValueError):
    """A dataset problem the user must fix (wrong path, empty folder, ...)."""


def pretrain_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop(scale 0.2–1, bicubic) + horizontal flip + ImageNet normalization."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(input_size: int, crop_pct: float = 224 / 256) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``input_size / crop_pct`` (256 for 224 by default), center crop
    ``input_size``, normalize. ``crop_pct=1``: the whole (square) image, for small images."""
    return transforms.Compose([
        transforms.Resize(round(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def scan_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root``, sorted. Symbolic links are followed, but a folder
    reached twice (a link cycle, or two links to one place) is read once; a folder that cannot
    be read is named in a warning and left out."""
    root = Path(root)
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []

    def unreadable(error: OSError) -> None:
        warnings.warn(f"cannot read folder {error.filename}: {error.strerror}; its images are left out",
                      stacklevel=3)

    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        # names are the non-folders os.walk found with scandir: no stat per file (a broken
        # link is skipped and counted when it is read, like any unreadable file)
        files += [Path(folder) / name for name in names if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def find_images(root: str | os.PathLike, cache: str | os.PathLike | None = None) -> list[Path]:
    """:func:`scan_images` of an existing folder (an ImageFolder tree or a flat folder); a
    missing folder or one without images is a :class:`DataError`.

    With ``cache`` (a file in the run's output folder), the list found at the run's first start
    is written there and reused: a resumed run reads the same files without rescanning a large
    tree (images added since are picked up by a new run, not by a resumed one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a directory")
    header = f"# fcmae file list of {root.resolve()}\n"
    if cache is not None and Path(cache).is_file():
        text = Path(cache).read_text(encoding="utf-8")
        if text.startswith(header):
            return [root / line for line in text[len(header):].splitlines()]
    files = scan_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    if cache is not None and distributed.is_main_process():
        listing = header + "".join(f"{path.relative_to(root)}\n" for path in files)
        atomic_write(cache, lambda file: file.write(listing.encode("utf-8")))
    return files


# What reading an image file can raise when the file is bad (corrupt, truncated, too large):
# such a sample is skipped and counted. An error in the augmentation after reading is a bug,
# not bad data, and is never counted as a skipped image (see :func:`augment`).
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def augment(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, where: object) -> torch.Tensor:
    """``transform(image)``; an exception there becomes a :class:`DataError` naming the sample
    (it would otherwise be mistaken for an unreadable file)."""
    try:
        return transform(image)
    except Exception as error:
        raise DataError(f"the augmentation failed on {where}, which was read fine: {type(error).__name__}: "
                        f"{error} (a bug or an incompatible library version, not bad data)") from error


def load_rgb(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """An image file (path or binary file object) as 8-bit RGB, whatever its mode: EXIF orientation applied; 16-bit and
    32-bit integer or float grayscale scaled to 0–255 (not clipped); alpha dropped (the colour
    under it is kept, as for RGBA → RGB); palette, CMYK, LA, 1-bit converted by Pillow.
    Images above Pillow's decompression-bomb limit raise (the dataset skips them)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(image, dtype=np.float64)
            full_scale = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else \
                255.0 if image.mode == "F" or values.max(initial=0) <= 255 else 65535.0
            image = Image.fromarray(np.clip(values / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif image.mode == "P":
            image = image.convert("RGBA")   # palette transparency becomes alpha, then is dropped
        return image.convert("RGB")


def load_center_crops(paths: Sequence[Path], input_size: int, crop_pct: float = 224 / 256) -> list[torch.Tensor]:
    """Each readable image of ``paths`` as a normalised (3, S, S) center crop (:func:`eval_transform`);
    unreadable files are skipped with a warning, and none readable is a :class:`DataError`."""
    transform, images = eval_transform(input_size, crop_pct), []
    for path in paths:
        try:
            image = load_rgb(path)
        except READ_ERRORS as error:
            warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
            continue
        images.append(augment(transform, image, path))
    if not images:
        raise DataError(f"none of the {len(paths)} images could be read" if paths else "no images given")
    return images


def demo_photo_paths(names: Sequence[str] = DEMO_TRAIN_PHOTOS) -> list[Path]:
    """Paths of scikit-image's bundled photos."""
    import skimage
    data_dir = Path(skimage.__file__).parent / "data"
    paths = [data_dir / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"scikit-image demo photos missing: {missing}; reinstall scikit-image")
    return paths


def seed_sample_rngs(*position: int) -> None:
    """Seed torch, ``random`` and NumPy from a sample's place in the run (seed, epoch, index…).
    Called in loader workers, so augmentations do not depend on a worker's history: persistent
    workers and resumed runs draw the same crops as a fresh, uninterrupted run."""
    value = int.from_bytes(hashlib.blake2b(repr(position).encode(), digest_size=8).digest(), "little")
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2 ** 32)


class ImageFiles(Dataset):
    """Images as RGB tensors, with their class index if ``labels`` are given. An unreadable file
    (corrupt, truncated, too large) is skipped with a warning — the next readable file is
    returned instead — and counted in ``num_skipped``.

    ``repeats`` lists every file that many times per epoch (for tiny demo sets, where each
    pass draws new random crops).
    """

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor],
                 labels: Sequence[int] | None = None, classes: Sequence[str] = (), repeats: int = 1,
                 seed: int = 0) -> None:
        if not files:
            raise DataError("dataset is empty")
        self.files = list(files)
        self.labels = None if labels is None else list(labels)
        self.classes = list(classes)
        self.transform = transform
        self.repeats = repeats
        self.seed = seed
        self._skipped = multiprocessing.Value("i", 0)  # shared with forked loader workers

    @property
    def num_skipped(self) -> int:
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def check_readable(self, what: str) -> None:
        """Read files in order until one loads, before training starts (not counted as
        skipped); none readable is a :class:`DataError` naming ``what`` and the first failure."""
        first_failure = None
        for path in self.files:
            try:
                load_rgb(path)
                return
            except READ_ERRORS as error:
                first_failure = first_failure or f"{path}: {getattr(error, 'strerror', None) or error}"
        raise DataError(f"{what}: none of the {len(self.files)} images could be read (first: {first_failure})")

    def __getitem__(self, item: int | tuple[int, int]) -> torch.Tensor | tuple[torch.Tensor, int]:
        """``item``: an index, or (epoch, index) as the training loader asks for it; then a loader
        worker seeds its augmentation from (seed, epoch, index), whatever it did before."""
        epoch, index = item if isinstance(item, tuple) else (None, item)
        if epoch is not None and get_worker_info() is not None:
            seed_sample_rngs(self.seed, epoch, index)
        index %= len(self.files)
        for attempt in range(len(self.files)):
            position = (index + attempt) % len(self.files)
            try:
                image = load_rgb(self.files[position])
            except READ_ERRORS as error:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image {self.files[position]}: {error}", stacklevel=2)
                continue
            image = augment(self.transform, image, self.files[position])
            return image if self.labels is None else (image, self.labels[position])
        raise DataError(f"none of the {len(self.files)} images could be read (first: {self.files[0]})")


def check_readable(dataset: Dataset, what: str) -> None:
    """Read a sample of ``dataset`` (:class:`ImageFiles`, :class:`~fcmae.shards.ShardImages`,
    or a ``Subset`` of one) before the first step, so data that cannot be read at all ends the
    run before any training: ``what`` names the flag it came from in the message."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    dataset.check_readable(what)


def spread_indices(count: int, max_items: int | None) -> list[int]:
    """At most ``max_items`` of ``range(count)``, evenly spaced: over a class-sorted list (an
    ImageFolder's files, a labeled dataset) every class keeps its share."""
    if max_items is None or count <= max_items:
        return list(range(count))
    return torch.linspace(0, count - 1, max_items).round().long().tolist()


def class_labels(root: Path, files: Sequence[Path]) -> tuple[list[Path], list[int], list[str]]:
    """The ImageFolder layout (``root/<class>/**/<image>``) of ``files`` found under ``root``:
    (the files inside a class folder, the class index of each, the sorted class names)."""
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    index = {name: label for label, name in enumerate(classes)}
    inside = [path for path in files if len(path.relative_to(root).parts) > 1]
    return inside, [index[path.relative_to(root).parts[0]] for path in inside], classes


def labeled_images(root: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor],
                   seed: int = 0, cache: str | os.PathLike | None = None) -> ImageFiles:
    """An ImageFolder tree (``root/<class>/**/<image>``) as a labeled :class:`ImageFiles`;
    classes are the sorted sub-folder names (``cache``: as for :func:`find_images`)."""
    root = Path(root)
    files, labels, classes = class_labels(root, find_images(root, cache))
    if not classes:
        raise DataError(f"no class folders under {str(root)!r} (expected {root}/<class>/<image>)")
    if not files:
        raise DataError(f"no images in class folders under {str(root)!r} (expected {root}/<class>/<image>)")
    return ImageFiles(files, transform, labels, classes, seed=seed)
