"""Shards → decoded, augmented, masked batches, with a position that makes mid-epoch resume exact.

Each data worker reads a disjoint slice of the epoch's shard order and counts the raw samples it has
consumed (`pos`). Every batch carries its worker and `pos`; the loader hands batches to the loop in a fixed
round-robin over workers and remembers, per worker, the `pos` of the last batch the loop took. Resuming
skips exactly those samples (before decoding) and restarts the round-robin at the right worker.
All randomness of a sample (clip start, crop, mask) comes from (seed, epoch, key), never from order.

Every batch also names the samples it consumed as (shard index in the manifest, sample index in the shard), and the
loader keeps them as one bitmask per shard: a record of the epoch that does not depend on ranks or workers. Resumed
on another number of ranks or workers, the epoch goes on with exactly the samples no rank trained yet, cut into
equal contiguous runs (in the epoch's shard order) over the new ranks x workers ("rebalanced" epoch).
"""
from __future__ import annotations

import atexit
import contextlib
import faulthandler
import functools
import json
import logging
import multiprocessing.sharedctypes
import multiprocessing.util  # noqa: F401  (its exit handler is registered now, so `_stop_live_workers` runs first)
import os
import signal
import sys
import threading
import weakref
import zlib
from collections import Counter, deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..logging import fault_stream
from .batch import Batch
from .decode import DEFAULT_ORDER, DecodeError, decode, decode_image, probe_layout
from .sampling import ShortVideo
from .shards import DataError, Shard, epoch_order, split
from .sources import IMAGE_EXTS, VIDEO_EXTS
from .transforms import apply_view
from .targets import stored_targets
from .views import View

log = logging.getLogger(__name__)
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTS))
MEDIA = ("mp4", *(e.lstrip(".") for e in sorted(VIDEO_EXTS) if e != ".mp4"), *IMAGE_MEMBERS)
END = "__end__"  # a worker's last item: tells the loader that worker has no more batches this epoch
SLOT = 1024  # bytes per data worker for "key<TAB>shard" of the sample it is decoding


class WorkerNotes:
    """Per data worker, in shared memory that the workers inherit: the sample it is decoding now, for the rank to name
    when a worker dies (a decoder crash, the out-of-memory killer)."""

    def __init__(self):
        self.buf = None

    def attach(self, workers: int) -> None:
        """Fresh notes for `workers` workers, before they start (none in the rank itself: 0 workers)."""
        self.buf = multiprocessing.sharedctypes.RawArray("c", SLOT * workers) if workers else None

    def note(self, worker: int, key: str = "", url: str = "") -> None:
        """The sample `worker` starts on; no key: between samples."""
        if self.buf is not None:
            data = (f"{key}\t{url}" if key else "").encode()[:SLOT - 1] + b"\0"
            self.buf[worker * SLOT:worker * SLOT + len(data)] = data

    def read(self, worker: int) -> tuple[str, str]:
        """(key, shard) of the sample `worker` noted last; ("", "") between samples."""
        if self.buf is None:
            return "", ""
        text = bytes(self.buf[worker * SLOT:(worker + 1) * SLOT]).split(b"\0", 1)[0].decode(errors="replace")
        key, _, url = text.partition("\t")
        return key, url


RESUME_ADVICE = ("A video that crashes the decoder or needs more memory than a worker has stops the run at the same "
                 "sample on every resume: list its key in a file (one per line) and pass data.exclude=FILE, then "
                 "--auto-resume (or re-make the shard without it)")


