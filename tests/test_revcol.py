import pytest
import torch

import fcmae
from fcmae.convert import convert_state, verify
from fcmae.masking import random_masks
from fcmae.models.revcol import REVCOL_SIZES, RevCol
from tools import profiling

from .helpers import assert_no_leakage, assert_param_count, randomize_

# Parameters with one 1000-class head, measured on the official model code (millions).
OFFICIAL_PARAMS_M = {"t": 30.46, "s": 60.57, "b": 138.62, "l": 273.10, "xl": 833.81}


@pytest.mark.parametrize("size", list(REVCOL_SIZES))
def test_parameter_counts_match_official(size):
    assert_param_count(f"revcol_{size}", OFFICIAL_PARAMS_M[size])


def test_official_keys_and_shapes_for_t():
    with torch.device("meta"):
        state = fcmae.create_model("revcol_t").state_dict()
    assert len(state) == 468
    expected = {"stem.0.weight": (64, 3, 4, 4), "subnet0.alpha0": (1, 64, 1, 1),
                "subnet0.level1.fusion.down.0.weight": (128, 64, 2, 2),
                "subnet0.level1.fusion.down.1.weight": (128,),
                "subnet1.level0.fusion.up.channel_reschedule.0.weight": (64, 128),
                "subnet1.level0.fusion.up.channel_reschedule.1.weight": (64,),
                "subnet0.level0.blocks.0.gamma": (64,), "subnet0.level0.blocks.0.dwconv.weight": (64, 1, 3, 3),
                "subnet0.level0.blocks.0.pwconv1.weight": (256, 64),
                "cls.classifier.0.weight": (512,), "cls.classifier.1.weight": (1000, 512)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("subnet0.") and ".fusion.up." in k for k in state)   # column 0 has no up
    assert not any(".level3.fusion.up." in k for k in state)


def small_revcol(reversible, columns=4, drop_path=0.3, seed=0):
    torch.manual_seed(seed)
    return RevCol((16, 32, 48, 64), (1, 2, 2, 1), num_subnet=columns, num_classes=0,
                  drop_path_rate=drop_path, reversible=reversible)


def randomized_pair(columns=4, drop_path=0.3):
    reversible, plain = small_revcol(True, columns, drop_path), small_revcol(False, columns, drop_path)
    randomize_(reversible)
    with torch.no_grad():   # alphas near their 0.5 init: 1/alpha amplifies rounding when inverting
        for name, param in reversible.named_parameters():
            if "alpha" in name:
                param.uniform_(0.3, 0.7)
    plain.load_state_dict(reversible.state_dict())
    return reversible.train(), plain.train()


@pytest.mark.parametrize("masked", [False, True])
def test_reversible_gradients_equal_plain_autograd_with_drop_path(masked):
    reversible, plain = randomized_pair()
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masks(2, 4, 0.5) if masked else None
    weights = None
    for model in (reversible, plain):
        torch.manual_seed(7)   # same drop-path draws in both
        out = model.forward_features(imgs, mask)
        weights = torch.randn_like(out) if weights is None else weights
        (out * weights).sum().backward()
        model.output = out.detach()
    torch.testing.assert_close(reversible.output, plain.output, rtol=0, atol=0)
    plain_params = dict(plain.named_parameters())
    for name, param in reversible.named_parameters():
        ref = plain_params[name].grad
        assert (param.grad is None) == (ref is None), name
        if ref is not None:
            scale = ref.abs().max().clamp(min=1e-8)
            assert (param.grad - ref).abs().max() / scale < 1e-4, name


def test_drop_path_is_active_in_that_test():
    model = small_revcol(False).train()
    imgs = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    first = model.forward_features(imgs)
    torch.manual_seed(2)
    assert not torch.equal(first, model.forward_features(imgs))


def saved_activation_bytes(model, imgs):
    """Bytes the forward pass keeps for backward."""
    total, out = profiling.saved_activation_bytes(lambda: model.forward_features(imgs))
    out.sum().backward()          # still works: the reversible path recomputes what it needs
    assert model.stem[0].weight.grad is not None
    return total


