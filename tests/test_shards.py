"""WebDataset shards: fcmae-shards packs folders faithfully, ranks and workers split an epoch
without overlap, resume is exact, and bad shards end in a message or a counted skip."""
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.checkpoint import load_checkpoint
from fcmae.cli import pretrain
from fcmae.cli import shards as shards_cli
from fcmae.data import DataError, find_images, load_rgb
from fcmae.shards import ShardImages, ShardSet, open_shard_set

from .helpers import exit_code, free_port, interrupt_at_epoch

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
            "--vis-every", "0", "--blr", "0.1", "--warmup-epochs", "1", "--seed", "3"]


def to_array(image):
    return torch.from_numpy(np.array(image))


@pytest.fixture(scope="module")
def labeled_folder(tmp_path_factory):
    """Three classes of small images in several modes and formats, one in a nested folder."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for index in range(24):
        folder = root / f"class{index % 3}" / ("nested" if index == 5 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40 + index, 48, 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if index % 4 else Image.fromarray(pixels[..., 0])
        image.save(folder / f"img{index:02d}.{'png' if index % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def packed(labeled_folder, tmp_path_factory):
    destination = tmp_path_factory.mktemp("shards")
    assert exit_code(shards_cli.main, [labeled_folder, destination, "--max-count", "3"]) == 0
    return destination


def spec_of(folder, count=8):
    return f"{folder}/shard-{{000000..{count - 1:06d}}}.tar"


def test_shards_hold_the_folder_images_and_labels(labeled_folder, packed):
    index = json.loads((packed / "shards.json").read_text())
    assert index["classes"] == ["class0", "class1", "class2"] and index["samples"] == 24
    assert [shard["samples"] for shard in index["shards"]] == [3] * 8
    assert not list(packed.glob("*.partial"))
    stream = ShardImages(open_shard_set(spec_of(packed)), to_array, labeled=True, batch_size=1, train=False)
    items = list(stream)
    files = find_images(labeled_folder)
    assert len(items) == len(files) == 24
    expected = sorted((to_array(load_rgb(path)).numpy().tobytes(), int(path.relative_to(labeled_folder).parts[0][-1]))
                      for path in files)
    assert sorted((image.numpy().tobytes(), label) for image, label in items) == expected
    # packed in a shuffled order (seed 0), so shards mix classes; --no-shuffle keeps path order
    assert len({label for _, label in items[:6]}) > 1


def test_no_shuffle_packs_in_path_order_and_files_that_are_not_images_are_skipped(labeled_folder, tmp_path,
                                                                                 capsys):
    import shutil
    source = tmp_path / "source"
    shutil.copytree(labeled_folder, source)
    (source / "class1" / "notes.jpg").write_text("not an image")
    assert exit_code(shards_cli.main, [source, tmp_path / "out", "--max-count", "3", "--no-shuffle"]) == 0
    assert "skipped 1" in capsys.readouterr().err
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["samples"] == 24 and "notes.jpg" in index["skipped"][0]
    items = list(ShardImages(open_shard_set(spec_of(tmp_path / "out")), to_array, labeled=True, batch_size=1,
                             train=False))
    for (image, _), path in zip(items, find_images(labeled_folder), strict=True):
        assert torch.equal(image, to_array(load_rgb(path))), path


@pytest.mark.slow
def test_two_ranks_and_workers_see_every_sample_once_per_epoch(packed, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(REPO / "tests" / "shard_worker.py"),
               spec_of(packed), str(tmp_path), "3", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4          # 24 / 2 ranks / batch 3
    index = json.loads((packed / "shards.json").read_text())
    expected = sorted(int(c) for c in _all_labels(packed, index))
    for epoch in range(2):
        seen = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert sorted(seen) == expected                               # all of them, none twice
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]                 # reshuffled between epochs


def _all_labels(folder, index):
    labels = []
    for shard in index["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            labels += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".cls")]
    return labels


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "folder"])
def test_resume_with_persistent_workers_is_exact(source, labeled_folder, packed, tmp_path, monkeypatch):
    data = spec_of(packed) if source == "shards" else str(labeled_folder)
    common = PRETRAIN + ["--data-path", data, "--num-workers", "2", "--epochs", "2", "--steps-per-epoch", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert exit_code(pretrain.main, common + ["--output-dir", straight]) == 0
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 1)
        assert exit_code(pretrain.main, common + ["--output-dir", split]) == 130
    assert exit_code(pretrain.main, common + ["--output-dir", split, "--resume", "auto"]) == 0
    a, b = load_checkpoint(straight / "checkpoint-last.pth"), load_checkpoint(split / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_truncated_shard_is_skipped_and_counted(packed, tmp_path):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes((packed / "shard-000000.tar").read_bytes()[:2000])   # first member cut short
    good = tmp_path / "shard-000001.tar"
    good.write_bytes((packed / "shard-000001.tar").read_bytes())
    # cut short in transit (a local truncated file is refused against its index before training)
    shard_set = ShardSet([str(bad), str(good)], [3, 3], ["a", "b", "c"])
    stream = ShardImages(shard_set, to_array, labeled=True, batch_size=1, train=False)
    with pytest.warns(UserWarning):
        items = list(stream)
    assert len(items) == 3 and stream.num_skipped >= 1


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("case,message", [
    ("no match", "matches no file"),
    ("no images", "hold no image samples"),
    ("failing pipe", "no usable sample in pipe:false x.tar … (0 sample(s) read; first problem: "),
    ("pipe without index", "--shard-index"),
    ("too few shards", "cannot feed"),
    ("no usable sample", "no usable sample in"),
])
def test_bad_shards_end_with_one_error_line(case, message, packed, tmp_path, capsys):
    extra = []
    if case == "no match":
        spec = f"{tmp_path}/nothing-{{000..003}}.tar"
    elif case == "no images":
        write_tar(tmp_path / "text-000.tar", {"0001.txt": b"hello"})
        spec, extra = f"{tmp_path}/text-000.tar", ["--num-workers", "0"]
    elif case == "failing pipe":
        (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": "x.tar", "samples": 8}]}))
        spec, extra = "pipe:false x.tar", ["--shard-index", tmp_path / "index.json", "--num-workers", "0"]
    elif case == "pipe without index":
        spec = "pipe:cat x.tar"
    elif case == "no usable sample":    # counted in the index, but every sample is not an image
        write_tar(tmp_path / "bad-000.tar", {f"{i:04d}.jpg": b"not a jpeg" for i in range(4)})
        (tmp_path / "shards.json").write_text(json.dumps({"shards": [{"name": "bad-000.tar", "samples": 4}]}))
        spec, extra = f"{tmp_path}/bad-000.tar", ["--num-workers", "0", "--batch-size", "2"]
    else:
        spec, extra = spec_of(packed, 1), ["--num-workers", "2"]
    code = exit_code(pretrain.main, PRETRAIN + ["--data-path", spec, "--epochs", "1",
                                                "--output-dir", tmp_path / "out", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_run_of_unusable_samples_in_training_ends_the_stream(packed, tmp_path):
    """Found during training (after the check before the first step read a good sample): a
    bounded run of unusable samples is an error, not an endless loop."""
    write_tar(tmp_path / "bad-000.tar", {f"{i:04d}.jpg": b"not a jpeg" for i in range(6)})
    shard_set = ShardSet([str(tmp_path / "bad-000.tar")], [6], [])
    stream = ShardImages(shard_set, to_array, labeled=False, batch_size=1, shuffle_buffer=1)
    stream.max_consecutive_skips = 3
    with pytest.warns(UserWarning), pytest.raises(DataError, match="3 samples in a row"):
        list(itertools.islice(stream, 1))
    assert stream.num_skipped == 3


def test_fcmae_shards_refuses_to_overwrite(labeled_folder, packed, capsys):
    assert exit_code(shards_cli.main, [labeled_folder, packed]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_pipe_shards_read_like_local_ones(packed):
    local = ShardImages(open_shard_set(spec_of(packed, 2)), to_array, labeled=True, batch_size=1, train=False)
    piped_set = open_shard_set(f"pipe:cat {packed}/shard-{{000000..000001}}.tar", packed / "shards.json")
    assert piped_set.samples == [3, 3]
    piped = ShardImages(piped_set, to_array, labeled=True, batch_size=1, train=False)
    pairs = list(zip(local, piped, strict=True))
    assert len(pairs) == 6
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in pairs)


def test_folders_train_without_webdataset_and_shards_say_what_is_missing(labeled_folder, packed, tmp_path):
    """A bare GPU machine has no webdataset: training from a folder must not import it, and a
    shard spec names the missing package in one line (a fresh interpreter, webdataset blocked)."""
    script = f"""
