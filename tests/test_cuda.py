"""CUDA-only checks, run by ``tools/gpu_checks.sh`` on a GPU machine and skipped elsewhere.

Their CPU twins (tests/test_convnextv2.py, tests/test_compile.py) run everywhere; these repeat
them where users train: CUDA kernels, fp32 without TF32, and bf16 autocast.
"""
import pytest
import torch

import fcmae
from fcmae.convert import encoder_to_dense
from fcmae.masking import random_masks

from .helpers import assert_close, randomize_
from .test_convnextv2 import converted_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32 here: no TF32 in convolutions or matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_sparse_equals_masked_dense_on_cuda(dtype, rtol):
    name = "convnextv2_atto"
    encoder = randomize_(fcmae.create_encoder(name))
    dense = converted_dense(encoder, name).cuda()
    encoder = encoder.cuda()
    imgs = torch.randn(4, 3, 128, 128, device="cuda")
    mask = random_masks(4, 16, 0.6, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        sparse_out = encoder(imgs, mask).float()
        dense_out = dense.forward_features(imgs, mask).float()
    assert_close(sparse_out, dense_out, rtol=rtol)
    weights = torch.randn_like(dense_out)
    (sparse_out * weights).sum().backward()
    (dense_out * weights).sum().backward()
    sparse_grads = encoder_to_dense({k: p.grad for k, p in encoder.named_parameters()}, name)
    for key, param in dense.named_parameters():
        if param.grad is not None:
            assert_close(sparse_grads[key], param.grad, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fcmae_equals_eager_on_cuda(dtype):
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=64), std=0.05).cuda()
    compiled = torch.compile(model, dynamic=False)   # as fcmae-pretrain --compile
    imgs = torch.randn(4, 3, 128, 128, device="cuda")
    mask = random_masks(4, 16, 0.6, device="cuda")
    results = []
    for run in (model, compiled):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = run(imgs, mask=mask)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(compiled_loss, eager_loss, atol=tolerance, rtol=tolerance)
    for name, grad in eager_grads.items():
        assert_close(compiled_grads[name], grad, rtol=tolerance * 10)