def test_reversible_memory_stays_flat_as_columns_grow():
    imgs = torch.randn(2, 3, 64, 64)
    plain = {n: saved_activation_bytes(small_revcol(False, n, 0.0), imgs) for n in (2, 8)}
    reversible = {n: saved_activation_bytes(small_revcol(True, n, 0.0), imgs) for n in (2, 8)}
    assert 3.5 < plain[8] / plain[2] < 4.5            # plain autograd: linear in columns
    assert reversible[8] < 0.15 * plain[8]
    assert reversible[8] - reversible[2] < 0.1 * (plain[8] - plain[2])


def test_fcmae_with_revcol_does_not_leak_removed_pixels():
    model = fcmae.create_fcmae("revcol_t", decoder_dim=32)
    randomize_(model, std=0.05)
    imgs, mask = torch.randn(2, 3, 64, 64), random_masks(2, 4, 0.5)
    assert_no_leakage(model, imgs, mask)
    model(imgs, mask=mask)[0].backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_revcol_fcmae_checkpoint_converts_and_verifies():
    model = fcmae.create_fcmae("revcol_t", decoder_dim=32)
    randomize_(model, std=0.02)
    dense_state, name = convert_state(model.state_dict())
    assert name == "revcol_t" and not any(k.startswith("cls.") for k in dense_state)
    assert verify(model.state_dict(), dense_state, name, input_size=64) < 1e-4
    timm_state, _ = convert_state(model.state_dict(), fmt="timm")   # fcmae's RevCol, registered with timm
    assert timm_state.keys() == dense_state.keys()


def test_intermediate_supervision_heads_keys_and_loss():
    with torch.device("meta"):
        state = fcmae.create_model("revcol_t", inter_supv=True).state_dict()
    assert len(state) == 603 and "cls.classifier.0.weight" not in state
    assert tuple(state["cls_blocks.3.classifier.1.weight"].shape) == (1000, 512)
    assert tuple(state["decoder_blocks.0.projback.0.weight"].shape) == (48, 64, 1, 1)

    from fcmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fcmae.models.revcol import inter_supervision_loss
    model = RevCol((16, 32, 48, 64), (1, 1, 2, 1), num_subnet=4, num_classes=5, inter_supv=True)
    imgs, targets = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    logits, recons = model.forward_inter(imgs)
    assert [tuple(logit.shape) for logit in logits] == [(2, 5)] * 4
    assert [tuple(r.shape) for r in recons] == [(2, 3, 64, 64)] * 3
    torch.testing.assert_close(model.eval()(imgs), model.forward_inter(imgs)[0][-1])
    loss = inter_supervision_loss(logits, recons, imgs, targets, IMAGENET_MEAN, IMAGENET_STD)
    loss.backward()
    assert torch.isfinite(loss) and model.decoder_blocks[0].projback[0].weight.grad.abs().sum() > 0
    assert model.subnet0.level0.blocks[0].pwconv1.weight.grad.abs().sum() > 0


def test_reversible_gradients_with_heads_on_intermediate_columns():
    from fcmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fcmae.models.revcol import inter_supervision_loss
    models = []
    for reversible in (True, False):
        torch.manual_seed(0)
        models.append(RevCol((16, 32, 48, 64), (1, 1, 2, 1), num_subnet=4, num_classes=5,
                             inter_supv=True, reversible=reversible, drop_path_rate=0.2))
    models[1].load_state_dict(models[0].state_dict())
    imgs, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
    for model in models:
        torch.manual_seed(3)
        logits, recons = model.forward_inter(imgs)
        inter_supervision_loss(logits, recons, imgs, targets, IMAGENET_MEAN, IMAGENET_STD).backward()
    plain = dict(models[1].named_parameters())
    for name, param in models[0].named_parameters():
        # levels whose outputs feed nothing get no grad in plain autograd, zeros when reversed
        ref = plain[name].grad if plain[name].grad is not None else torch.zeros_like(param)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        scale = ref.abs().max().clamp(min=1e-8)
        assert (grad - ref).abs().max() / scale < 1e-4, name
