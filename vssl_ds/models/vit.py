"""Video ViT with joint space-time attention that can encode only the visible tokens (VideoMAE / MVD).

Keys follow timm / VideoMAE (`patch_embed.proj`, `blocks.N.attn.qkv`, `norm`, optional `cls_token`), so
checkpoints map onto it with few renames (see weights.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, PatchEmbed3D, resolve_backend, run_blocks, sincos_3d_table, sincos_table
from .registry import register_model


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VideoViT(nn.Module):
    def __init__(self, img_size=224, num_frames=16, tubelet=2, patch=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, attn_backend="auto",
                 grad_ckpt=False, pos_embed="sincos", cls_token=False):
        super().__init__()
        self.embed_dim, self.grad_ckpt, self.depth = embed_dim, grad_ckpt, depth
        self.patch_embed = PatchEmbed3D(img_size, num_frames, tubelet, patch, in_chans, embed_dim)
        self.grid, self.num_patches = self.patch_embed.grid, self.patch_embed.num_patches
        self.patch_size = (tubelet, patch, patch)
        n = self.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        if pos_embed in ("sincos", "sincos3d"):  # fixed, patches only; a CLS token gets none (as in MAE)
            table = sincos_table(n, embed_dim) if pos_embed == "sincos" else sincos_3d_table(self.grid, embed_dim)
            self.register_buffer("pos_embed", table, persistent=False)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"pos_embed must be 'sincos' (VideoMAE's 1D table), 'sincos3d' (MVD's) or 'learned', "
                             f"got '{pos_embed}'")
        backend = resolve_backend(attn_backend)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], backend) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding + positions, hidden tokens dropped, CLS prepended.  # [B,(1+)Nv,D]"""
        x = self.patch_embed(video.to(self.patch_embed.proj.weight.dtype))  # [B,N,D]
        x = x + self.pos_embed.to(x.dtype)
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])  # [B,Nv,D]; every sample hides as many tokens
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None, norm: bool = True) -> torch.Tensor:
        """video [B,C,T,H,W]; mask [B,N] bool (True = hidden) → visible tokens [B,(1+)Nv,D], after the final
        norm unless `norm=False` (MVD's teacher targets: the last block's output)."""
        x = run_blocks(self.blocks, self.embed(video, mask), self.grad_ckpt, self.training)
        return self.norm(x) if norm else x


def _video_vit(defaults: dict, kwargs: dict) -> VideoViT:
    return VideoViT(**{**defaults, **kwargs})


@register_model
def vit_micro_video(**kw):  # debug size for CPU tests and the embedded default
    return _video_vit(dict(embed_dim=64, depth=2, num_heads=2), kw)


@register_model
def vit_tiny_video(**kw):
    return _video_vit(dict(embed_dim=192, depth=12, num_heads=3), kw)


@register_model
def vit_small_video(**kw):
    return _video_vit(dict(embed_dim=384, depth=12, num_heads=6), kw)


@register_model
def vit_base_video(**kw):
    return _video_vit(dict(embed_dim=768, depth=12, num_heads=12), kw)


@register_model
def vit_large_video(**kw):
    return _video_vit(dict(embed_dim=1024, depth=24, num_heads=16), kw)


@register_model
def vit_huge_video(**kw):
    return _video_vit(dict(embed_dim=1280, depth=32, num_heads=16), kw)