import sys
sys.modules["webdataset"] = sys.modules["braceexpand"] = None   # as if not installed
from fcmae.data import DataError
from fcmae.datasets import build_pretrain_dataset
assert len(build_pretrain_dataset({str(labeled_folder)!r}, 64)) > 0
try:
    build_pretrain_dataset({spec_of(packed)!r}, 64)
except DataError as error:
    print("refused:", error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: tar shards need the webdataset package" in result.stdout


def test_labels_outside_the_classes_are_skipped_and_counted(tmp_path):
    """Labels checked as read: -1, 3 of 2 classes, missing or not a number are skipped (with the
    shard and key named), never handed to the loss."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    members = {"0000.png": png.getvalue(), "0000.cls": b"1"}
    for key, label in (("0001", b"-1"), ("0002", b"3"), ("0003", b"one")):
        members |= {f"{key}.png": png.getvalue(), f"{key}.cls": label}
    members["0004.png"] = png.getvalue()
    write_tar(tmp_path / "s-000.tar", members)
    index = {"shards": [{"name": "s-000.tar", "samples": 5}], "classes": ["a", "b"]}
    (tmp_path / "shards.json").write_text(json.dumps(index))
    stream = ShardImages(open_shard_set(f"{tmp_path}/s-000.tar"), to_array, labeled=True, batch_size=1, train=False)
    with pytest.warns(UserWarning) as warned:
        items = list(stream)
    assert [label for _, label in items] == [1]
    assert stream.num_skipped == 4
    messages = " ".join(str(w.message) for w in warned)
    assert "s-000.tar:0002" in messages and "not one of the 2 classes" in messages and "no 'cls'" in messages


@pytest.mark.parametrize("prefix", ["../../x", "a/b", "a%db", "{a,b}"])
def test_shard_prefixes_that_are_not_plain_names_are_refused(prefix, labeled_folder, tmp_path, capsys):
    assert exit_code(shards_cli.main, [labeled_folder, tmp_path / "out", "--prefix", prefix]) == 2
    assert "--prefix" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.parent.glob("x-*"))


def test_a_link_planted_at_a_partial_shard_is_never_followed(labeled_folder, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (tmp_path / "out").mkdir()
    planted = tmp_path / "out" / "shard-000000.tar.partial"
    planted.symlink_to(target)
    assert exit_code(shards_cli.main, [labeled_folder, tmp_path / "out"]) == 0   # written in a fresh folder
    assert target.read_text() == "precious" and planted.is_symlink()            # neither followed nor removed
    shard = tmp_path / "out" / "shard-000000.tar"
    assert shard.is_file() and not shard.is_symlink()


def keys_seen(stream, ranks, monkeypatch, epoch=0):
    """The image bytes each of ``ranks`` simulated ranks reads in ``epoch`` (one process, no workers)."""
    from fcmae import distributed
    seen = []
    for rank in range(ranks):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: ranks)
        stream.set_epoch(epoch)
        items = itertools.islice(iter(stream), len(stream)) if stream.train else iter(stream)
        seen.append([item[0].numpy().tobytes() for item in items])
    return seen


@pytest.mark.parametrize("train", [False, True])
def test_ranks_share_out_the_shards_without_overlap(train, packed, monkeypatch):
    """Evaluation: every sample exactly once over the ranks; training: an epoch's shards are
    split between the ranks (one shard order for all ranks, not one per rank)."""
    stream = ShardImages(open_shard_set(spec_of(packed)), to_array, labeled=True, batch_size=3, train=train,
                         shuffle_buffer=1)
    monkeypatch.setattr("fcmae.distributed.world_size", lambda: 2)
    stream.plan_epochs(stream.samples_per_rank() // 3)
    first, second = keys_seen(stream, 2, monkeypatch)
    assert not set(first) & set(second)
    assert len(first) + len(second) == 24
