"""Conversion of FCMAE pretraining weights into dense layouts: our dense model (the official
layout), timm's and Hugging Face transformers' (ConvNeXt V1/V2). Each family's key maps live
beside its model (its ``checkpoint_filter_fn``, ``timm_filter_fn`` and ``transformers_layout``);
this module only applies them and writes the files."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .atomic import atomic_folder, atomic_save
from .checkpoint import ENCODER_PREFIX, CheckpointError, is_fcmae_state, save_safetensors
from .data import IMAGENET_MEAN, IMAGENET_STD
from .masking import random_masks
from .models import TransformersLayout, create_encoder, create_model, get_model_entry, list_families, list_models

FORMATS = ("official", "timm", "transformers")


def encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``encoder.*`` part of an FCMAE state dict, prefix removed (a bare encoder as is)."""
    if is_fcmae_state(state):
        return {key[len(ENCODER_PREFIX):]: value for key, value in state.items()
                if key.startswith(ENCODER_PREFIX)}
    return dict(state)


def meta_model(build) -> nn.Module:
    """``build()`` on the meta device: shapes and keys without memory or init time."""
    with torch.device("meta"):
        return build()


def timm_model(model_name: str, **kwargs) -> nn.Module:
    """timm's model of the same name: timm's own for a family that declares a
    ``timm_filter_fn`` (ConvNeXt V1/V2), else ours, which importing ``fcmae`` registers with timm
    (:mod:`fcmae.timm_hub`; InternImage, RevCol: their timm layout is the official one)."""
    return timm.create_model(model_name, pretrained=False, **kwargs)


@functools.cache
def model_shapes(model_name: str, part: str) -> Mapping[str, tuple[int, ...]]:
    """Keys and shapes of ``model_name``'s ``part``: ``"dense"`` (the classifier), ``"encoder"``
    (the sparse FCMAE encoder) or ``"timm"`` (timm's model); built once, on the meta device."""
    build = {"dense": create_model, "encoder": create_encoder, "timm": timm_model}[part]
    state = meta_model(lambda: build(model_name)).state_dict()
    return MappingProxyType({key: tuple(value.shape) for key, value in state.items()})


def in_timm_layout(state: dict[str, Tensor], model_name: str) -> bool:
    """True when ``state`` holds timm's keys for ``model_name`` rather than the official ones."""
    if get_model_entry(model_name).family.timm_filter_fn is None:
        return False
    official, timm_keys = model_shapes(model_name, "dense").keys(), model_shapes(model_name, "timm").keys()
    return bool(state) and not state.keys() <= official and state.keys() <= timm_keys


def encoder_to_dense(encoder: dict[str, Tensor], model_name: str, fmt: str = "official") -> dict[str, Tensor]:
    """FCMAE encoder weights (no ``encoder.`` prefix) of ``model_name`` → the dense model's
    weights in ``fmt`` layout, by the family's checkpoint filters."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    family = get_model_entry(model_name).family
    dense = family.checkpoint_filter_fn(encoder, meta_model(lambda: create_model(model_name)))
    if fmt == "transformers":
        return transformers_layout(model_name).filter_fn(dense, get_model_entry(model_name).size_kwargs)
    return dense_to_timm(dense, model_name) if fmt == "timm" else dense


def transformers_layout(model_name: str) -> TransformersLayout:
    """The family's transformers layout; a clear error for a family transformers does not have."""
    layout = get_model_entry(model_name).family.transformers_layout
    if layout is None:
        with_layout = sorted(family.name for family in list_families() if family.transformers_layout is not None)
        raise ValueError(f"--format transformers: transformers has no {model_name} architecture (only "
                         f"{', '.join(with_layout)}); use --format timm (any family) or official")
    return layout


def dense_to_timm(dense: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Official-layout dense weights of ``model_name`` → timm's layout (the family's ``timm_filter_fn``;
    the same layout for the families registered with timm by fcmae)."""
    to_timm = get_model_entry(model_name).family.timm_filter_fn
    return dict(dense) if to_timm is None else to_timm(dense, meta_model(lambda: timm_model(model_name)))


def infer_model_name(encoder: dict[str, Tensor]) -> str:
    """The registered model whose sparse encoder has exactly these keys and shapes."""
    found = {key: tuple(value.shape) for key, value in encoder.items()}
    for name in list_models():
        if model_shapes(name, "encoder") == found:
            return name
    raise CheckpointError(f"the checkpoint's encoder ({len(found)} tensors) matches no known model "
                          f"({', '.join(list_models())}); is it an FCMAE checkpoint?")


def convert_state(state: dict[str, Tensor], model_name: str | None = None,
                  fmt: str = "official", named_by: str = "--model") -> tuple[dict[str, Tensor], str]:
    """FCMAE checkpoint weights → (dense encoder weights in ``fmt`` layout, model name).
    ``model_name``, where given, must be the model the weights hold (``named_by`` says where
    the name came from, for the message)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    inferred = fcmae_model_name(state, model_name, named_by)
    return encoder_to_dense(encoder_state(state), inferred, fmt), inferred


