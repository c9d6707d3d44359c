import pytest
import timm
import torch

import fcmae
from fcmae.convert import dense_to_timm, encoder_to_dense
from fcmae.masking import random_masks
from fcmae.models.convnext import CONVNEXT_SIZES
from fcmae.models.convnextv2 import CONVNEXTV2_SIZES

from .helpers import assert_close, assert_param_count, assert_within_dtype_error, randomize_, sparse_and_dense_results

# Published parameter counts (millions, 1000-class classifier), ConvNeXt V2 paper table.
PUBLISHED_PARAMS_M = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6,
                      "base": 89.0, "large": 198.0, "huge": 660.0}


@pytest.mark.parametrize("size", list(CONVNEXTV2_SIZES))
def test_parameter_count_within_one_percent_of_paper(size):
    assert_param_count(f"convnextv2_{size}", PUBLISHED_PARAMS_M[size])


@pytest.mark.parametrize("size", list(CONVNEXT_SIZES))
def test_convnext_v1_parameter_count_equals_timm(size):
    with torch.device("meta"):
        ours, theirs = fcmae.create_model(f"convnext_{size}"), timm.create_model(f"convnext_{size}")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def official_dense_shapes(depths, dims, num_classes=1000, kernel=7, grn=True):
    """Key → shape of an official dense ConvNeXt V2 (``grn``) or V1 checkpoint, written from
    their documented layouts."""
    shapes = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
              "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        shapes |= {f"downsample_layers.{i}.0.weight": (dims[i - 1],),
                   f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                   f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                   f"downsample_layers.{i}.1.bias": (dims[i],)}
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes |= {p + "dwconv.weight": (dim, 1, kernel, kernel), p + "dwconv.bias": (dim,),
                       p + "norm.weight": (dim,), p + "norm.bias": (dim,),
                       p + "pwconv1.weight": (4 * dim, dim), p + "pwconv1.bias": (4 * dim,),
                       p + "pwconv2.weight": (dim, 4 * dim), p + "pwconv2.bias": (dim,)}
            shapes |= ({p + "grn.gamma": (1, 1, 1, 4 * dim), p + "grn.beta": (1, 1, 1, 4 * dim)} if grn
                       else {p + "gamma": (dim,)})
    shapes |= {"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
               "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)}
    return shapes


def official_fcmae_encoder_shapes(depths, dims, kernel=7, grn=True):
    """Key → shape of the ``encoder.*`` part of an official FCMAE (MinkowskiEngine) checkpoint
    (V2, ``grn``), or of our V1 sparse encoder (the same layout with ``gamma`` instead of GRN)."""
    shapes = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
              "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        shapes |= {f"downsample_layers.{i}.0.ln.weight": (dims[i - 1],),
                   f"downsample_layers.{i}.0.ln.bias": (dims[i - 1],),
                   f"downsample_layers.{i}.1.kernel": (4, dims[i - 1], dims[i]),
                   f"downsample_layers.{i}.1.bias": (1, dims[i])}
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes |= {p + "dwconv.kernel": (kernel * kernel, dim), p + "dwconv.bias": (1, dim),
                       p + "norm.ln.weight": (dim,), p + "norm.ln.bias": (dim,),
                       p + "pwconv1.linear.weight": (4 * dim, dim), p + "pwconv1.linear.bias": (4 * dim,),
                       p + "pwconv2.linear.weight": (dim, 4 * dim), p + "pwconv2.linear.bias": (dim,)}
            shapes |= {p + "grn.gamma": (1, 4 * dim), p + "grn.beta": (1, 4 * dim)} if grn else {p + "gamma": (dim,)}
    return shapes


