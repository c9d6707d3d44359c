import math

import pytest
import torch
import torch.nn.functional as F

import fcmae
from fcmae.convert import convert_state, verify
from fcmae.masking import random_masks
from fcmae.models.dcnv3 import DCNv3, dcnv3_sample
from fcmae.models.internimage import INTERNIMAGE_SIZES, InternImage

from .helpers import assert_no_leakage, assert_param_count, randomize_

PUBLISHED_PARAMS_M = {"t": 29.92, "s": 50.08, "b": 97.46, "l": 223.33, "xl": 334.82, "h": 1089.6}


@pytest.mark.parametrize("size", list(INTERNIMAGE_SIZES))
def test_parameter_counts_match_published(size):
    assert_param_count(f"internimage_{size}", PUBLISHED_PARAMS_M[size])


def official_t_keys():
    """Keys of the official InternImage-T classification checkpoint, from its documented layout."""
    keys = [f"patch_embed.{name}" for name in ("conv1.weight", "conv1.bias", "norm1.1.weight", "norm1.1.bias",
                                                "conv2.weight", "conv2.bias", "norm2.1.weight", "norm2.1.bias")]
    for level, depth in enumerate((4, 4, 18, 4)):
        for block in range(depth):
            prefix = f"levels.{level}.blocks.{block}."
            keys += [prefix + k for k in (
                "norm1.0.weight", "norm1.0.bias", "dcn.dw_conv.0.weight", "dcn.dw_conv.0.bias",
                "dcn.dw_conv.1.1.weight", "dcn.dw_conv.1.1.bias", "dcn.offset.weight", "dcn.offset.bias",
                "dcn.mask.weight", "dcn.mask.bias", "dcn.input_proj.weight", "dcn.input_proj.bias",
                "dcn.output_proj.weight", "dcn.output_proj.bias", "norm2.0.weight", "norm2.0.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
        keys += [f"levels.{level}.norm.0.weight", f"levels.{level}.norm.0.bias"]
        if level < 3:
            keys += [f"levels.{level}.downsample.conv.weight", f"levels.{level}.downsample.norm.1.weight",
                     f"levels.{level}.downsample.norm.1.bias"]
    keys += ["conv_head.0.weight"] + [f"conv_head.1.0.{k}" for k in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + ["head.weight", "head.bias"]
    return set(keys)


def test_t_state_dict_keys_are_official():
    with torch.device("meta"):
        state = fcmae.create_model("internimage_t").state_dict()
    assert set(state) == official_t_keys()
    assert tuple(state["levels.0.blocks.0.dcn.offset.weight"].shape) == (72, 64)
    assert tuple(state["levels.0.blocks.0.dcn.mask.weight"].shape) == (36, 64)
    with torch.device("meta"):
        small = fcmae.create_model("internimage_s").state_dict()
    assert "levels.0.norm.0.weight" not in small and "levels.0.blocks.0.gamma1" in small


def naive_dcnv3(value, offset, weight, groups, kernel=3, scale=1.0):
    """Bilinear sampling written out point by point (the definition, for tiny inputs)."""
    batch, height, width, channels = value.shape
    cg, points = channels // groups, kernel * kernel
    offset = offset.reshape(batch, height, width, groups, points, 2)
    weight = weight.reshape(batch, height, width, groups, points)
    rows = []
    for n in range(batch):
        for h in range(height):
            for w in range(width):
                site = []
                for g in range(groups):
                    acc = value.new_zeros(cg)
                    for p in range(points):
                        i, j = divmod(p, kernel)
                        x = w + (i - kernel // 2 + offset[n, h, w, g, p, 0]) * scale
                        y = h + (j - kernel // 2 + offset[n, h, w, g, p, 1]) * scale
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        sample = value.new_zeros(cg)
                        for cy, cx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= cy < height and 0 <= cx < width:
                                bilinear = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
                                sample = sample + bilinear * value[n, cy, cx, g * cg:(g + 1) * cg]
                        acc = acc + weight[n, h, w, g, p] * sample
                    site.append(acc)
                rows.append(torch.cat(site))
    return torch.stack(rows).reshape(batch, height, width, channels)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_dcnv3_sampling_matches_hand_written_bilinear_with_gradients(scale):
    torch.manual_seed(0)
    value = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(1, 3, 4, 2 * 9 * 2, dtype=torch.float64) * 1.5).requires_grad_(True)  # some fall outside
    weight = torch.rand(1, 3, 4, 2 * 9, dtype=torch.float64, requires_grad=True)
    fast = dcnv3_sample(value, offset, weight, groups=2, offset_scale=scale)
    slow = naive_dcnv3(value, offset, weight, groups=2, scale=scale)
    torch.testing.assert_close(fast, slow)
    probe = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * probe).sum(), (value, offset, weight))
    slow_grads = torch.autograd.grad((slow * probe).sum(), (value, offset, weight))
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        torch.testing.assert_close(fast_grad, slow_grad)


@pytest.mark.parametrize("scale,dilation", [(1.0, 1), (2.0, 2)])
def test_zero_offsets_and_uniform_weights_give_a_box_filter(scale, dilation):
    value = torch.randn(2, 6, 7, 8)
    offset = torch.zeros(2, 6, 7, 4 * 9 * 2)
    weight = torch.full((2, 6, 7, 4 * 9), 1 / 9)
    out = dcnv3_sample(value, offset, weight, groups=4, offset_scale=scale)
    box = torch.full((8, 1, 3, 3), 1 / 9)
    expected = F.conv2d(value.permute(0, 3, 1, 2), box, padding=dilation, dilation=dilation, groups=8)
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1), atol=1e-6, rtol=1e-5)


