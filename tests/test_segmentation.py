"""fcmae weights in segmentation_models_pytorch through its timm encoders (``tu-MODEL``): the
weights of a ``fcmae-convert --format timm`` folder load as the encoder (its feature maps are
the dense model's stages, every family), and a U-Net on them learns drawn rectangles."""
import pytest
import segmentation_models_pytorch as smp
import torch

import fcmae
from fcmae.checkpoint import load_body
from fcmae.cli import convert
from fcmae.convert import convert_state

from .helpers import exit_code, randomize_, rectangles

FAMILIES = ["convnextv2_atto", "convnext_atto", "internimage_t", "revcol_t"]


def export_for_timm(name: str, folder) -> tuple[str, torch.nn.Module]:
    """Random FCMAE weights of ``name`` (GRN and LayerScale not at their zero/tiny init) through
    ``fcmae-convert --format timm``: the folder's weight file, and the dense model with them."""
    state = randomize_(fcmae.create_fcmae(name, decoder_dim=32), std=0.05).state_dict()
    torch.save({"model": state}, folder / "fcmae.pth")
    assert exit_code(convert.main, [folder / "fcmae.pth", "-o", folder / "timm", "--format", "timm"]) == 0
    reference = fcmae.create_model(name).eval()
    load_body(reference, convert_state(state, name)[0], name, "fcmae.pth")
    return str(folder / "timm" / "model.safetensors"), reference


@pytest.mark.parametrize("name", FAMILIES)
def test_the_smp_encoder_gives_the_stages_of_the_weights(name, tmp_path):
    weights, reference = export_for_timm(name, tmp_path)
    model = smp.Unet(f"tu-{name}", encoder_weights=True, classes=3,
                     pretrained_cfg_overlay=dict(file=weights)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features, expected = model.encoder(images)[-4:], reference.forward_stages(images)
    for feature, stage in zip(features, expected, strict=True):
        # timm's own ConvNeXt computes the same network in another order of operations
        torch.testing.assert_close(feature, stage, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_unet_learns_on_every_family(name, tmp_path):
    torch.manual_seed(0)
    weights, _ = export_for_timm(name, tmp_path)
    model = smp.Unet(f"tu-{name}", encoder_weights=True, classes=3, decoder_channels=(64, 32, 16, 16, 8),
                     pretrained_cfg_overlay=dict(file=weights)).train()
    images, targets = rectangles(4, size=64)
    classes = torch.stack([target["masks"][0].long() * target["labels"] for target in targets])   # (4, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(20):
        batch = [2 * (step % 2), 2 * (step % 2) + 1]
        loss = torch.nn.functional.cross_entropy(model(torch.stack([images[i] for i in batch])), classes[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