def shapes_of(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.mark.parametrize("family,sizes", [("convnextv2", CONVNEXTV2_SIZES), ("convnext", CONVNEXT_SIZES)])
@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_state_dict_layouts_are_official(family, sizes, size):
    depths, dims = sizes[size]
    with torch.device("meta"):
        dense = fcmae.create_model(f"{family}_{size}")
        encoder = fcmae.create_encoder(f"{family}_{size}")
    grn = family == "convnextv2"
    assert shapes_of(dense.state_dict()) == official_dense_shapes(depths, dims, grn=grn)
    assert shapes_of(encoder.state_dict()) == official_fcmae_encoder_shapes(depths, dims, grn=grn)


def converted_dense(encoder, name):
    dense = fcmae.create_model(name)
    missing, unexpected = dense.load_state_dict(encoder_to_dense(encoder.state_dict(), name),
                                                strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert unexpected == []
    return dense


CASES = [  # (model, mask_ratio, batch, image side)
    ("convnextv2_atto", 0.6, 2, 64),
    ("convnextv2_atto", 0.75, 3, 96),
    ("convnextv2_femto", 0.3, 1, 128),
    ("convnextv2_nano", 0.5, 2, 64),
    ("convnext_atto", 0.6, 2, 64),
    ("convnext_femto", 0.3, 3, 96),
]


@pytest.mark.parametrize("name,mask_ratio,batch,side", CASES)
def test_sparse_encoder_equals_masked_dense_outputs_and_gradients(name, mask_ratio, batch, side):
    encoder = randomize_(fcmae.create_encoder(name))
    dense = converted_dense(encoder, name)
    imgs = torch.randn(batch, 3, side, side)
    mask = random_masks(batch, (side // 32) ** 2, mask_ratio)
    sparse_out = encoder(imgs, mask)
    dense_out = dense.forward_features(imgs, mask)
    assert_close(sparse_out, dense_out)
    weights = torch.randn_like(dense_out)
    (sparse_out * weights).sum().backward()
    (dense_out * weights).sum().backward()
    sparse_grads = encoder_to_dense({k: p.grad for k, p in encoder.named_parameters()}, name)
    body = {key: param for key, param in dense.named_parameters() if not key.startswith(dense.head_prefixes)}
    assert sparse_grads.keys() == body.keys()
    for key, param in body.items():
        assert_close(sparse_grads[key], param.grad, rtol=2e-4)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto"])
def test_mask_ratio_zero_equals_plain_dense_model(name):
    encoder = randomize_(fcmae.create_encoder(name))
    dense = converted_dense(encoder, name)
    imgs = torch.randn(2, 3, 64, 96)                       # non-square works too
    no_mask = torch.zeros(2, 2 * 3)
    assert_close(encoder(imgs, no_mask), dense.forward_features(imgs))


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto"])
def test_masked_sites_are_zero_and_removed_pixels_do_not_leak(name):
    encoder = randomize_(fcmae.create_encoder(name))
    imgs = torch.randn(2, 3, 96, 96)
    mask = random_masks(2, 9, 0.6)
    out = encoder(imgs, mask)
    removed = mask.reshape(2, 1, 3, 3).bool()
    assert bool((out.masked_select(removed) == 0).all())
    pixel_removed = removed.repeat_interleave(32, 2).repeat_interleave(32, 3)
    altered = torch.where(pixel_removed, torch.randn_like(imgs) * 10, imgs)
    assert torch.equal(encoder(altered, mask), out)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_atto", "convnext_tiny"])
def test_dense_model_matches_timm_implementation(name):
    """atto keeps the MLP as 1×1 convs in timm, tiny as Linear layers: both layouts are written."""
    model = randomize_(fcmae.create_model(name, num_classes=10)).eval()
    reference = timm.create_model(name, pretrained=False, num_classes=10).eval()
    reference.load_state_dict(dense_to_timm(model.state_dict(), name), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(imgs), reference(imgs))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'convnextv2_giant'.*convnextv2_atto"):
        fcmae.create_model("convnextv2_giant")


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto"])
def test_sparse_encoder_in_bf16_costs_what_bf16_costs_the_dense_model(name):
    """bf16 autocast (the CPU twin of tests/test_cuda.py): sparse and masked-dense round
    differently, so the tolerance is measured, not fixed: the sparse encoder's bf16 error
    against fp32 is within 6× (L2) the dense model's own bf16 error, output and every gradient."""
    encoder = randomize_(fcmae.create_encoder(name))
    dense = converted_dense(encoder, name)
    imgs = torch.randn(4, 3, 128, 128)
    mask = random_masks(4, 16, 0.6)
    _, dense_fp32 = sparse_and_dense_results(encoder, dense, name, imgs, mask)
    sparse_bf16, dense_bf16 = sparse_and_dense_results(encoder, dense, name, imgs, mask, torch.bfloat16)
    assert_within_dtype_error(sparse_bf16, dense_bf16, dense_fp32)
