"""fcmae weights as torchvision detection backbones: the maps are the encoder's stages, and a
Faster R-CNN (every family) and a Mask R-CNN built on them learn (rectangles of known colours
the test draws)."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN

import fcmae
from fcmae.atomic import atomic_save
from fcmae.backbones import feature_backbone
from fcmae.checkpoint import load_body
from fcmae.convert import convert_state
from fcmae.optim import layer_decay_param_groups_around

from .helpers import rectangles


def test_the_backbone_gives_the_encoders_stages(tmp_path):
    state = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).state_dict()
    torch.save({"model": state}, tmp_path / "fcmae.pth")
    dense, _ = convert_state(state)
    reference = fcmae.create_model("convnextv2_atto").eval()
    load_body(reference, dense, "convnextv2_atto", "fcmae.pth")
    backbone = feature_backbone(tmp_path / "fcmae.pth").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stages, expected = backbone.body(images), reference.forward_stages(images)
        maps = backbone(images)
    assert all(torch.equal(stages[str(index)], expected[index]) for index in range(4))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert all(feature_map.shape[1] == backbone.out_channels for feature_map in maps.values())
    plain = feature_backbone(tmp_path / "fcmae.pth", fpn=False).eval()
    assert plain.out_channels == 320
    with torch.no_grad():
        assert torch.equal(plain(images)["0"], expected[-1])


def test_layer_decay_reaches_into_the_detector():
    backbone = feature_backbone("random:convnextv2_atto")
    detector = FasterRCNN(backbone, num_classes=3)
    encoder = backbone.body.model
    groups = layer_decay_param_groups_around(detector, encoder, weight_decay=0.05, layer_decay=0.8)
    scale = {id(param): group["lr_scale"] for group in groups for param in group["params"]}
    decay = {id(param): group["weight_decay"] for group in groups for param in group["params"]}
    trainable = [param for param in detector.parameters() if param.requires_grad]
    assert sum(len(group["params"]) for group in groups) == len(trainable) == len(scale)
    stem, fpn_conv = encoder.downsample_layers[0][0].weight, backbone.fpn.inner_blocks[0][0].weight
    assert scale[id(stem)] == min(scale.values()) == 0.8 ** encoder.num_layers() and scale[id(fpn_conv)] == 1.0
    assert decay[id(fpn_conv)] == 0.05 and decay[id(backbone.fpn.inner_blocks[0][0].bias)] == 0.0
    assert scale[id(detector.roi_heads.box_predictor.cls_score.weight)] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto", "internimage_t", "revcol_t"])
def test_faster_rcnn_learns_on_every_family(name, tmp_path):
    torch.manual_seed(0)
    state = fcmae.create_fcmae(name, decoder_dim=32).state_dict()
    dense, _ = convert_state(state)
    atomic_save({"model": dense, "model_name": name}, tmp_path / "dense.pth")
    detector = FasterRCNN(feature_backbone(tmp_path / "dense.pth"), num_classes=3, min_size=128, max_size=128)
    assert_learns(detector)


@pytest.mark.slow
def test_mask_rcnn_learns_on_fcmae_weights(tmp_path):
    torch.manual_seed(0)
    torch.save({"model": fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).state_dict()}, tmp_path / "fcmae.pth")
    backbone = feature_backbone(tmp_path / "fcmae.pth", out_channels=64)
    assert_learns(MaskRCNN(backbone, num_classes=3, min_size=128, max_size=128, box_batch_size_per_image=64))


def assert_learns(detector: torch.nn.Module, steps: int = 20) -> None:
    """``steps`` SGD steps on two batches of drawn rectangles (boxes, labels, masks): the mean
    of the last four losses is under 0.8 × the first four's."""
    detector.train()
    images, targets = rectangles(4)
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for step in range(steps):
        batch = [2 * (step % 2), 2 * (step % 2) + 1]
        loss = sum(detector([images[i] for i in batch], [targets[i] for i in batch]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
