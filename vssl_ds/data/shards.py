"""Shard lists: where they come from, how an epoch orders them, which rank/worker reads which."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np


class DataError(ValueError):
    """Training data that cannot be read or cannot fill a batch: the run stops with this message.

    `local`: met by this rank alone (one of its data workers died) while the other ranks are in the middle of a
    step: this rank leaves without the closing barrier (`engine.dist.abandon`) and the launcher stops the rest."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int = -1  # -1 when the source gives no count (brace pattern, pipe: URL)


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard manifest '{path}': {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"shard manifest '{path}' has no 'shards' list; regenerate it with tools/make_shards.py")
    return manifest


def resolve_shards(spec: str) -> list[Shard]:
    """`spec` is a manifest .json, a brace pattern (`train-{000000..000099}.tar`), or `;`-joined URLs."""
    if not spec:
        raise DataError("data.train is empty: give a manifest.json, a brace pattern or shard URLs")
    if spec.endswith(".json"):
        manifest = load_manifest(spec)
        root = Path(spec).parent
        shards = []
        for i, entry in enumerate(manifest["shards"]):
            if "url" not in entry:
                raise DataError(f"shard manifest '{spec}': entry {i} has no 'url'")
            url = entry["url"]
            if is_local(url) and not Path(url).is_absolute():
                url = str(root / url)  # manifests store paths relative to themselves so shard sets can move
            shards.append(Shard(url, int(entry.get("samples", -1))))
        return shards
    return [Shard(u) for part in spec.split(";") if part for u in braceexpand.braceexpand(part)]


def is_local(url: str) -> bool:
    """A file path (not a URL, not a `pipe:` command)."""
    return "://" not in url and not url.startswith("pipe:")


def present_shards(shards: list[Shard], spec: str) -> tuple[list[Shard], list[Shard]]:
    """→ (shards to read, local shard files that do not exist). No shard listed, or none present, is a DataError
    that says how many were listed and how many can be read (a run would otherwise wait for data forever)."""
    if not shards:
        raise DataError(f"'{spec}' lists no shards (0 listed): write shards with tools/make_shards.py")
    missing = [s for s in shards if is_local(s.url) and not Path(s.url).is_file()]
    if len(missing) == len(shards):
        raise DataError(f"none of the {len(shards)} shards listed by '{spec}' can be read: all {len(missing)} are "
                        f"missing (first: {missing[0].url}); check the paths, or that the shard folder is mounted")
    gone = set(missing)
    return [s for s in shards if s not in gone], missing


def epoch_order(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    """The same permutation on every rank: ranks then take disjoint slices of it."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def split(shards: list[Shard], index: int, count: int) -> list[Shard]:
    return shards[index::count]


def samples_per_epoch(shards: list[Shard], fallback: int) -> int:
    if all(s.samples >= 0 for s in shards):
        return sum(s.samples for s in shards)
    if fallback <= 0:
        raise DataError("the shard list carries no sample counts: use a manifest.json or set data.epoch_size")
    return fallback
