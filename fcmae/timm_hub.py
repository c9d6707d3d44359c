"""The dense models timm does not have (InternImage, RevCol), registered with timm's model
registry when ``fcmae`` is imported, so that ``timm.create_model`` builds them — with
``features_only=True`` (timm's feature-getter route, through :meth:`forward_intermediates`)
and with weights from a file (``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``:
any dense or FCMAE weights fcmae writes, converted on loading). ConvNeXt V1/V2 stay timm's
own models (their weights reach timm through ``fcmae-convert --format timm``).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .checkpoint import is_fcmae_state
from .convert import encoder_state, encoder_to_dense
from .data import IMAGENET_MEAN, IMAGENET_STD
from .models import get_model_entry, list_families
from .models.registry import StateDict

default_cfgs: dict[str, dict[str, Any]] = {}   # read by timm's register_model, by model name


def load_filter(state: StateDict, model: nn.Module) -> StateDict:
    """timm's ``pretrained_filter_fn``: FCMAE weights converted to the dense layout
    (:func:`~fcmae.convert.encoder_to_dense`); parts of ``model`` the file lacks (the classifier
    of head-less weights) keep their fresh values, so loading stays strict for the rest."""
    if is_fcmae_state(state):
        state = encoder_to_dense(encoder_state(state), model.pretrained_cfg["architecture"])
    own = model.state_dict()
    return {**{key: value for key, value in own.items() if key.startswith(model.head_prefixes)},
            **{key: value for key, value in state.items() if key in own}}


def _entrypoint(model_name: str) -> Callable[..., nn.Module]:
    build_dense = get_model_entry(model_name).build_dense

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_model_with_cfg(build_dense, model_name, pretrained, pretrained_filter_fn=load_filter,
                                    feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **kwargs)
    create.__name__, create.__module__ = model_name, __name__
    create.__qualname__ = model_name
    return create


def _first_conv_and_classifier(model_name: str) -> tuple[str, str]:
    """Module names timm's config records: the first convolution and the final classifier."""
    with torch.device("meta"):
        model = get_model_entry(model_name).build_dense()
    modules = list(model.named_modules())
    first_conv = next(name for name, module in modules if isinstance(module, nn.Conv2d))
    classifier = [name for name, module in modules if isinstance(module, nn.Linear)
                  and f"{name}.".startswith(model.head_prefixes)][-1]
    return first_conv, classifier


def register_with_timm() -> list[str]:
    """Register every model of a family timm has no layout for (``timm_filter_fn`` None);
    returns their names. Registers once per process (timm warns on a second registration)."""
    if default_cfgs:
        return list(default_cfgs)
    names = []
    for family in list_families():
        if family.timm_filter_fn is not None:
            continue
        # module names are the same in every size: found once per family, on its first size
        first_conv, classifier = _first_conv_and_classifier(f"{family.name}_{next(iter(family.sizes))}")
        for size in family.sizes:
            name = f"{family.name}_{size}"
            default_cfgs[name] = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                                      crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                      first_conv=first_conv, classifier=classifier, license="", tag="")
            entry = _entrypoint(name)
            setattr(sys.modules[__name__], name, entry)
            register_model(entry)
            names.append(name)
    return names
