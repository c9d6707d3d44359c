"""The `minkowski` backend gives the torch backend's numbers.

Skipped where MinkowskiEngine is not importable, except when FCMAE_REQUIRE_MINKOWSKI=1
(set by .ci/run, which builds it): then a missing backend fails loudly.
"""
import os

import pytest
import torch

import fcmae
import sparse_ops
from sparse_ops import SparseImage
from sparse_ops import functional as SF

from .helpers import assert_close, randomize_

if "minkowski" not in sparse_ops.available_backends():
    if os.environ.get("FCMAE_REQUIRE_MINKOWSKI") == "1":
        raise RuntimeError("FCMAE_REQUIRE_MINKOWSKI=1 but MinkowskiEngine does not import; "
                           "run tools/install_minkowski.sh")
    pytest.skip("MinkowskiEngine is not installed (tools/install_minkowski.sh builds it)",
                allow_module_level=True)


def on_backend(x: SparseImage, backend: str) -> SparseImage:
    features = x.features.detach().clone().requires_grad_(True)
    return SparseImage(features, x.sites, backend)


def random_input(height=10, width=12, channels=6, density=0.45):
    dense = torch.randn(3, channels, height, width)
    active = torch.rand(3, height, width) < density
    return SparseImage.from_dense(dense, active)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_depthwise_conv_parity_with_asymmetric_kernel(kernel_size):
    x = random_input()
    kernel = torch.randn(kernel_size * kernel_size, 6, requires_grad=True)   # asymmetric
    bias = torch.randn(1, 6, requires_grad=True)
    outputs, grads = {}, {}
    for backend in ("torch", "minkowski"):
        xb = on_backend(x, backend)
        out = SF.depthwise_conv2d(xb, kernel, bias)
        weights = torch.linspace(-1, 1, out.features.numel()).reshape(out.features.shape)
        kernel.grad = bias.grad = None
        (out.features * weights).sum().backward()
        outputs[backend] = out.features.detach()
        grads[backend] = (xb.features.grad, kernel.grad.clone(), bias.grad.clone())
    assert_close(outputs["minkowski"], outputs["torch"], rtol=1e-5)
    for mink, ref in zip(grads["minkowski"], grads["torch"]):
        assert_close(mink, ref, rtol=1e-5)


def test_strided_conv_parity():
    x = random_input(height=8, width=10)
    kernel = torch.randn(4, 6, 5, requires_grad=True)
    outputs = {}
    for backend in ("torch", "minkowski"):
        xb = on_backend(x, backend)
        out = SF.strided_conv2d(xb, kernel, None, 2)
        kernel.grad = None
        out.features.square().sum().backward()
        outputs[backend] = (out.features.detach(), out.coords, xb.features.grad, kernel.grad.clone())
    for mink, ref in zip(outputs["minkowski"], outputs["torch"]):
        assert_close(mink.float(), ref.float(), rtol=1e-5)


def minkowski_devices() -> list[str]:
    """cpu, and cuda where a GPU is there and MinkowskiEngine was built with CUDA."""
    import MinkowskiEngine as ME
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and ME.is_cuda_available() else [])


@pytest.mark.parametrize("device", minkowski_devices())
def test_encoder_parity_outputs_and_gradients(device):
    torch_encoder = randomize_(fcmae.create_encoder("convnextv2_atto", backend="torch"), std=0.1).to(device)
    mink_encoder = fcmae.create_encoder("convnextv2_atto", backend="minkowski").to(device)
    mink_encoder.load_state_dict(torch_encoder.state_dict())   # same parameters, same layout
    imgs = torch.randn(2, 3, 96, 96).to(device)
    mask = fcmae.masking.random_masks(2, 9, 0.6).to(device)
    ref, out = torch_encoder(imgs, mask), mink_encoder(imgs, mask)
    assert_close(out, ref, rtol=1e-4)
    ref.square().sum().backward()
    out.square().sum().backward()
    mink_params = dict(mink_encoder.named_parameters())
    for name, param in torch_encoder.named_parameters():
        assert_close(mink_params[name].grad, param.grad, rtol=1e-3)


def test_drop_path_and_grad_checkpointing_match_torch_backend():
    """Train mode: drop path draws from the global RNG, so building ME layers (which
    initialise kernels of their own) must not consume random numbers, and recomputation under
    gradient checkpointing must see the same draws."""
    sparse_ops.get_backend("minkowski")._layers.clear()        # layers are first built below
    imgs, mask = torch.randn(2, 3, 64, 64), fcmae.masking.random_masks(2, 4, 0.5)
    results = {}
    for backend in ("torch", "minkowski"):
        torch.manual_seed(0)
        encoder = randomize_(fcmae.create_encoder("convnextv2_atto", backend=backend, drop_path_rate=0.3),
                             std=0.1).train()
        encoder.set_grad_checkpointing()
        torch.manual_seed(1)
        out = encoder(imgs, mask)
        out.square().sum().backward()
        results[backend] = (out.detach(), {name: p.grad for name, p in encoder.named_parameters()})
    assert_close(results["minkowski"][0], results["torch"][0], rtol=1e-4)
    for name, grad in results["torch"][1].items():
        assert_close(results["minkowski"][1][name], grad, rtol=1e-3)


def test_checkpoint_moves_between_backends_with_same_loss():
    torch_model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    mink_model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32, backend="minkowski")
    mink_model.load_state_dict(torch_model.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    mask = fcmae.masking.random_masks(2, 4, 0.5)
    torch.testing.assert_close(mink_model(imgs, mask=mask)[0], torch_model(imgs, mask=mask)[0],
                               rtol=1e-5, atol=1e-5)


def test_pretrain_cli_runs_on_minkowski_and_resumes_on_torch(tmp_path):
    from fcmae.checkpoint import load_checkpoint
    from fcmae.cli.pretrain import main
    common = ["--input-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--num-workers", "0",
              "--steps-per-epoch", "2", "--output-dir", str(tmp_path)]
    main(common + ["--epochs", "1", "--backend", "minkowski"])
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 0
    main(common + ["--epochs", "2", "--backend", "torch", "--resume", "auto"])
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 1