def dead_workers(stream, notes: WorkerNotes, rank: int, advice: str = RESUME_ADVICE, wait: float = 0.0) -> str:
    """What died among a DataLoader iterator's workers, on which sample, and what to do; "" while every worker lives
    (or ended normally). `wait`: seconds to give a worker whose death broke the read (its connection closes a moment
    before its exit status can be read)."""
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not any(p.exitcode for p in getattr(stream, "_workers", ())):
        time.sleep(0.05)
    lines = []
    for worker, process in enumerate(getattr(stream, "_workers", ())):
        code = process.exitcode
        if not code:  # alive (None) or finished (0)
            continue
        how = f"exit code {code}"
        if code < 0:
            how = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else how
            how += " (the kernel's out-of-memory killer sends SIGKILL)" if code == -signal.SIGKILL else ""
        key, url = notes.read(worker)
        where = (f"while decoding sample '{key}' of {url}" if key else
                 "between samples (reading shard data or collating a batch)")
        lines.append(f"data worker {worker} (pid {process.pid}) of rank {rank} died, {how}, {where}")
    if not lines:
        return ""
    return "; ".join(lines) + ". " + advice


class ShardStream(IterableDataset):
    """Stream of batches from video (or image) shards.

    After each stage the stream holds: shard urls (this rank's and worker's slice, or resampled) → raw samples
    {__key__, mp4|jpg…, json} → shuffled raw samples (buffer seeded per rank/worker/epoch) → [skip the ones
    consumed before a resume] → decoded, viewed, masked samples {video [T,H,W,C] uint8, (long|second|image),
    mask [N]} → batches {video [B,C,T,H,W] uint8, mask [B,N], label [B], keys}.
    """

    def __init__(self, shards: list[Shard], view: View, batch_size: int, mask_fn=None, rank: int = 0,
                 world: int = 1, seed: int = 0, decoders=DEFAULT_ORDER, shuffle_buffer: int = 0,
                 resampled: bool = False, epoch_samples: int = 0, cache: str = "", cache_targets=(),
                 decode_device: str = "cpu", exclude=frozenset()):
        if view.repeats > 1 and batch_size % view.repeats:
            raise ValueError(f"data.batch_size ({batch_size}) must be a multiple of data.repeats ({view.repeats}) "
                             "so that no video's repeats are split across a checkpoint")
        if resampled and epoch_samples <= 0:
            raise ValueError("resampled mode needs an epoch length: a manifest with sample counts or data.epoch_size")
        self.shards, self.view, self.batch_size, self.mask_fn = shards, view, batch_size, mask_fn
        self.rank, self.world, self.seed, self.decoders = rank, world, seed, tuple(decoders)
        self.shuffle_buffer, self.resampled, self.epoch_samples = shuffle_buffer, resampled, epoch_samples
        self.cache, self.cache_targets = cache, tuple(cache_targets)  # teacher-target shards, joined by key
        self.decode_device = decode_device  # not "cpu": ship encoded videos and their plan (see device_decode.py)
        self.epoch, self.start, self.base = 0, {}, None
        self.shard_index = {s.url: i for i, s in enumerate(shards)}
        self.exclude = frozenset(exclude)  # sample keys left out (data.exclude), before decoding
        self.notes = WorkerNotes()  # per worker, the sample it is decoding (named if the worker dies)

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None, base: dict[int, int] | None = None) -> None:
        """`start`: raw samples each worker consumed already; `base`: for a rebalanced epoch, the samples (bitmask
        per shard index) every rank of the previous layout trained — the epoch serves only the others."""
        self.epoch, self.start, self.base = epoch, dict(start or {}), base

    def _rebalanced(self, worker: int, num_workers: int) -> list[tuple[Shard, set[int] | None]]:
        """This worker's part of a rebalanced epoch: the samples not in `base`, in the epoch's shard order, cut into
        world x workers contiguous runs of equal length (±1) → [(shard, sample indices to read)]."""
        base, order = self.base or {}, epoch_order(self.shards, self.seed, self.epoch)
        if any(s.samples < 0 for s in order):  # no counts (no manifest): whole shards, trained samples left out
            return [(s, None) for s in split(split(order, self.rank, self.world), worker, num_workers)]
        left = [s.samples - bin(base.get(self.shard_index[s.url], 0)).count("1") for s in order]
        slots, slot, total = self.world * num_workers, self.rank * num_workers + worker, sum(left)
        lo, hi = total * slot // slots, total * (slot + 1) // slots
        mine, offset = [], 0
        for shard, n in zip(order, left):
            if offset < hi and offset + n > lo:
                bits = base.get(self.shard_index[shard.url], 0)
                todo = [i for i in range(shard.samples) if not bits >> i & 1]
                mine.append((shard, set(todo[max(lo - offset, 0):hi - offset])))
            offset += n
        return mine

    def _my_shards(self, worker: int, num_workers: int) -> Iterator[Shard]:
        if self.resampled:  # shards drawn with replacement, a stream of its own per rank and worker
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
            while True:
                yield self.shards[int(rng.integers(len(self.shards)))]
        mine = split(split(epoch_order(self.shards, self.seed, self.epoch), self.rank, self.world),
                     worker, num_workers)
        if not mine:
            log.warning("rank %d worker %d has no shard this epoch (%d shards for %d ranks x %d workers); "
                        "write more shards than ranks x workers", self.rank, worker, len(self.shards),
                        self.world, num_workers)
        yield from mine

    def _raw(self, shards: Iterator[tuple[Shard, set[int] | None]], on_error) -> Iterator[dict]:
        """Raw samples of (shard, the sample indices to read or None for all), tagged with `__sid__` (the shard's
        index in the manifest) and `__idx__` (the sample's index in its shard); in a rebalanced epoch, the samples
        trained before the resume are left out."""
        base = self.base if self.base is not None else {}
        for shard, wanted in shards:
            sid = self.shard_index[shard.url]
            done = base.get(sid, 0)
            for idx, raw in enumerate(self._shard_samples(shard, on_error)):
                if (wanted is not None and idx not in wanted) or done >> idx & 1:
                    continue
                raw["__sid__"], raw["__idx__"] = sid, idx
                yield raw

    def _shard_samples(self, shard: Shard, on_error) -> Iterator[dict]:
        """One shard's raw samples; with a teacher cache, each joined with its target entry (same name, order)."""
        if not self.cache:
            yield from tarfile_samples([{"url": shard.url}], handler=on_error)
            return
        target_url = str(Path(self.cache) / Path(shard.url).name)
        targets = tarfile_samples([{"url": target_url}], handler=on_error)
        for raw in tarfile_samples([{"url": shard.url}], handler=on_error):
            entry = next(targets, None)
            if entry is None or entry["__key__"] != raw["__key__"]:
                raise KeyError(f"teacher cache has no entry for sample '{raw['__key__']}' of shard {shard.url} "
                               f"(looked in {target_url}{', found ' + entry['__key__'] if entry else ''}): the "
                               "cache was made from other shards; rebuild it with tools/cache_teachers.py")
            yield {**entry, **raw}

    def _shuffled(self, raws: Iterator[dict], worker: int) -> Iterator[dict]:
        """A sample shuffle buffer whose order depends only on (seed, epoch, rank, worker): replayable."""
        if self.shuffle_buffer <= 1:
            yield from raws
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 2])
        buf: list[dict] = []
        for raw in raws:
            if len(buf) < self.shuffle_buffer:
                buf.append(raw)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], raw = raw, buf[k]
            yield raw
        for k in rng.permutation(len(buf)):
            yield buf[k]

    def _sample(self, raw: dict, faults: Counter) -> list:
        key, url = raw["__key__"], raw.get("__url__")
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
        member = next((m for m in MEDIA if m in raw), None)
        if member is None:
            faults["missing_media"] += 1
            log.warning("sample %s in %s has no video/image member (has %s); skipped", key, url,
                        sorted(k for k in raw if not k.startswith("__")))
            return []
        picks: list[np.ndarray] = []
        replay = self._replay(raw, faults) if self.cache else None
        if self.cache and replay is None:
            return []

        def pick(n: int) -> np.ndarray:  # all clips of all repeats, decoded once; drawn once (a fallback decoder
            # asks again after the first failed: the draws, and so the crops and masks after them, do not depend on
            # which decoder read the clip)
            if not picks and replay is not None:  # the cached view: exactly the frames the teachers saw
                picks.extend(np.asarray(f) for f in replay["frames"])
            elif not picks:
                picks.extend(c for _ in range(self.view.repeats) for c in self.view.pick(n, rng))
            if max(int(p.max()) for p in picks) >= n:
                raise DecodeError(f"{'cached view wants' if replay is not None else 'clip drawn for'} frame "
                                  f"{max(int(p.max()) for p in picks)} of {n}")
            return np.unique(np.concatenate(picks))

        planned = self.decode_device != "cpu" and member not in IMAGE_MEMBERS
        try:
            if planned:  # the device decodes: only the frame count and size are read here
                count, height, width = probe_layout(raw[member])
                indices, frames, used = pick(count), None, self.decoders[0]
            elif member in IMAGE_MEMBERS:
                indices, frames = decode_image(raw[member], pick)
                used = self.decoders[0]
            else:
                indices, frames, used = decode(raw[member], pick, self.decoders)
        except DecodeError as e:
            faults["corrupt"] += 1
            log.warning("corrupt sample %s in %s skipped: %s", key, url, e)
            return []
        except ShortVideo as e:
            faults["short"] += 1
            log.info("short clip %s in %s skipped: %s", key, url, e)
            return []
        if used != self.decoders[0]:
            faults["decoder_fallback"] += 1
        if not planned:
            frames = torch.from_numpy(frames)  # [F,H,W,C] uint8, F = distinct frames of all clips
            height, width = frames.shape[1], frames.shape[2]
        where = {int(i): k for k, i in enumerate(indices)}
        label, names, out = _label(raw), self.view.names(), []
        per = len(names)
        for r in range(1 if replay is not None else self.view.repeats):
            clips = picks[r * per:(r + 1) * per]
            params = replay["spatial"] if replay is not None else self.view.spatial(height, width, rng)
            if planned:  # the same draws as below, for decode_batch on the device
                sample = {"encoded": (raw[member], {
                    "key": key, "frames": np.asarray(indices, dtype=np.int64), "decoders": list(self.decoders),
                    "clips": {name: [where[int(i)] for i in idx] for name, idx in zip(names, clips)},
                    "spatial": dict(zip(names, params))})}
            else:
                sample = {name: apply_view(_gather(frames, [where[int(i)] for i in idx]), p)
                          for name, idx, p in zip(names, clips, params)}
            if self.mask_fn is not None:
                sample["mask"] = torch.from_numpy(self.mask_fn(rng))  # fresh every epoch, cached views or not
            if replay is not None:
                sample.update({f"target:{n}": t for n, t in replay["targets"].items()})
            out.append((key, sample, label))
        return out

    def _replay(self, raw: dict, faults: Counter) -> dict | None:
        """View k = epoch mod K of the cached entry: its frames, spatial parameters and targets."""
        meta = json.loads(raw["views.json"])
        if "error" in meta:  # the clip failed when the cache was made
            faults["corrupt"] += 1
            log.warning("sample %s in %s was unreadable when the cache was made; skipped", raw["__key__"],
                        raw.get("__url__"))
            return None
        k = self.epoch % len(meta["views"])
        view = meta["views"][k]
        return {"frames": view["frames"], "spatial": view["spatial"],
                "targets": {m: t for n in self.cache_targets for m, t in stored_targets(raw, n, k).items()}}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        skip = self.start.get(worker, 0)
        faults: Counter = Counter()

        def on_error(exn: Exception) -> bool:  # unreadable tar / member: count, log, go on
            faults["unreadable"] += 1
            log.warning("rank %d worker %d: skipping unreadable shard data: %s", self.rank, worker, exn)
            return True

        if self.base is not None and not self.resampled:
            shards = iter(self._rebalanced(worker, num_workers))
        else:
            shards = ((s, None) for s in self._my_shards(worker, num_workers))
        raws = self._shuffled(self._raw(shards, on_error), worker)
        quota = -(-self.epoch_samples // (self.world * num_workers)) if self.resampled else 0
        items, taken = [], []
        for pos, raw in enumerate(raws, start=1):
            if quota and pos > quota:
                break
            if pos <= skip:
                continue  # consumed before the checkpoint this run resumes from
            taken.append((raw["__sid__"], raw["__idx__"]))  # trained once the loop takes this batch (or skipped)
            if raw["__key__"] in self.exclude:
                continue
            self.notes.note(worker, raw["__key__"], raw.get("__url__", ""))
            items += self._sample(raw, faults)
            self.notes.note(worker)
            if len(items) >= self.batch_size:
                yield _collate(items[:self.batch_size], worker, pos, faults, taken)
                items, taken = items[self.batch_size:], []
        yield {END: worker, "faults": dict(faults)}


VideoClips = ShardStream  # the name the spine used


def _label(raw: dict) -> int:
    meta = raw.get("json")
    if meta is None:
        return -1
    try:
        return int(json.loads(meta).get("label", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


def _gather(frames: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The decoded frames a clip uses, in order: the decoded tensor itself when the clip is exactly those frames
    (no full-resolution copy), a gather otherwise (frames shared by two clips, repeats)."""
    if rows == list(range(len(frames))):
        return frames
    return frames[rows]


def _batched(parts: list[torch.Tensor], order: tuple[int, ...] | None, shared: bool | None = None) -> torch.Tensor:
    """Stack per-sample tensors (each permuted by `order`) into one batch written once: in a data worker (or with
    `shared`) straight into shared memory, which the DataLoader then hands to the rank without copying it again."""
    first = parts[0] if order is None else parts[0].permute(*order)
    out = torch.empty((len(parts), *first.shape), dtype=first.dtype)
    if shared or (shared is None and torch.utils.data.get_worker_info() is not None):
        out.share_memory_()
    for i, part in enumerate(parts):
        out[i].copy_(part if order is None else part.permute(*order))
    return out


def _collate(items, worker: int, pos: int, faults: Counter, taken=()) -> dict:
    keys, samples, labels = zip(*items)
    out = {"label": torch.tensor(labels, dtype=torch.long), "keys": list(keys), "worker": worker, "pos": pos,
           "faults": dict(faults), "views": {}, "consumed": list(taken)}
    for name in samples[0]:
        parts = [s[name] for s in samples]
        if name == "encoded":
            out["encoded"] = list(parts)  # [(video bytes, plan)]: decoded on the device (device_decode.py)
        elif name == "mask":
            out["mask"] = _batched(parts, None)  # [B,N] bool
        elif name.startswith("target:"):
            out.setdefault("targets", {})[name[7:]] = _batched(parts, None)  # [B,N,D]
        elif name == "image":
            out["image"] = _batched([p[0] for p in parts], (2, 0, 1))  # [B,C,H,W] uint8
        else:
            x = _batched(parts, (3, 0, 1, 2))  # [B,C,T,H,W] uint8
            if name == "video":
                out["video"] = x
            else:
                out["views"][name] = x
    return out


def _ignore_stop_signals(_worker_id: int, parent: int = 0) -> None:
    """Preemption signals reach the whole process tree; workers keep serving while the rank checkpoints.
    And a worker never outlives its rank: when the rank dies (kill -9 included) the kernel kills the worker
    (Linux PR_SET_PDEATHSIG), so no orphaned worker keeps memory, shared memory or a GPU context."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    stream = fault_stream()
    if stream is not None:  # the rank's hang watchdog asks for our stacks
        faulthandler.register(signal.SIGUSR2, file=stream, all_threads=True)
    _die_with_parent(parent or os.getppid())


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # no prctl: torch's own watchdog still notices within seconds
        return
    if os.getppid() != parent:  # the rank died before prctl took effect
        os._exit(1)


_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators whose workers may still run


def stop_workers(stream) -> None:
    """Stop a DataLoader iterator's workers: torch's own shutdown (each worker gets a few seconds to finish the
    batch in hand), then SIGKILL for any still alive: torch's last resort is SIGTERM, which our workers ignore, and
    a worker left running makes the interpreter's exit wait for it forever (multiprocessing joins its children)."""
    _LIVE.discard(stream)
    shutdown = getattr(stream, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    finally:
        for worker in getattr(stream, "_workers", ()):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)


# what reading from a DataLoader iterator raises when one of its workers died: torch's RuntimeError ("worker … exited
# unexpectedly", or its SIGCHLD handler's), or, when the worker died while handing over a batch's shared memory, the
# broken connection (ConnectionResetError, EOFError)
WORKER_DEATH_ERRORS = (RuntimeError, OSError, EOFError)


@contextlib.contextmanager
def named_worker_deaths(stream, notes: WorkerNotes, rank: int, advice: str = RESUME_ADVICE):
    """Around the use of a DataLoader iterator: when one of its workers died, the error that reading from it raises
    (`WORKER_DEATH_ERRORS`) becomes a DataError naming worker, signal and sample (`dead_workers`), others pass;
    when torch's SIGCHLD handler raised its error in the caller's code instead, the same is logged on the way out.
    The workers are stopped on every way out (`stop_workers`): a dead worker's pid stays registered with torch until
    its iterator shuts down, and torch's SIGCHLD handler would raise about it at any later child's exit."""
    told = False
    # torch's SIGCHLD handler raises its "worker exited unexpectedly" wherever the main thread is at that moment
    # (in a step, in a collective, in the user's code), where this context never sees it; without the handler torch
    # finds the dead worker in next() (within 5 s), here
    sigchld = _quiet_sigchld(stream)
    try:
        yield
    except WORKER_DEATH_ERRORS as e:
        dead = dead_workers(stream, notes, rank, advice, wait=2.0)
        if not dead:
            raise
        told = True
        raise DataError(dead, local=True) from e
    finally:
        dead = "" if told else dead_workers(stream, notes, rank, advice)
        if dead:
            log.error("%s", dead)
        stop_workers(stream)
        if sigchld is not None and signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL:
            signal.signal(signal.SIGCHLD, sigchld)


def _quiet_sigchld(stream):
    """Set SIGCHLD to its default while `stream`'s workers run (main thread only) → the handler to put back, or
    None when nothing was changed."""
    if not getattr(stream, "_workers", None) or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous):  # default already, or SIG_IGN (children reaped unseen: left as the caller set it)
        return None
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return previous


@atexit.register
def _stop_live_workers() -> None:
    """At exit, stop the workers of loaders that were never closed: a script that stops iterating early, or an
    exception whose traceback (kept by the interpreter for printing) holds the loop. Registered after
    multiprocessing's exit handler, so it runs before that handler joins (and would wait for) the workers."""
    for stream in list(_LIVE):
        stop_workers(stream)


class OrderedLoader:
    """A DataLoader over a `ShardStream` that yields `Batch`es in a fixed worker round-robin and keeps
    the state (`state_dict`) from which the same epoch continues exactly."""

    def __init__(self, dataset: ShardStream, num_workers: int, prefetch: int = 2, pin_memory: bool = False):
        self.dataset, self.num_workers = dataset, num_workers
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.epoch, self.positions, self.turn = 0, {}, 0
        self.consumed: dict[int, int] = {}  # shard index → bitmask of its samples trained this epoch (any layout)
        self.base: dict[int, int] | None = None  # a rebalanced epoch: what the previous layout had trained
        self.faults: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": dict(self.positions), "turn": self.turn,
                "num_workers": self.num_workers, "world": self.dataset.world, "consumed": dict(self.consumed),
                "base": None if self.base is None else dict(self.base)}

    def load_state_dict(self, state: dict, peers=None) -> None:
        """This rank's saved state; `peers()` → every saved rank's state, read only when the layout changed."""
        same_layout = state.get("num_workers") == self.num_workers and state.get("world") == self.dataset.world
        self.epoch = int(state["epoch"])
        if same_layout:
            self.positions = {int(k): int(v) for k, v in state["positions"].items()}
            self.turn = int(state["turn"])
            self.consumed = {int(k): int(v) for k, v in state.get("consumed", {}).items()}
            self.base = None if state.get("base") is None else {int(k): int(v) for k, v in state["base"].items()}
            return
        self.positions, self.turn = {}, 0
        states = peers() if peers is not None else []
        if self.dataset.resampled or not states or any("consumed" not in p for p in states):
            why = ("data.resampled draws a new stream" if self.dataset.resampled else
                   "the checkpoint does not record which samples were trained (written before vssl_ds did)")
            log.warning("data layout changed (workers %s→%d, ranks %s→%d) and %s: epoch %d restarts from its "
                        "beginning", state.get("num_workers"), self.num_workers, state.get("world"),
                        self.dataset.world, why, self.epoch)
            self.consumed, self.base = {}, None
            return
        if len({int(p["epoch"]) for p in states}) != 1:
            raise ValueError(f"the saved ranks disagree on the epoch ({sorted({p['epoch'] for p in states})}): "
                             "the checkpoint is not from one run")
        union: dict[int, int] = {}
        for peer in states:
            for sid, bits in peer["consumed"].items():
                union[int(sid)] = union.get(int(sid), 0) | int(bits)
        self.base, self.consumed = union, dict(union)
        trained = sum(bin(b).count("1") for b in union.values())
        log.info("data layout changed (workers %s→%d, ranks %s→%d): epoch %d goes on with the samples no rank has "
                 "trained yet (%d trained so far), spread evenly over %d ranks x %d workers",
                 state.get("num_workers"), self.num_workers, state.get("world"), self.dataset.world, self.epoch,
                 trained, self.dataset.world, max(self.num_workers, 1))

    missing_shards = 0  # listed shard files that did not exist when the run started (left out, see build.stream)

    def fault_counts(self) -> Counter:
        total: Counter = Counter()
        for counts in self.faults.values():
            total.update(counts)
        if self.missing_shards:
            total["missing_shard"] += self.missing_shards
        return total

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (`self.epoch`), continued from the saved positions when there are any."""
        self.dataset.set_epoch(self.epoch, self.positions, self.base)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                            prefetch_factor=self.prefetch if self.num_workers else None,
                            worker_init_fn=functools.partial(_ignore_stop_signals, parent=os.getpid()))
        workers = list(range(max(self.num_workers, 1)))
        pending = {w: deque() for w in workers}
        active = list(workers)
        self.dataset.notes.attach(self.num_workers)
        stream = iter(loader)
        if hasattr(stream, "_workers"):  # worker processes (none with num_workers=0)
            _LIVE.add(stream)
        # workers ignore SIGTERM (see above): they are stopped on every way out, errors included
        with named_worker_deaths(stream, self.dataset.notes, self.dataset.rank):
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
                for sid, idx in item["consumed"]:
                    self.consumed[sid] = self.consumed.get(sid, 0) | 1 << idx
                yield Batch.from_worker(item)
        self.next_epoch()

    def next_epoch(self) -> None:
        """Close the current epoch (also called when another rank ran out first)."""
        self.epoch, self.positions, self.turn = self.epoch + 1, {}, 0
        self.consumed, self.base = {}, None
