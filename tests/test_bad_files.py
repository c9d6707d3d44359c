"""Bad files (data, shard indexes, weights) found before any training: one ``error:`` line, a
non-zero exit, no traceback, and no file that existed before is changed."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcmae
from fcmae.cli import finetune, pretrain, visualize
from fcmae.cli import shards as shards_cli

from .helpers import exit_code

PRETRAIN = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
            "--num-workers", "0", "--vis-every", "0", "--epochs", "1", "--steps-per-epoch", "1"]
FINETUNE = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--num-workers", "0",
            "--epochs", "1", "--steps-per-epoch", "1", "--mixup", "0", "--cutmix", "0"]


def existing_files(root):
    """Digest of every file below ``root`` now: new files may appear, these must not change."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*") if path.is_file()}


def assert_unchanged(before):
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in before if path.is_file()} == before


def save_images(folder, count, readable=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        if readable:
            Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        else:
            (folder / f"{index}.png").write_bytes(b"not a png at all")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Good and unreadable folders, and labeled shards of good and unreadable images."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val"):
        for label in ("a", "b"):
            save_images(root / "good" / split / label, 4, seed=hash((split, label)) % 1000)
            save_images(root / "bad" / split / label, 2, readable=False)
    save_images(root / "flat_bad", 3, readable=False)
    assert exit_code(shards_cli.main, [root / "good" / "train", root / "shards", "--max-count", "2"]) == 0
    assert exit_code(shards_cli.main, [root / "bad" / "val", root / "bad_shards", "--max-count", "2"]) != 0
    (root / "unreadable").mkdir()
    with tarfile.open(root / "unreadable" / "unreadable-000.tar", "w") as tar:   # packed by hand: images that are not
        for index in range(4):
            member = tarfile.TarInfo(f"{index:04d}.png")
            member.size = 10
            tar.addfile(member, io.BytesIO(b"x" * 10))
            label = tarfile.TarInfo(f"{index:04d}.cls")
            label.size = 1
            tar.addfile(label, io.BytesIO(b"0"))
    index = {"shards": [{"name": "unreadable-000.tar", "samples": 4}], "classes": ["a", "b"]}
    (root / "unreadable" / "shards.json").write_text(json.dumps(index))
    return root


def shard_spec(root):
    return f"{root}/shards/shard-{{000000..000003}}.tar"


DATA_CASES = [   # (command, arguments with {data} for the data folder, parts of the error line)
    ("pretrain", ["--data-path", "{data}/flat_bad"], "--data-path: none of the 3 images could be read"),
    ("pretrain", ["--val-data-path", "{data}/flat_bad"], "--val-data-path: none of the 3 images"),
    ("pretrain", ["--knn-data-path", "{data}/bad"], "--knn-data-path train/: none of the 4 images"),
    ("pretrain", ["--data-path", "{data}/unreadable/unreadable-000.tar"], "--data-path: no usable sample"),
    ("finetune", ["--data-path", "{data}/bad"], "bad/train: none of the 4 images"),
    ("finetune", ["--data-path", "{data}/shards/shard-{{000000..000003}}.tar", "--val-data-path",
                  "{data}/unreadable/unreadable-000.tar"], "--val-data-path: no usable sample"),
    ("finetune", ["--data-path", "{data}/unreadable/unreadable-000.tar", "--val-data-path", "{data}/good/val"],
     "--data-path: no usable sample"),
]


