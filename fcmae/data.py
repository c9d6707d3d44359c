"""Datasets and transforms: image folders (ImageFolder tree or flat), and the built-in demo
photos that ship with scikit-image (nothing is downloaded)."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
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


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root`` (an ImageFolder tree or a flat folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a directory")
    files = sorted(path for path in root.rglob("*")
                   if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    return files


def demo_photo_paths(names: Sequence[str] = DEMO_TRAIN_PHOTOS) -> list[Path]:
    """Paths of scikit-image's bundled photos."""
    import skimage
    data_dir = Path(skimage.__file__).parent / "data"
    paths = [data_dir / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"scikit-image demo photos missing: {missing}; reinstall scikit-image")
    return paths


class UnlabeledImages(Dataset):
    """Images as RGB tensors, labels ignored. An unreadable file is skipped with a warning
    (the next readable one is returned instead) and counted in ``num_skipped``.

    ``repeats`` lists every file that many times per epoch (for tiny demo sets, where each
    pass draws new random crops).
    """

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor],
                 repeats: int = 1) -> None:
        if not files:
            raise DataError("dataset is empty")
        self.files = list(files)
        self.transform = transform
        self.repeats = repeats
        self._skipped = multiprocessing.Value("i", 0)  # shared with forked loader workers

    @property
    def num_skipped(self) -> int:
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    @staticmethod
    def load(path: Path) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")

    def __getitem__(self, index: int) -> torch.Tensor:
        index %= len(self.files)
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                return self.transform(self.load(path))
            except (OSError, UnidentifiedImageError, ValueError) as error:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
        raise DataError("no image in the dataset could be read")


def build_pretrain_dataset(data_path: str | None, input_size: int, demo_repeats: int = 8) -> UnlabeledImages:
    """The user's folder, or (``data_path`` None) the built-in demo photos."""
    transform = pretrain_transform(input_size)
    if data_path is None:
        return UnlabeledImages(demo_photo_paths(), transform, repeats=demo_repeats)
    return UnlabeledImages(find_images(data_path), transform)
