"""RevCol: reversible column networks (Cai et al., ICLR 2023), dense classifier and FCMAE encoder.

N columns, each with four levels (strides 4/8/16/32). Column k updates
``c_i = alpha_i * c_i(previous column) + Level_i(low, high)`` for i = 0..3, where
``low`` is the stem output (i = 0) or this column's new ``c_{i-1}`` and ``high`` is the
previous column's ``c_{i+1}``. Because ``c_i(previous)`` can be recovered as
``(c_i - Level_i(low, high)) / alpha_i``, the reversible mode stores no activations inside
a column: backward recomputes them (with the same RNG and autocast state) and inverts.

State-dict keys follow the official checkpoints (``stem``, ``subnet{k}.alpha{i}``,
``subnet{k}.level{i}.fusion.*``/``blocks.*``, ``cls.classifier.*``). Masked-dense FCMAE:
the stem output, every fusion output and every block output are re-masked, so each ``c_i``
is exactly zero at removed sites and nothing leaks across 32-px patches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .convnext import Block, stem
from .layers import (
    STEM_STRIDE,
    BlockSequence,
    LayerNorm2d,
    TimmFeatures,
    apply_keep,
    drop_path_rates,
    scale_head_init,
    stage_keeps,
    stage_strides,
    trunc_normal_init,
)
from .registry import AnalysisPoint, EncoderFamily, FamilyOption, masked_dense_encoder, register_family

# name: (channels, blocks per level, columns)
REVCOL_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "t": ((64, 128, 256, 512), (2, 2, 4, 2), 4),
    "s": ((64, 128, 256, 512), (2, 2, 4, 2), 8),
    "b": ((72, 144, 288, 576), (1, 1, 3, 2), 16),
    "l": ((128, 256, 512, 1024), (1, 2, 6, 2), 8),
    "xl": ((224, 448, 896, 1792), (1, 2, 6, 2), 8),
}

Masks = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]  # keep (B,1,h,w) per level


class UpSample(nn.Module):
    """Linear c_{i+1} → c_i and LayerNorm per site, then nearest ×2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.channel_reschedule = nn.Sequential(nn.Linear(in_channels, out_channels),
                                                nn.LayerNorm(out_channels, eps=1e-6))

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Fusion(nn.Module):
    """Combines ``low`` (this column, finer level) and ``high`` (previous column, coarser level)."""

    def __init__(self, level: int, channels: Sequence[int], first_column: bool) -> None:
        super().__init__()
        self.level, self.first_column = level, first_column
        self.down = (nn.Sequential(nn.Conv2d(channels[level - 1], channels[level], 2, stride=2),
                                   LayerNorm2d(channels[level], eps=1e-6))
                     if level > 0 else nn.Identity())
        if not first_column:
            self.up = UpSample(channels[level + 1], channels[level]) if level < 3 else nn.Identity()

    def forward(self, low: Tensor, high: Tensor | None) -> Tensor:
        if self.first_column or self.level == 3:
            return self.down(low)
        return self.up(high) + self.down(low)


class Level(nn.Module):
    def __init__(self, level: int, channels: Sequence[int], layers: Sequence[int], first_column: bool,
                 drop_rates: Sequence[float], kernel_size: int = 3) -> None:
        super().__init__()
        start = sum(layers[:level])
        self.fusion = Fusion(level, channels, first_column)
        self.blocks = BlockSequence(*[Block(channels[level], drop_rates[start + j], kernel_size)
                                      for j in range(layers[level])])

    def forward(self, low: Tensor, high: Tensor | None, keep: Tensor | None = None) -> Tensor:
        return self.blocks(apply_keep(self.fusion(low, high), keep), keep)


def _column_forward(levels, alphas, x: Tensor, prev: Sequence[Tensor | None], keeps: Masks,
                    before_level: Callable[[], None] | None = None) -> list[Tensor]:
    """One column: c_i = alpha_i * prev_i + Level_i(low, prev_{i+1}); prev None = column 0.
    ``before_level()`` runs before each level (the reversible column records RNG states)."""
    outputs: list[Tensor] = []
    for i, (level, alpha) in enumerate(zip(levels, alphas)):
        if before_level is not None:
            before_level()
        low = x if i == 0 else outputs[i - 1]
        high = prev[i + 1] if i < 3 else None
        out = level(low, high, keeps[i])
        outputs.append(out if prev[i] is None else alpha * prev[i] + out)
    return outputs


