"""torch.compile (the --compile path): same loss and gradients as eager."""
import pytest
import torch

import fcmae
from fcmae.masking import random_masks

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

