"""Shards → decoded, augmented, masked batches, with a position that makes mid-epoch resume exact.

Each data worker reads a disjoint slice of the epoch's shard order and counts the raw samples it has
consumed (`pos`). Every batch carries its worker and `pos`; the loader hands batches to the loop in a fixed
round-robin over workers and remembers, per worker, the `pos` of the last batch the loop took. Resuming
skips exactly those samples (before decoding) and restarts the round-robin at the right worker.
All randomness of a sample (clip start, crop, mask) comes from (seed, epoch, key), never from order.
"""
from __future__ import annotations

import json
import logging
import signal
import zlib
from collections import Counter, deque
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..config.schema import DataConfig
from .batch import Batch
from .decode import DecodeError, decode
from .masking import MASKS
from .sampling import ShortVideo, strided_clip
from .shards import Shard, epoch_order, split
from .transforms import apply_view, multi_scale_crop_params

log = logging.getLogger(__name__)
END = "__end__"  # a worker's last item: tells the loader that worker has no more batches this epoch


class VideoClips(IterableDataset):
    """Stream of batches from video shards.

    After each stage the stream holds: shard urls → raw samples {__key__, mp4, json} → (key, clip uint8
    [T,H,W,C], mask [N], label) → batches {video [B,C,T,H,W] uint8, mask [B,N], label [B], keys}.
    """

    def __init__(self, shards: list[Shard], cfg: DataConfig, token_grid, mask_kind: str, mask_ratio: float,
                 rank: int = 0, world: int = 1, seed: int = 0, decoders=("decord", "pyav")):
        self.shards, self.cfg, self.grid = shards, cfg, tuple(token_grid)
        self.mask_kind, self.mask_ratio = mask_kind, mask_ratio
        self.rank, self.world, self.seed, self.decoders = rank, world, seed, tuple(decoders)
        self.epoch, self.start = 0, {}

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None) -> None:
        self.epoch, self.start = epoch, dict(start or {})

    def _my_shards(self, worker: int, num_workers: int) -> list[Shard]:
        mine = split(split(epoch_order(self.shards, self.seed, self.epoch), self.rank, self.world),
                     worker, num_workers)
        if not mine:
            log.warning("rank %d worker %d has no shard this epoch (%d shards for %d ranks x %d workers); "
                        "write more shards than ranks x workers", self.rank, worker, len(self.shards),
                        self.world, num_workers)
        return mine

    def _sample(self, raw: dict, faults: Counter):
        key = raw["__key__"]
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
        video = raw.get("mp4")
        if video is None:
            faults["missing_video"] += 1
            log.warning("sample %s in %s has no .mp4 member; skipped", key, raw.get("__url__"))
            return None
        c = self.cfg
        try:
            pick = lambda n: strided_clip(n, c.num_frames, c.sampling_rate, rng, c.short_video)  # noqa: E731
            _, frames, used = decode(video, pick, self.decoders)
        except DecodeError as e:
            faults["corrupt"] += 1
            log.warning("corrupt clip %s in %s skipped: %s", key, raw.get("__url__"), e)
            return None
        except ShortVideo as e:
            faults["short"] += 1
            log.info("short clip %s in %s skipped: %s", key, raw.get("__url__"), e)
            return None
        if used != self.decoders[0]:
            faults["decoder_fallback"] += 1
        frames = torch.from_numpy(frames)  # [T,H,W,C] uint8
        view = multi_scale_crop_params(frames.shape[1], frames.shape[2], c.size, c.scales, rng)
        clip = apply_view(frames, view)
        mask = MASKS[self.mask_kind](self.grid, self.mask_ratio, rng)
        label = _label(raw)
        return key, clip, torch.from_numpy(mask), label

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        skip = self.start.get(worker, 0)
        faults: Counter = Counter()

        def on_error(exn: Exception) -> bool:  # unreadable tar / member: count, log, go on
            faults["unreadable"] += 1
            log.warning("rank %d worker %d: skipping unreadable shard data: %s", self.rank, worker, exn)
            return True

        urls = [{"url": s.url} for s in self._my_shards(worker, num_workers)]
        items = []
        for pos, raw in enumerate(tarfile_samples(urls, handler=on_error), start=1):
            if pos <= skip:
                continue  # consumed before the checkpoint this run resumes from
            sample = self._sample(raw, faults)
            if sample is not None:
                items.append(sample)
            if len(items) == self.cfg.batch_size:
                yield _collate(items, worker, pos, faults)
                items = []
        yield {END: worker, "faults": dict(faults)}


