"""fcmae-convert --format transformers: a folder Hugging Face transformers loads by itself
(ConvNextModel / ConvNextV2Model), giving the dense model's stage outputs; other families refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fcmae
from fcmae.checkpoint import CheckpointError, load_body
from fcmae.cli import convert
from fcmae.convert import convert_state
from fcmae.weights import read_weights

from .helpers import exit_code, randomize_

pytest.importorskip("transformers")   # the [hf] extra; part of [dev], so CI always runs these

# Run in a fresh interpreter that never imports fcmae: transformers alone must read the folder.
TRANSFORMERS_LOADER = """
import sys, torch, transformers
model_class, folder, reference = sys.argv[1:]
model, info = getattr(transformers, model_class).from_pretrained(folder, output_loading_info=True)
assert not any(info.values()), info                    # no missing, unexpected or mismatched key
processor = transformers.AutoImageProcessor.from_pretrained(folder)
assert type(processor).__name__.startswith("ConvNextImageProcessor"), type(processor)
expected = torch.load(reference, weights_only=True)
with torch.no_grad():
    hidden = model.eval()(pixel_values=expected["imgs"], output_hidden_states=True).hidden_states[1:]
worst = max((a - b).abs().max().item() for a, b in zip(hidden, expected["stages"], strict=True))
assert worst <= 1e-5, worst
assert "fcmae" not in sys.modules
print("transformers folder load ok", worst)
"""


@pytest.mark.parametrize("name, model_class", [("convnextv2_atto", "ConvNextV2Model"),
                                               ("convnext_atto", "ConvNextModel")])
def test_transformers_loads_the_export_alone(name, model_class, tmp_path):
    state = randomize_(fcmae.create_fcmae(name, decoder_dim=32), std=0.05).state_dict()
    torch.save({"model": state}, tmp_path / "fcmae.pth")
    assert exit_code(convert.main, [tmp_path / "fcmae.pth", "-o", tmp_path / "hf", "--format", "transformers",
                                    "--verify", "--tolerance", "1e-5"]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [model_class]
    reference = fcmae.create_model(name).eval()
    load_body(reference, convert_state(state, name)[0], name, "fcmae.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.save({"imgs": images, "stages": reference.forward_stages(images)}, tmp_path / "ref.pt")
    command = [sys.executable, "-c", TRANSFORMERS_LOADER, model_class, str(tmp_path / "hf"), str(tmp_path / "ref.pt")]
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "transformers folder load ok" in result.stdout, result.stderr[-3000:]
    with pytest.raises(CheckpointError, match="Hugging Face transformers export"):
        read_weights(tmp_path / "hf")


def test_families_transformers_lacks_are_refused_in_one_line(tmp_path, capsys):
    torch.save({"model": fcmae.create_fcmae("revcol_t", decoder_dim=32).state_dict()}, tmp_path / "fcmae.pth")
    assert exit_code(convert.main, [tmp_path / "fcmae.pth", "-o", tmp_path / "hf", "--format", "transformers"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "transformers has no revcol_t" in message and "--format timm" in message
    assert not (tmp_path / "hf").exists()
