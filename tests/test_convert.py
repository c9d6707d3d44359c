import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch

import fcmae
import fcmae.convert
import sparse_ops.layout
from fcmae.atomic import atomic_save
from fcmae.checkpoint import load_checkpoint, save_safetensors
from fcmae.cli.convert import main
from fcmae.convert import convert_state, verify

from .helpers import exit_code, randomize_


def run_cli(args):
    return exit_code(main, args)


@pytest.fixture(scope="module")
def official_style_checkpoint(tmp_path_factory):
    """An FCMAE checkpoint laid out like the official ones: weights under 'model', keys
    'encoder.*' plus decoder keys, and 'optimizer', 'epoch', 'scaler', 'args' entries."""
    torch.manual_seed(1)
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=64), std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-799.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 799, "scaler": {},
                "args": {"model": "convnextv2_atto"}}, path)
    return path, model


@pytest.mark.parametrize("fmt", ["official", "timm"])
def test_converted_random_fcmae_reproduces_sparse_features(official_style_checkpoint, fmt):
    _, model = official_style_checkpoint
    dense_state, name = convert_state(model.state_dict(), fmt=fmt)
    assert name == "convnextv2_atto"
    assert not any(k.startswith(("proj", "pred", "mask_token", "decoder")) for k in dense_state)
    assert verify(model.state_dict(), dense_state, name, fmt) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnextv2_tiny", "convnext_atto", "convnext_tiny"])
def test_each_convnext_family_and_mlp_form_converts_to_both_layouts(name):
    """V1 and V2, 1×1-conv (atto) and Linear (tiny) MLPs in timm: the name is inferred from the
    weights, both layouts reproduce the sparse encoder, timm's model misses only its head."""
    model = randomize_(fcmae.create_fcmae(name, decoder_dim=16), std=0.05)
    for fmt in ("official", "timm"):
        dense_state, inferred = convert_state(model.state_dict(), fmt=fmt)
        assert inferred == name
        assert verify(model.state_dict(), dense_state, name, fmt, input_size=64) < 1e-4
    missing, unexpected = timm.create_model(name, pretrained=False).load_state_dict(dense_state, strict=False)
    assert unexpected == [] and sorted(missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias",
                                                    "head.norm.weight"]


def test_timm_layout_loads_into_timm_apart_from_head(official_style_checkpoint):
    _, model = official_style_checkpoint
    dense_state, _ = convert_state(model.state_dict(), fmt="timm")
    timm_model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    missing, unexpected = timm_model.load_state_dict(dense_state, strict=False)
    assert unexpected == []
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encoder(imgs, torch.zeros(2, 4))
        torch.testing.assert_close(timm_model.forward_features(imgs), expected, atol=1e-4, rtol=1e-4)


