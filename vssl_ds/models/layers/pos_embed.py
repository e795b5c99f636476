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


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's 1D table: sines then cosines (not interleaved).  # [M,dim]"""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
    """MAE's 2D table: half the channels encode the w coordinate, half the h coordinate.  # [H*W,dim]"""
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))  # [H,W] each
    return np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)


def sincos_2d_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """MAE's fixed 2D position table over the (h, w) token order.  # [1,H*W,D]"""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos table needs a width divisible by 4, got {dim}")
    return torch.from_numpy(_sincos_2d(grid[0], grid[1], dim)).float().unsqueeze(0)


def sincos_3d_table(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """MVD's / MAE-ST's 3D table: a quarter of the channels encode time, three quarters the (w, h) position,
    over the (t, h, w) token order.  # [1,T*H*W,D]"""
    t, h, w = grid
    if dim % 4 or (dim // 4 * 3) % 4:
        raise ValueError(f"a 3D sin-cos table needs a width divisible by 16, got {dim}")
    d_sp, d_t = dim // 4 * 3, dim // 4
    spatial = _sincos_2d(h, w, d_sp)  # [H*W,Ds]
    temporal = _sincos_1d(d_t, np.arange(t, dtype=np.float64))  # [T,Dt]
    table = np.concatenate([np.repeat(temporal[:, None], h * w, 1), np.repeat(spatial[None], t, 0)], axis=-1)
    return torch.from_numpy(table.reshape(t * h * w, dim)).float().unsqueeze(0)
