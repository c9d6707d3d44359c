"""Small helpers shared by the tests."""
import torch


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values: zero-initialised GRN or biases would hide bugs."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Max abs difference within ``rtol`` of the expected tensor's largest magnitude."""
    scale = expected.abs().max().clamp(min=1.0)
    diff = (actual - expected).abs().max()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"
