"""torch.compile (the --compile path): same loss and gradients as eager."""
import pytest
import torch

import fcmae
from fcmae.masking import random_masks
from fcmae.models.internimage import DCNv3

from .helpers import randomize_


@pytest.mark.slow
def test_compiled_sparse_fcmae_matches_eager():
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    compiled = torch.compile(model, dynamic=False)   # as fcmae-pretrain --compile does
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masks(2, 4, 0.5)
    eager_loss = model(imgs, mask=mask)[0]
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled_loss = compiled(imgs, mask=mask)[0]
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_compiled_gather_dcnv3_matches_eager():
    """The custom autograd function of the ``gather`` DCNv3 traces under torch.compile."""
    layer = randomize_(DCNv3(16, groups=2, impl="gather"), std=0.1)
    x = torch.randn(2, 8, 8, 16)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(layer.parameters()))
    compiled = torch.compile(layer, dynamic=False)(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-4, rtol=1e-3)
