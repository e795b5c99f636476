"""data.decode_device=cuda: the videos of a batch decoded on the rank's device, then cropped, resized, flipped and
colour-jittered there by the CPU path's own transforms.

The data workers still draw everything random — frame indices, crop boxes, flips, masks — from (seed, epoch, key) in
the CPU path's order (pipeline.ShardStream), so resume, elastic resume and cached views are unchanged; they ship the
encoded video (tens of kB) and that plan instead of decoded clips. Each sample of a batch is
`(video bytes, plan)` with plan = {"key", "frames": the distinct frame indices to decode, "clips": {view name: rows of
those frames, in clip order}, "spatial": {view name: the recorded spatial view}}.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from .decode import DEFAULT_ORDER, DecodeError, decode, decode_torchcodec_on
from .pipeline import _gather
from .transforms import apply_view

log = logging.getLogger(__name__)
_fallbacks = {"count": 0}  # samples this process decoded on the CPU instead (the first is logged as a warning)
Frames = Callable[[bytes, np.ndarray, torch.device], torch.Tensor]  # (video, indices, device) → [F,H,W,C] uint8


def decode_batch(encoded: list, device, decode_frames: Frames = decode_torchcodec_on,
                 fallback=DEFAULT_ORDER) -> dict[str, torch.Tensor]:
    """[(video bytes, plan)] → {view name: [B,C,T,H,W] uint8 on `device`}. Repeats of one video in the batch share
    one decode. A video the device decoder cannot read is decoded on the CPU (the same frame indices) by the
    decoders its plan names (the run's data.decoder order), else by `fallback`, and moved to the device; one neither
    can read raises DecodeError naming its key."""
    device = torch.device(device)
    decoded: dict[tuple, torch.Tensor] = {}
    out: dict[str, list[torch.Tensor]] = {}
    for data, plan in encoded:
        indices = np.asarray(plan["frames"], dtype=np.int64)
        ident = (plan["key"], indices.tobytes())
        if ident not in decoded:
            cpu = tuple(plan.get("decoders") or fallback)  # the run's data.decoder order, from the worker
            decoded[ident] = _frames(data, indices, device, decode_frames, cpu, plan["key"])
        frames = decoded[ident]
        for name, rows in plan["clips"].items():
            clip = apply_view(_gather(frames, rows), plan["spatial"][name])
            out.setdefault(name, []).append(clip.permute(3, 0, 1, 2))
    return {name: torch.stack(clips) for name, clips in out.items()}


def _frames(data: bytes, indices: np.ndarray, device, decode_frames: Frames, fallback, key: str) -> torch.Tensor:
    try:
        frames = decode_frames(data, indices, device)
    except DecodeError as first:
        try:
            got, frames, _ = decode(data, lambda n: indices, fallback)
        except DecodeError as second:
            raise DecodeError(f"sample {key}: {first}; CPU fallback: {second}") from None
        if not np.array_equal(got, indices):
            raise DecodeError(f"sample {key}: the CPU fallback decoded other frames") from None
        (log.debug if _fallbacks["count"] else log.warning)(
            "sample %s: decoded on the CPU after the device decoder failed (%s)%s", key, first,
            "" if _fallbacks["count"] else "; later fallbacks are logged at debug level")
        _fallbacks["count"] += 1
        frames = torch.from_numpy(frames).to(device)
    if frames.shape[0] != len(indices):
        raise DecodeError(f"sample {key}: {frames.shape[0]} frames decoded for {len(indices)} asked")
    return frames
