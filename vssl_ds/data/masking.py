"""Mask generators, run in the data workers. True = hidden. Shapes are over the token grid."""
from __future__ import annotations

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


MASKS = {
    "tube": tube_mask,
    "random": lambda grid, ratio, rng: random_mask(int(np.prod(grid)), ratio, rng),
}
