"""Encoders as backbones of the detection and segmentation libraries people already use.

:func:`feature_backbone` gives any weights fcmae reads (every family) torchvision's backbone
interface — ``out_channels`` and a forward returning an ordered dict of feature maps — so that
``torchvision.models.detection.FasterRCNN`` / ``MaskRCNN`` take it unchanged. Segmentation goes
through timm encoders (``segmentation_models_pytorch``'s ``tu-`` encoders; InternImage and
RevCol are registered with timm by :mod:`fcmae.timm_hub`). No detector or decoder of our own.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .weights import load_encoder


class StageFeatures(nn.Module):
    """A dense model's stage outputs ``out_indices`` as ``{"0": (B, C_i, H/s_i, W/s_i), …}``."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.out_indices = tuple(out_indices)
        self.channels = [model.stage_channels[index] for index in self.out_indices]
        self.strides = [model.feature_strides[index] for index in self.out_indices]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        stages = self.model.forward_stages(x)
        return OrderedDict((str(position), stages[index]) for position, index in enumerate(self.out_indices))


class FeatureBackbone(nn.Module):
    """torchvision's backbone interface: ``out_channels`` and ``forward(x)`` → ordered dict of
    maps, each ``out_channels`` wide (an FPN over the stages, plus a max-pooled level, as
    torchvision's ``BackboneWithFPN``), or the last chosen stage alone without FPN."""

    def __init__(self, body: StageFeatures, fpn: bool = True, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool()) if fpn else None
        self.out_channels = out_channels if fpn else body.channels[-1]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        features = self.body(x)
        if self.fpn is not None:
            return self.fpn(features)
        return OrderedDict([("0", next(reversed(features.values())))])


def feature_backbone(weights: str | os.PathLike, out_indices: Sequence[int] = (0, 1, 2, 3), fpn: bool = True,
                     out_channels: int = 256, model_name: str | None = None, **model_kwargs) -> FeatureBackbone:
    """A detection backbone from ``weights`` (any file fcmae reads, or ``random:MODEL``): the
    dense encoder's stages ``out_indices`` (all four by default, strides 4–32: with the FPN's
    max-pooled level, the five maps "0"–"3", "pool" that torchvision's default anchors and RoI
    pooling expect) with an FPN of ``out_channels`` (``fpn=False``: the last stage alone). In training mode after
    ``.train()``; its drop path is the model's (set ``drop_path_rate`` in ``model_kwargs``)."""
    model, _ = load_encoder(weights, model_name, **model_kwargs)
    return FeatureBackbone(StageFeatures(model, out_indices), fpn, out_channels)