def test_freshly_initialised_dcnv3_is_a_box_average_of_its_projection():
    layer = DCNv3(8, groups=2)
    x = torch.randn(1, 5, 5, 8)
    box = torch.full((8, 1, 3, 3), 1 / 9)
    value = layer.input_proj(x).permute(0, 3, 1, 2)
    expected = layer.output_proj(F.conv2d(value, box, padding=1, groups=8).permute(0, 2, 3, 1))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def dcnv3_inputs(batch, height, width, groups, group_channels=4, offset_std=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, height, width, groups * group_channels, generator=generator)
    offset = torch.randn(batch, height, width, groups * 9 * 2, generator=generator) * offset_std
    weight = torch.rand(batch, height, width, groups * 9, generator=generator).softmax(-1)
    return value, offset, weight


def test_bf16_sampling_keeps_sub_pixel_positions_on_large_maps():
    """bf16 resolves x ≈ 56 only to 0.25 px; positions must be computed in fp32 anyway."""
    value, offset, weight = dcnv3_inputs(1, 64, 64, groups=2, group_channels=8)
    low = [t.bfloat16() for t in (value, offset, weight)]
    reference = dcnv3_sample(*(t.double() for t in low), groups=2)
    error = (dcnv3_sample(*low, groups=2).double() - reference).abs()
    assert error.mean() < 0.01 * reference.abs().mean(), error.mean()


def test_bf16_gradients_stay_close_to_fp32():
    value, offset, weight = dcnv3_inputs(1, 40, 40, groups=2, group_channels=8)
    probe = torch.randn(1, 40, 40, 16)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.to(dtype).requires_grad_() for t in (value, offset, weight)]
        out = dcnv3_sample(*leaves, groups=2)
        grads[dtype] = torch.autograd.grad((out.float() * probe).sum(), leaves)
    for low, high in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert low.dtype == torch.bfloat16
        assert (low.float() - high).abs().mean() < 0.02 * high.abs().mean()


def test_unknown_dcnv3_implementation_is_refused():
    with pytest.raises(ValueError, match="grid_sample, triton"):
        DCNv3(8, groups=2, impl="cuda")


def test_bf16_autocast_stays_close_to_fp32():
    layer = randomize_(DCNv3(16, groups=2), std=0.1)
    x = torch.randn(2, 6, 6, 16)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_fcmae_with_internimage_never_reads_removed_pixels():
    model = fcmae.create_fcmae("internimage_t", decoder_dim=32)
    randomize_(model, std=0.05)            # non-zero offsets reach far beyond the base grid
    assert_no_leakage(model, torch.randn(2, 3, 96, 96), random_masks(2, 9, 0.6))


@pytest.mark.slow
def test_internimage_fcmae_converts_and_verifies():
    model = fcmae.create_fcmae("internimage_t", decoder_dim=32)
    randomize_(model, std=0.02)
    dense_state, name = convert_state(model.state_dict())
    assert name == "internimage_t" and not any(k.startswith(("conv_head", "head")) for k in dense_state)
    assert verify(model.state_dict(), dense_state, name, input_size=64) < 1e-4


def tiny_h_like(num_classes=7, **kwargs):
    """InternImage with every H feature (dw 5×5, centre feature scale, residual post-norms,
    level-2 post-norms, attention-pooling head) at toy width."""
    return InternImage(channels=16, depths=(1, 1, 3, 1), groups=(2, 2, 4, 4), dw_kernel_size=5,
                       res_post_norm=True, center_feature_scale=True, level2_post_norm_ids=(0, 1),
                       clip_projector=True, num_classes=num_classes, **kwargs)


