"""The encoder-family contract, checked for every registered family (smallest size each)."""
import argparse

import pytest
import torch

import fcmae
from fcmae.masking import random_masks
from fcmae.models import DenseModel, FCMAEEncoder, get_model_entry, list_families
from fcmae.models.registry import family_kwargs
from fcmae.optim import exempt_from_decay

FAMILIES = {family.name: family for family in list_families()}
SMALLEST = {name: f"{name}_{next(iter(family.sizes))}" for name, family in FAMILIES.items()}


def test_every_family_is_registered():
    assert set(FAMILIES) == {"convnext", "convnextv2", "internimage", "revcol"}


@pytest.mark.parametrize("model_name", SMALLEST.values())
def test_models_provide_the_contract(model_name):
    with torch.device("meta"):
        dense = fcmae.create_model(model_name)
        encoder = fcmae.create_encoder(model_name)
    assert isinstance(dense, DenseModel) and isinstance(encoder, FCMAEEncoder)
    for model in (dense, encoder):
        assert model.patch_size == model.feature_strides[-1] == 32
        assert model.feature_strides == (4, 8, 16, 32)
        assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert encoder.num_features == dense.num_features
    for decay_type in ("single", "group"):
        last = dense.num_layers(decay_type) + 1
        ids = {name: dense.layer_id(name, decay_type) for name, _ in dense.named_parameters()}
        assert all(0 <= layer <= last for layer in ids.values())
        heads = {layer for name, layer in ids.items() if name.startswith(dense.head_prefixes)}
        assert heads == {last}, f"{decay_type}: head parameters must get the full lr"
        assert min(ids.values()) in (0, 1) and last - 1 in set(ids.values())


@pytest.mark.parametrize("model_name", SMALLEST.values())
def test_encoder_output_shape_and_zero_at_removed_patches(model_name):
    encoder = fcmae.create_encoder(model_name).eval()
    mask = random_masks(2, 4, 0.5)
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 64, 64), mask)
    assert out.shape == (2, encoder.num_features, 2, 2)
    assert bool((out.masked_select(mask.reshape(2, 1, 2, 2).bool()) == 0).all())


def test_families_without_sparse_encoder_refuse_a_sparse_backend():
    for name, family in FAMILIES.items():
        entry = get_model_entry(SMALLEST[name])
        if family.sparse_encoder:
            continue
        with pytest.raises(ValueError, match="has no sparse encoder"):
            entry.build_encoder(backend="minkowski")


def test_weight_decay_exemptions_are_declared_by_the_model():
    with torch.device("meta"):
        v2, revcol, fcmae_v2 = (fcmae.create_model("convnextv2_atto"), fcmae.create_model("revcol_t"),
                                fcmae.create_fcmae("convnextv2_atto"))
    assert "stages.0.0.grn.gamma" in exempt_from_decay(v2)             # (1, 1, 1, C): declared
    assert "stages.0.0.pwconv1.weight" not in exempt_from_decay(v2)
    assert "subnet0.alpha0" not in exempt_from_decay(revcol)          # (1, C, 1, 1): RevCol decays it
    exempt = exempt_from_decay(fcmae_v2)
    assert {"mask_token", "encoder.stages.0.0.grn.gamma", "decoder.0.grn.gamma"} <= exempt


def test_family_options_belong_to_their_family():
    args = argparse.Namespace(dcn_impl="grid_sample")
    assert family_kwargs("internimage_t", args, "cpu") == {"dcn_impl": "grid_sample"}
    with pytest.raises(ValueError, match="applies to internimage_\\* models only"):
        family_kwargs("convnext_atto", args, "cpu")
    assert family_kwargs("convnext_atto", argparse.Namespace(dcn_impl=None), "cpu") == {}
