"""Video decoding from in-memory bytes (shard members). decord is the default backend."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np


class DecodeError(Exception):
    """The bytes are not a decodable video (corrupt, truncated, unknown codec)."""


def decode_decord(data: bytes, pick: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Decode the frames `pick(num_frames)` chooses.  → (indices [T], frames [T,H,W,C] uint8)"""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        indices = np.asarray(pick(len(reader)), dtype=np.int64)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except decord.DECORDError as e:
        raise DecodeError(str(e).splitlines()[0]) from None
    return indices, frames


DECODERS = {"decord": decode_decord}
