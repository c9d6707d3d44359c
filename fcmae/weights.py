"""Any weights this project writes or reads, as a dense encoder — and its features.

``load_encoder(source)`` accepts an FCMAE pretraining checkpoint (ours or official, any
family, ``.pth`` or ``.safetensors``), a converted dense file (official layout, ours), a timm
state dict or ``fcmae-convert --format timm`` folder of a family timm has, a fine-tuning
checkpoint, or ``random:MODEL`` for a freshly initialised network. The model name is read
from the file or inferred from its tensor shapes.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .autoencoder import create_fcmae
from .convert import (
    ENCODER_PREFIX,
    encoder_state,
    encoder_to_dense,
    fcmae_model_name,
    in_timm_layout,
    infer_model_name,
    meta_model,
    model_shapes,
    timm_model,
)
from .models import create_model, get_model_entry, list_models

RANDOM_PREFIX = "random:"


def _shapes(state: dict[str, Tensor], skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items() if not key.startswith(skip)}


@functools.cache
def _head_prefixes(model_name: str) -> tuple[str, ...]:
    return meta_model(lambda: create_model(model_name)).head_prefixes


def infer_dense_model_name(state: dict[str, Tensor]) -> str:
    """The registered model whose dense network (head aside) has exactly these tensors."""
    for name in list_models():
        head = _head_prefixes(name)
        if {key: shape for key, shape in model_shapes(name, "dense").items() if not key.startswith(head)} == \
                _shapes(state, head):
            return name
    raise ckpt.CheckpointError(f"the weights ({len(state)} tensors) fit no known model's encoder or dense "
                               f"network ({', '.join(list_models())})")


def timm_to_dense(state: dict[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """timm-layout weights of ``model_name`` → the official dense layout (the inverse of the
    family's ``timm_filter_fn``, found by applying it to the dense model's own keys)."""
    dense = meta_model(lambda: create_model(model_name)).state_dict()
    mapped = get_model_entry(model_name).family.timm_filter_fn(dense, meta_model(lambda: timm_model(model_name)))
    official_key = dict(zip(mapped, dense))                        # timm key → official key, same order
    return {official_key[key]: value.reshape(dense[official_key[key]].shape)
            for key, value in state.items() if key in official_key}


def trained_input_size(checkpoint: dict, folder: Path | None = None) -> int | None:
    """The image side the weights were trained at, where the file says: a training run's saved
    ``args``, ``input_size`` written by ``fcmae-convert`` (also as safetensors metadata), or a
    timm folder's ``config.json``; None where nothing says (e.g. official files)."""
    value = ckpt.saved_args(checkpoint).get("input_size") or checkpoint.get("input_size")
    if value is None and folder is not None and (folder / "config.json").is_file():
        try:
            value = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"][-1]
        except (ValueError, KeyError, IndexError, TypeError):
            value = None
    try:
        size = int(value)
    except (TypeError, ValueError):
        return None
    return size if 32 <= size <= 8192 and size % 32 == 0 else None


def saved_model_name(checkpoint: dict, source: str | os.PathLike) -> str | None:
    """The ``model_name`` entry of a checkpoint, checked like user input: a registered model
    name, or None where the file has none."""
    name = checkpoint.get("model_name")
    if name is None:
        return None
    if not isinstance(name, str) or name not in list_models():
        raise ckpt.CheckpointError(f"{str(source)!r} names its model {str(name)[:60]!r}, which is not a known model "
                                   f"({', '.join(list_models())}); pass --model")
    return name


def saved_mask_ratio(checkpoint: dict) -> float | None:
    """The mask ratio a pretraining checkpoint was trained with, where its saved args hold a
    usable one (a number strictly between 0 and 1); None otherwise."""
    value = ckpt.saved_args(checkpoint).get("mask_ratio")
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        return None
    return ratio if 0 < ratio < 1 else None


