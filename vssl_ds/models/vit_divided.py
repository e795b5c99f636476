"""TimeSformer-style video ViT with divided space-time attention (LSTCL's ViT): in each block, attention
over time (same patch, all frames), then over space (same frame, all patches + CLS), then the MLP.
Parameter names follow TimeSformer (`temporal_norm1`, `temporal_attn`, `temporal_fc`, `time_embed`), so its
released `.pyth` checkpoints load (weights.py). Tokens are kept in (t, s) order, TimeSformer's in (s, t) order:
the same function up to that permutation (tests/test_reference.py compares them)."""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from .layers.common import DropPath, Mlp

from .layers import Attention, resolve_backend, run_blocks
from .registry import register_model
from .vit import init_weights
from .vit2d import PatchEmbed2D


class DividedBlock(nn.Module):
    compilable_block = True  # model.compile=true compiles it (layers.block.compile_blocks)

    def __init__(self, dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, backend="sdpa", frames=8):
        super().__init__()
        self.frames = frames
        self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, heads, qkv_bias, backend)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """x [B,1+T*S,D], patches in (t, s) order after the CLS token."""
        t = self.frames
        cls, p = x[:, :1], x[:, 1:]
        s = p.shape[1] // t
        xt = rearrange(p, "b (t s) d -> (b s) t d", t=t)
        xt = self.temporal_fc(self.temporal_attn(self.temporal_norm1(xt)))
        p = p + self.drop_path(rearrange(xt, "(b s) t d -> b (t s) d", s=s))
        x = torch.cat([cls, p], 1)  # the temporal update stays in the residual stream, as in TimeSformer
        xs = torch.cat([cls.repeat_interleave(t, 0), rearrange(p, "b (t s) d -> (b t) s d", t=t)], 1)  # [(B T),1+S,D]
        xs = self.attn(self.norm1(xs))
        cls_out = rearrange(xs[:, :1], "(b t) 1 d -> b t d", t=t).mean(1, keepdim=True)  # CLS averaged over frames
        x = x + self.drop_path(torch.cat([cls_out, rearrange(xs[:, 1:], "(b t) s d -> b (t s) d", t=t)], 1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DividedViT(nn.Module):
    def __init__(self, img_size=224, num_frames=8, patch=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, attn_backend="auto", grad_ckpt=False, tubelet=1):
        super().__init__()
        if tubelet != 1:
            raise ValueError("the divided space-time ViT embeds each frame on its own (tubelet 1)")
        self.embed_dim, self.grad_ckpt, self.depth, self.num_frames = embed_dim, grad_ckpt, depth, num_frames
        self.patch_embed = PatchEmbed2D(img_size, patch, in_chans, embed_dim)
        s = self.patch_embed.num_patches
        self.grid, self.num_patches = (num_frames, *self.patch_embed.grid), num_frames * s
        self.patch_size = (1, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + s, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        backend = resolve_backend(attn_backend)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(DividedBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, r, backend, num_frames)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        # TimeSformer leaves its time table at zero and starts each temporal branch as an identity: at initialisation
        # every frame is encoded on its own (a reversed clip gives exactly the same pooled feature)
        for blk in self.blocks:
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    def forward(self, video: torch.Tensor, mask=None, norm: bool = True) -> torch.Tensor:
        """video [B,C,T,H,W] → [B,1+T*S,D] (CLS first)."""
        if mask is not None:
            raise ValueError("the divided space-time ViT has no masked forward (it needs every token of each frame)")
        b, t = video.shape[0], video.shape[2]
        x = self.patch_embed(rearrange(video.to(self.pos_embed.dtype), "b c t h w -> (b t) c h w"))  # [(B T),S,D]
        x = x + self.pos_embed[:, 1:]
        x = rearrange(x, "(b t) s d -> (b s) t d", b=b) + self.time_embed[:, :t]
        x = rearrange(x, "(b s) t d -> b (t s) d", b=b)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
        x = run_blocks(self.blocks, x, self.grad_ckpt, self.training)
        return self.norm(x) if norm else x


@register_model
def vit_micro_divided_st(**kw):
    return DividedViT(**{**dict(embed_dim=64, depth=2, num_heads=2), **kw})


@register_model
def vit_base_divided_st(**kw):
    return DividedViT(**{**dict(embed_dim=768, depth=12, num_heads=12), **kw})
