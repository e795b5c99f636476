"""Pre-norm transformer block (ViT) built on the shared attention function."""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from .common import DropPath, Mlp

from .attention import attention


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = attention(q, k, v, bias, self.backend)  # [B,H,N,D]
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    compilable_block = True  # model.compile=true compiles it (compile_blocks)

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block of `model` in place (`nn.Module.compile`: parameters and state-dict
    keys stay as they are, so checkpoints and ZeRO see the same module) → the number of blocks compiled.
    Blocks of one width share one compiled graph; activation checkpointing still recomputes per block."""
    blocks = [m for m in model.modules() if getattr(m, "compilable_block", False)]
    for blk in blocks:
        blk.compile()
    return len(blocks)


def run_blocks(blocks, x: torch.Tensor, grad_ckpt: bool, training: bool, *args) -> torch.Tensor:
    """Apply `blocks` in turn, each under activation checkpointing when asked (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    for blk in blocks:
        x = checkpoint(blk, x, *args, use_reentrant=False) if grad_ckpt and training else blk(x, *args)
    return x
