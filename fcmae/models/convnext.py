"""ConvNeXt: the network both ConvNeXt families share — the dense classifier and the sparse
FCMAE encoder, built from a block — with the V1 block (LayerScale ``gamma``, init 1e-6, no
GRN), the sizes of both families (stated once), and the conversions to the dense, timm and
Hugging Face transformers layouts. ConvNeXt V2 (:mod:`.convnextv2`) changes only the block: GRN, no LayerScale.

The dense model follows the official key layout (``downsample_layers``, ``stages.i.j.{dwconv,
norm, pwconv1, pwconv2, gamma|grn}``, ``norm``, ``head``); the sparse encoder has the same keys
in the FCMAE sparse layout (``dwconv.kernel``, ``norm.ln.*``, ``pwconv1.linear.*``) and loads
the ``encoder.*`` part of official FCMAE checkpoints strictly, whatever ``sparse_ops`` backend
runs it. Sizes are timm's ``convnext_*`` / ``convnextv2_*``; converted weights load into timm.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn

import sparse_ops
import sparse_ops.nn as snn
from sparse_ops.layout import sparse_to_dense_state_dict

from ..masking import visible_sites
from .layers import (
    STEM_STRIDE,
    BlockSequence,
    GradCheckpointing,
    LayerNorm2d,
    TimmFeatures,
    apply_keep,
    drop_path_rates,
    scale_head_init,
    stage_keeps,
    stage_strides,
    trunc_normal_init,
)
from .registry import AnalysisPoint, EncoderFamily, StateDict, TransformersLayout, register_family

# size: (depths, dims), for both families (timm's convnext_* and convnextv2_* sizes)
CONVNEXT_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
# the sizes ConvNeXt V1 is registered in (tiny … xlarge are the official ones)
CONVNEXT_SIZES = {size: CONVNEXT_SHAPES[size] for size in
                  ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge")}


def stem(in_chans: int, dim: int) -> nn.Sequential:
    """Patchify stem: Conv 4×4/4 + LayerNorm (``downsample_layers.0``)."""
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=STEM_STRIDE, stride=STEM_STRIDE),
                         LayerNorm2d(dim, eps=1e-6))


def downsample_layers(in_chans: int, dims: Sequence[int], norm: Callable[..., nn.Module],
                      conv: Callable[..., nn.Module]) -> nn.ModuleList:
    """The stem, then per later stage ``norm(C_in)`` + ``conv(C_in, C_out, 2, 2)`` (dense or sparse layers)."""
    layers = [stem(in_chans, dims[0])]
    layers += [nn.Sequential(norm(dims[i - 1], eps=1e-6), conv(dims[i - 1], dims[i], 2, 2))
               for i in range(1, len(dims))]
    return nn.ModuleList(layers)


def stages(block: Callable[..., nn.Module], depths: Sequence[int], dims: Sequence[int], drop_path_rate: float,
           **block_kwargs) -> nn.ModuleList:
    """One :class:`BlockSequence` of ``block(dim, drop_path, **block_kwargs)`` per stage."""
    return nn.ModuleList(BlockSequence(*[block(dim, rate, **block_kwargs) for rate in rates])
                         for dim, rates in zip(dims, drop_path_rates(depths, drop_path_rate)))


class ConvNeXtShape:
    """Sizes every ConvNeXt model (dense or sparse, V1 or V2) exposes through the family contract."""

    def _set_shape(self, depths: Sequence[int], dims: Sequence[int]) -> None:
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.stage_channels = tuple(dims)
        self.num_features = dims[-1]
        self.feature_strides = stage_strides(len(dims))
        self.patch_size = self.feature_strides[-1]

    def analysis_points(self) -> list[AnalysisPoint]:
        """Every block, ``stages.{i}.{j}``; its expansion activation is the input of ``pwconv2``."""
        return [AnalysisPoint(f"stages.{i}.{j}", i, block, block.pwconv2)
                for i, stage in enumerate(self.stages) for j, block in enumerate(stage)]

    def no_weight_decay(self) -> set[str]:
        """GRN's (1, 1, 1, C) gamma/beta are not decayed (the official recipe); all else with
        more than one dimension is."""
        return {name for name, _ in self.named_parameters() if ".grn." in name}


class Block(nn.Module):
    """dwconv k×k → LN → Linear(C→eC) → GELU → Linear(eC→C) → ×gamma → DropPath, residual
    (expansion e = 4; RevCol's columns use this block too).

    With ``keep`` (B, 1, H, W) the masked-dense reference: removed sites are zeroed after the
    depthwise conv and at the output.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7,
                 layer_scale_init_value: float = 1e-6, expansion: int = 4) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expansion * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        shortcut = x                                                     # (B, C, H, W)
        x = apply_keep(self.dwconv(x), keep).permute(0, 2, 3, 1)         # (B, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))           # (B, H, W, C), via eC
        x = (self.gamma * x).permute(0, 3, 1, 2)                         # (B, C, H, W)
        return apply_keep(shortcut + self.drop_path(x), keep)


