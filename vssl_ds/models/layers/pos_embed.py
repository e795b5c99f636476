"""Fixed sin-cos position tables."""
from __future__ import annotations

import numpy as np
import torch


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's 1D table over the flattened (t,h,w) token order, so its checkpoints load as they are.  # [1,N,D]"""
    pos = np.arange(num_positions)[:, None]
    angle = pos / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None]
    angle[:, 0::2] = np.sin(angle[:, 0::2])
    angle[:, 1::2] = np.cos(angle[:, 1::2])
    return torch.from_numpy(angle).float().unsqueeze(0)
