"""CUDA-only checks, run by ``tools/gpu_checks.sh`` on a GPU machine and skipped elsewhere.

Their CPU twins (tests/test_convnextv2.py, tests/test_compile.py) run everywhere; these repeat
them where users train: CUDA kernels, fp32 without TF32, and bf16 autocast.
"""
import pytest
import torch

import fcmae
from fcmae.masking import random_masks

from .helpers import assert_close, assert_within_dtype_error, randomize_, sparse_and_dense_results
from .test_convnextv2 import converted_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32 here: no TF32 in convolutions or matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_sparse_equals_masked_dense_on_cuda():
    """fp32 (no TF32): equal to 1e-4; bf16 autocast: within what bf16 costs the dense model
    itself (the measured tolerance of tests/helpers.assert_within_dtype_error)."""
    name = "convnextv2_atto"
    encoder = randomize_(fcmae.create_encoder(name)).cuda()
    dense = converted_dense(encoder.cpu(), name).cuda()
    encoder = encoder.cuda()
    imgs = torch.randn(4, 3, 128, 128, device="cuda")
    mask = random_masks(4, 16, 0.6, device="cuda")
    sparse_fp32, dense_fp32 = sparse_and_dense_results(encoder, dense, name, imgs, mask)
    for key, value in dense_fp32.items():
        assert_close(sparse_fp32[key], value, rtol=1e-4)
    sparse_bf16, dense_bf16 = sparse_and_dense_results(encoder, dense, name, imgs, mask, torch.bfloat16)
    assert_within_dtype_error(sparse_bf16, dense_bf16, dense_fp32)


def training_step(model, imgs: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """Loss and gradients of one pretraining step (mask drawn inside, seeded) under autocast."""
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(imgs)[0]
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    results = {"loss": loss.detach().float(), **{n: p.grad.float().clone() for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return results


def test_compiled_fcmae_equals_eager_on_cuda(monkeypatch):
    """The --compile training step (one graph; fp32, then bf16 in the same process, as the
    recompile limit sees it) against eager: fp32 to 1e-4, bf16 within the dtype's own cost.
    ``fallback_random`` makes the compiled mask draw use eager's RNG stream."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=64), std=0.05).cuda()
    compiled = torch.compile(model, dynamic=False)   # as fcmae-pretrain --compile
    imgs = torch.randn(4, 3, 128, 128, device="cuda")
    eager_fp32 = training_step(model, imgs, None)
    compiled_fp32 = training_step(compiled, imgs, None)
    for key, value in eager_fp32.items():
        assert_close(compiled_fp32[key], value, rtol=1e-4 if key == "loss" else 1e-3)
    eager_bf16 = training_step(model, imgs, torch.bfloat16)
    compiled_bf16 = training_step(compiled, imgs, torch.bfloat16)
    assert_within_dtype_error(compiled_bf16, eager_bf16, eager_fp32)
