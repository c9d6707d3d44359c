import pytest
import torch

import fcmae
from fcmae.autoencoder import patchify, unpatchify
from fcmae.masking import random_masks

from .helpers import assert_no_leakage, randomize_


@pytest.mark.parametrize("num_patches,mask_ratio", [(49, 0.6), (49, 0.0), (16, 0.75), (9, 0.99)])
def test_random_masks_keep_int_l_times_one_minus_ratio(num_patches, mask_ratio):
    mask = random_masks(8, num_patches, mask_ratio)
    assert mask.shape == (8, num_patches)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = int(num_patches * (1 - mask_ratio))
    assert (mask.shape[1] - mask.sum(1)).eq(kept).all()
    assert not torch.equal(mask[0], mask[1]) or kept in (0, num_patches)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio_is_a_clear_error(ratio):
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        fcmae.create_fcmae("convnextv2_atto", mask_ratio=ratio)


def test_image_side_not_multiple_of_32_is_a_clear_error():
    model = fcmae.create_fcmae("convnextv2_atto")
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        model(torch.zeros(1, 3, 100, 64))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sparse backend 'cuda_magic'"):
        fcmae.create_fcmae("convnextv2_atto", backend="cuda_magic")


def test_patchify_round_trip_and_order():
    imgs = torch.randn(2, 3, 64, 96)
    patches = patchify(imgs, 32)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    # patch 1 is the second patch of the first row; its first entry is pixel (0, 32) channel 0..2
    assert torch.equal(patches[0, 1, :3], imgs[0, :, 0, 32])
    assert torch.equal(unpatchify(patches, 32, (2, 3)), imgs)


def test_state_dict_has_official_fcmae_keys():
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=64, decoder_depth=2)
    keys = set(model.state_dict())
    assert {"mask_token", "proj.weight", "proj.bias", "pred.weight", "pred.bias",
            "decoder.0.dwconv.weight", "decoder.1.grn.gamma",
            "encoder.stages.0.0.dwconv.kernel", "encoder.downsample_layers.1.1.kernel"} <= keys
    assert model.mask_token.shape == (1, 64, 1, 1)
    assert model.pred.weight.shape == (32 * 32 * 3, 64, 1, 1)


def test_forward_shapes_and_loss_counts_removed_patches_only():
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32, mask_ratio=0.5), std=0.05)
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 4, 3072) and mask.shape == (2, 4)
    target = patchify(imgs, 32)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)
    # changing predictions of visible patches leaves the loss unchanged
    altered = torch.where(mask.bool()[..., None], pred, pred + 5.0)
    torch.testing.assert_close(model.forward_loss(imgs, altered, mask), loss)


def test_without_norm_pix_loss_target_is_raw_pixels():
    model = fcmae.create_fcmae("convnextv2_atto", norm_pix_loss=False, decoder_dim=32)
    imgs = torch.randn(1, 3, 32, 64)
    mask = torch.tensor([[1.0, 0.0]])
    pred = patchify(imgs, 32).clone()
    assert model.forward_loss(imgs, pred, mask).item() == 0.0
    pred[0, 0] += 1.0
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), torch.tensor(1.0))


def test_removed_pixels_change_neither_latent_nor_prediction():
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    assert_no_leakage(model, torch.randn(2, 3, 96, 96), random_masks(2, 9, 0.6))


def test_backward_reaches_every_parameter():
    model = randomize_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=32), std=0.05)
    loss, _, _ = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnextv2_atto", "revcol_t", "internimage_t"])
def test_bf16_autocast_training_step_matches_fp32(name):
    """The --amp bf16 path: every encoder family runs under autocast and stays close to fp32."""
    model = randomize_(fcmae.create_fcmae(name, decoder_dim=32), std=0.02)
    imgs, mask = torch.randn(2, 3, 64, 64), random_masks(2, 4, 0.5)
    reference = model(imgs, mask=mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(imgs, mask=mask)[0]
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    from fcmae.models.layers import drop_path_rates
    rates = drop_path_rates([2, 3], 0.4)
    assert [[round(rate, 6) for rate in stage] for stage in rates] == [[0.0, 0.1], [0.2, 0.3, 0.4]]
    model = fcmae.create_model("convnextv2_atto", drop_path_rate=0.3)   # depths 2, 2, 6, 2
    last = model.stages[-1][-1].drop_path
    first = model.stages[0][0].drop_path
    assert getattr(first, "drop_prob", 0.0) == 0.0 and abs(last.drop_prob - 0.3) < 1e-9


@pytest.mark.parametrize("name,head", [("convnextv2_atto", "head"), ("internimage_t", "head"),
                                       ("revcol_t", "cls.classifier.1")])
def test_head_init_scale_shrinks_only_the_classifier(name, head):
    models = []
    for scale in (1.0, 0.001):
        torch.manual_seed(0)
        models.append(fcmae.create_model(name, num_classes=5, head_init_scale=scale).state_dict())
    full, small = models
    for key in full:
        expected = full[key] * 0.001 if key.startswith(head + ".") else full[key]
        torch.testing.assert_close(small[key], expected, msg=key)
