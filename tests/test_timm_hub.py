"""InternImage and RevCol through timm: importing fcmae registers them, timm builds them with
features_only and loads fcmae's weight files (dense or FCMAE) and its --format timm folders."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import fcmae
from fcmae.atomic import atomic_save
from fcmae.checkpoint import load_body
from fcmae.cli import convert
from fcmae.convert import convert_state

from .helpers import exit_code


@pytest.mark.parametrize("source", ["fcmae.pth", "dense.pth"])
@pytest.mark.parametrize("name", ["internimage_t", "revcol_t"])
def test_timm_gives_the_stage_features_of_the_weights(name, source, tmp_path):
    state = fcmae.create_fcmae(name, decoder_dim=32).state_dict()
    torch.save({"model": state}, tmp_path / "fcmae.pth")
    dense, _ = convert_state(state, name)
    atomic_save({"model": dense, "model_name": name, "input_size": 224}, tmp_path / "dense.pth")
    features = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / source))).eval()
    reference = fcmae.create_model(name).eval()
    load_body(reference, dense, name, tmp_path / source)
    assert features.feature_info.channels() == list(reference.stage_channels[1:])
    assert features.feature_info.reduction() == [8, 16, 32]
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs, expected = features(images), reference.forward_stages(images)[1:]
    assert len(outputs) == 3 and all(torch.equal(a, b) for a, b in zip(outputs, expected))


def test_the_registration_leaves_timms_own_models_alone():
    from fcmae.timm_hub import register_with_timm
    assert set(register_with_timm()) == set(timm.list_models("internimage_*")) | set(timm.list_models("revcol_*"))
    with torch.device("meta"):
        assert type(timm.create_model("convnextv2_atto")).__module__.startswith("timm.")
    model = timm.create_model("revcol_t", num_classes=3)
    assert model.pretrained_cfg["classifier"].startswith("cls.") and model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


TIMM_FOLDER_LOADER = """
import sys, torch, timm
import fcmae   # registers the architecture named in config.json
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True, features_only=True, out_indices=(3,)).eval()
reference = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    assert torch.equal(model(reference["imgs"])[0], reference["features"])
print("timm folder load ok")
"""


@pytest.mark.parametrize("name", ["internimage_t", "revcol_t"])
def test_a_timm_export_of_the_registered_families_loads_in_timm(name, tmp_path):
    """fcmae-convert --format timm writes a folder timm loads by itself once fcmae is imported."""


    model = fcmae.create_fcmae(name, decoder_dim=32)
    torch.save({"model": model.state_dict()}, tmp_path / "fcmae.pth")
    assert exit_code(convert.main, [tmp_path / "fcmae.pth", "-o", tmp_path / "export", "--format", "timm",
                                    "--verify"]) == 0
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save({"imgs": images, "features": model.encoder(images, torch.zeros(1, 4))}, tmp_path / "ref.pt")
    command = [sys.executable, "-c", TIMM_FOLDER_LOADER, str(tmp_path / "export"), str(tmp_path / "ref.pt")]
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "timm folder load ok" in result.stdout, result.stderr[-3000:]
