"""Tubelet embedding: a Conv3d with kernel = stride = (tubelet, patch, patch)."""
from __future__ import annotations

import torch.nn as nn


class PatchEmbed3D(nn.Module):
    def __init__(self, img_size: int, num_frames: int, tubelet: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch or num_frames % tubelet:
            raise ValueError(f"input {num_frames}x{img_size}² is not divisible by tubelet {tubelet}x{patch}²")
        self.grid = (num_frames // tubelet, img_size // patch, img_size // patch)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x):  # [B,C,T,H,W]
        return self.proj(x).flatten(2).transpose(1, 2)  # [B,N,D], N in (t,h,w) order
