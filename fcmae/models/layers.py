"""Dense layers shared by the ConvNeXt V2 classifier, the masked-dense reference and the
FCMAE decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (keys ``weight``/``bias``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on channels-last (B, H, W, C) input.

    ``gamma``/``beta`` have shape (1, 1, 1, C) as in the official dense checkpoints. With
    ``keep`` (B, H, W, 1) the statistics use only the kept sites (masked-dense reference).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        stats_input = x if keep is None else x * keep
        norms = torch.linalg.vector_norm(stats_input, dim=(1, 2), keepdim=True)   # (B, 1, 1, C)
        scale = norms / (norms.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta + x, self.gamma, x * scale)


def trunc_normal_init(module: nn.Module, types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> None:
    """The init every architecture here uses: weights trunc_normal(std .02), biases zero.
    Use as ``model.apply(trunc_normal_init)``."""
    if isinstance(module, types):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
