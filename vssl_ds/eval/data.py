"""The test pass's data: every video of a labelled shard set exactly once, as clips × crops views.

Clips are spread evenly over the video (VideoMAE's multi-clip testing; one clip = the centre one); crops are
taken along the long side after the short side is scaled to `size` (one crop = the centre one). Shards are
split over ranks, then over data workers; an unreadable clip is skipped and logged with its key and shard.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..data.decode import DecodeError, decode, decode_image, decoder_order
from ..data.pipeline import IMAGE_MEMBERS, MEDIA, WorkerNotes, _label
from ..data.shards import resolve_shards
from ..data.transforms import crop_resize

log = logging.getLogger(__name__)


def spread_clips(n: int, num_frames: int, stride: int, clips: int, policy: str) -> list[np.ndarray]:
    """Frame indices of `clips` clips spread evenly over a video of `n` frames (loop / pad a short one)."""
    span = (num_frames - 1) * stride + 1
    room = max(n - span, 0)
    starts = [room // 2] if clips == 1 else [round(room * i / (clips - 1)) for i in range(clips)]
    out = []
    for s in starts:
        idx = s + np.arange(num_frames) * stride
        out.append(idx % n if policy == "loop" else np.minimum(idx, n - 1))  # skip would drop a test video: pad
    return out


def spread_crops(height: int, width: int, crops: int) -> list[list[int]]:
    """Square boxes of the short side, spread along the long side (decoded pixels)."""
    side = min(height, width)
    room = max(height, width) - side
    offsets = [room // 2] if crops == 1 else [round(room * i / (crops - 1)) for i in range(crops)]
    return [[o, 0, side, side] if height > width else [0, o, side, side] for o in offsets]


class EvalViews(IterableDataset):
    """Yields {"key", "label", "video": uint8 [V,T,H,W,C]} with V = clips × crops, each video once."""

    def __init__(self, spec: str, num_frames: int, stride: int, size: int, clips: int, crops: int,
                 rank: int = 0, world: int = 1, decoder: str = "pyav", policy: str = "loop"):
        super().__init__()
        self.shards = resolve_shards(spec)[rank::world] if spec else []  # '': views() of given samples only
        self.num_frames, self.stride, self.size, self.clips, self.crops = num_frames, stride, size, clips, crops
        self.decoders, self.policy = decoder_order(decoder), policy
        self.notes = WorkerNotes()  # the sample each worker decodes (named if a worker dies)

    def views(self, raw: dict) -> torch.Tensor:
        member = next((m for m in MEDIA if m in raw), None)
        if member is None:
            raise DecodeError(f"no video/image member (has {sorted(k for k in raw if not k.startswith('__'))})")
        picks: list[np.ndarray] = []

        def pick(n: int) -> np.ndarray:
            if not picks:
                picks.extend(spread_clips(n, self.num_frames, self.stride, self.clips, self.policy))
            return np.concatenate(picks)

        if member in IMAGE_MEMBERS:
            _, frames = decode_image(raw[member], pick)
        else:
            _, frames, _ = decode(raw[member], pick, self.decoders)
        frames = torch.from_numpy(frames)
        out, t = [], self.num_frames
        for c in range(self.clips):
            clip = frames[c * t:(c + 1) * t]
            out.extend(crop_resize(clip, box, [self.size, self.size]) for box in spread_crops(*clip.shape[1:3], self.crops))
        return torch.stack(out)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        worker = info.id if info else 0
        for shard in mine:
            try:
                for raw in tarfile_samples([{"url": shard.url}]):
                    self.notes.note(worker, raw.get("__key__", "?"), shard.url)
                    try:
                        video = self.views(raw)
                    except DecodeError as e:
                        log.warning("test clip %s in %s skipped: %s", raw.get("__key__"), shard.url, e)
                        continue
                    finally:
                        self.notes.note(worker)
                    yield {"key": raw["__key__"], "label": _label(raw), "video": video}
            except (OSError, ValueError) as e:  # an unreadable tar: the rest of the shard is lost, not the run
                log.warning("test shard %s unreadable, skipped from here on: %s", shard.url, e)


def _collate(items: list[dict]) -> dict:
    return {"keys": [i["key"] for i in items], "label": torch.tensor([i["label"] for i in items]),
            "video": torch.stack([i["video"] for i in items]).permute(0, 1, 5, 2, 3, 4)}  # [B,V,C,T,H,W]


def eval_loader(spec: str, cfg, clips: int, crops: int, rank: int, world: int, batch_size: int) -> DataLoader:
    d = cfg.data
    ds = EvalViews(spec, d.num_frames, d.sampling_rate, d.size, clips, crops, rank, world, d.decoder, d.short_video)
    workers = min(d.num_workers, len(ds.shards))
    ds.notes.attach(workers)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      persistent_workers=False, prefetch_factor=d.prefetch if workers else None)
