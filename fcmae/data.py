"""Datasets and transforms: image folders (ImageFolder tree or flat), and the built-in demo
photos that ship with scikit-image (nothing is downloaded)."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

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


def eval_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to 256/224 of ``input_size``, center crop, normalize."""
    return transforms.Compose([
        transforms.Resize(int(input_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
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
        files += [Path(folder) / name for name in names if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(path for path in files if path.is_file())


def find_images(root: str | os.PathLike) -> list[Path]:
    """:func:`scan_images` of an existing folder (an ImageFolder tree or a flat folder); a
    missing folder or one without images is a :class:`DataError`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a directory")
    files = scan_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    return files


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB, whatever its mode: EXIF orientation applied; 16-bit and
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


def demo_photo_paths(names: Sequence[str] = DEMO_TRAIN_PHOTOS) -> list[Path]:
    """Paths of scikit-image's bundled photos."""
    import skimage
    data_dir = Path(skimage.__file__).parent / "data"
    paths = [data_dir / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"scikit-image demo photos missing: {missing}; reinstall scikit-image")
    return paths


class ImageFiles(Dataset):
    """Images as RGB tensors, with their class index if ``labels`` are given. An unreadable file
    (corrupt, truncated, too large) is skipped with a warning — the next readable file is
    returned instead — and counted in ``num_skipped``.

    ``repeats`` lists every file that many times per epoch (for tiny demo sets, where each
    pass draws new random crops).
    """

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor],
                 labels: Sequence[int] | None = None, classes: Sequence[str] = (), repeats: int = 1) -> None:
        if not files:
            raise DataError("dataset is empty")
        self.files = list(files)
        self.labels = None if labels is None else list(labels)
        self.classes = list(classes)
        self.transform = transform
        self.repeats = repeats
        self._skipped = multiprocessing.Value("i", 0)  # shared with forked loader workers

    @property
    def num_skipped(self) -> int:
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        index %= len(self.files)
        for attempt in range(len(self.files)):
            position = (index + attempt) % len(self.files)
            try:
                image = self.transform(load_rgb(self.files[position]))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image {self.files[position]}: {error}", stacklevel=2)
                continue
            return image if self.labels is None else (image, self.labels[position])
        raise DataError(f"none of the {len(self.files)} images could be read (first: {self.files[0]})")


def labeled_images(root: str | os.PathLike, transform: Callable[[Image.Image], torch.Tensor]) -> ImageFiles:
    """An ImageFolder tree (``root/<class>/**/<image>``) as a labeled :class:`ImageFiles`;
    classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        found = scan_images(root / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no images in class folders under {str(root)!r} (expected {root}/<class>/<image>)")
    return ImageFiles(files, transform, labels, classes)


def build_pretrain_dataset(data_path: str | None, input_size: int, demo_repeats: int = 8) -> ImageFiles:
    """The user's folder, or (``data_path`` None) the built-in demo photos."""
    transform = pretrain_transform(input_size)
    if data_path is None:
        return ImageFiles(demo_photo_paths(), transform, repeats=demo_repeats)
    return ImageFiles(find_images(data_path), transform)
