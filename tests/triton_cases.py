"""Comparisons of the ``triton`` DCNv3 kernels with the ``grid_sample`` implementation.

tests/test_dcnv3_triton.py runs them on CPU in a subprocess with TRITON_INTERPRET=1
(Triton's interpreter is chosen when the kernels are defined, so it needs a fresh process:
``python tests/triton_cases.py`` prints one JSON object) and, where a GPU exists, on CUDA in
process. Each case returns the largest absolute difference (relative error for bf16)."""
import json
import os

import torch

from fcmae.masking import random_masks
from fcmae.models.dcnv3 import dcnv3_sample
from fcmae.models.internimage import InternImage


def sample_inputs(shape, groups, seed, device, group_channels=4, offset_std=1.5):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(*shape, groups * group_channels, generator=generator)
    offset = torch.randn(*shape, groups * 18, generator=generator) * offset_std   # some points leave the map
    weight = torch.rand(*shape, groups * 9, generator=generator).softmax(-1)
    return value.to(device), offset.to(device), weight.to(device)


def output_and_grads(impl, value, offset, weight, probe, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (value, offset, weight)]
    out = dcnv3_sample(*leaves, impl=impl, **options)
    return [out, *torch.autograd.grad((out.float() * probe).sum(), leaves)]


def max_difference(impl_options, value, offset, weight, probe):
    triton = output_and_grads("triton", value, offset, weight, probe, **impl_options)
    reference = output_and_grads("grid_sample", value, offset, weight, probe, **impl_options)
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(triton, reference))


def full_map(scale, device):
    value, offset, weight = sample_inputs((2, 5, 6), groups=2, seed=0, device=device)
    return max_difference(dict(groups=2, offset_scale=scale), value, offset, weight,
                          torch.randn(2, 5, 6, 8, device=device))


def query_sites(device):
    value, offset, weight = sample_inputs((2, 7, 9), groups=3, seed=1, device=device,
                                          group_channels=5)                      # Cg not a power of 2
    query_yx = torch.tensor([[[0, 0], [3, 8], [6, 1], [2, 2]], [[6, 8], [1, 4], [0, 7], [5, 5]]], device=device)
    rows = torch.arange(2, device=device)[:, None]
    pick = (rows, query_yx[..., 0], query_yx[..., 1])
    return max_difference(dict(groups=3, query_yx=query_yx), value, offset[pick], weight[pick],
                          torch.randn(2, 4, 15, device=device))


def bf16_relative_error(device):
    value, offset, weight = (t.bfloat16() for t in sample_inputs((1, 40, 40), groups=2, seed=2, device=device,
                                                                 group_channels=8))
    reference = dcnv3_sample(value.double(), offset.double(), weight.double(), groups=2, impl="grid_sample")
    out = dcnv3_sample(value, offset, weight, groups=2, impl="triton")
    assert out.dtype == torch.bfloat16
    return ((out.double() - reference).abs().mean() / reference.abs().mean()).item()


def packed_encoder(device):
    """A small InternImage FCMAE encoder: triton on packed visible sites vs grid_sample
    masked-dense, outputs and every parameter gradient (relative to its largest entry)."""
    torch.manual_seed(0)
    options = dict(channels=16, depths=(1, 1, 2, 1), groups=(2, 2, 4, 4), num_classes=0)
    packed = InternImage(dcn_impl="triton", **options)
    for param in packed.parameters():
        torch.nn.init.normal_(param, std=0.05)
    masked = InternImage(dcn_impl="grid_sample", packed_masked=False, **options)
    masked.load_state_dict(packed.state_dict())
    packed, masked = packed.to(device), masked.to(device)
    imgs, mask = torch.randn(2, 3, 96, 96, device=device), random_masks(2, 9, 0.6, device=device)
    out_packed, out_masked = packed(imgs, mask), masked(imgs, mask)
    probe = torch.randn_like(out_packed)
    (out_packed * probe).sum().backward()
    (out_masked * probe).sum().backward()
    worst = (out_packed - out_masked).abs().max().item()
    reference = dict(masked.named_parameters())
    for name, param in packed.named_parameters():
        scale = reference[name].grad.abs().max().clamp(min=1e-6)
        worst = max(worst, ((param.grad - reference[name].grad).abs().max() / scale).item())
    return worst


def run_all(device: str) -> dict[str, float]:
    return {"full_map_scale_1": full_map(1.0, device), "full_map_scale_2": full_map(2.0, device),
            "query_sites": query_sites(device), "bf16_relative": bf16_relative_error(device),
            "packed_encoder": packed_encoder(device)}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps(run_all("cpu")))
