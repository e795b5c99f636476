"""2D ViT for images and image teachers (MVD's image teacher, ViC-MAE, iBoot). Parameter names are timm's
`VisionTransformer` ones, so a timm state dict (saved to a local file) loads as it is."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, resolve_backend, run_blocks, sincos_2d_table, sincos_table
from .registry import register_model
from .vit import init_weights


class PatchEmbed2D(nn.Module):
    def __init__(self, img_size: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not divisible by patch {patch}")
        self.grid = (img_size // patch, img_size // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # [B,C,H,W]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B,N,D]


class ViT2D(nn.Module):
    def __init__(self, img_size=224, patch=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path=0.0, attn_backend="auto", grad_ckpt=False, cls_token=True,
                 pos_embed="learned", num_frames=1, tubelet=1):
        super().__init__()  # num_frames / tubelet: accepted from the shared model config, unused (frames come one by one)
        self.embed_dim, self.grad_ckpt, self.depth = embed_dim, grad_ckpt, depth
        self.patch_embed = PatchEmbed2D(img_size, patch, in_chans, embed_dim)
        self.grid, self.num_patches, self.patch_size = self.patch_embed.grid, self.patch_embed.num_patches, patch
        self.num_prefix = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        n = self.num_patches + self.num_prefix  # timm keeps the CLS position in the same table
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed in ("sincos", "sincos2d"):  # fixed; MAE's 2D table, or a 1D one over the patch order
            table = sincos_table(self.num_patches, embed_dim) if pos_embed == "sincos" else \
                sincos_2d_table(self.grid, embed_dim)
            table = torch.cat([torch.zeros(1, self.num_prefix, embed_dim), table], 1)
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got '{pos_embed}'")
        backend = resolve_backend(attn_backend)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, backend) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(image.to(self.patch_embed.proj.weight.dtype))  # [B,N,D]
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, self.num_prefix:]
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])  # [B,Nv,D]
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return x

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None, norm: bool = True) -> torch.Tensor:
        """image [B,C,H,W]; mask [B,N] → tokens [B,(1+)Nv,D] (CLS first when the model has one)."""
        x = run_blocks(self.blocks, self.embed(image, mask), self.grad_ckpt, self.training)
        return self.norm(x) if norm else x


def _vit2d(defaults: dict, kwargs: dict) -> ViT2D:
    return ViT2D(**{**defaults, **kwargs})


@register_model
def vit2d_micro_patch16(**kw):
    return _vit2d(dict(embed_dim=64, depth=2, num_heads=2), kw)


@register_model
def vit2d_small_patch16(**kw):
    return _vit2d(dict(embed_dim=384, depth=12, num_heads=6), kw)


@register_model
def vit2d_base_patch16(**kw):
    return _vit2d(dict(embed_dim=768, depth=12, num_heads=12), kw)


@register_model
def vit2d_large_patch16(**kw):
    return _vit2d(dict(embed_dim=1024, depth=24, num_heads=16), kw)


@register_model
def vit2d_huge_patch14(**kw):
    return _vit2d(dict(embed_dim=1280, depth=32, num_heads=16, patch=14), kw)