def test_h_specific_keys_and_head():
    with torch.device("meta"):
        state = fcmae.create_model("internimage_h").state_dict()
    expected = {"levels.0.blocks.0.dcn.center_feature_scale_proj_weight": (10, 320),
                "levels.0.blocks.0.dcn.dw_conv.0.weight": (320, 1, 5, 5),
                "levels.0.blocks.0.res_post_norm1.0.weight": (320,),
                "levels.2.post_norms.4.0.weight": (1280,), "levels.3.norm.0.weight": (2560,),
                "dcnv3_head_x4.0.weight": (4096, 2560, 1, 1), "dcnv3_head_x3.weight": (1024, 1280, 1, 1),
                "clip_projector.cross_dcn.q_bias": (1024,), "clip_projector.cross_dcn.proj.weight": (768, 1024),
                "fc_norm.0.weight": (768,), "head.weight": (1000, 768)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "levels.2.post_norms.5.0.weight" not in state and "conv_head.0.weight" not in state
    model = randomize_(tiny_h_like(), std=0.05).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_attention_pooling_matches_written_out_attention():
    pool = randomize_(tiny_h_like().clip_projector, std=0.05)
    tokens = torch.randn(2, 5, 1024)
    attn = pool.cross_dcn
    query = pool.norm1_q(tokens.mean(1, keepdim=True)) @ attn.q.weight.t() + attn.q_bias
    keys = pool.norm1_k(tokens) @ attn.k.weight.t() + attn.k_bias
    values = pool.norm1_v(tokens) @ attn.v.weight.t() + attn.v_bias
    heads = []
    for h in range(16):
        part = slice(64 * h, 64 * (h + 1))
        weights = (query[..., part] @ keys[..., part].transpose(1, 2) / 8.0).softmax(-1)
        heads.append(weights @ values[..., part])
    expected = attn.proj(torch.cat(heads, -1)).squeeze(1)
    torch.testing.assert_close(pool(tokens), expected, atol=1e-5, rtol=1e-4)


def test_h_features_keep_removed_pixels_out():
    encoder = randomize_(tiny_h_like(num_classes=0), std=0.05)
    imgs = torch.randn(2, 3, 96, 96)
    mask = random_masks(2, 9, 0.6)
    latent = encoder(imgs, mask)
    removed = mask.reshape(2, 1, 3, 3).bool().repeat_interleave(32, 2).repeat_interleave(32, 3)
    assert torch.equal(encoder(torch.where(removed, torch.randn_like(imgs) * 10, imgs), mask), latent)


@pytest.mark.slow
@pytest.mark.parametrize("build", [lambda **kw: fcmae.create_encoder("internimage_t", **kw),
                                   lambda **kw: tiny_h_like(num_classes=0, **kw)], ids=["t", "h-like"])
def test_packed_visible_sites_equal_masked_dense_outputs_and_gradients(build):
    """In fp64, so that gradients of 1e-6 next to gradients of 10 compare tightly too."""
    torch.manual_seed(0)
    packed = randomize_(build(), std=0.05).double()
    masked = build(packed_masked=False).double()
    masked.load_state_dict(packed.state_dict())
    imgs = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    mask = random_masks(2, 9, 0.6)
    out_packed, out_masked = packed(imgs, mask), masked(imgs, mask)
    torch.testing.assert_close(out_packed, out_masked, atol=1e-10, rtol=1e-10)
    probe = torch.randn_like(out_packed)
    (out_packed * probe).sum().backward()
    (out_masked * probe).sum().backward()
    masked_params = dict(masked.named_parameters())
    for name, param in packed.named_parameters():
        ref = masked_params[name].grad
        scale = ref.abs().max().clamp(min=1e-6)
        assert (param.grad - ref).abs().max() / scale < 1e-8, name


def test_sampling_at_query_sites_equals_full_map_sampling():
    value = torch.randn(2, 5, 6, 8)
    offset = torch.randn(2, 5, 6, 2 * 9 * 2)
    weight = torch.rand(2, 5, 6, 2 * 9)
    full = dcnv3_sample(value, offset, weight, groups=2)
    query_yx = torch.tensor([[[0, 0], [2, 3], [4, 5]], [[1, 1], [3, 0], [4, 4]]])
    rows = torch.arange(2)[:, None]
    picked = dcnv3_sample(value, offset[rows, query_yx[..., 0], query_yx[..., 1]],
                          weight[rows, query_yx[..., 0], query_yx[..., 1]], groups=2, query_yx=query_yx)
    torch.testing.assert_close(picked, full[rows, query_yx[..., 0], query_yx[..., 1]])