def fcmae_model_name(state: dict[str, Tensor], model_name: str | None = None, named_by: str = "--model") -> str:
    """The model whose encoder FCMAE weights (or a bare encoder) hold, by their shapes;
    ``model_name``, where given, must be it (``named_by`` says where the name came from)."""
    inferred = infer_model_name(encoder_state(state))
    if model_name is not None and model_name != inferred:
        raise CheckpointError(f"{named_by} names {model_name!r}, but the checkpoint's encoder is {inferred!r}")
    return inferred


class LastHiddenState(nn.Module):
    """A transformers ConvNeXt model seen as a dense model: ``forward_features`` (B, 3, H, W) →
    its ``last_hidden_state`` (B, C, H/32, W/32), the last stage's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).last_hidden_state


def transformers_model(model_name: str, state: dict[str, Tensor]) -> nn.Module:
    """transformers' model of ``model_name`` (its class named in the layout's config) with
    ``state`` loaded strictly. Needs the optional ``transformers`` (``pip install "fcmae[hf]"``)."""
    try:
        import transformers  # optional extra, imported only where a transformers model is built
    except ImportError as error:
        raise ValueError('building a transformers model needs transformers: pip install "fcmae[hf]"') from error
    config = transformers_config(model_name)
    model = getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))
    model.load_state_dict(state, strict=True)
    return model


def transformers_config(model_name: str, input_size: int = 224) -> dict[str, Any]:
    """The ``config.json`` of ``model_name``'s transformers export."""
    return transformers_layout(model_name).config(get_model_entry(model_name).size_kwargs) | {"image_size": input_size}


def build_dense(model_name: str, fmt: str, dense_state: dict[str, Tensor]) -> nn.Module:
    """A dense model of ``fmt`` (ours = official layout, timm's, or transformers' seen through
    :class:`LastHiddenState`) with ``dense_state`` loaded; only its head (final norm,
    classifier) may be missing."""
    if fmt == "transformers":
        return LastHiddenState(transformers_model(model_name, dense_state))
    model = timm_model(model_name) if fmt == "timm" else create_model(model_name)
    head_prefixes = getattr(model, "head_prefixes", ("head.",))     # timm's own ConvNeXt: its head
    missing, unexpected = model.load_state_dict(dense_state, strict=False)
    missing_body = [key for key in missing if not key.startswith(head_prefixes)]
    if unexpected or missing_body:
        raise CheckpointError(f"converted weights do not fit {fmt} {model_name}: "
                              f"missing {missing_body[:3]}, unexpected {unexpected[:3]}")
    return model


