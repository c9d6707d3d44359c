import pytest
import torch
import torch.nn.functional as F

import sparse_ops
import sparse_ops.nn as snn
from sparse_ops import SparseImage
from sparse_ops.layout import conv_kernel_to_weight, depthwise_kernel_to_weight

from .helpers import assert_close


def random_sparse(batch=3, channels=5, height=9, width=11, density=0.4):
    dense = torch.randn(batch, channels, height, width)
    active = torch.rand(batch, height, width) < density
    active[0, 0, 0] = True  # never empty
    return SparseImage.from_dense(dense, active), dense * active[:, None], active


def active_map(sites):
    """(B, H, W) bool, true at the active ``sites``."""
    return SparseImage(torch.ones(len(sites), 1), sites).dense()[:, 0] > 0


def test_from_dense_round_trip_zeroes_inactive_sites():
    x, masked, active = random_sparse()
    assert x.features.shape == (int(active.sum()), 5)
    assert torch.equal(x.dense(), masked)
    assert torch.equal(active_map(x.sites), active)
    # raster order: flat index strictly increasing
    assert bool((x.sites.flat_index.diff() > 0).all())


def patch_tiling(batch=3, grid=(3, 4), keep=5, cells=4, seed=0):
    """(sites from kept patch indices, the same sites from the dense mask) on a grid of
    ``cells``-site patches."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.stack([torch.randperm(grid[0] * grid[1], generator=generator)[:keep] for _ in range(batch)])
    active = torch.zeros(batch, grid[0] * grid[1], dtype=torch.bool)
    active[torch.arange(batch)[:, None], kept] = True
    active = active.reshape(batch, *grid).repeat_interleave(cells, 1).repeat_interleave(cells, 2)
    return sparse_ops.ActiveSites.from_patches(kept, grid, cells, stride=4), sparse_ops.ActiveSites.from_mask(active, 4)


def test_patch_tiling_equals_sites_of_the_mask():
    """Sites built from kept patch indices (static shapes, any order of the indices) are the
    mask's sites in raster order, with the per-image count known."""
    tiled, from_mask = patch_tiling()
    assert torch.equal(tiled.coords, from_mask.coords)
    assert tiled.spatial_shape == from_mask.spatial_shape == (12, 16)
    assert tiled.sites_per_image == from_mask.sites_per_image == 5 * 16
    for stride in (2, 4):   # stays a tiling down to one site per patch: same sites and children
        (tiled_coarse, tiled_children), (coarse, children) = tiled.downsample(stride), from_mask.downsample(stride)
        assert tiled_coarse.patches is not None and tiled_coarse.stride == 4 * stride
        assert torch.equal(tiled_coarse.coords, coarse.coords)
        assert torch.equal(tiled_children, children)
        assert tiled_coarse.sites_per_image == 5 * 16 // stride ** 2