class SparseBlock(nn.Module):
    """The V1 block on a :class:`sparse_ops.SparseImage`."""

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7,
                 layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = snn.DepthwiseConv2d(dim, kernel_size)
        self.norm = snn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = snn.Linear(dim, 4 * dim)
        self.act = snn.GELU()
        self.pwconv2 = snn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        self.drop_path = snn.DropPath(drop_path)

    def forward(self, x: sparse_ops.SparseImage) -> sparse_ops.SparseImage:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))   # (N, C), via 4C
        return snn.add(x, self.drop_path(out.replace(out.features * self.gamma)))


class ConvNeXt(ConvNeXtShape, TimmFeatures, GradCheckpointing, nn.Module):
    """Dense ConvNeXt classifier (official key layout), V1 with its :class:`Block`.

    ``forward_features(x, mask)`` with a patch mask is the masked-dense FCMAE reference.
    ``block`` is the one thing ConvNeXt V2 changes (:mod:`.convnextv2`: GRN, no LayerScale);
    extra keyword arguments go to it.
    """

    block: Callable[..., nn.Module] = Block
    head_prefixes = ("norm.", "head.")  # not part of an FCMAE encoder; fine-tuning starts them fresh

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 in_chans: int = 3, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 head_init_scale: float = 1.0, kernel_size: int = 7, **block_kwargs) -> None:
        super().__init__()
        self._set_shape(depths, dims)
        self.downsample_layers = downsample_layers(in_chans, dims, LayerNorm2d, nn.Conv2d)
        self.stages = stages(self.block, depths, dims, drop_path_rate, kernel_size=kernel_size, **block_kwargs)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_init)
        scale_head_init([self.head] if num_classes > 0 else [], head_init_scale)

    def num_layers(self, decay_type: str = "single") -> int:
        """Depth used by layer-wise lr decay: one id per block ('single') or 12 groups ('group')."""
        return sum(self.depths) if decay_type == "single" else 12

    def layer_id(self, param_name: str, decay_type: str = "single") -> int:
        """Layer-wise lr decay id of a parameter (0 = stem … num_layers + 1 = norm/head).

        'single': every block its own id, a downsample layer shares the id of the first block
        after it. 'group' (official recipe for base/large, depths 3,3,27,3): twelve groups —
        stage 0 → 1, stage 1 → 2, stage 2 in runs of three blocks → 3…11, stage 3 → 12; a
        downsample layer joins the first group of its stage (the stem: 0).
        """
        parts = param_name.split(".")
        if parts[0] not in ("downsample_layers", "stages"):
            return self.num_layers(decay_type) + 1
        stage = int(parts[1])
        if decay_type == "single":
            block = int(parts[2]) if parts[0] == "stages" else 0
            return sum(self.depths[:stage]) + block + 1
        if parts[0] == "downsample_layers" and stage == 0:
            return 0
        block = int(parts[2]) if parts[0] == "stages" else 0
        return (1, 2, 3 + block // 3, 12)[stage]

    def forward_stages(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """(B, 3, H, W) → every stage's output (B, C_i, H/s_i, W/s_i). ``mask`` (B, L): 1 = removed patch."""
        keeps = stage_keeps(mask, x, self.feature_strides, channel_dim=1)
        outputs = []
        for downsample, stage, keep in zip(self.downsample_layers, self.stages, keeps):
            x = apply_keep(downsample(x), keep)
            x = stage(x, keep)
            outputs.append(x)
        return outputs

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) → (B, C_last, H/32, W/32). ``mask`` (B, L): 1 = removed patch."""
        return self.forward_stages(x, mask)[-1]

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, C, h, w) → (B, num_classes): global average pool → LayerNorm → Linear."""
        return self.head(self.norm(features.mean(dim=(-2, -1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class SparseConvNeXt(ConvNeXtShape, GradCheckpointing, nn.Module):
    """FCMAE encoder: dense stem, then only visible sites are computed.

    ``forward(imgs, mask, num_visible=None)``: imgs (B, 3, H, W), mask (B, L) with 1 =
    removed patch → (B, C_last, H/32, W/32) features, zero at removed patches. ``num_visible``
    (patches kept per image, when the caller knows it) keeps every shape static. Keys match the ``encoder.*``
    part of official FCMAE checkpoints (no final norm, no head). ``block`` as in
    :class:`ConvNeXt`.
    """

    block: Callable[..., nn.Module] = SparseBlock

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 in_chans: int = 3, drop_path_rate: float = 0.0, kernel_size: int = 7,
                 backend: str = "torch", **block_kwargs) -> None:
        super().__init__()
        sparse_ops.get_backend(backend)  # fail early on an unknown or missing backend
        self.backend = backend
        self._set_shape(depths, dims)
        self.downsample_layers = downsample_layers(in_chans, dims, snn.LayerNorm, snn.Conv2d)
        self.stages = stages(self.block, depths, dims, drop_path_rate, kernel_size=kernel_size, **block_kwargs)
        self.apply(trunc_normal_init)

    def forward(self, imgs: Tensor, mask: Tensor, num_visible: int | None = None) -> Tensor:
        stem_out = self.downsample_layers[0](imgs)                         # (B, C0, H/4, W/4)
        (sites,) = visible_sites(mask, imgs.shape[-2:], self.patch_size, [STEM_STRIDE], num_visible)
        x = sparse_ops.SparseImage.at_sites(stem_out, sites, self.backend)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsample_layers[i](x)
            x = stage(x)
        return x.dense()                                                   # (B, C, h, w)


def checkpoint_filter_fn(state: StateDict, model: nn.Module) -> StateDict:
    """FCMAE encoder weights (sparse layers, official MinkowskiEngine layout) → ``model``'s
    dense layout (official): sparse kernels become conv weights, sparse-layer wrappers drop
    out of the keys (:func:`sparse_ops.layout.sparse_to_dense_state_dict`), and (1, C) biases
    and GRN parameters take the dense model's shapes. Shared by ConvNeXt V1 and V2."""
    dense = sparse_to_dense_state_dict(state)
    target = model.state_dict()
    return {key: _reshaped_like(value, target.get(key)) for key, value in dense.items()}


# Official dense key → timm key, applied in order (first match wins), then block-level renames.
_TIMM_RULES: tuple[tuple[str, str], ...] = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.", "head.fc."),
    (r"^norm\.", "head.norm."),
)
_TIMM_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv1\.", ".mlp.fc1."),
    (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.grn\.gamma$", ".mlp.grn.weight"),
    (r"\.grn\.beta$", ".mlp.grn.bias"),
)


def timm_filter_fn(dense: StateDict, timm_model: nn.Module) -> StateDict:
    """Official dense ConvNeXt (V1 or V2) keys → timm ``convnext_*``/``convnextv2_*`` keys,
    each tensor in the shape ``timm_model`` has (small sizes keep the MLP as 1×1 convs there,
    GRN parameters are (C,))."""
    target = timm_model.state_dict()
    timm_state: StateDict = {}
    for key, value in dense.items():
        key = _first_rename(key, _TIMM_RULES) or key
        for pattern, replacement in _TIMM_BLOCK_RULES:
            key = re.sub(pattern, replacement, key)
        timm_state[key] = _reshaped_like(value, target.get(key))
    return timm_state


# Official dense key → Hugging Face transformers ConvNextModel / ConvNextV2Model key (first match
# wins); the classifier (``head``) has no place there and is dropped.
_TRANSFORMERS_RULES: tuple[tuple[str, str], ...] = (
    (r"^downsample_layers\.0\.0\.", "embeddings.patch_embeddings."),
    (r"^downsample_layers\.0\.1\.", "embeddings.layernorm."),
    (r"^downsample_layers\.(\d+)\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"encoder.stages.\1.layers.\2.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"encoder.stages.\1.layers.\2.grn.bias"),
    (r"^stages\.(\d+)\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"^norm\.", "layernorm."),
)


def transformers_filter_fn(dense: StateDict, size: Mapping[str, Any]) -> StateDict:
    """Official dense ConvNeXt (V1 or V2) weights of a size (``depths``, ``dims``) → the keys
    of transformers' ``ConvNextModel`` / ``ConvNextV2Model``. The pooled output's ``layernorm``,
    which an FCMAE encoder lacks, is written at its fresh values (weight 1, bias 0); GRN
    parameters are (1, 1, 1, C) there."""
    state: StateDict = {}
    for key, value in dense.items():
        new_key = _first_rename(key, _TRANSFORMERS_RULES)
        if new_key is not None:
            state[new_key] = value.reshape(1, 1, 1, -1) if ".grn." in new_key else value
    width = size["dims"][-1]
    state.setdefault("layernorm.weight", torch.ones(width))
    state.setdefault("layernorm.bias", torch.zeros(width))
    return state


def transformers_layout(model_type: str, architecture: str, **fields: Any) -> TransformersLayout:
    """The transformers layout of a ConvNeXt family: ``config.json`` fields of ``model_type``
    (``convnext``, ``convnextv2``) loaded by ``architecture``, plus the family's own ``fields``."""
    def config(size: Mapping[str, Any]) -> dict[str, Any]:
        return {"architectures": [architecture], "model_type": model_type, "num_channels": 3,
                "patch_size": STEM_STRIDE, "num_stages": len(size["depths"]), "depths": list(size["depths"]),
                "hidden_sizes": list(size["dims"]), "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                "drop_path_rate": 0.0, **fields}
    return TransformersLayout(config=config, filter_fn=transformers_filter_fn)


def _first_rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """``key`` renamed by the first of ``rules`` (pattern, replacement) that changes it; None if none does."""
    for pattern, replacement in rules:
        new_key = re.sub(pattern, replacement, key)
        if new_key != key:
            return new_key
    return None


def _reshaped_like(value: Tensor, reference: Tensor | None) -> Tensor:
    """``value`` in ``reference``'s shape where both hold as many numbers (a classifier of
    another class count stays as it is, for the loader to report)."""
    return value.reshape(reference.shape) if reference is not None and value.numel() == reference.numel() else value


register_family(EncoderFamily(
    name="convnext",
    sizes={size: dict(depths=depths, dims=dims) for size, (depths, dims) in CONVNEXT_SIZES.items()},
    dense=ConvNeXt, encoder=SparseConvNeXt, checkpoint_filter_fn=checkpoint_filter_fn, timm_filter_fn=timm_filter_fn,
    transformers_layout=transformers_layout("convnext", "ConvNextModel", layer_scale_init_value=1e-6)))
