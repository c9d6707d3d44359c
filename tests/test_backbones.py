"""fcmae weights as torchvision detection backbones: the maps are the encoder's stages, and a
Faster R-CNN built on them learns (rectangles of known colours the test draws)."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN

import fcmae
from fcmae.atomic import atomic_save
from fcmae.backbones import feature_backbone
from fcmae.checkpoint import load_body
from fcmae.convert import convert_state


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


def rectangles(count: int, size: int = 128, seed: int = 0):
    """Images with one red (label 1) or blue (label 2) rectangle on grey noise, and its box."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for index in range(count):
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=generator)
        x0, y0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        width, height = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        label = 1 + index % 2
        colour = torch.tensor([1.0, 0.0, 0.0] if label == 1 else [0.0, 0.0, 1.0])
        image[:, y0:y0 + height, x0:x0 + width] = colour[:, None, None]
        images.append(image.clamp(0, 1))
        targets.append(dict(boxes=torch.tensor([[x0, y0, x0 + width, y0 + height]], dtype=torch.float32),
                            labels=torch.tensor([label])))
    return images, targets


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto", "internimage_t", "revcol_t"])
def test_faster_rcnn_learns_on_every_family(name, tmp_path):
    torch.manual_seed(0)
    state = fcmae.create_fcmae(name, decoder_dim=32).state_dict()
    dense, _ = convert_state(state)
    atomic_save({"model": dense, "model_name": name}, tmp_path / "dense.pth")
    detector = FasterRCNN(feature_backbone(tmp_path / "dense.pth"), num_classes=3, min_size=128, max_size=128)
    detector.train()
    images, targets = rectangles(4)
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for step in range(20):
        batch = [2 * (step % 2), 2 * (step % 2) + 1]
        loss = sum(detector([images[i] for i in batch], [targets[i] for i in batch]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
