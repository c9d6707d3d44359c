"""FCMAE: sparse encoder + light dense ConvNeXt V2 decoder + normalized-pixel loss."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .masking import check_mask_ratio, num_visible, patch_grid, random_masks
from .models import create_encoder
from .models.convnextv2 import Block
from .models.layers import trunc_normal_init


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) → (B, L, p·p·C) in (h, w, p, q, c) order, as the official code."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """(B, L, p·p·C) → (B, C, h·p, w·p); the inverse of :func:`patchify`."""
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)",
                     h=grid[0], w=grid[1], p=patch_size, q=patch_size)


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder.

    State_dict keys follow official FCMAE checkpoints: ``encoder.*``, ``proj.*``,
    ``mask_token``, ``decoder.{k}.*``, ``pred.*``.
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int = 512, decoder_depth: int = 1,
                 mask_ratio: float = 0.6, norm_pix_loss: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.proj = nn.Conv2d(encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, self.patch_size ** 2 * in_chans, kernel_size=1)
        for module in (self.proj, self.decoder, self.pred):
            module.apply(trunc_normal_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The mask token, the decoder's GRN parameters and what the encoder exempts."""
        return ({"mask_token"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
                | {name for name, _ in self.named_parameters() if name.startswith("decoder.") and ".grn." in name})

    def forward_decoder(self, latent: Tensor, mask: Tensor) -> Tensor:
        """latent (B, C, h, w), mask (B, L) → pred (B, L, p·p·3)."""
        x = self.proj(latent)                                            # (B, D, h, w)
        removed = mask.reshape(x.shape[0], 1, *x.shape[2:]).type_as(x)  # (B, 1, h, w)
        x = torch.lerp(x, self.mask_token.to(x.dtype).expand_as(x), removed)
        x = self.pred(self.decoder(x))                                   # (B, p·p·3, h, w)
        return rearrange(x, "b c h w -> b (h w) c")

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over removed patches only."""
        target = patchify(imgs, self.patch_size).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)          # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs (B, 3, H, W) → (loss, pred (B, L, p·p·3), mask (B, L); 1 = removed).

        A random mask is drawn with the model's ``mask_ratio`` unless ``mask`` is given.
        A drawn mask keeps a number of patches known without reading it, which the encoder
        uses to build its sites with static shapes (one graph under ``torch.compile``); a
        given mask is read once to count them.
        """
        grid = patch_grid(imgs.shape[-2:], self.patch_size)
        visible = None
        if mask is None:
            mask = random_masks(imgs.shape[0], grid[0] * grid[1], self.mask_ratio, device=imgs.device)
            visible = num_visible(grid[0] * grid[1], self.mask_ratio)
        latent = self.encoder(imgs, mask, num_visible=visible)
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def create_fcmae(name: str, mask_ratio: float = 0.6, decoder_dim: int = 512,
                 decoder_depth: int = 1, norm_pix_loss: bool = True, backend: str = "torch",
                 **kwargs) -> FCMAE:
    """FCMAE with the sparse encoder of ``name``; kwargs go to the encoder constructor."""
    encoder = create_encoder(name, backend=backend, **kwargs)
    return FCMAE(encoder, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                 mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
                 in_chans=kwargs.get("in_chans", 3))
