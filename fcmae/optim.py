"""Optimizer parameter groups and the learning-rate schedule (official FCMAE recipe)."""
from __future__ import annotations

import math

import torch
from torch import nn


def exempt_from_decay(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that get no weight decay: every bias and 1-D parameter
    (norm weights, LayerScale), and what the model declares in ``no_weight_decay()`` (as timm)."""
    declared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return {name for name, param in model.named_parameters()
            if param.ndim <= 1 or name.endswith(".bias") or name in declared}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and everything :func:`exempt_from_decay` names."""
    exempt = exempt_from_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_epochs``, then half-cosine to ``min_lr``.

    ``epoch`` is fractional (steps done / steps_per_epoch), so the lr changes every step; the
    engine evaluates it at the end of each step, so the first step trains and the last reaches
    ``min_lr``.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (times its ``lr_scale``, e.g. from layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                             decay_type: str = "single") -> list[dict]:
    """AdamW groups with layer-wise lr decay: a parameter of layer ``i`` gets
    ``lr_scale = layer_decay ** (num_layers + 1 - i)`` (the head keeps the full lr).

    The model provides ``layer_id(name, decay_type)`` and ``num_layers(decay_type)``.
    """
    if decay_type not in ("single", "group"):
        raise ValueError(f"--layer-decay-type must be 'single' or 'group', got {decay_type!r}")
    num_layers = model.num_layers(decay_type)
    exempt_names = exempt_from_decay(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = model.layer_id(name, decay_type)
        exempt = name in exempt_names
        group = groups.setdefault((layer, exempt), {
            "params": [], "weight_decay": 0.0 if exempt else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def layer_decay_param_groups_around(model: nn.Module, encoder: nn.Module, weight_decay: float, layer_decay: float,
                                    decay_type: str = "single") -> list[dict]:
    """AdamW groups for a model built around a dense fcmae ``encoder`` (a detector or a
    segmentation network; e.g. ``feature_backbone(...).body.model``): the encoder's parameters
    as :func:`layer_decay_param_groups` (the stem gets the smallest ``lr_scale``), every other
    parameter of ``model`` (FPN, heads, decoder) ``lr_scale`` 1, biases and 1-D parameters
    without weight decay. Set each group's lr to ``base_lr * lr_scale`` (:func:`set_lr`)."""
    groups = layer_decay_param_groups(encoder, weight_decay, layer_decay, decay_type)
    inside = {id(param) for param in encoder.parameters()}
    outside = [(name, param) for name, param in model.named_parameters()
               if id(param) not in inside and param.requires_grad]
    exempt = exempt_from_decay(model)
    groups += [{"params": [param for name, param in outside if name not in exempt],
                "weight_decay": weight_decay, "lr_scale": 1.0},
               {"params": [param for name, param in outside if name in exempt],
                "weight_decay": 0.0, "lr_scale": 1.0}]
    return [group for group in groups if group["params"]]
