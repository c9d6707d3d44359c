"""torch.compile (the --compile path): one graph per training step, no recompiles beyond the
one autocast needs, and the same loss and gradients as eager."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fcmae
from fcmae.masking import random_masks

from .helpers import randomize_


def compiled_training_step(name: str, **kwargs):
    """The pretraining step as ``fcmae-pretrain --compile`` compiles it (the mask is drawn
    inside the model), counted by a backend that records every graph Dynamo hands it."""
    torch._dynamo.reset()
    model = fcmae.create_fcmae(name, decoder_dim=32, **kwargs)
    counter = CompileCounter()
    step = torch.compile(lambda imgs: model(imgs)[0], backend=counter, dynamic=False)
    return model, step, counter


@pytest.mark.parametrize("name, kwargs", [("convnextv2_atto", {}), ("convnext_atto", {}),
                                          ("internimage_t", {}), ("revcol_t", {"reversible": False})])
def test_training_step_is_one_graph(name, kwargs):
    """No data-dependent shape, host sync or Python-side cache in the encoder: Dynamo captures
    forward + loss as one graph. (RevCol's default reversible mode runs a custom autograd
    Function that records RNG states per level: 15 graphs, see BENCHMARKS.md.)"""
    model, step, counter = compiled_training_step(name, **kwargs)
    if "reversible" in kwargs:
        model.encoder.reversible = kwargs["reversible"]
    step(torch.randn(2, 3, 64, 64)).backward()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    step(torch.randn(2, 3, 64, 64))   # a new mask, same shapes: the graph is reused
    assert counter.frame_count == 1


def test_fp32_then_bf16_compiles_twice_and_reuses_both():
    """The replay of tests/test_cuda.py's sequence in one process: fp32, then bf16 autocast,
    then both again. Autocast is a guard, so two graphs, never more (the recompile limit is 8)."""
    _, step, counter = compiled_training_step("convnextv2_atto")
    imgs = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        step(imgs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(imgs)
    assert counter.frame_count == 2, f"{counter.frame_count} graphs"


@pytest.mark.slow
def test_compiled_sparse_fcmae_matches_eager():
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    compiled = torch.compile(model, dynamic=False)   # as fcmae-pretrain --compile
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