@dataclass
class WeightsFile:
    """A weights file as every command reads it (:func:`read_weights`): what it holds, checked.

    ``kind``: ``"fcmae"`` (a whole FCMAE: ``encoder.*`` and, usually, the decoder), ``"encoder"``
    (a bare sparse encoder), ``"dense"`` (the official dense layout: converted, fine-tuned or
    official weights) or ``"timm"`` (timm's layout, a file or an ``fcmae-convert --format timm``
    folder). ``state`` is the file's tensors as they are; ``input_size`` the image side they
    were trained at (None where the file does not say); ``settings`` the run's saved settings."""

    source: str
    kind: str
    state: dict[str, Tensor]
    model_name: str
    input_size: int | None
    settings: dict[str, Any]
    checkpoint: dict[str, Any]

    @property
    def is_pretraining(self) -> bool:
        return self.kind in ("fcmae", "encoder")

    def dense_state(self) -> dict[str, Tensor]:
        """The weights in the official dense layout (FCMAE encoders converted, timm mapped back)."""
        if self.is_pretraining:
            return encoder_to_dense(encoder_state(self.state), self.model_name)
        if self.kind == "timm":
            return timm_to_dense(self.state, self.model_name)
        return self.state


def read_weights(source: str | os.PathLike, model_name: str | None = None) -> WeightsFile:
    """The one reader of weight files: a checkpoint (``.pth``/``.safetensors``) or a timm export
    folder, read safely (``weights_only``), its tensors finite, its model found — ``model_name``
    (``--model``) where given, which must then be what the file holds, else the file's own
    ``model_name`` entry (checked), else inferred from the tensor shapes — and what kind of
    weights it holds (see :class:`WeightsFile`)."""
    path = Path(source)
    folder = path if path.is_dir() else None
    checkpoint = ckpt.load_checkpoint(path)
    state = ckpt.state_dict_of(checkpoint)
    named_by = "--model" if model_name else f"the file's model_name entry ({path})"
    model_name = model_name or saved_model_name(checkpoint, path)
    found = WeightsFile(str(source), "", state, "", trained_input_size(checkpoint, folder),
                        ckpt.saved_args(checkpoint), checkpoint)
    if ckpt.is_fcmae_state(state):
        found.model_name = fcmae_model_name(state, model_name, named_by)   # checked, not converted yet
        found.kind = "fcmae"
        return found
    if model_name is not None and model_shapes(model_name, "encoder") == _shapes(state):   # a bare sparse encoder
        found.model_name, found.kind = model_name, "encoder"
        return found
    if model_name is None:
        try:
            found.model_name, found.kind = infer_model_name(state), "encoder"
            return found
        except ckpt.CheckpointError:
            pass
        timm_names = [name for name in list_models() if get_model_entry(name).family.timm_filter_fn is not None
                      and in_timm_layout(state, name)]
        model_name = timm_names[0] if timm_names else infer_dense_model_name(state)
    get_model_entry(model_name)
    found.model_name = model_name
    found.kind = "timm" if in_timm_layout(state, model_name) else "dense"
    return found


def load_dense_state(source: str | os.PathLike,
                     model_name: str | None = None) -> tuple[dict[str, Tensor], str, int | None]:
    """(official-layout dense weights, model name, the image side they were trained at or None)
    of any weights file (:func:`read_weights`)."""
    found = read_weights(source, model_name)
    return found.dense_state(), found.model_name, found.input_size


