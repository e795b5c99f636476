"""From the typed config to the loader the training loop iterates: a video stream, and optionally an image
stream joined batch by batch (BEVT trains on both in every step)."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..config.schema import DataConfig
from .batch import Batch
from .decode import decoder_order
from .pipeline import OrderedLoader, ShardStream
from .shards import DataError, present_shards, resolve_shards, samples_per_epoch
from .views import View

log = logging.getLogger(__name__)


def view_from(d: DataConfig, kind: str | None = None) -> View:
    return View(kind=kind or d.view, num_frames=d.num_frames, stride=d.sampling_rate, size=d.size,
                policy=d.short_video, scales=tuple(d.scales), short_range=tuple(d.short_range),
                long_stride=d.long_stride, max_gap=d.max_gap, repeats=d.repeats, flip=d.flip)


def stream(d: DataConfig, spec: str, view: View, batch_size: int, mask_fn, rank: int, world: int,
           seed: int, cache_targets=(), cache_sub: str = "", decode_device: str = "cpu") -> tuple[OrderedLoader, int]:
    """→ (loader, samples per epoch over all ranks). `decode_device="cuda"`: the batches carry the encoded videos and
    what to make of them; Batch.to decodes them on the device (see pipeline.ShardStream)."""
    shards, missing = present_shards(resolve_shards(spec), spec)
    if missing and rank == 0:  # logged once per run (not once per worker and epoch), counted in data/faults
        log.warning("%d of %d shards listed by '%s' are missing and are left out: %s", len(missing),
                    len(shards) + len(missing), spec, ", ".join(s.url for s in missing))
    if not d.resampled and len(shards) < world:  # a rank without a shard has no batch: fail now, not hang later
        raise DataError(f"'{spec}' has {len(shards)} readable shard(s) for {world} ranks: each rank reads whole "
                        f"shards, so {world - len(shards)} rank(s) would get nothing. Write at least {world} shards "
                        "(tools/make_shards.py --max-per-shard / --shard-size), or set data.resampled=true")
    samples = d.epoch_size or samples_per_epoch(shards, 0)  # errors when neither says how long an epoch is
    if samples <= 0:
        raise DataError(f"'{spec}' lists {len(shards)} readable shards with 0 samples: nothing to train on")
    cache = ""
    if cache_targets:
        if not d.targets:
            raise DataError("cached teacher targets need data.targets (the folder tools/cache_teachers.py wrote)")
        cache = str((Path(d.targets).parent if d.targets.endswith(".json") else Path(d.targets)) / cache_sub)
    ds = ShardStream(shards, view, batch_size, mask_fn, rank, world, seed, decoder_order(d.decoder),
                     d.shuffle_buffer, d.resampled, samples, cache, cache_targets, decode_device,
                     excluded_keys(d.exclude, rank))
    loader = OrderedLoader(ds, d.num_workers, d.prefetch, d.pin_memory)
    loader.missing_shards = len(missing)
    return loader, samples


def excluded_keys(path: str, rank: int = 0) -> frozenset[str]:
    """data.exclude: sample keys to leave out, one per line (blank lines and `#` comments ignored)."""
    if not path:
        return frozenset()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DataError(f"data.exclude: cannot read '{path}' ({e.strerror or e}); it should be a text file of sample "
                        "keys, one per line") from None
    keys = frozenset(k for k in (line.split("#", 1)[0].strip() for line in lines) if k)
    if rank == 0:
        log.info("data.exclude: %d sample key(s) from %s are left out", len(keys), path)
    return keys


class JointLoader:
    """Video batches, each joined with the next batch of an endless image stream. Same interface and
    exact-resume state as `OrderedLoader` (the image stream keeps its own epoch and position)."""

    def __init__(self, videos: OrderedLoader, images: OrderedLoader):
        self.videos, self.images = videos, images

    @property
    def epoch(self) -> int:
        return self.videos.epoch

    def state_dict(self) -> dict:
        return {**self.videos.state_dict(), "images": self.images.state_dict()}

    def load_state_dict(self, state: dict, peers=None) -> None:
        self.videos.load_state_dict(state, peers)
        if "images" in state:  # endless: on another layout its epoch restarts (see OrderedLoader.load_state_dict)
            self.images.load_state_dict(state["images"])

    def fault_counts(self) -> Counter:
        return self.videos.fault_counts() + Counter({f"image_{k}": v for k, v in self.images.fault_counts().items()})

    def next_epoch(self) -> None:
        self.videos.next_epoch()

    def _endless_images(self) -> Iterator[Batch]:
        empty = 0  # passes in a row without a batch
        while True:
            got = False
            for batch in self.images:
                got = True
                yield batch
            # one empty pass is the tail of an image epoch whose last batch was taken just before the previous
            # video epoch closed this generator: the pass ends that epoch, the next pass starts a new one
            empty = 0 if got else empty + 1
            if empty >= 2:
                raise RuntimeError("the image stream (data.images) yielded no batch in a whole epoch: "
                                   "check the shards and data.image_batch_size")

    def __iter__(self) -> Iterator[Batch]:
        images = self._endless_images()
        try:
            for batch in self.videos:
                yield batch.with_images(next(images))
        finally:
            images.close()  # stop the image workers with this epoch; the next one resumes from the state


def build_loader(d: DataConfig, mask_fn, image_mask_fn, rank: int, world: int, seed: int, cache_targets=(),
                 image_cache_targets=()):
    """→ (loader, samples per epoch over all ranks)."""
    if not d.train:
        raise DataError("data.train is empty: give a manifest.json, a brace pattern or shard URLs")
    videos, samples = stream(d, d.train, view_from(d), d.batch_size, mask_fn, rank, world, seed, cache_targets,
                             decode_device=d.decode_device)
    if d.image_batch_size <= 0:
        return videos, samples
    if not d.images:
        raise DataError("data.image_batch_size > 0 needs data.images (image shards from make_shards --kind image)")
    images, _ = stream(d, d.images, view_from(d, "image"), d.image_batch_size, image_mask_fn, rank, world, seed + 1,
                       image_cache_targets, "images")
    return JointLoader(videos, images), samples