@pytest.mark.parametrize("command,arguments,message", DATA_CASES, ids=[" ".join([c, *a]) for c, a, _ in DATA_CASES])
def test_unreadable_data_is_found_before_the_first_step(command, arguments, message, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = (PRETRAIN if command == "pretrain" else FINETUNE) + ["--output-dir", out]
    argv += [argument.format(data=data) for argument in arguments]
    if command == "finetune" and "--data-path" not in arguments:
        argv += ["--data-path", data / "good"]
    before = existing_files(data)
    code = exit_code(pretrain.main if command == "pretrain" else finetune.main, argv)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err and not (out / "checkpoint-last.pth").exists() and "epoch 0" not in err
    assert_unchanged(before)


def test_a_failing_monitor_never_costs_the_epoch(tmp_path, capsys, monkeypatch):
    """The epoch's checkpoint is written before the monitors run."""
    from fcmae import monitor
    from fcmae.checkpoint import load_checkpoint
    from fcmae.data import DataError
    save_images(tmp_path / "val", 2)

    def fail(self, model, epoch):
        raise DataError("the validation disk went away")
    monkeypatch.setattr(monitor.ReconstructionMonitor, "__call__", fail)
    code = exit_code(pretrain.main, PRETRAIN + ["--output-dir", tmp_path / "out", "--val-data-path", tmp_path / "val"])
    assert code == 2 and "the validation disk went away" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")["epoch"] == 0


INDEX_CASES = [   # (what shards.json holds, part of the error line)
    ([{"name": "shard-000000.tar", "samples": 2}], "no 'shards' list"),
    ({"classes": ["a"]}, "no 'shards' list"),
    ({"shards": [{"name": "shard-000000.tar"}]}, "'samples' of shard 'shard-000000.tar' is None"),
    ({"shards": [{"name": "shard-000000.tar", "samples": "2"}]}, "is '2', not a count"),
    ({"shards": [{"name": "shard-000000.tar", "samples": -1}]}, "is -1, not a count"),
    ({"shards": [{"samples": 2}]}, "entry 0 has no 'name'"),
    ({"shards": [{"name": "shard-000000.tar", "samples": 2}], "classes": "ab"}, "'classes' is not a list"),
    ({"shards": [{"name": "shard-000000.tar", "samples": 2_000_000_000_000}]}, "more than its"),
    ({"shards": [{"name": "shard-000000.tar", "samples": 2, "bytes": 12}]}, "records 12"),
    ({"shards": [{"name": "shard-000001.tar", "samples": 2}]}, "does not list shard 'shard-000000.tar'"),
    ("{not json", "cannot be read as JSON"),
    (None, "does not exist"),
    ("folder", "is a folder"),
]


@pytest.mark.parametrize("content,message", INDEX_CASES, ids=[str(c)[:40] for c, _ in INDEX_CASES])
def test_a_malformed_shard_index_is_one_line_naming_the_file(content, message, data, tmp_path, capsys):
    index = tmp_path / "index.json"
    if content == "folder":
        index.mkdir()
    elif isinstance(content, str):
        index.write_text(content)
    elif content is not None:
        index.write_text(json.dumps(content))
    argv = PRETRAIN + ["--output-dir", tmp_path / "out", "--data-path", f"{data}/shards/shard-000000.tar",
                       "--shard-index", index]
    code = exit_code(pretrain.main, argv)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(error_lines) == 1 and message in error_lines[0] and str(index) in error_lines[0], err


def test_an_interrupted_fcmae_shards_leaves_the_earlier_set_as_it_was(data, tmp_path, monkeypatch):
    from fcmae import shards
    destination = tmp_path / "set"
    assert exit_code(shards_cli.main, [data / "good" / "train", destination, "--max-count", "2"]) == 0
    before = existing_files(destination)
    written = []

    class Interrupting:   # a progress bar that stops the packing after 5 images: 2 shards complete
        def reset(self, total):
            pass

        def update(self):
            written.append(1)
            if len(written) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(data / "good" / "train", destination, max_count=2, shuffle_seed=7,
                            progress=Interrupting())
    assert existing_files(destination) == before and sorted(destination.iterdir()) == sorted(before)


def test_a_set_cut_short_while_moving_in_is_refused_against_its_index(data, tmp_path, monkeypatch):
    from fcmae import shards
    destination = tmp_path / "set"
    assert exit_code(shards_cli.main, [data / "good" / "train", destination, "--max-count", "3"]) == 0
    real_replace, moved = shards.os.replace, []

    def die_after_one_shard(source, target):
        if str(target).endswith(".tar") and Path(source).parent != Path(target).parent:
            if moved:
                raise KeyboardInterrupt
            moved.append(target)
        return real_replace(source, target)
    monkeypatch.setattr(shards.os, "replace", die_after_one_shard)
    with pytest.raises(KeyboardInterrupt):   # now 2 shards of 4 images: the second keeps its earlier size
        shards.write_shards(data / "good" / "train", destination, max_count=4, shuffle_seed=1)
    monkeypatch.undo()
    with pytest.raises(fcmae.data.DataError, match="are from different writes"):
        shards.open_shard_set(f"{destination}/shard-{{000000..000001}}.tar")


@pytest.fixture(scope="module")
def fcmae_state():
    return fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).state_dict()