def load_encoder(source: str | os.PathLike, model_name: str | None = None, seed: int = 0,
                 **model_kwargs) -> tuple[nn.Module, str]:
    """A dense model (no classifier, eval mode) with the encoder weights of ``source`` (see the
    module docstring; ``random:MODEL`` for random init, drawn from ``seed`` without touching the
    global random streams). Returns (model, model name).

    ``model.forward_features(images)`` → (B, C, H/32, W/32); see :func:`extract_features`.
    ``model.pretrained_cfg["input_size"]`` is (3, S, S) with the side S the weights were
    trained at (timm's convention), or None where the file does not say."""
    if str(source).startswith(RANDOM_PREFIX):
        model_name = str(source)[len(RANDOM_PREFIX):]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(model_name, num_classes=0, **model_kwargs).eval()
        model.pretrained_cfg = {"input_size": None}
        return model, model_name
    state, model_name, input_size = load_dense_state(source, model_name)
    model = create_model(model_name, num_classes=0, **model_kwargs)
    ckpt.load_body(model, state, model_name, source)
    model.pretrained_cfg = {"input_size": (3, input_size, input_size) if input_size else None}
    return model.eval(), model_name


def trained_size(model: nn.Module) -> int | None:
    """The image side ``model``'s weights were trained at (set by :func:`load_encoder`), or None."""
    trained = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return trained[-1] if trained else None


def input_size_for(model: nn.Module, requested: int | None, default: int = 224) -> tuple[int, str]:
    """The image side to evaluate ``model`` at, and where it came from: ``requested`` (the
    command line), else the side its weights were trained at, else ``default``."""
    if requested:
        return requested, "--input-size"
    trained = trained_size(model)
    if trained:
        return trained, "the weights' training size"
    return default, "default; the weights do not say"


@torch.no_grad()
def extract_features(model: nn.Module, images: Tensor, pooled: bool = True,
                     per_stage: bool = False) -> Tensor | list[Tensor]:
    """Encoder features of ``images`` (B, 3, H, W), normalised as in training: pooled
    (B, C) (global average) or the final map (B, C, H/32, W/32) with ``pooled=False``.

    ``per_stage=True``: a list with one entry per stage instead (``model.forward_stages``),
    (B, C_i) pooled or (B, C_i, H/s_i, W/s_i) at strides ``model.feature_strides``."""
    if not per_stage:
        features = model.forward_features(images)
        return features.mean(dim=(-2, -1)) if pooled else features
    maps = model.forward_stages(images)
    return [feature.mean(dim=(-2, -1)) for feature in maps] if pooled else maps


def load_fcmae(source: str | os.PathLike, model_name: str | None = None) -> tuple[nn.Module, str, dict]:
    """An FCMAE pretraining checkpoint (ours or official, any family) as an FCMAE model in eval
    mode, decoder included (its width and depth read from the weights). Returns (model, model
    name, the settings the file records, each checked and None where it has no usable one:
    ``input_size``, ``mask_ratio``). Everything read from the file is checked like user input
    before a model is built from it."""
    found = read_weights(source, model_name)
    state = found.state
    if found.kind != "fcmae" or "proj.weight" not in state:
        raise ckpt.CheckpointError(f"{str(source)!r} holds {KIND_WORDS[found.kind]}, not an FCMAE encoder + decoder; "
                                   f"pass a pretraining checkpoint (fcmae-pretrain's checkpoint-last.pth or an "
                                   f"official FCMAE file)")
    decoder_dim, decoder_depth = decoder_shape(state, source)
    norm_pix_loss = found.settings.get("norm_pix_loss", True)
    model = create_fcmae(found.model_name, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                         norm_pix_loss=norm_pix_loss if isinstance(norm_pix_loss, bool) else True)
    ckpt.check_compatible(model.state_dict(), state, found.model_name, found.checkpoint.get("model_name"), source)
    model.load_state_dict(state)
    settings = {"input_size": found.input_size, "mask_ratio": saved_mask_ratio(found.checkpoint)}
    return model.eval(), found.model_name, settings


KIND_WORDS = {"fcmae": "FCMAE pretraining weights", "encoder": "a bare sparse FCMAE encoder",
              "dense": "dense (converted, fine-tuned or official) weights", "timm": "timm-layout weights"}