@torch.no_grad()
def verify(sparse_state: dict[str, Tensor], dense_state: dict[str, Tensor], model_name: str,
           fmt: str = "official", batch_size: int = 2, input_size: int = 128,
           mask_ratio: float = 0.6, seed: int = 0) -> float:
    """Max abs difference between the sparse encoder (from ``sparse_state``) and the dense
    model (from ``dense_state``) on a random batch.

    Checked twice: without a mask (sparse encoder == dense ``forward_features``) and, for
    the official layout, with a random mask against the masked-dense forward at visible sites.
    """
    generator = torch.Generator().manual_seed(seed)
    encoder = create_encoder(model_name).eval()
    encoder.load_state_dict(encoder_state(sparse_state))
    dense = build_dense(model_name, fmt, dense_state).eval()
    imgs = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
    num_patches = (input_size // encoder.patch_size) ** 2
    no_mask = torch.zeros(batch_size, num_patches)
    worst = (encoder(imgs, no_mask) - dense.forward_features(imgs)).abs().max().item()
    if fmt == "official":
        mask = random_masks(batch_size, num_patches, mask_ratio, generator=generator)
        worst = max(worst, (encoder(imgs, mask) - dense.forward_features(imgs, mask)).abs().max().item())
    return worst


EXPORT_FOLDER_FILES = frozenset({"model.safetensors", "config.json", "preprocessor_config.json"})


def is_export_folder(folder: Path) -> bool:
    """True when ``folder`` holds nothing but what :func:`write_timm_folder` or
    :func:`write_transformers_folder` write (or nothing): the only kind of folder
    ``fcmae-convert --force`` may replace."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return {entry.name for entry in folder.iterdir()} <= EXPORT_FOLDER_FILES


def write_timm_folder(timm_state: dict[str, Tensor], model_name: str, folder: Path, input_size: int = 224) -> None:
    """A timm model folder: ``model.safetensors`` (a head-less model, ``num_classes=0``; what
    the encoder lacks, e.g. timm ConvNeXt's final ``head.norm``, keeps its fresh values so the
    folder loads strictly) and the
    ``config.json`` timm reads for ``local-dir:`` models (architecture, ``num_features``,
    ``pretrained_cfg`` describing these weights). Written here rather than by timm's hub export,
    which needs huggingface_hub and differs across the supported timm versions."""
    model = timm_model(model_name, num_classes=0)
    missing, unexpected = model.load_state_dict(timm_state, strict=False)
    fresh = getattr(model, "head_prefixes", ("head.norm.",))   # timm's ConvNeXt: its final norm; ours: the head
    if unexpected or any(not key.startswith(fresh) for key in missing):
        raise CheckpointError(f"converted weights do not fit timm {model_name}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    pretrained_cfg = {key: value for key, value in model.pretrained_cfg.items()
                      if value is not None and key not in (
                          "url", "hf_hub_id", "file", "state_dict", "source", "architecture", "license",
                          "tag", "test_input_size", "test_crop_pct")}   # those describe timm's own weights
    pretrained_cfg |= {"tag": "fcmae", "num_classes": 0, "input_size": [3, input_size, input_size],
                       "pool_size": [input_size // 32, input_size // 32]}
    config = {"architecture": model_name, "num_classes": 0, "num_features": model.num_features,
              "global_pool": "avg", "pretrained_cfg": pretrained_cfg}
    save_safetensors(model.state_dict(), folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_transformers_folder(state: dict[str, Tensor], model_name: str, folder: Path, input_size: int = 224) -> None:
    """A Hugging Face transformers model folder that ``ConvNextModel`` / ``ConvNextV2Model``
    ``.from_pretrained(folder)`` loads with transformers alone: ``config.json`` (the layout's
    fields, ``image_size`` the training input size), ``model.safetensors`` (every key of the
    model; the pooled output's norm fresh) and the ``preprocessor_config.json`` of
    ``ConvNextImageProcessor`` (ImageNet mean/std, resize to ``input_size``). Written without
    importing transformers."""
    preprocessor = {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": input_size}, "crop_pct": 0.875, "resample": 3,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    save_safetensors(state, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(transformers_config(model_name, input_size), indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def save_converted(dense_state: dict[str, Tensor], model_name: str, fmt: str, output: Path,
                   input_size: int = 224) -> str:
    """Write converted weights atomically; the kind of file follows ``output``'s name:

    * ``*.safetensors``: the tensors, with ``model_name``, ``format`` and the training
      ``input_size`` as metadata;
    * no suffix, with ``fmt='timm'``: a timm model folder (:func:`write_timm_folder`) that
      ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads; with
      ``fmt='transformers'``: a transformers model folder (:func:`write_transformers_folder`);
    * anything else: ``torch.save`` (official: ``{'model': ..., 'model_name', 'input_size'}``;
      timm: a bare state dict).

    Returns what was written, in words."""
    output = Path(output)
    if output.suffix == ".safetensors":
        save_safetensors(dense_state, output, {"model_name": model_name, "format": f"{fmt}-dense",
                                               "input_size": str(input_size)})
        return f"{fmt} safetensors file"
    if output.suffix == "":
        if fmt == "official":
            raise ValueError(f"{output} has no file suffix: a model folder is written for --format timm or "
                             "transformers; name a .pth or .safetensors file")
        write = write_timm_folder if fmt == "timm" else write_transformers_folder
        atomic_folder(output, lambda folder: write(dense_state, model_name, folder, input_size))
        return f"{fmt} model folder ({', '.join(sorted(entry.name for entry in output.iterdir()))})"
    atomic_save(dense_state if fmt != "official" else
                {"model": dense_state, "model_name": model_name, "format": "official-dense",
                 "input_size": input_size}, output)
    return f"{fmt} .pth file"
