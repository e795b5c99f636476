"""Temporal samplers: which frame indices of a decoded video make each clip of a sample."""
from __future__ import annotations

import numpy as np


class ShortVideo(Exception):
    """The video has fewer frames than the sampler needs and the policy is `skip`."""


def strided_clip(num_video_frames: int, num: int, stride: int, rng: np.random.Generator,
                 policy: str = "loop") -> np.ndarray:
    """`num` frames `stride` apart from a random start (VideoMAE's sampler).  # [num]

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


def multi_clip(num_video_frames: int, num: int, stride: int, repeats: int, rng: np.random.Generator,
               policy: str = "loop") -> list[np.ndarray]:
    """`repeats` independent strided clips of one video (repeated augmentation)."""
    return [strided_clip(num_video_frames, num, stride, rng, policy) for _ in range(repeats)]


def long_short_pair(num_video_frames: int, num: int, short_stride: int, long_stride: int,
                    rng: np.random.Generator, policy: str = "loop") -> tuple[np.ndarray, np.ndarray]:
    """LSTCL: a short clip and a long clip of the same frame count; the long one spans `long_stride/short_stride`
    times more time and the short one lies inside it (the long clip is the short clip's wider temporal context;
    reconstructed, LSTCL has no public code). A video shorter than the long span: each clip on its own.
    → (short [num], long [num])"""
    long = strided_clip(num_video_frames, num, long_stride, rng, policy)
    long_span, short_span = (num - 1) * long_stride + 1, (num - 1) * short_stride + 1
    if num_video_frames < long_span or short_span > long_span:
        return strided_clip(num_video_frames, num, short_stride, rng, policy), long
    start = int(long[0]) + int(rng.integers(0, long_span - short_span + 1))
    return start + short_stride * np.arange(num), long


def frame_pair(num_video_frames: int, max_gap: int, rng: np.random.Generator) -> np.ndarray:
    """ViC-MAE: two frames at most `max_gap` apart (an image, with one frame, gives itself twice).  # [2]"""
    if num_video_frames <= 0:
        raise ShortVideo("video has no frames")
    gap = int(rng.integers(0, min(max_gap, num_video_frames - 1) + 1))
    first = int(rng.integers(0, num_video_frames - gap))
    return np.array([first, first + gap])