def _label(raw: dict) -> int:
    meta = raw.get("json")
    if meta is None:
        return -1
    try:
        return int(json.loads(meta).get("label", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


def _collate(items, worker: int, pos: int, faults: Counter) -> dict:
    keys, clips, masks, labels = zip(*items)
    return {
        "video": torch.stack(clips).permute(0, 4, 1, 2, 3).contiguous(),  # [B,C,T,H,W] uint8
        "mask": torch.stack(masks),  # [B,N] bool
        "label": torch.tensor(labels, dtype=torch.long),
        "keys": list(keys),
        "worker": worker,
        "pos": pos,
        "faults": dict(faults),
    }


def _ignore_stop_signals(_worker_id: int) -> None:
    """Preemption signals reach the whole process tree; workers keep serving while the rank checkpoints."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class OrderedLoader:
    """A DataLoader over `VideoClips` that yields `Batch`es in a fixed worker round-robin and keeps
    the state (`state_dict`) from which the same epoch continues exactly."""

    def __init__(self, dataset: VideoClips, num_workers: int, prefetch: int = 2, pin_memory: bool = False):
        self.dataset, self.num_workers = dataset, num_workers
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.positions, self.turn = 0, {}, 0
        self.faults: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": dict(self.positions), "turn": self.turn,
                "num_workers": self.num_workers, "world": self.dataset.world}

    def load_state_dict(self, state: dict) -> None:
        same_layout = state.get("num_workers") == self.num_workers and state.get("world") == self.dataset.world
        self.epoch = int(state["epoch"])
        if same_layout:
            self.positions = {int(k): int(v) for k, v in state["positions"].items()}
            self.turn = int(state["turn"])
        else:  # shard slices differ now: the epoch restarts rather than guessing
            log.warning("data layout changed (workers %s→%d, ranks %s→%d): epoch %d restarts from its beginning",
                        state.get("num_workers"), self.num_workers, state.get("world"), self.dataset.world,
                        self.epoch)
            self.positions, self.turn = {}, 0

    def fault_counts(self) -> Counter:
        total: Counter = Counter()
        for counts in self.faults.values():
            total.update(counts)
        return total

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (`self.epoch`), continued from the saved positions when there are any."""
        self.dataset.set_epoch(self.epoch, self.positions)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                            prefetch_factor=self.prefetch if self.num_workers else None,
                            worker_init_fn=_ignore_stop_signals)
        workers = list(range(max(self.num_workers, 1)))
        pending = {w: deque() for w in workers}
        active = list(workers)
        stream = iter(loader)
        while active:
            w = self.turn if self.turn in active else active[0]
            while not pending[w]:
                item = next(stream)
                pending[item.get("worker", item.get(END))].append(item)
            item = pending[w].popleft()
            self.faults[w] = item["faults"]
            nxt = active[(active.index(w) + 1) % len(active)]
            if END in item:
                active.remove(w)
                self.turn = nxt if active else 0
                continue
            self.positions[w], self.turn = item["pos"], nxt
            yield Batch.from_worker(item)
        self.next_epoch()

    def next_epoch(self) -> None:
        """Close the current epoch (also called when another rank ran out first)."""
        self.epoch, self.positions, self.turn = self.epoch + 1, {}, 0