class ReversibleColumn(torch.autograd.Function):
    """Column forward without stored activations; backward recomputes and inverts.

    Inputs: (levels, alphas, keeps, first_column, x, prev0..prev3). Saves only x and the
    column's outputs. Each level's RNG state (CPU and the input's CUDA device) and the
    autocast state are captured in forward and restored for the recomputation.
    """

    @staticmethod
    def forward(ctx, levels, alphas, keeps, first_column, x, *prev):
        ctx.levels, ctx.alphas, ctx.keeps, ctx.first_column = levels, alphas, keeps, first_column
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng = []
        with torch.no_grad():
            outputs = _column_forward(levels, alphas, x, [None] * 4 if first_column else list(prev), keeps,
                                      before_level=lambda: ctx.rng.append(_rng_state(x.device)))
        ctx.save_for_backward(x, *outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, *outputs = ctx.saved_tensors
        grads = [g.clone() if g is not None else torch.zeros_like(c) for g, c in zip(grad_outputs, outputs)]
        prev: list[Tensor | None] = [None] * 4     # recovered previous-column outputs
        prev_grads: list[Tensor | None] = [None] * 4
        grad_x = None
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices), \
                torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            for i in reversed(range(4)):
                _set_rng_state(ctx.rng[i], x.device)
                low = (x if i == 0 else outputs[i - 1]).detach().requires_grad_(True)
                high = None
                if i < 3 and not ctx.first_column:
                    high = prev[i + 1].detach().requires_grad_(True)
                out = ctx.levels[i](low, high, ctx.keeps[i])
                torch.autograd.backward(out, grads[i])
                if i == 0:
                    grad_x = low.grad
                else:
                    grads[i - 1] += low.grad
                if high is not None:
                    prev_grads[i + 1] = prev_grads[i + 1] + high.grad
                if not ctx.first_column:
                    alpha = ctx.alphas[i]
                    with torch.no_grad():
                        prev[i] = (outputs[i] - out.detach()) / alpha
                    torch.autograd.backward(prev[i].detach() * alpha, grads[i])   # alpha's grad
                    prev_grads[i] = alpha.detach() * grads[i]
        if ctx.first_column:
            return (None, None, None, None, grad_x, None, None, None, None)
        return (None, None, None, None, grad_x, *prev_grads)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class SubNet(nn.Module):
    """One column: ``alpha0..3`` (1, c_i, 1, 1) and ``level0..3``."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], first_column: bool,
                 drop_rates: Sequence[float], kernel_size: int = 3) -> None:
        super().__init__()
        self.first_column = first_column
        for i, dim in enumerate(channels):
            setattr(self, f"alpha{i}", nn.Parameter(torch.full((1, dim, 1, 1), 0.5)))
            setattr(self, f"level{i}", Level(i, channels, layers, first_column, drop_rates, kernel_size))

    @property
    def levels(self) -> list[Level]:
        return [getattr(self, f"level{i}") for i in range(4)]

    @property
    def alphas(self) -> list[nn.Parameter]:
        return [getattr(self, f"alpha{i}") for i in range(4)]

    def forward(self, x: Tensor, prev: Sequence[Tensor | None], keeps: Masks,
                reversible: bool) -> list[Tensor]:
        with torch.no_grad():   # keep |alpha| >= 1e-3 so the column stays invertible
            for alpha in self.alphas:
                alpha.copy_(alpha.sign().where(alpha != 0, torch.ones_like(alpha)) * alpha.abs().clamp(min=1e-3))
        if reversible and torch.is_grad_enabled():
            zeros = [x.new_zeros(()) for _ in range(4)] if self.first_column else list(prev)
            return list(ReversibleColumn.apply(self.levels, self.alphas, keeps, self.first_column, x, *zeros))
        return _column_forward(self.levels, self.alphas, x, [None] * 4 if self.first_column else prev, keeps)


class Classifier(nn.Module):
    """Global average pool → LayerNorm → Linear (keys ``classifier.0/1``)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x.mean(dim=(-2, -1)))


