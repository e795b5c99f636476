"""Loss functions and target builders shared by methods."""
from __future__ import annotations

import torch
from einops import rearrange


def patchify(video: torch.Tensor, patch_size) -> torch.Tensor:
    """[B,C,T,H,W] → [B,N,P,C] with P = pt*ph*pw pixels per tubelet, N in (t,h,w) order."""
    pt, ph, pw = patch_size
    return rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=pt, p1=ph, p2=pw)


def pixel_targets(video: torch.Tensor, patch_size, normalize: bool) -> torch.Tensor:
    """VideoMAE targets: each tubelet's pixels, normalised per channel by the tubelet's own mean/std
    when `normalize`.  video [B,C,T,H,W] (un-normalised, in [0,1]) → [B,N,P*C]"""
    x = patchify(video.float(), patch_size)  # [B,N,P,C]
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return rearrange(x, "b n p c -> b n (p c)")


def masked_mse(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred [B,Nm,D] for the masked tokens in mask order; targets [B,N,D]; mask [B,N] bool."""
    target = targets[mask].reshape(pred.shape)  # boolean indexing keeps the (t,h,w) order of the mask
    return torch.mean((pred.float() - target) ** 2)
