"""One registry for every architecture, and the contract an encoder family fulfils.

A family (ConvNeXt V2, InternImage, ...) is one model file that ends with one
:func:`register_family` call; nothing else in the package names it. The shared code
(optimizer groups, conversion, training, CLIs, benchmarks) only uses what the contract below
declares.
"""
from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

import sparse_ops

StateDict = dict[str, Tensor]


@runtime_checkable
class DenseModel(Protocol):
    """What a family's dense classifier provides (its ``nn.Module`` subclass).

    * ``patch_size``: the FCMAE patch side in pixels (the network's total stride, 32).
    * ``feature_strides``: the stride of each stage's output, e.g. (4, 8, 16, 32).
    * ``num_features``: channels of ``forward_features``' output.
    * ``head_prefixes``: state-dict prefixes of the parts an FCMAE encoder lacks (final norm,
      classifier): they start fresh when fine-tuning from pretrained weights.
    """

    patch_size: int
    feature_strides: tuple[int, ...]
    num_features: int
    head_prefixes: tuple[str, ...]

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) → (B, num_features, H/32, W/32). With a patch ``mask`` (B, L), 1 =
        removed, the masked-dense FCMAE reference: zero at removed patches, nothing from them
        reaching a visible site."""

    def forward_stages(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Every stage's output (B, C_i, H/s_i, W/s_i), ``s_i`` in ``feature_strides``; the last
        is ``forward_features``."""

    def num_layers(self, decay_type: str = "single") -> int:
        """Depth for layer-wise lr decay ('single': per block; 'group': the family's grouping)."""

    def layer_id(self, param_name: str, decay_type: str = "single") -> int:
        """Layer of a parameter for layer-wise lr decay: 0 (stem) … ``num_layers() + 1`` (head)."""

    def no_weight_decay(self) -> set[str]:
        """Names of parameters with more than one dimension that are exempt from weight decay
        (every bias and 1-D parameter is exempt anyway, as in timm)."""


@runtime_checkable
class FCMAEEncoder(Protocol):
    """What a family's FCMAE encoder provides: ``encoder(imgs, mask, num_visible=None)``, imgs
    (B, 3, H, W), mask (B, L) with 1 = removed patch → (B, num_features, H/32, W/32), zero at
    removed patches. ``num_visible``: the number of patches every image keeps when the caller
    knows it without reading the mask (FCMAE's own draws), so that sparse sites are built with
    static shapes (one graph under ``torch.compile``); an encoder that computes every site may
    ignore it. ``patch_size``, ``feature_strides``, ``num_features`` and ``no_weight_decay()``
    as :class:`DenseModel`."""

    patch_size: int
    feature_strides: tuple[int, ...]
    num_features: int

    def __call__(self, imgs: Tensor, mask: Tensor, num_visible: int | None = None) -> Tensor: ...

    def no_weight_decay(self) -> set[str]: ...


@dataclass(frozen=True)
class AnalysisPoint:
    """One block of a dense model for the feature-collapse analysis (``fcmae-analyze``).

    ``expansion``: the layer whose input is the block's MLP expansion activation (after GELU,
    and GRN where the block has one), channels-last (B, H, W, 4C); ``block``: the block itself,
    whose output is channels-last when ``block_channels_last``. Dense models that support the
    analysis return their blocks in order from ``analysis_points()``."""

    name: str
    stage: int
    block: nn.Module
    expansion: nn.Module
    block_channels_last: bool = False


def same_keys(state: StateDict, model: nn.Module) -> StateDict:
    """The checkpoint filter of a family whose encoder has its dense model's keys and shapes."""
    return dict(state)


@dataclass(frozen=True)
class FamilyOption:
    """A constructor option a family puts on the command line (e.g. InternImage's ``--dcn-impl``).

    ``to_kwargs(value, device_type)`` turns the flag's value into constructor keyword arguments,
    or raises a ``ValueError`` saying what works on that device."""

    flag: str
    help: str
    choices: tuple[str, ...]
    to_kwargs: Callable[[str, str], dict[str, Any]]
    commands: tuple[str, ...] = ("pretrain", "finetune")   # the commands that offer it

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class TransformersLayout:
    """How a family's dense weights become a Hugging Face transformers model folder.

    ``config(size_kwargs)``: the ``config.json`` fields of a size (``model_type`` and
    ``architectures`` included), written without importing transformers; ``filter_fn``:
    ``(dense_state, size_kwargs) -> state``: official dense layout → the transformers model's
    keys, complete (parts the encoder lacks, e.g. the pooled output's norm, at their fresh
    values) so that ``from_pretrained`` loads without a missing key."""

    config: Callable[[Mapping[str, Any]], dict[str, Any]]
    filter_fn: Callable[[StateDict, Mapping[str, Any]], StateDict]