class Decoder(nn.Module):
    """Intermediate-supervision decoder: c3 (stride 32) → 3×H×W reconstruction logits.

    Three stages of 1×1 conv → LayerNorm → GELU → bilinear ×2 and a ConvNeXt block with
    expansion 1, then a 1×1 conv to 48 channels and PixelShuffle(4).
    """

    def __init__(self, channels: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        dims = tuple(reversed(channels))
        self.proj_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[s], dims[s + 1], 1), LayerNorm2d(dims[s + 1], eps=1e-6), nn.GELU(),
                          nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
            for s in range(3))
        self.normal_layers = nn.ModuleList(nn.Sequential(Block(dims[s + 1], kernel_size=kernel_size, expansion=1))
                                           for s in range(3))
        self.projback = nn.Sequential(nn.Conv2d(channels[0], 3 * STEM_STRIDE ** 2, 1),
                                      nn.PixelShuffle(STEM_STRIDE))

    def forward(self, x: Tensor) -> Tensor:
        for project, refine in zip(self.proj_layers, self.normal_layers):
            x = refine(project(x))
        return self.projback(x)


def inter_supervision_loss(logits: Sequence[Tensor], reconstructions: Sequence[Tensor], imgs: Tensor,
                           targets: Tensor, mean: Sequence[float], std: Sequence[float],
                           recon_weight: float = 3.0, cls_weight: float = 0.7,
                           criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """RevCol's training loss with intermediate supervision (fine-tuning's loss for a RevCol
    built with ``inter_supv``: ``fcmae-finetune --inter-supervision on``); ``criterion`` is the
    run's classification loss (cross-entropy, label smoothing, or soft targets under mixup).

    For head k < last: ``recon_weight·(1 − k/n)·BCE(recon_k, image) + cls_weight·(k+1)/(n+1)·CE(logits_k)``
    with n = number of decoders (3) and the image de-normalised and clamped to [0.01, 0.99];
    the last logits add plain cross-entropy. imgs (B, 3, H, W) normalised; targets (B,).
    """
    mean_t = torch.tensor(mean, device=imgs.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, 3, 1, 1)
    pixels = (imgs * std_t + mean_t).clamp(0.01, 0.99)
    count = len(reconstructions)
    loss = criterion(logits[-1], targets)
    for k, recon in enumerate(reconstructions):
        loss = loss + recon_weight * (1 - k / count) * F.binary_cross_entropy_with_logits(recon, pixels)
        loss = loss + cls_weight * (k + 1) / (count + 1) * criterion(logits[k], targets)
    return loss


class RevCol(TimmFeatures, nn.Module):
    """RevCol classifier (official key layout). ``forward_features(x, mask)`` is the
    masked-dense FCMAE encoder; ``reversible=True`` trains with constant activation memory."""

    head_prefixes = ("cls.", "cls_blocks.", "decoder_blocks.")

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 512), layers: Sequence[int] = (2, 2, 4, 2),
                 num_subnet: int = 4, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 kernel_size: int = 3, reversible: bool = True, head_init_scale: float = 1.0,
                 inter_supv: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.channels, self.layers, self.num_subnet = tuple(channels), tuple(layers), num_subnet
        self.reversible = reversible
        self.stage_channels = tuple(channels)
        self.num_features = channels[-1]
        self.feature_strides = stage_strides(len(channels))
        self.patch_size = self.feature_strides[-1]
        self.stem = stem(in_chans, channels[0])
        rates = [rate for level in drop_path_rates(layers, drop_path_rate) for rate in level]   # flat, by block
        for k in range(num_subnet):
            setattr(self, f"subnet{k}", SubNet(channels, layers, k == 0, rates, kernel_size))
        self.inter_supv = inter_supv and num_classes > 0
        if self.inter_supv:   # four heads after evenly spaced columns, decoders after the first three
            if num_subnet % 4:
                raise ValueError(f"intermediate supervision needs a multiple of 4 columns, got {num_subnet}")
            self.cls_blocks = nn.ModuleList(Classifier(channels[-1], num_classes) for _ in range(4))
            self.decoder_blocks = nn.ModuleList(Decoder(channels, kernel_size) for _ in range(3))
            heads = [block.classifier[1] for block in self.cls_blocks]
        elif num_classes > 0:
            self.cls = Classifier(channels[-1], num_classes)
            heads = [self.cls.classifier[1]]
        self.apply(trunc_normal_init)
        scale_head_init(heads if num_classes > 0 else [], head_init_scale)

    def forward_columns(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """(B, 3, H, W) → the last column's [c0, c1, c2, c3] (strides 4…32)."""
        keeps = tuple(stage_keeps(mask, x, self.feature_strides, channel_dim=1))
        x = apply_keep(self.stem(x), keeps[0])
        columns: list[Tensor | None] = [None] * 4
        for k in range(self.num_subnet):
            columns = getattr(self, f"subnet{k}")(x, columns, keeps, self.reversible)
        return columns

    def forward_stages(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """(B, 3, H, W) → the last column's four levels (B, C_i, H/s_i, W/s_i)."""
        return self.forward_columns(x, mask)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) → (B, c3, H/32, W/32); with ``mask`` (B, L), zero at removed patches."""
        return self.forward_columns(x, mask)[3]

    def forward_inter(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """With ``inter_supv``: logits of the four heads and the three reconstructions
        (B, 3, H, W), for :func:`inter_supervision_loss`."""
        x = self.stem(x)
        interval = self.num_subnet // 4
        columns: list[Tensor | None] = [None] * 4
        logits, reconstructions = [], []
        for k in range(self.num_subnet):
            columns = getattr(self, f"subnet{k}")(x, columns, (None,) * 4, self.reversible)
            if (k + 1) % interval == 0:
                logits.append(self.cls_blocks[k // interval](columns[3]))
                if k != self.num_subnet - 1:
                    reconstructions.append(self.decoder_blocks[k // interval](columns[3]))
        return logits, reconstructions

    def forward(self, x: Tensor, mask: Tensor | None = None,
                num_visible: int | None = None) -> Tensor | tuple[list[Tensor], list[Tensor]]:
        """Logits (B, num_classes); with ``inter_supv`` in training mode, :meth:`forward_inter`'s
        (logits of every head, reconstructions) for :func:`inter_supervision_loss`. As FCMAE
        encoder, ``encoder(imgs, mask)`` → features (``num_visible`` is not needed: every site
        is computed and re-masked)."""
        if mask is not None:
            return self.forward_features(x, mask)
        if self.inter_supv and self.training:
            return self.forward_inter(x)
        if self.inter_supv:
            return self.cls_blocks[-1](self.forward_features(x))
        return self.cls(self.forward_features(x))

    def num_layers(self, decay_type: str = "single") -> int:
        return self.num_subnet

    def layer_id(self, param_name: str, decay_type: str = "single") -> int:
        """Layer-wise lr decay by column: stem 0, column k → k + 1, classifier last."""
        if param_name.startswith("stem"):
            return 0
        if param_name.startswith("subnet"):
            return int(param_name.split(".")[0][len("subnet"):]) + 1
        return self.num_subnet + 1

    def analysis_points(self) -> list[AnalysisPoint]:
        """Every block of every column, ``subnet{k}.level{i}.blocks.{j}`` (stage = level); its
        expansion activation is the input of ``pwconv2``."""
        return [AnalysisPoint(f"subnet{k}.level{i}.blocks.{j}", i, block, block.pwconv2)
                for k in range(self.num_subnet) for i, level in enumerate(getattr(self, f"subnet{k}").levels)
                for j, block in enumerate(level.blocks)]

    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases: the column weights ``alpha*`` (1, C, 1, 1) are
        decayed, as in the official RevCol training code (its optimizer exempts 1-D tensors only)."""
        return set()


def inter_supervision_kwargs(value: str, device_type: str) -> dict[str, Any]:
    return {"inter_supv": value == "on"}


def supervised_loss(outputs: tuple[list[Tensor], list[Tensor]], imgs: Tensor, targets: Tensor,
                    criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Fine-tuning's loss for the training forward of a RevCol with ``inter_supv`` (ImageNet-normalised images)."""
    logits, reconstructions = outputs
    return inter_supervision_loss(logits, reconstructions, imgs, targets, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                  criterion=criterion)


register_family(EncoderFamily(
    name="revcol", sizes={size: dict(channels=channels, layers=layers, num_subnet=columns)
                          for size, (channels, layers, columns) in REVCOL_SIZES.items()},
    options=(FamilyOption("--inter-supervision", "RevCol's intermediate supervision: a head after every quarter "
                          "of the columns and reconstruction decoders after the first three, trained with "
                          "inter_supervision_loss (official recipe); evaluation uses the last head",
                          ("on", "off"), inter_supervision_kwargs, commands=("finetune",)),),
    supervised_loss=supervised_loss,
    dense=RevCol, encoder=partial(masked_dense_encoder, RevCol), sparse_encoder=False,
    benchmark_variants=lambda device_type: {"masked-plain": {"reversible": False}}))   # ordinary autograd, for memory
