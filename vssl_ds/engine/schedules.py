"""Per-step schedules (lr, weight decay, momentum, temperature) as arrays owned by the loop."""
from __future__ import annotations

import numpy as np


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from `warmup_start` to `base`, then half-cosine from `base` to `final`.  # [total_steps]"""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warm, decay])


def global_batch(batch_size: int, repeats: int, world: int, accum: int) -> tuple[int, int]:
    """→ (clips, videos) per optimizer step. With repeated augmentation (R clips per video in the batch) the lr
    scales and an epoch counts by videos, as VideoMAE's fine-tuning (total_batch_size = videos per step)."""
    clips = batch_size * world * accum
    return clips, clips // max(repeats, 1)


def scaled_lr(blr: float, lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = blr * global_batch / 256, unless an absolute lr is given."""
    return lr if lr > 0 else blr * global_batch / 256


def build_schedules(optim, total_steps: int, steps_per_epoch: int, global_batch: int) -> dict[str, np.ndarray]:
    """lr and weight decay for every optimizer step, from the `optim` config section."""
    peak = scaled_lr(optim.blr, optim.lr, global_batch)
    min_lr = scaled_lr(optim.min_blr, optim.min_lr, global_batch)
    warmup = optim.warmup_steps or int(round(optim.warmup_epochs * steps_per_epoch))
    wd_end = optim.weight_decay if optim.weight_decay_end < 0 else optim.weight_decay_end
    return {
        "lr": cosine(peak, min_lr, total_steps, warmup, scaled_lr(optim.warmup_blr, 0.0, global_batch)),
        "wd": cosine(optim.weight_decay, wd_end, total_steps),
    }