HOSTILE = {   # (what is changed in a good pretraining checkpoint, part of the error line)
    "scalar proj.weight": (lambda c: c["model"].__setitem__("proj.weight", torch.tensor(1.0)), "proj.weight has shape"),
    "args a string": (lambda c: c.__setitem__("args", "input_size=64"), None),
    "args a list": (lambda c: c.__setitem__("args", [1, 2]), None),
    "huge input size": (lambda c: c.__setitem__("args", {"input_size": 1_000_000}), None),
    "mask ratio 7": (lambda c: c.__setitem__("args", {"mask_ratio": 7}), None),
    "model name a number": (lambda c: c.__setitem__("model_name", 12), "names its model '12'"),
    "decoder block x": (lambda c: c["model"].__setitem__("decoder.x.dwconv.weight", torch.zeros(1)),
                        "decoder blocks"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_visualize_checks_what_it_reads_from_a_checkpoint(case, fcmae_state, tmp_path, capsys):
    """Damaged entries are one error line; unusable settings are ignored (defaults used)."""
    change, message = HOSTILE[case]
    checkpoint = {"model": dict(fcmae_state), "model_name": "convnextv2_atto"}
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "hostile.pth")
    save_images(tmp_path / "images", 1)
    code = exit_code(visualize.main, [tmp_path / "hostile.pth", tmp_path / "images" / "0.png", "-o",
                                      tmp_path / "out.png"])
    err = capsys.readouterr().err
    if message is None:   # the defaults: 224 px, mask ratio 0.6
        assert code == 0 and (tmp_path / "out.png").is_file() and "at 224px, mask ratio 0.6" in err, err
    else:
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(error_lines) == 1 and message in error_lines[0], err


def test_saved_settings_that_are_not_usable_are_ignored(fcmae_state, tmp_path):
    from fcmae.weights import load_fcmae
    torch.save({"model": fcmae_state, "args": {"input_size": 1_000_000, "mask_ratio": "x", "norm_pix_loss": "no"}},
               tmp_path / "odd.pth")
    model, name, settings = load_fcmae(tmp_path / "odd.pth")
    assert name == "convnextv2_atto" and settings == {"input_size": None, "mask_ratio": None}
    assert model.norm_pix_loss is True


def test_init_with_dense_weights_says_so(tmp_path, capsys):
    torch.save({"model": fcmae.create_model("convnextv2_atto").state_dict()}, tmp_path / "dense.pth")
    code = exit_code(pretrain.main, PRETRAIN + ["--output-dir", tmp_path / "out", "--init", tmp_path / "dense.pth"])
    err = capsys.readouterr().err
    assert code == 2 and "holds dense (converted, fine-tuned or official) weights, not an FCMAE checkpoint" in err, err


def test_a_folder_that_is_not_an_export_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert exit_code(visualize.main, [tmp_path / "folder", "-o", tmp_path / "x.png"]) == 2
    assert "is a folder, not a checkpoint file" in capsys.readouterr().err


def test_finetune_reads_a_timm_export_folder(fcmae_state, data, tmp_path):
    """--finetune takes every kind of weights the other commands read, a timm folder included."""
    from fcmae.cli import convert
    torch.save({"model": fcmae_state}, tmp_path / "fcmae.pth")
    assert exit_code(convert.main, [tmp_path / "fcmae.pth", "-o", tmp_path / "timm", "--format", "timm"]) == 0
    code = exit_code(finetune.main, FINETUNE + ["--data-path", data / "good", "--finetune", tmp_path / "timm",
                                                "--output-dir", tmp_path / "out"])
    assert code == 0 and (tmp_path / "out" / "checkpoint-last.pth").is_file()
