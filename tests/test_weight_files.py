"""Every kind of weights file × every command that reads weights: each command accepts the
same files (through weights.read_weights) and refuses the others with one line saying why."""
import numpy as np
import pytest
import torch
from PIL import Image

import fcmae
from fcmae.atomic import atomic_save
from fcmae.checkpoint import save_safetensors
from fcmae.cli import analyze, convert, finetune, knn, pretrain, visualize

from .helpers import exit_code

FILES = ("fcmae.pth", "fcmae.safetensors", "encoder.pth", "dense.pth", "timm.pth", "timm_folder", "finetuned.pth")
PRETRAINING = {"fcmae.pth", "fcmae.safetensors", "encoder.pth"}
ACCEPTS = {   # command: the files it takes (the others are refused with the message below)
    "fcmae-convert": PRETRAINING,
    "fcmae-pretrain --init": PRETRAINING,
    "fcmae-visualize": {"fcmae.pth", "fcmae.safetensors"},
    "fcmae-finetune --finetune": set(FILES),
    "fcmae-knn": set(FILES),
    "fcmae-analyze": set(FILES),
}
REFUSAL = {"fcmae-convert": "not an FCMAE checkpoint: fcmae-convert takes",
           "fcmae-pretrain --init": "not an FCMAE checkpoint: --init takes",
           "fcmae-visualize": "not an FCMAE encoder + decoder"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind for convnextv2_atto, and a tiny ImageFolder with train/ and val/."""
    root = tmp_path_factory.mktemp("weights")
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32)
    state = model.state_dict()
    torch.save({"model": state, "model_name": "convnextv2_atto", "args": {"input_size": 64}}, root / "fcmae.pth")
    save_safetensors(state, root / "fcmae.safetensors", {"model_name": "convnextv2_atto"})
    torch.save({"model": model.encoder.state_dict()}, root / "encoder.pth")
    for argv in ([root / "fcmae.pth", "-o", root / "dense.pth"],
                 [root / "fcmae.pth", "-o", root / "timm.pth", "--format", "timm"],
                 [root / "fcmae.pth", "-o", root / "timm_folder", "--format", "timm"]):
        assert exit_code(convert.main, argv) == 0
    classifier = fcmae.create_model("convnextv2_atto", num_classes=2)
    atomic_save({"model": classifier.state_dict(), "model_name": "convnextv2_atto", "epoch": 3, "optimizer": {}},
                root / "finetuned.pth")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / "data" / split / label).mkdir(parents=True)
            for index in range(2):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                    root / "data" / split / label / f"{index}.png")
    return root


def command_line(command, weights, root, out):
    data, image = root / "data", root / "data" / "val" / "a" / "0.png"
    quick = ["--input-size", "64", "--batch-size", "2", "--num-workers", "0", "--epochs", "1", "--steps-per-epoch", "1"]
    return {
        "fcmae-convert": (convert.main, [weights, "-o", out / "dense.pth"]),
        "fcmae-pretrain --init": (pretrain.main, quick + ["--decoder-dim", "32", "--vis-every", "0", "--init", weights,
                                                          "--output-dir", out]),
        "fcmae-visualize": (visualize.main, [weights, image, "-o", out / "recon.png", "--input-size", "64"]),
        "fcmae-finetune --finetune": (finetune.main, quick + ["--data-path", data, "--finetune", weights,
                                                              "--mixup", "0", "--cutmix", "0", "--no-model-ema",
                                                              "--output-dir", out]),
        "fcmae-knn": (knn.main, [weights, "--data-path", data, "--input-size", "64", "--num-workers", "0"]),
        "fcmae-analyze": (analyze.main, [weights, "-o", out / "collapse.png", "--input-size", "64", "--data-path", data,
                                         "--max-images", "2", "--batch-size", "2"]),
    }[command]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("command", ACCEPTS)
def test_each_command_takes_the_same_weight_files(command, name, files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    entry, argv = command_line(command, files / name, files, out)
    code = exit_code(entry, argv)
    err = capsys.readouterr().err
    if name in ACCEPTS[command]:
        assert code == 0, err
    else:
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(error_lines) == 1 and REFUSAL[command] in error_lines[0], err
        assert "Traceback" not in err