@dataclass(frozen=True)
class EncoderFamily:
    """Everything the shared code needs to know about one architecture family.

    Attributes:
        name: model names are ``{name}_{size}``.
        sizes: size → constructor keyword arguments (depths, widths, ...).
        dense: builds the dense classifier (:class:`DenseModel`) from a size's kwargs.
        encoder: builds the FCMAE encoder (:class:`FCMAEEncoder`) from a size's kwargs and
            ``backend=``; a family without a sparse path refuses any backend but ``torch``.
        checkpoint_filter_fn: ``(encoder_state, dense_model) -> dense_state``: FCMAE encoder
            weights (``encoder.`` prefix removed) → the dense model's official layout.
        timm_filter_fn: ``(dense_state, timm_model) -> timm_state``: official dense layout →
            timm's layout of the model of the same name; None where timm has no such model.
        transformers_layout: how the dense weights become a transformers model folder
            (:class:`TransformersLayout`); None where transformers has no such model.
        options: the family's own command-line options.
        supervised_loss: for a classifier whose training forward returns more than logits
            (RevCol's intermediate supervision): ``(outputs, images, targets, criterion)`` →
            the fine-tuning loss; None: ``criterion(logits, targets)``.
        sparse_encoder: False for families whose encoder runs masked-dense (the dense model
            re-masking after every spatial op), which run on the ``torch`` backend only.
        benchmark_variants: ``(device_type) -> {name: dense-model kwargs}``: configurations
            ``tools/benchmark.py`` compares besides ``dense`` (no mask) and ``masked``; a name
            starting with ``dense`` runs without a mask, any other with one (it may redefine
            ``masked``).
    """

    name: str
    sizes: Mapping[str, Mapping[str, Any]]
    dense: Callable[..., nn.Module]
    encoder: Callable[..., nn.Module]
    checkpoint_filter_fn: Callable[[StateDict, nn.Module], StateDict] = same_keys
    timm_filter_fn: Callable[[StateDict, nn.Module], StateDict] | None = None
    transformers_layout: TransformersLayout | None = None
    options: tuple[FamilyOption, ...] = field(default=())
    supervised_loss: Callable[..., Tensor] | None = None
    sparse_encoder: bool = True
    benchmark_variants: Callable[[str], dict[str, dict[str, Any]]] = lambda device_type: {}


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: a size of a family."""

    name: str
    family: EncoderFamily
    size: str

    @property
    def size_kwargs(self) -> Mapping[str, Any]:
        """The size's constructor keyword arguments (depths, widths, ...)."""
        return self.family.sizes[self.size]

    def build_dense(self, **kwargs: Any) -> nn.Module:
        return self.family.dense(**self.size_kwargs, **kwargs)

    def build_encoder(self, backend: str = "torch", **kwargs: Any) -> nn.Module:
        return self.family.encoder(**self.size_kwargs, backend=backend, **kwargs)


_FAMILIES: dict[str, EncoderFamily] = {}
_MODELS: dict[str, ModelEntry] = {}


def register_family(family: EncoderFamily) -> None:
    """Register ``family`` and every one of its sizes as ``{family.name}_{size}``."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    names = [f"{family.name}_{size}" for size in family.sizes]
    taken = [name for name in names if name in _MODELS]
    if taken:
        raise ValueError(f"models {taken} are already registered")
    _FAMILIES[family.name] = family
    for size, name in zip(family.sizes, names):
        _MODELS[name] = ModelEntry(name, family, size)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def list_families() -> list[EncoderFamily]:
    return list(_FAMILIES.values())


def get_model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Dense classifier ``name`` (e.g. ``"convnextv2_atto"``); kwargs go to its constructor."""
    return get_model_entry(name).build_dense(**kwargs)


def create_encoder(name: str, backend: str = "torch", **kwargs: Any) -> nn.Module:
    """The sparse FCMAE encoder of model ``name`` on ``backend``."""
    sparse_ops.get_backend(backend)
    return get_model_entry(name).build_encoder(backend=backend, **kwargs)


def masked_dense_encoder(model_class: Callable[..., nn.Module], backend: str = "torch",
                         **kwargs: Any) -> nn.Module:
    """FCMAE encoder for families that run masked-dense (re-masking after every spatial op)
    rather than through ``sparse_ops``: the classifier without its head, called as
    ``encoder(imgs, mask)``. They never use a sparse backend, so any ``backend`` but the
    default ``torch`` is refused rather than silently ignored."""
    if backend != "torch":
        raise ValueError(f"{getattr(model_class, '__name__', model_class)} has no sparse encoder (it runs "
                         f"masked-dense in PyTorch); --backend {backend} does not apply: use --backend torch")
    return model_class(num_classes=0, **kwargs)


def add_family_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Every registered family's own options that ``command`` (``"pretrain"``, ``"finetune"``)
    offers, each saying which family it belongs to."""
    for family in list_families():
        for option in family.options:
            if command not in option.commands:
                continue
            parser.add_argument(option.flag, option.flag.replace("-", "_").replace("__", "--", 1),
                                choices=option.choices, default=None,
                                help=f"{family.name}_* models only: {option.help}")


def family_kwargs(model_name: str, args: argparse.Namespace, device_type: str) -> dict[str, Any]:
    """Constructor kwargs from the family options set in ``args``; an option of another
    family, or a value that does not run on ``device_type``, is a ``ValueError``."""
    own = get_model_entry(model_name).family
    kwargs: dict[str, Any] = {}
    for family in list_families():
        for option in family.options:
            value = getattr(args, option.dest, None)
            if value is None:
                continue
            if family is not own:
                raise ValueError(f"{option.flag} applies to {family.name}_* models only, not {model_name}")
            kwargs |= option.to_kwargs(value, device_type)
    return kwargs
