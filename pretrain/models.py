"""Masked auto-encoder ViT (encoder + MAE decoder) built from timm blocks.

Encoder parameter names match timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.*``, ``norm``) and decoder names match the official MAE
(``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks.N.*``,
``decoder_norm``, ``decoder_pred``), so official checkpoints and timm load without key surgery.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from rcmae.core.vit import check_arch, sincos_pos_embed


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), pixels of a patch ordered (row, col, channel) as in MAE."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """(N, L, p*p*3) -> (N, 3, H, W); inverse of :func:`patchify` for square grids."""
    n, length, _ = x.shape
    g = int(round(length ** 0.5))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square patch grid, got {length} patches")
    x = x.reshape(n, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, g * p, g * p)


def random_masking_ids(noise: torch.Tensor, mask_ratio: float):
    """Per-sample random masking by argsort of noise (N, L).

    Returns ``ids_keep`` (N, len_keep), ``ids_restore`` (N, L) and the binary ``mask``
    (N, L; 1 = masked), exactly ``L - int(L * (1 - mask_ratio))`` masked patches per sample.
    """
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-patch loss (N, L) over the masked patches (mask = 1)."""
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth))
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.num_patches = num_patches
        self._init_weights()

    def no_weight_decay(self) -> set[str]:
        """The tokens and position embeddings (timm's convention); the official pretraining decays
        them all the same (``optim.decay_tokens``, :func:`rcmae.core.optim.pretrain_param_groups`)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    def _init_weights(self):
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor,
                ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (N, L, p*p*3), from the visible patches ``ids_keep``."""
        return self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_restore)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target: patches, per-patch mean/var normalised if ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def reconstruction_loss(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MAE's loss: squared error to :meth:`target`, mean over pixels, then over the masked patches."""
        return masked_mean(((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1), mask)


def build_mae(arch: str, img_size: int = 224, decoder_embed_dim: int = 512, decoder_depth: int = 8,
              decoder_num_heads: int = 16, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    spec = check_arch(arch, img_size)
    return MaskedAutoencoderViT(img_size=img_size, decoder_embed_dim=decoder_embed_dim,
                                decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
                                norm_pix_loss=norm_pix_loss, **spec)