def test_from_dense_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="expected dense"):
        SparseImage.from_dense(torch.zeros(2, 3, 4, 4), torch.ones(2, 5, 4, dtype=torch.bool))


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_depthwise_conv_equals_dense_conv_on_masked_input(kernel_size):
    x, masked, active = random_sparse()
    x.features.requires_grad_(True)
    layer = snn.DepthwiseConv2d(5, kernel_size)
    with torch.no_grad():
        layer.bias.normal_()
    out = layer(x)
    weight = depthwise_kernel_to_weight(layer.kernel)
    reference = F.conv2d(masked, weight, layer.bias.reshape(-1), padding=kernel_size // 2, groups=5)
    assert_close(out.dense(), reference * active[:, None])
    # gradients w.r.t. input features and kernel
    out.features.square().sum().backward()
    dense_in = masked.clone().requires_grad_(True)
    ref_out = F.conv2d(dense_in, depthwise_kernel_to_weight(layer.kernel), layer.bias.reshape(-1),
                       padding=kernel_size // 2, groups=5)
    kernel_grad = layer.kernel.grad.clone()
    layer.kernel.grad = None
    (ref_out * active[:, None]).square().sum().backward()
    assert_close(SparseImage(x.features.grad, x.sites).dense(), dense_in.grad * active[:, None])
    assert_close(kernel_grad, layer.kernel.grad)


def test_depthwise_kernel_orientation_is_minkowski_order():
    # row r = dx * k + dy holds offset (dy, dx): a one at (dy=+1, dx=0) reads the pixel below.
    kernel = torch.zeros(9, 1)
    kernel[1 * 3 + 2] = 1.0  # dx index 1 (0 offset), dy index 2 (+1)
    dense = torch.arange(16.0).reshape(1, 1, 4, 4)
    x = SparseImage.from_dense(dense, torch.ones(1, 4, 4, dtype=torch.bool))
    out = sparse_ops.functional.depthwise_conv2d(x, kernel).dense()
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :3] = dense[0, 0, 1:]
    assert torch.equal(out, expected)


def test_kernel_layouts_map_every_tap_to_its_weight():
    """Row r = dx * k + dy of a sparse kernel is weight[..., dy, dx] of the torch.nn layer."""
    depthwise = torch.randn(25, 6)                                   # (k·k, C), k = 5
    weight = depthwise_kernel_to_weight(depthwise)                   # (C, 1, k, k)
    conv = torch.randn(4, 3, 7)                                      # (k·k, C_in, C_out), k = 2
    conv_weight = conv_kernel_to_weight(conv)                        # (C_out, C_in, k, k)
    for dx in range(5):
        for dy in range(5):
            assert torch.equal(weight[:, 0, dy, dx], depthwise[dx * 5 + dy])
    for dx in range(2):
        for dy in range(2):
            assert torch.equal(conv_weight[:, :, dy, dx], conv[dx * 2 + dy].t())


def test_strided_conv_equals_dense_conv_and_activates_parents():
    x, masked, active = random_sparse(height=8, width=10)
    x.features.requires_grad_(True)
    layer = snn.Conv2d(5, 7, kernel_size=2, stride=2)
    with torch.no_grad():
        layer.bias.normal_()
    out = layer(x)
    parent_active = F.max_pool2d(active[:, None].float(), 2)[:, 0].bool()
    assert torch.equal(active_map(out.sites), parent_active)
    assert out.stride == 2 and out.spatial_shape == (4, 5)
    reference = F.conv2d(masked, conv_kernel_to_weight(layer.kernel), layer.bias.reshape(-1), stride=2)
    assert_close(out.dense(), reference * parent_active[:, None])
    out.features.sum().backward()
    dense_in = masked.clone().requires_grad_(True)
    (F.conv2d(dense_in, conv_kernel_to_weight(layer.kernel.detach()), stride=2)
     * parent_active[:, None]).sum().backward()
    assert_close(SparseImage(x.features.grad, x.sites).dense(), dense_in.grad * active[:, None])


def test_grn_is_per_image_and_matches_dense_grn_on_masked_map():
    from fcmae.models.layers import GRN as DenseGRN
    x, masked, active = random_sparse(channels=6)          # unequal counts per image
    assert not x.sites.equal_counts
    sparse_grn, dense_grn = snn.GRN(6), DenseGRN(6)
    with torch.no_grad():
        sparse_grn.gamma.normal_(), sparse_grn.beta.normal_()
        dense_grn.gamma.copy_(sparse_grn.gamma.reshape(1, 1, 1, 6))
        dense_grn.beta.copy_(sparse_grn.beta.reshape(1, 1, 1, 6))
    out = sparse_grn(x).dense()
    reference = dense_grn(masked.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * active[:, None]
    assert_close(out, reference)
    # the batch-statistics compatibility mode pools all images and so differs
    batch_grn = snn.GRN(6, batch_stats=True)
    batch_grn.load_state_dict(sparse_grn.state_dict())
    assert (batch_grn(x).dense() - out).abs().max() > 1e-3


def test_grn_with_equal_counts_uses_each_images_own_sites():
    """Equal site counts take the free-view path of ``to_padded``; GRN must still normalise each
    image by its own sites (GRN of one image alone gives the same rows)."""
    active = torch.zeros(2, 4, 4, dtype=torch.bool)
    active[0, :2] = True
    active[1, 2:] = True                                   # 8 sites each
    x = SparseImage.from_dense(torch.randn(2, 3, 4, 4) * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1), active)
    assert x.sites.equal_counts
    grn = snn.GRN(3)
    with torch.no_grad():
        grn.gamma.normal_(), grn.beta.normal_()
    out = grn(x).features
    for image in range(2):
        rows = x.sites.batch_index == image
        alone = SparseImage.from_dense(x.dense()[image:image + 1], active[image:image + 1])
        assert_close(out[rows], grn(alone).features)


def test_pointwise_layers_match_torch_nn():
    x, _, _ = random_sparse(channels=8)
    linear, norm = snn.Linear(8, 4), snn.LayerNorm(8)
    assert torch.equal(linear(x).features, linear.linear(x.features))
    assert torch.equal(norm(x).features, norm.ln(x.features))
    assert torch.equal(snn.GELU()(x).features, F.gelu(x.features))


def test_drop_path_drops_whole_images_and_keeps_the_expectation():
    x, _, _ = random_sparse(batch=64, channels=4, density=0.5)
    layer = snn.DropPath(0.5).train()
    ratio = layer(x).features / x.features
    per_image = []
    for image in range(64):
        values = ratio[x.sites.batch_index == image]
        assert torch.allclose(values, values[0].expand_as(values))
        per_image.append(values[0, 0].item())
    assert set(per_image) == {0.0, 2.0}                    # some images dropped, the kept ones ×1/(1-p)
    assert 16 <= per_image.count(0.0) <= 48                # ~Binomial(64, 0.5): |z| < 4
    assert torch.equal(layer.eval()(x).features, x.features)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sparse backend 'nope'.*torch"):
        sparse_ops.get_backend("nope")
    assert "torch" in sparse_ops.available_backends()


def test_layers_print_their_shapes_like_torch_nn():
    from sparse_ops import nn as snn
    assert repr(snn.DepthwiseConv2d(40, 7)) == "DepthwiseConv2d(40, kernel_size=7, bias=True)"
    assert repr(snn.Conv2d(40, 80)) == "Conv2d(40, 80, kernel_size=2, stride=2, bias=True)"
    assert repr(snn.GRN(160)) == "GRN(160, eps=1e-06)"
    assert "Linear(in_features=40, out_features=160, bias=True)" in repr(snn.Linear(40, 160))