def read_pretraining_weights(source: str | os.PathLike, command: str, model_name: str | None = None) -> WeightsFile:
    """:func:`read_weights` for a command that needs pretraining weights (an FCMAE or its
    sparse encoder: ``--init``, ``fcmae-convert``); dense or timm weights are refused, saying
    where they go instead."""
    found = read_weights(source, model_name)
    if not found.is_pretraining:
        raise ckpt.CheckpointError(f"{str(source)!r} holds {KIND_WORDS[found.kind]}, not an FCMAE checkpoint: "
                                   f"{command} takes fcmae-pretrain's checkpoint or an official FCMAE file; dense "
                                   f"weights are for fcmae-finetune --finetune, fcmae-knn and fcmae-analyze")
    return found


MAX_DECODER_DIM, MAX_DECODER_DEPTH = 8192, 64


def decoder_shape(state: dict[str, Tensor], source: str | os.PathLike) -> tuple[int, int]:
    """(decoder width, decoder depth) of FCMAE weights, from ``proj.weight`` (dim, C, 1, 1) and
    the ``decoder.N.*`` blocks; a shape no decoder has is a :class:`CheckpointError`."""
    proj = state["proj.weight"]
    blocks = {key.split(".")[1] for key in state if key.startswith("decoder.")}
    if proj.ndim != 4 or not 0 < proj.shape[0] <= MAX_DECODER_DIM or tuple(proj.shape[2:]) != (1, 1):
        raise ckpt.CheckpointError(f"{str(source)!r}: proj.weight has shape {tuple(proj.shape)}, not a decoder's "
                                   f"(dim, channels, 1, 1) with dim <= {MAX_DECODER_DIM}; the file is damaged")
    if not all(block.isdigit() for block in blocks) or sorted(map(int, blocks)) != list(range(len(blocks))) \
            or not 0 < len(blocks) <= MAX_DECODER_DEPTH:
        raise ckpt.CheckpointError(f"{str(source)!r}: decoder blocks {sorted(blocks)[:5]} are not 0..N-1 with "
                                   f"1 <= N <= {MAX_DECODER_DEPTH}; the file is damaged")
    return proj.shape[0], len(blocks)


def init_from_fcmae(model: nn.Module, weights: WeightsFile, model_name: str) -> str:
    """Load pretraining ``weights`` (:func:`read_pretraining_weights`, read before any data;
    ours or the official ConvNeXt-V2 layout) into the FCMAE ``model`` to continue pretraining:
    encoder and decoder where the file has both, the encoder alone for a decoder-less file.
    Optimizer, schedule and step start fresh.

    Returns what was loaded, in words; raises :class:`CheckpointError` for another model."""
    encoder = encoder_state(weights.state)
    ckpt.check_compatible(model.encoder.state_dict(), encoder, model_name, weights.model_name, weights.source)
    decoder = {key: value for key, value in weights.state.items() if not key.startswith(ENCODER_PREFIX)}
    if weights.kind == "encoder" or not decoder:
        model.encoder.load_state_dict(encoder)
        return "encoder only (the file has no decoder; the decoder starts fresh)"
    own_decoder = {key: value for key, value in model.state_dict().items()
                   if not key.startswith(ENCODER_PREFIX)}
    if {k: v.shape for k, v in own_decoder.items()} != {k: v.shape for k, v in decoder.items()}:
        raise ckpt.CheckpointError(f"the decoder in {weights.source!r} ({_decoder_size(decoder)}) differs from this "
                                   f"run's ({_decoder_size(own_decoder)}); pass matching --decoder-dim/--decoder-depth")
    model.load_state_dict(weights.state)
    return "encoder and decoder"


def _decoder_size(decoder: dict[str, Tensor]) -> str:
    dim = decoder["proj.weight"].shape[0] if "proj.weight" in decoder else "?"
    depth = len({key.split(".")[1] for key in decoder if key.startswith("decoder.")})
    return f"dim {dim}, depth {depth}"
