"""Spatial transforms on uint8 clips `[T,H,W,C]`. Each draws its parameters first and returns them,
so a view can be recorded (teacher cache) and replayed exactly."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def multi_scale_crop_params(height: int, width: int, size: int, scales, rng: np.random.Generator,
                            max_distort: int = 1) -> dict:
    """VideoMAE/TSN multi-scale crop: side lengths from `scales` of the short side, at most
    `max_distort` steps of aspect change, and one of 13 fixed offsets (corners, centre, …)."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(ch, cw) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(rng.integers(len(pairs)))]
    hs, ws = (height - ch) // 4, (width - cw) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),
               (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
               (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]
    top, left = offsets[int(rng.integers(len(offsets)))]
    return {"box": [int(top), int(left), int(ch), int(cw)], "size": [size, size], "flip": False}


def flip_params(rng: np.random.Generator, p: float = 0.5) -> bool:
    return bool(rng.random() < p)


def crop_resize(frames: torch.Tensor, box, size) -> torch.Tensor:
    """Crop `box=[top,left,h,w]` (decoded pixels) and resize to `size=[h,w]`.  # [T,H,W,C] uint8"""
    top, left, h, w = box
    clip = frames[:, top:top + h, left:left + w]
    if list(clip.shape[1:3]) == list(size):
        return clip.contiguous()
    x = clip.permute(0, 3, 1, 2).float()  # [T,C,h,w]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def apply_view(frames: torch.Tensor, params: dict) -> torch.Tensor:
    """Replay a recorded view: crop box, output size, flip.  # [T,H,W,C] uint8"""
    clip = crop_resize(frames, params["box"], params["size"])
    return clip.flip(2) if params.get("flip") else clip


def normalize(video: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 `[B,C,T,H,W]` → float, per-channel normalised (done on the device, after the copy)."""
    m = torch.tensor(mean, device=video.device).view(1, -1, 1, 1, 1) * 255
    s = torch.tensor(std, device=video.device).view(1, -1, 1, 1, 1) * 255
    return (video.float() - m) / s
