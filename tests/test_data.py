"""The one data layer of pretraining and fine-tuning: every image mode decodes to the right
RGB, unreadable files are skipped and counted, folder cycles are not followed."""
import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import ImageFiles, find_images, labeled_images, load_rgb, scan_images

RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 10]],
                [[10, 20, 30], [128, 64, 32], [0, 0, 0], [255, 255, 255]]], dtype=np.uint8)   # 2 x 4
GRAY = np.array([[0, 17, 128, 255], [3, 60, 200, 254]], dtype=np.uint8)


def write(path, image, **options):
    image.save(path, **options)
    return path


def test_every_mode_decodes_to_the_expected_rgb(tmp_path):
    gray_rgb = np.repeat(GRAY[..., None], 3, axis=2)
    palette = Image.fromarray(RGB).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    palette.info["transparency"] = 0
    rgba = np.concatenate([RGB, np.full((2, 4, 1), 7, np.uint8)], axis=2)
    cases = {
        "16-bit gray png": (write(tmp_path / "g16.png", Image.fromarray(GRAY.astype(np.uint16) * 257)), gray_rgb),
        "32-bit int gray tiff": (write(tmp_path / "g32.tif", Image.fromarray(GRAY.astype(np.int32) * 257, "I")),
                                 gray_rgb),
        "float gray tiff": (write(tmp_path / "f.tif", Image.fromarray(GRAY.astype(np.float32) / 255, "F")), gray_rgb),
        "8-bit gray": (write(tmp_path / "g8.png", Image.fromarray(GRAY)), gray_rgb),
        "palette with transparency": (write(tmp_path / "p.png", palette, transparency=0),
                                      np.asarray(palette.convert("RGB"))),
        "cmyk tiff": (write(tmp_path / "cmyk.tif", Image.fromarray(RGB).convert("CMYK")), RGB),
        "gray with alpha": (write(tmp_path / "la.png", Image.fromarray(np.stack([GRAY, GRAY // 2], 2), "LA")),
                            gray_rgb),
        "rgba": (write(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")), RGB),
        "1-bit": (write(tmp_path / "bw.png", Image.fromarray(GRAY > 100)),
                  np.repeat((GRAY > 100)[..., None] * 255, 3, axis=2)),
    }
    for name, (path, expected) in cases.items():
        decoded = load_rgb(path)
        assert decoded.mode == "RGB", name
        np.testing.assert_allclose(np.asarray(decoded, dtype=int), expected.astype(int), atol=1, err_msg=name)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                     # stored rotated: display after a 90° clockwise turn
    path = write(tmp_path / "rotated.png", Image.fromarray(RGB), exif=exif)
    decoded = np.asarray(load_rgb(path))
    assert decoded.shape == (4, 2, 3)
    np.testing.assert_array_equal(decoded, np.rot90(RGB, k=-1))


def test_unreadable_and_oversized_images_are_skipped_and_counted(tmp_path, monkeypatch):
    good = write(tmp_path / "good.png", Image.fromarray(RGB))
    (tmp_path / "truncated.jpg").write_bytes(
        write(tmp_path / "full.jpg", Image.fromarray(np.tile(RGB, (40, 40, 1))), quality=90).read_bytes()[:300])
    (tmp_path / "full.jpg").unlink()
    write(tmp_path / "huge.png", Image.fromarray(np.zeros((64, 64), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)    # 64x64 > 2x the limit: a "bomb"
    dataset = ImageFiles(find_images(tmp_path), lambda image: torch.from_numpy(np.asarray(image).copy()))
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        images = [dataset[index] for index in range(len(dataset))]
    # reads are counted: item 1 (huge) falls through to truncated, then to good; item 2 skips truncated
    assert dataset.num_skipped == 3
    assert {str(warning.message).split(":")[0].split("/")[-1] for warning in caught} == {"huge.png", "truncated.jpg"}
    assert all(torch.equal(image, torch.from_numpy(np.array(load_rgb(good)))) for image in images)


def test_folder_cycles_are_read_once(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(8):
        write(folder / f"{index}.png", Image.fromarray(RGB))
    os.symlink(folder, folder / "loop")                  # images/loop -> images
    os.symlink(folder, tmp_path / "alias")
    assert len(scan_images(folder)) == 8


def test_unreadable_folder_is_named_in_a_warning(tmp_path, monkeypatch):
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        write(tmp_path / name / "a.png", Image.fromarray(RGB))
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("dogs"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)       # as root, chmod cannot make a folder unreadable
    with pytest.warns(UserWarning, match=r"cannot read folder .*dogs: Permission denied"):
        dataset = labeled_images(tmp_path, lambda image: image)
    assert dataset.classes == ["cats", "dogs"] and dataset.labels == [0]


def test_labeled_images_follow_class_folders(tmp_path):
    for label, name in enumerate(["b_class", "a_class"]):
        (tmp_path / name / "nested").mkdir(parents=True)
        for index in range(label + 1):
            write(tmp_path / name / "nested" / f"{index}.png", Image.fromarray(RGB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = labeled_images(tmp_path, lambda image: image)
    assert dataset.classes == ["a_class", "b_class"]
    assert sorted(dataset.labels) == [0, 0, 1]
    assert dataset[0][1] == 0 and dataset[2][1] == 1


def test_the_batch_stream_starts_at_its_epoch_and_batch():
    """A resumed run's first batch: the epoch's own shuffle, from the batch it stopped at."""
    from torch.utils.data import DistributedSampler

    from fcmae.loader import EpochBatchSampler
    dataset = list(range(40))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    batches = EpochBatchSampler(sampler, batch_size=4, batches_per_epoch=10)
    batches.set_epoch(3, skip_batches=2)
    stream = iter(batches)
    first = next(stream)
    sampler.set_epoch(3)
    assert first == [(3, index) for index in list(sampler)[8:12]]
    assert len(list(itertools.islice(stream, 7))) == 7 and next(stream)[0][0] == 4   # then epoch 4 from its start
