"""set_grad_checkpointing(): same outputs and gradients (drop path active), fewer saved bytes."""
import pytest
import torch

import fcmae
from fcmae.masking import random_masks
from tools.profiling import saved_activation_bytes

from .helpers import randomize_

CASES = {   # name: (build, forward(net, imgs, mask))
    "convnextv2 dense": (lambda: fcmae.create_model("convnextv2_atto", num_classes=0, drop_path_rate=0.3),
                         lambda net, imgs, mask: net.forward_features(imgs)),
    "convnextv2 masked-dense": (lambda: fcmae.create_model("convnextv2_atto", num_classes=0, drop_path_rate=0.3),
                                lambda net, imgs, mask: net.forward_features(imgs, mask)),
    "convnextv2 sparse": (lambda: fcmae.create_encoder("convnextv2_atto", drop_path_rate=0.3),
                          lambda net, imgs, mask: net(imgs, mask)),
    "convnext v1 sparse": (lambda: fcmae.create_encoder("convnext_atto", drop_path_rate=0.3),
                           lambda net, imgs, mask: net(imgs, mask)),
    "internimage dense": (lambda: fcmae.create_model("internimage_t", num_classes=0, drop_path_rate=0.3),
                          lambda net, imgs, mask: net.forward_features(imgs)),
    "internimage packed": (lambda: fcmae.create_encoder("internimage_t", drop_path_rate=0.3),
                           lambda net, imgs, mask: net(imgs, mask)),
}


@pytest.fixture
def batch():
    torch.manual_seed(2)
    return torch.randn(2, 3, 64, 64), random_masks(2, 4, 0.5)


def step(net, forward, batch, checkpointing):
    net.set_grad_checkpointing(checkpointing)
    net.zero_grad()
    torch.manual_seed(1)                                   # same drop-path draws in both runs
    saved, out = saved_activation_bytes(lambda: forward(net, *batch))
    out.square().mean().backward()
    return saved, out.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_keeps_numbers_and_saves_memory(case, batch):
    build, forward = CASES[case]
    torch.manual_seed(0)
    net = randomize_(build(), std=0.05).train()
    plain_saved, plain_out, plain_grads = step(net, forward, batch, False)
    saved, out, grads = step(net, forward, batch, True)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved < 0.5 * plain_saved, (saved, plain_saved)


def test_checkpointing_is_off_under_no_grad_and_by_default(batch, monkeypatch):
    """Off by default; when on, blocks go through torch.utils.checkpoint only while autograd
    records (under no_grad it would only add overhead)."""
    import fcmae.models.layers as layers
    calls = []
    monkeypatch.setattr(layers, "checkpoint", lambda block, *inputs, **kw: calls.append(block) or block(*inputs))
    net = fcmae.create_model("convnextv2_atto", num_classes=0)
    assert not any(getattr(m, "grad_checkpointing", False) for m in net.modules())
    net.forward_features(batch[0])
    assert calls == []
    net.set_grad_checkpointing()
    with torch.no_grad():
        net.forward_features(batch[0])
    assert calls == []
    net.forward_features(batch[0])
    assert len(calls) == sum(net.depths)
