"""Temporal samplers: which frame indices of a decoded video make a clip."""
from __future__ import annotations

import numpy as np


class ShortVideo(Exception):
    """The video has fewer frames than the sampler needs and the policy is `skip`."""


def strided_clip(num_video_frames: int, num: int, stride: int, rng: np.random.Generator,
                 policy: str = "loop") -> np.ndarray:
    """`num` frames `stride` apart from a random start (VideoMAE's sampler).

    A video shorter than the span is looped (indices wrap), padded with its last frame, or skipped.
    """
    if num_video_frames <= 0:
        raise ShortVideo("video has no frames")
    span = (num - 1) * stride + 1
    if num_video_frames >= span:
        start = int(rng.integers(0, num_video_frames - span + 1))
        return start + stride * np.arange(num)
    if policy == "skip":
        raise ShortVideo(f"video has {num_video_frames} frames, the clip needs {span}")
    idx = stride * np.arange(num)
    if policy == "loop":
        return idx % num_video_frames
    return np.minimum(idx, num_video_frames - 1)  # pad: repeat the last frame
