"""Checkpoint layouts: sparse FCMAE encoder (official MinkowskiEngine layout) → dense
ConvNeXt V2 (official layout) → timm layout. The key maps live here and nowhere else."""
from __future__ import annotations

import re

from torch import Tensor

from sparse_ops.layout import conv_kernel_to_weight, depthwise_kernel_to_weight

ENCODER_PREFIX = "encoder."


def sparse_to_dense_state_dict(sparse: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official conversion rules. ``sparse`` holds FCMAE keys (with or without ``encoder.``);
    decoder keys (``proj``, ``mask_token``, ``decoder``, ``pred``) are dropped.

    * ``*.kernel`` (k·k, C) → depthwise ``weight`` (C, 1, k, k);
      (k·k, C_in, C_out) → ``weight`` (C_out, C_in, k, k)
    * ``.ln.`` / ``.linear.`` path components are dropped
    * biases (1, C) → (C,); ``grn.gamma``/``grn.beta`` (1, C) → (1, 1, 1, C)
    """
    dense: dict[str, Tensor] = {}
    has_prefix = any(key.startswith(ENCODER_PREFIX) for key in sparse)
    for key, value in sparse.items():
        if has_prefix:
            if not key.startswith(ENCODER_PREFIX):
                continue
            key = key[len(ENCODER_PREFIX):]
        key = key.replace(".ln.", ".").replace(".linear.", ".")
        if key.endswith(".kernel"):
            key = key[: -len("kernel")] + "weight"
            value = depthwise_kernel_to_weight(value) if value.ndim == 2 else conv_kernel_to_weight(value)
        elif re.search(r"\.grn\.(gamma|beta)$", key):
            value = value.reshape(1, 1, 1, -1)
        elif key.endswith(".bias") and value.ndim == 2 and value.shape[0] == 1:
            value = value.reshape(-1)
        dense[key] = value
    return dense


# Official dense key → timm key, applied in order (first match wins).
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


def dense_to_timm_state_dict(dense: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official dense ConvNeXt V2 keys → timm ``convnextv2_*`` keys.

    timm keeps the MLP as 1×1 convs, so ``pwconv`` weights (out, in) become (out, in, 1, 1),
    and GRN parameters (1, 1, 1, C) become (C,).
    """
    timm_state: dict[str, Tensor] = {}
    for key, value in dense.items():
        for pattern, replacement in _TIMM_RULES:
            new_key = re.sub(pattern, replacement, key)
            if new_key != key:
                key = new_key
                break
        for pattern, replacement in _TIMM_BLOCK_RULES:
            key = re.sub(pattern, replacement, key)
        if ".mlp.fc" in key and key.endswith("weight"):
            value = value[:, :, None, None]
        elif ".mlp.grn." in key:
            value = value.reshape(-1)
        timm_state[key] = value
    return timm_state