def test_cli_converts_official_style_file_and_verifies(official_style_checkpoint, tmp_path, capsys):
    path, model = official_style_checkpoint
    out = tmp_path / "dense.pth"
    assert run_cli([path, "-o", out, "--verify"]) == 0
    assert "max abs difference" in capsys.readouterr().err
    saved = torch.load(out, weights_only=True)
    dense = fcmae.create_model(saved["model_name"])
    missing, unexpected = dense.load_state_dict(saved["model"], strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and not unexpected


def test_verify_catches_a_wrong_conversion(official_style_checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = official_style_checkpoint
    # forget the transpose of the kernel layout: rows and columns swap
    monkeypatch.setattr(sparse_ops.layout, "depthwise_kernel_to_weight",
                        lambda k: k.t().reshape(k.shape[1], 1, 7, 7))
    out = tmp_path / "dense.pth"
    assert run_cli([path, "-o", out, "--verify"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_needs_force(official_style_checkpoint, tmp_path, capsys):
    path, _ = official_style_checkpoint
    out = tmp_path / "dense.pth"
    out.write_bytes(b"keep me")
    assert run_cli([path, "-o", out]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert run_cli([path, "-o", out, "--force"]) == 0
    assert out.read_bytes() != b"keep me"


def tree_digest(folder):
    """Every file under ``folder`` (relative path → bytes): equal before and after = untouched."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", ["run folder holding the input", "folder of other files", "input itself"])
def test_force_never_deletes_what_convert_did_not_write(case, official_style_checkpoint, tmp_path, capsys):
    """--force replaces an earlier export, never a run folder, the input, or foreign files."""
    path, _ = official_style_checkpoint
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "checkpoint-last.pth").write_bytes(path.read_bytes())
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (run / "events.out.tfevents.1").write_bytes(b"tb")
    source, output, message = {
        "run folder holding the input": (run / "checkpoint-last.pth", run, "holds the input checkpoint"),
        "folder of other files": (path, run, "did not write (checkpoint-last.pth, events.out.tfevents.1, log.jsonl)"),
        "input itself": (run / "checkpoint-last.pth", run / "checkpoint-last.pth", "is or holds the input"),
    }[case]
    before = tree_digest(tmp_path)
    assert run_cli([source, "-o", output, "--format", "timm", "--force"]) == 2
    assert message in capsys.readouterr().err
    assert tree_digest(tmp_path) == before
    export = tmp_path / "export"
    assert run_cli([path, "-o", export, "--format", "timm"]) == 0
    assert run_cli([path, "-o", export, "--format", "timm", "--force"]) == 0   # an earlier export: replaced
    assert sorted(entry.name for entry in export.iterdir()) == ["config.json", "model.safetensors"]


class RunsCode:
    """Unpickling this would call os.getcwd: a stand-in for a malicious checkpoint."""

    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize("content,message", [
    ("truncated", "truncated or corrupt"),
    ("garbage", "not a PyTorch checkpoint or safetensors file"),
    ("text", "not a PyTorch checkpoint or safetensors file"),
    ("code", "refused for safety"),
    ("other", "matches no known model"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(official_style_checkpoint, tmp_path, capsys,
                                                          content, message):
    path, _ = official_style_checkpoint
    bad = tmp_path / "bad.pth"
    if content == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    elif content == "text":
        bad.write_text("epoch,loss\n0,1.0\n")
    elif content == "code":
        torch.save({"model": {"encoder.weight": torch.zeros(3)}, "hook": RunsCode()}, bad)
    else:
        atomic_save({"model": {"encoder.weight": torch.zeros(3, 3)}}, bad)
    out = tmp_path / "dense.pth"
    assert run_cli([bad, "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "weights_only=False" not in err[0]
    assert list(tmp_path.iterdir()) == [bad]


def test_wrong_model_name_is_refused(official_style_checkpoint, tmp_path, capsys):
    path, _ = official_style_checkpoint
    assert run_cli([path, "-o", tmp_path / "x.pth", "--model", "convnextv2_femto"]) == 2
    err = capsys.readouterr().err
    assert "'convnextv2_femto'" in err and "'convnextv2_atto'" in err


# Runs in a fresh interpreter where importing fcmae or sparse_ops fails: the folder must load
# with timm alone, both through timm's local-folder source and through a file overlay.
TIMM_ONLY_LOADER = """
import sys
sys.modules["fcmae"] = sys.modules["sparse_ops"] = None
import timm, torch
folder, reference = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
local = timm.create_model("local-dir:" + folder, pretrained=True).eval()
assert local.num_classes == 0
data_config = timm.data.resolve_model_data_config(local)
assert tuple(data_config["input_size"]) == (3, 64, 64) and data_config["interpolation"] == "bicubic", data_config
overlay = timm.create_model("convnextv2_atto", pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=folder + "/model.safetensors")).eval()
with torch.no_grad():
    for model in (local, overlay):
        torch.testing.assert_close(model.forward_features(reference["imgs"]), reference["features"],
                                   atol=1e-4, rtol=1e-4)
print("timm-only load ok")
"""


@pytest.mark.slow
def test_timm_folder_loads_in_timm_without_fcmae(official_style_checkpoint, tmp_path):
    path, model = official_style_checkpoint
    source = tmp_path / "fcmae.pth"
    torch.save({**torch.load(path, weights_only=True), "args": {"input_size": 64}}, source)
    folder = tmp_path / "convnextv2_atto_timm"
    assert run_cli([source, "-o", folder, "--format", "timm", "--verify"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.save({"imgs": imgs, "features": model.encoder(imgs, torch.zeros(2, 4))}, tmp_path / "ref.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", TIMM_ONLY_LOADER, str(folder), str(tmp_path / "ref.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "timm-only load ok" in result.stdout


def test_safetensors_in_and_out(official_style_checkpoint, tmp_path):
    _, model = official_style_checkpoint
    source = tmp_path / "fcmae.safetensors"
    save_safetensors(model.state_dict(), source, {"model_name": "convnextv2_atto"})
    out = tmp_path / "dense.safetensors"
    assert run_cli([source, "-o", out, "--verify"]) == 0
    written = load_checkpoint(out)
    assert written["model_name"] == "convnextv2_atto" and written["format"] == "official-dense"
    expected, _ = convert_state(model.state_dict())
    assert written["model"].keys() == expected.keys()
    assert all(torch.equal(written["model"][key], value) for key, value in expected.items())


def test_official_checkpoint_with_namespace_args_loads_weights_only(official_style_checkpoint, tmp_path):
    path, _ = official_style_checkpoint
    source = tmp_path / "official.pth"
    torch.save({**torch.load(path, weights_only=True), "args": argparse.Namespace(input_size=224)}, source)
    assert load_checkpoint(source)["args"].input_size == 224
    assert run_cli([source, "-o", tmp_path / "dense.pth"]) == 0


def test_folder_output_needs_timm_format_and_output_cannot_be_the_input(official_style_checkpoint,
                                                                         tmp_path, capsys):
    path, _ = official_style_checkpoint
    assert run_cli([path, "-o", tmp_path / "folder"]) == 2
    assert "--format timm" in capsys.readouterr().err
    copy = tmp_path / "fcmae.pth"
    copy.write_bytes(path.read_bytes())
    assert run_cli([copy, "-o", copy, "--force"]) == 2
    assert "is or holds the input checkpoint" in capsys.readouterr().err
    assert copy.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcmae.pth"]


def test_written_files_honour_the_umask(official_style_checkpoint, tmp_path):
    path, _ = official_style_checkpoint
    previous = os.umask(0o022)
    try:
        assert run_cli([path, "-o", tmp_path / "dense.pth"]) == 0
        assert run_cli([path, "-o", tmp_path / "timm_folder", "--format", "timm"]) == 0
    finally:
        os.umask(previous)
    for file in (tmp_path / "dense.pth", tmp_path / "timm_folder" / "model.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o644, file
