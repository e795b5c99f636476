"""Checkpoint folder layout and the atomic `latest` pointer.

    <run>/checkpoints/<tag>/            DeepSpeed's files (model, optimizer shards, client state)
    <run>/checkpoints/<tag>/rank00000.pt   per-rank state: RNG states, data position
    <run>/checkpoints/latest            the tag of the newest *complete* checkpoint (DeepSpeed's format)

`latest` is replaced (write temp + fsync + rename) only after every rank has written everything, so a
crash while saving leaves it on the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint '{tag}' but {ckpt_dir / tag} does not exist; "
                                f"point it at a complete checkpoint folder or remove it to start afresh")
    return tag


def rank_state_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"rank{rank:05d}.pt"


def save_rank_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def prune(ckpt_dir: Path, keep_last: int, protect: str) -> None:
    """Remove the oldest complete checkpoints beyond `keep_last` (never the one `latest` names)."""
    if keep_last <= 0:
        return
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir())  # step%08d: by step (mtimes change, e.g. when
    # an elastic resume converts an old checkpoint to a universal one inside its folder)
    for old in tags[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
