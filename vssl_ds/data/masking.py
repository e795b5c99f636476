"""Mask generators, run in the data workers. True = hidden. Masks are flat over the token grid
(`[T*H*W]` for video, `[H*W]` for images), in the order the patch embedding emits tokens."""
from __future__ import annotations

import math
from functools import partial

import numpy as np


def random_mask(num_tokens: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(ratio * N) hidden tokens, uniformly placed.  # [N] bool"""
    num_masked = int(round(ratio * num_tokens))
    mask = np.zeros(num_tokens, dtype=bool)
    mask[rng.permutation(num_tokens)[:num_masked]] = True
    return mask


def tube_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """VideoMAE tube masking: one spatial mask repeated on every temporal slot.  # [T*H*W] bool"""
    t, h, w = grid
    spatial = random_mask(h * w, ratio, rng)
    return np.tile(spatial, t)


def block_mask_2d(height: int, width: int, num_masked: int, rng: np.random.Generator, min_block: int = 16,
                  max_block: int | None = None, aspect=(0.3, 1 / 0.3)) -> np.ndarray:
    """BEiT blockwise masking: add random rectangles (area ≥ `min_block` patches, log-uniform aspect) until
    `num_masked` patches are hidden or 10 tries in a row add nothing (so the count may end a little short,
    as in BEiT).  # [H,W] bool"""
    mask = np.zeros((height, width), dtype=bool)
    max_block = max_block or num_masked
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            target = min_block + (budget - min_block) * rng.random()  # BEiT's uniform(min, budget), also when
            # fewer than min_block cells remain (then the area lies between budget and min_block)
            ar = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region[:] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def image_block_mask(grid: tuple[int, int], ratio: float, rng: np.random.Generator, min_block: int = 16) -> np.ndarray:
    """BEiT/BEVT image mask, e.g. 98 of 196 on 14×14 for ratio 0.5.  # [H*W] bool"""
    h, w = grid[-2:]
    return block_mask_2d(h, w, int(round(ratio * h * w)), rng, min_block).reshape(-1)


def block_tube_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator, min_block: int = 16,
                    tube=(0.5, 1.0)) -> np.ndarray:
    """BEVT video mask: one blockwise 2D mask repeated over a random run of 50–100 % of the temporal slots,
    the run wrapping around the end.  # [T*H*W] bool"""
    t, h, w = grid
    spatial = block_mask_2d(h, w, int(round(ratio * h * w)), rng, min_block)
    length = int(rng.integers(math.ceil(tube[0] * t), math.floor(tube[1] * t) + 1))
    start = int(rng.integers(0, t))
    mask = np.zeros((t, h, w), dtype=bool)
    mask[(start + np.arange(length)) % t] = spatial
    return mask.reshape(-1)


MASKS = {
    "tube": tube_mask,
    "random": lambda grid, ratio, rng: random_mask(int(np.prod(grid)), ratio, rng),
    "block_tube": block_tube_mask,
    "block": image_block_mask,
}


def mask_fn(kind: str, grid, ratio: float):
    """A generator `rng → mask` for the workers (picklable)."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask kind '{kind}'; choose one of {sorted(MASKS)}")
    return partial(_draw, kind, tuple(grid), ratio)


def _draw(kind, grid, ratio, rng):
    return MASKS[kind](grid, ratio, rng)
