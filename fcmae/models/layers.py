"""Dense layers shared by the ConvNeXt V2 classifier, the masked-dense reference and the
FCMAE decoder, and gradient checkpointing shared by every architecture."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..masking import keep_maps

STEM_STRIDE = 4   # every family here starts with a stride-4 patchify stem, then halves per stage


def stage_strides(num_stages: int) -> tuple[int, ...]:
    """Output stride of each stage: (4, 8, 16, 32) for four stages; the last is the FCMAE patch size."""
    return tuple(STEM_STRIDE * 2 ** i for i in range(num_stages))


def stage_keeps(mask: Tensor | None, images: Tensor, strides: Sequence[int], channel_dim: int) -> list[Tensor | None]:
    """Per stage the broadcastable keep map of a patch ``mask`` (B, L) (1 = removed) for
    ``images`` (B, 3, H, W): (B, 1, H/s, W/s) with ``channel_dim=1`` (channels-first maps),
    (B, H/s, W/s, 1) with ``channel_dim=-1`` (channels-last), in ``images``' dtype; 1 at the
    sites of kept patches. ``[None] * len(strides)`` (no masking) when ``mask`` is None."""
    if mask is None:
        return [None] * len(strides)
    return [keep.unsqueeze(channel_dim).type_as(images)
            for keep in keep_maps(mask, images.shape[-2:], strides[-1], strides)]


def apply_keep(x: Tensor, keep: Tensor | None) -> Tensor:
    """``x`` zeroed where the broadcastable ``keep`` map is 0 (removed patches); ``x`` itself
    when ``keep`` is None (no mask). The one re-masking rule of every masked-dense path."""
    return x if keep is None else x * keep


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
        norms = torch.linalg.vector_norm(apply_keep(x, keep), dim=(1, 2), keepdim=True)   # (B, 1, 1, C)
        scale = norms / (norms.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta + x, self.gamma, x * scale)


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Stochastic-depth rate of every block, rising linearly from 0 (first block of the network)
    to ``drop_path_rate`` (last block), grouped per stage: one list of ``depths[i]`` rates each."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth] for start, depth in zip(starts, depths)]


@torch.no_grad()
def scale_head_init(heads: Sequence[nn.Linear], scale: float) -> None:
    """Multiply freshly initialised classifier weights and biases by ``scale`` (the official
    ``head_init_scale``: a small head keeps early fine-tuning close to the pretrained features)."""
    for head in heads:
        head.weight.mul_(scale)
        head.bias.mul_(scale)


def trunc_normal_init(module: nn.Module, types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> None:
    """The init every architecture here uses: weights trunc_normal(std .02), biases zero.
    Use as ``model.apply(trunc_normal_init)``."""
    if isinstance(module, types):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def run_block(block: nn.Module, *inputs: Any, checkpointing: bool = False) -> Any:
    """``block(*inputs)``; with ``checkpointing`` (while autograd records) the block's
    activations are recomputed in backward instead of kept: non-reentrant
    ``torch.utils.checkpoint``, which restores the RNG state, so drop path draws the same."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class BlockSequence(nn.Sequential):
    """Blocks applied in order, each given the same extra inputs (e.g. a ``keep`` mask);
    keys as ``nn.Sequential``. ``grad_checkpointing`` recomputes each block in backward."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Any, *extra: Any) -> Any:
        for block in self:
            x = run_block(block, x, *extra, checkpointing=self.grad_checkpointing)
        return x


class GradCheckpointing:
    """timm's ``set_grad_checkpointing`` for a model whose block containers carry a
    ``grad_checkpointing`` flag (:class:`BlockSequence` and the like)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable


def enable_grad_checkpointing(model: nn.Module, model_name: str) -> None:
    """``--grad-checkpointing``: ConvNeXt V2 (dense and sparse) and InternImage support it;
    RevCol is reversible, which keeps even less."""
    if not isinstance(model, GradCheckpointing):
        raise ValueError(f"--grad-checkpointing is not supported by {model_name}")
    model.set_grad_checkpointing()


class TimmFeatures:
    """What timm's feature getter (``timm.create_model(..., features_only=True)``) needs from a
    dense model with ``forward_stages``, ``stage_channels`` and ``feature_strides``:
    ``feature_info`` and ``forward_intermediates``."""

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return [dict(num_chs=channels, reduction=stride, module=f"stage{index}")
                for index, (channels, stride) in enumerate(zip(self.stage_channels, self.feature_strides))]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's interface: the stage outputs (B, C_i, H/s_i, W/s_i) picked by ``indices`` (the
        last n, or a list), and with ``intermediates_only=False`` the final features first."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: only NCHW")
        stages = self.forward_stages(x)
        take, _ = feature_take_indices(len(stages), indices)
        intermediates = [stages[index] for index in take]
        return intermediates if intermediates_only else (stages[-1], intermediates)
