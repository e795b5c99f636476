"""The two small timm building blocks the backbones use, written here so that building a model does not import
timm (and torchvision: ~5 s per process). Same module and parameter names as timm's (fc1 / fc2), same maths,
and DropPath draws its random numbers exactly as timm's does."""
from __future__ import annotations

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero a sample's residual branch with probability `p` and scale
    the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Linear → activation → Linear (timm's Mlp without dropout or norm: fc1, act, fc2)."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
