"""``fcmae-pretrain --init``: continued pretraining from FCMAE weights, ours or official."""
import argparse

import pytest
import torch

import fcmae
from fcmae.checkpoint import CheckpointError, load_checkpoint
from fcmae.cli.pretrain import main
from fcmae.weights import init_from_fcmae, read_pretraining_weights

from .helpers import randomize_

QUICK = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "2", "--decoder-dim", "32",
         "--num-workers", "0", "--epochs", "1", "--steps-per-epoch", "1", "--vis-every", "0"]


def official_sparse_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One official dense ConvNeXt V2 entry → the official FCMAE (MinkowskiEngine) encoder entry,
    written from the published conversion rules, read backwards (independent of fcmae.convert)."""
    parts = key.split(".")
    if key.startswith("downsample_layers.0."):                       # the dense stem stays as it is
        return key, value
    if parts[0] == "downsample_layers" and parts[2] == "0":          # LayerNorm before downsampling
        return ".".join(parts[:3] + ["ln", parts[3]]), value
    if parts[0] == "downsample_layers":                              # 2x2 stride-2 conv
        if parts[3] == "weight":                                     # (out, in, k, k) → (k·k, in, out)
            out_c, in_c = value.shape[:2]
            return key[: -len("weight")] + "kernel", value.transpose(3, 2).reshape(out_c, in_c, -1).permute(2, 1, 0)
        return key, value.reshape(1, -1)
    if ".dwconv.weight" in key:                                      # (C, 1, k, k) → (k·k, C)
        return key.replace(".weight", ".kernel"), value.transpose(3, 2).reshape(value.shape[0], -1).permute(1, 0)
    if ".dwconv.bias" in key:
        return key, value.reshape(1, -1)
    if ".norm." in key:
        return key.replace(".norm.", ".norm.ln."), value
    if ".pwconv" in key:
        return key.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias"), value
    if ".grn." in key:                                               # (1, 1, 1, C) → (1, C)
        return key, value.reshape(1, -1)
    raise AssertionError(f"unexpected dense key {key}")


@pytest.fixture(scope="module")
def official_fcmae_file(tmp_path_factory):
    """An official-layout FCMAE checkpoint (args as a Namespace) built from a random dense model
    and a random decoder; returns (path, dense model, decoder weights)."""
    torch.manual_seed(3)
    dense = randomize_(fcmae.create_model("convnextv2_atto"), std=0.1).eval()
    encoder = dict(official_sparse_key(key, value) for key, value in dense.state_dict().items()
                   if not key.startswith(("norm.", "head.")))
    decoder = {key: value for key, value in
               randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32)).state_dict().items()
               if not key.startswith("encoder.")}
    path = tmp_path_factory.mktemp("official") / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": {**{f"encoder.{k}": v for k, v in encoder.items()}, **decoder},
                "optimizer": {}, "epoch": 1599, "scaler": {},
                "args": argparse.Namespace(model="convnextv2_atto", input_size=224)}, path)
    return path, dense, decoder


def test_init_loads_official_layout_encoder_and_decoder(official_fcmae_file):
    path, dense, decoder = official_fcmae_file
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).eval()
    assert init_from_fcmae(model, read_pretraining_weights(path, "--init"), "convnextv2_atto") == "encoder and decoder"
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(imgs, torch.zeros(2, 4)), dense.forward_features(imgs),
                                   atol=1e-4, rtol=1e-4)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in decoder.items())


def test_cli_init_starts_a_fresh_run_from_the_weights(official_fcmae_file, tmp_path, capsys):
    path, _, _ = official_fcmae_file
    out = tmp_path / "continued"
    # lr 0: one step leaves the weights as loaded, so the checkpoint shows exactly what --init gave
    main(QUICK + ["--init", str(path), "--output-dir", str(out), "--lr", "0"])   # returns on success
    assert "initialised from" in capsys.readouterr().err
    saved = load_checkpoint(out / "checkpoint-last.pth")
    source = load_checkpoint(path)["model"]
    assert saved["model"].keys() == source.keys()
    assert all(torch.equal(saved["model"][key], value) for key, value in source.items())
    assert saved["epoch"] == 0 and saved["step"] == 1            # a fresh schedule, not epoch 1600
    assert all(state["step"] == 1 for state in saved["optimizer"]["state"].values())


def test_a_checkpoint_found_by_resume_wins_over_init(official_fcmae_file, tmp_path, capsys):
    path, _, _ = official_fcmae_file
    out = tmp_path / "run"
    main(QUICK + ["--init", str(path), "--output-dir", str(out), "--blr", "1.0"])       # moves off the init
    first = load_checkpoint(out / "checkpoint-last.pth")["model"]
    main(QUICK + ["--init", str(path), "--output-dir", str(out), "--resume", "auto", "--epochs", "2", "--lr", "0"])
    assert "already part of this run" in capsys.readouterr().err
    resumed = load_checkpoint(out / "checkpoint-last.pth")
    assert resumed["epoch"] == 1
    assert all(torch.equal(resumed["model"][key], value) for key, value in first.items())   # lr 0: as resumed


def test_decoder_less_file_initialises_the_encoder_only(official_fcmae_file, tmp_path):
    path, _, decoder = official_fcmae_file
    encoder_only = {key: value for key, value in load_checkpoint(path)["model"].items()
                    if key.startswith("encoder.")}
    torch.save({"model": encoder_only}, tmp_path / "encoder.pth")
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32)
    fresh_decoder = {key: value.clone() for key, value in model.state_dict().items()
                     if not key.startswith("encoder.")}
    assert init_from_fcmae(model, read_pretraining_weights(tmp_path / "encoder.pth", "--init"),
                           "convnextv2_atto").startswith("encoder only")
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in encoder_only.items())
    assert all(torch.equal(state[key], value) for key, value in fresh_decoder.items())


def test_another_size_or_decoder_is_a_one_line_error(official_fcmae_file, tmp_path, capsys):
    path, _, _ = official_fcmae_file
    femto = tmp_path / "femto.pth"
    torch.save({"model": fcmae.create_fcmae("convnextv2_femto", decoder_dim=32).state_dict()}, femto)
    for source, extra, message in ((femto, [], "'convnextv2_femto'"),
                                   (path, ["--decoder-dim", "64"], "--decoder-dim"),
                                   (tmp_path / "missing.pth", [], "does not exist")):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_:
            main(QUICK + extra + ["--init", str(source), "--output-dir", str(out)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (out / "checkpoint-last.pth").exists()


@pytest.mark.slow
def test_init_refuses_a_file_without_fcmae_weights(tmp_path):
    torch.save({"model": {"something.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError):
        read_pretraining_weights(tmp_path / "other.pth", "--init")
