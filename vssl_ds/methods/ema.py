"""EMA targets (BYOL, MoCo v3 momentum encoders): a frozen copy outside the engine, updated after every
optimizer step from the online weights. Under ZeRO-3 the online weights are partitioned; the engine binds a
`gather` context (DeepSpeed's GatheredParameters) so every rank reads the full tensors."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.nn as nn


def momentum_schedule(base: float, total_steps: int) -> list[float]:
    """BYOL / MoCo v3: m rises from `base` to 1 along a half cosine over the run.  # [total_steps]"""
    return [1 - (1 - base) * (math.cos(math.pi * s / max(total_steps, 1)) + 1) / 2 for s in range(total_steps)]


class EMA(nn.Module):
    def __init__(self, online: nn.Module):
        super().__init__()
        self.target = copy.deepcopy(online)
        self.target.requires_grad_(False)
        self.gather: Callable = lambda params: contextlib.nullcontext()

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """target ← m·target + (1−m)·online, parameter by parameter (buffers are copied)."""
        params = list(online.parameters())
        with self.gather(params):
            for t, o in zip(self.target.parameters(), params):
                t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1 - momentum)
        for t, o in zip(self.target.buffers(), online.buffers()):
            t.copy_(o)

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)
