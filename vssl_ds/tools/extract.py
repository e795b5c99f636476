"""Features of your own videos from a trained encoder, to disk: no loader to write.

    vssl-extract /data/my_videos feats/ --weights runs/mvd_b/export/encoder.safetensors
    vssl-extract clips.csv feats/ --weights runs/mvd_b --clips 4 --tokens
    deepspeed --num_gpus 8 tools/extract.py /shards/k400_val/manifest.json feats/ --weights enc.safetensors

Input: a folder (every video or image file under it, recursively), a CSV `path[,label]` (relative paths resolve
against the CSV's folder), or shards (a manifest.json, a brace pattern). Encoder: an export (`.safetensors` +
its `.json`, tools/export.py) or a run / checkpoint folder (consolidated on the fly, any ZeRO stage).

Each video gives `--clips` clips spread evenly over it (the centre crop at the encoder's input size); their features
are averaged: the mean-pooled token (`--pool mean`, default), the CLS token (`--pool cls`), or every token
(`--tokens`, [L,D] in fp16). Output: WebDataset shards `features-<rank>-<n>.tar` of `<key>.npy` + `<key>.json`
(source, label, clips), keyed like the input (a file's path under the folder / CSV without its extension, dots
→ `_`; a shard sample's own key), `manifest.json` (shards, counts, feature shape, encoder), and `failures.jsonl`
(each video that could not be decoded, with the reason: never a stopped job).

Multi-rank under deepspeed / torchrun / srun: the videos are split over the ranks. Resumable: a shard counts once
it is closed and listed in `progress-<rank>.jsonl`; a rerun (any number of ranks) skips every video of a listed
shard and removes half-written ones.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from ..cli import HelpFormatter, console
from ..data.pipeline import WORKER_DEATH_ERRORS, WorkerNotes, dead_workers, stop_workers
from ..data.targets import npy_bytes

log = logging.getLogger(__name__)
VIDEO_EXT = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-extract", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", help="a folder of videos, a CSV path[,label], or shards (manifest.json / brace pattern)")
    p.add_argument("out", help="output folder (features-*.tar, manifest.json, failures.jsonl)")
    p.add_argument("--weights", required=True, help="an exported encoder (.safetensors + .json) or a run / "
                                                    "checkpoint folder")
    p.add_argument("--clips", type=int, default=1, help="clips spread over each video, features averaged")
    p.add_argument("--tokens", action="store_true", help="every token [L,D] (fp16) instead of one pooled vector")
    p.add_argument("--pool", choices=("mean", "cls"), default="mean")
    p.add_argument("--num-frames", type=int, default=0, help="frames per clip (default: the encoder's)")
    p.add_argument("--stride", type=int, default=4, help="frame stride within a clip")
    p.add_argument("--size", type=int, default=0, help="input size (default: the encoder's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding workers per rank")
    p.add_argument("--shard-size", type=int, default=1000, help="videos per output shard (the unit of resume)")
    p.add_argument("--decoder", default="pyav", choices=("decord", "pyav", "torchcodec"))
    p.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406))
    p.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p.parse_args(argv)


def list_inputs(spec: str) -> tuple[str, list[tuple[str, str, int]]]:
    """→ ("files", [(key, path, label)]) for a folder or a CSV, or ("shards", []) for shards."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXT | IMAGE_EXT)
        if not files:
            raise ValueError(f"'{spec}' holds no video or image file ({', '.join(sorted(VIDEO_EXT | IMAGE_EXT))})")
        return "files", [(_key(f.relative_to(path)), str(f), -1) for f in files]
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise FileNotFoundError(f"CSV '{spec}' does not exist")
        rows = []
        with open(path, newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or (i == 0 and row[0].strip().lower() == "path"):
                    continue
                rel = Path(row[0].strip())
                full = rel if rel.is_absolute() else path.parent / rel
                label = int(row[1]) if len(row) > 1 and row[1].strip().lstrip("-").isdigit() else -1
                rows.append((_key(rel if not rel.is_absolute() else Path(*rel.parts[1:])), str(full), label))
        if not rows:
            raise ValueError(f"CSV '{spec}' lists no video (expected rows path[,label])")
        keys = [k for k, _, _ in rows]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"CSV '{spec}' lists '{dup}' twice: every video must be listed once")
        return "files", rows
    local = "://" not in spec and not spec.startswith("pipe:") and not any(c in spec for c in "{;")
    if local and not path.exists():
        raise FileNotFoundError(f"input '{spec}' does not exist: give a folder of videos, a CSV path[,label] or "
                                "shards (a manifest.json or a brace pattern)")
    return "shards", []


def _key(rel: Path) -> str:
    return str(rel.with_suffix("")).replace(".", "_")


class FileViews(torch.utils.data.IterableDataset):
    """EvalViews over files on disk: yields {"key", "label", "video" [V,T,H,W,C] uint8} or {"key", "error"}."""

    def __init__(self, items, views):
        super().__init__()
        self.items, self.views, self.notes = items, views, WorkerNotes()

    def __iter__(self):
        from ..data.decode import DecodeError

        info = torch.utils.data.get_worker_info()
        mine = self.items if info is None else self.items[info.id::info.num_workers]
        worker = info.id if info else 0
        for key, path, label in mine:
            ext = Path(path).suffix.lower()
            self.notes.note(worker, key, path)
            try:
                raw = {"__key__": key, ("jpg" if ext in IMAGE_EXT else "mp4"): Path(path).read_bytes()}
                video = self.views.views(raw)
            except (DecodeError, OSError, ValueError, RuntimeError) as e:
                yield {"key": key, "error": f"{type(e).__name__}: {e}", "source": path}
                continue
            finally:
                self.notes.note(worker)
            yield {"key": key, "label": label, "video": video, "source": path}


class ShardViews(torch.utils.data.IterableDataset):
    """EvalViews over shards, skipping done keys and reporting undecodable samples instead of dropping them."""

    def __init__(self, views, done: set[str]):
        super().__init__()
        self.views, self.done, self.notes = views, done, WorkerNotes()

    def __iter__(self):
        from webdataset.tariterators import tarfile_samples

        from ..data.decode import DecodeError
        from ..data.pipeline import _label

        info = torch.utils.data.get_worker_info()
        shards = self.views.shards if info is None else self.views.shards[info.id::info.num_workers]
        worker = info.id if info else 0
        for shard in shards:
            try:
                for raw in tarfile_samples([{"url": shard.url}]):
                    key = raw["__key__"]
                    if key in self.done:
                        continue
                    self.notes.note(worker, key, shard.url)
                    try:
                        video = self.views.views(raw)
                    except DecodeError as e:
                        yield {"key": key, "error": str(e), "source": shard.url}
                        continue
                    finally:
                        self.notes.note(worker)
                    yield {"key": key, "label": _label(raw), "video": video, "source": shard.url}
            except (OSError, ValueError) as e:
                yield {"key": f"<shard {shard.url}>", "error": f"unreadable from here on: {e}", "source": shard.url}


def _collate(items):
    return items  # variable: good videos and failures mixed; batched by the caller


def load_encoder(weights: str, device: torch.device):
    """→ (encoder in eval mode, its ModelConfig as a dict, a description for the manifest)."""
    path = Path(weights)
    if path.suffix == ".safetensors":
        from ..models.exported import load_exported

        model, info = load_exported(path)
        return model.to(device).eval(), info["model"], {"weights": str(path.resolve()), "method": info.get("method"),
                                                        "step": info.get("step")}
    from ..engine.deepspeed import consolidated_weights
    from .export import _encoder, find_checkpoint

    tag_dir = find_checkpoint(path)
    state, saved = consolidated_weights(tag_dir)
    model, cfg, _extra, method = _encoder(tag_dir, state, saved)
    from dataclasses import asdict

    return model.to(device).eval(), asdict(cfg.model), {"weights": str(tag_dir.resolve()), "method": method,
                                                        "step": int(saved.get("step", 0))}


class ShardWriter:
    """features-<rank>-<n>.tar of `per_shard` videos; a shard is listed in progress-<rank>.jsonl once closed."""

    def __init__(self, out: Path, rank: int, per_shard: int):
        self.out, self.rank, self.per_shard = out, rank, per_shard
        taken = [int(p.stem.rsplit("-", 1)[1]) for p in out.glob(f"features-{rank:03d}-*.tar")]
        self.next, self.tar, self.keys, self.tmp = max(taken, default=-1) + 1, None, [], None

    def add(self, key: str, array: np.ndarray, meta: dict) -> None:
        if self.tar is None:
            self.tmp = self.out / f"features-{self.rank:03d}-{self.next:06d}.tar.tmp"
            self.tar = tarfile.open(self.tmp, "w")
        for name, data in ((f"{key}.npy", npy_bytes(array)), (f"{key}.json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            self.tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)
        if len(self.keys) >= self.per_shard:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = self.tmp.with_suffix("")  # drop .tmp
        os.replace(self.tmp, final)
        with open(self.out / f"progress-{self.rank:03d}.jsonl", "a") as f:
            f.write(json.dumps({"shard": final.name, "keys": self.keys}) + "\n")
        self.next, self.tar, self.keys = self.next + 1, None, []


def done_keys(out: Path) -> set[str]:
    """Keys of every closed shard of an earlier run (any rank count); half-written shards are removed."""
    for tmp in [*out.glob("features-*.tar.tmp"), *out.glob("failures-*.jsonl")]:  # failed videos are tried again
        tmp.unlink()
    done = set()
    for progress in out.glob("progress-*.jsonl"):
        for line in progress.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if (out / row["shard"]).is_file():
                    done.update(row["keys"])
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..engine import dist
    from ..eval.classifier import pooled
    from ..eval.data import EvalViews
    from ..logging import setup_console

    dist.prepare_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup_console(rank)
    device = dist.device_for_local_rank()
    if world > 1:
        torch.distributed.init_process_group(dist.resolve_backend("auto", device))
    try:
        kind, items = list_inputs(args.input)
        model, m, source = load_encoder(args.weights, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        dist.shutdown()
        return 2
    frames = args.num_frames or m.get("num_frames", 16)
    size = args.size or m.get("img_size", 224)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    done = done_keys(out) if rank == 0 else None
    done = dist.all_gather_object(done)[0] if world > 1 else done
    dist.barrier()
    try:
        views = EvalViews(args.input if kind == "shards" else "", frames, args.stride, size, args.clips, 1, rank,
                          world, args.decoder)
    except ValueError as e:  # an unreadable manifest (DataError)
        print(f"error: {e}", file=sys.stderr)
        dist.shutdown()
        return 2
    if kind == "files":
        todo = [it for it in items if it[0] not in done]
        mine = todo[rank::world]
        total = len(mine)
    else:
        total = sum(max(s.samples, 0) for s in views.shards) or None
    if done and rank == 0:
        log.info("resuming: %d videos of closed shards in %s are kept and skipped", len(done), out)
    workers = max(0, min(args.workers, total if total else args.workers))
    mean = torch.tensor(args.mean, device=device).view(1, 3, 1, 1, 1)
    std = torch.tensor(args.std, device=device).view(1, 3, 1, 1, 1)
    writer = ShardWriter(out, rank, args.shard_size)
    failures = out / f"failures-{rank:03d}.jsonl"
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    shape, count, failed, t0 = None, 0, 0, time.time()
    seen = set(done)  # kept from before, written or failed in this run: what a restarted loader skips
    from tqdm import tqdm

    def fail(key: str, source: str, reason: str) -> None:
        log.warning("video %s (%s) skipped: %s", key, source, reason)
        with open(failures, "a") as f:
            f.write(json.dumps({"key": key, "source": source, "reason": reason}) + "\n")

    with tqdm(total=total, desc=f"rank {rank} extracting", unit="video", disable=rank != 0) as bar, torch.no_grad():
        while True:  # once, or again after a data worker died on a video (that one is then a failure)
            if kind == "files":
                data = FileViews([it for it in mine if it[0] not in seen], views)
            else:
                data = ShardViews(views, seen)
            data.notes.attach(workers)
            batches = iter(torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=workers,
                                                       collate_fn=_collate))
            # torch's SIGCHLD handler raises its "worker died" error wherever this thread is, e.g. between writing a
            # feature and recording its key; without it, torch finds the dead worker in next() (within 5 s), so a
            # batch is either fetched and written whole, or not at all
            sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if workers else None
            try:
                for batch in batches:
                    good = [b for b in batch if "video" in b]
                    for b in batch:
                        if "error" in b:
                            failed += 1
                            fail(b["key"], b["source"], b["error"])
                    seen.update(b["key"] for b in batch)
                    bar.update(len(batch))
                    if not good:
                        continue
                    video = torch.stack([b["video"] for b in good]).permute(0, 1, 5, 2, 3, 4).to(device)  # [B,V,C,T,H,W]
                    n, v = video.shape[:2]
                    x = (video.flatten(0, 1).float() / 255 - mean) / std
                    with autocast:
                        if args.tokens:
                            from ..eval.classifier import encoder_tokens

                            tokens, _ = encoder_tokens(model, x)
                            feats = tokens.float().view(n, v, *tokens.shape[1:]).mean(1).half()  # [B,L,D]
                        else:
                            feats = pooled(model, x, args.pool).float().view(n, v, -1).mean(1)  # [B,D]
                    for b, f in zip(good, feats.cpu().numpy()):
                        writer.add(b["key"], f, {"source": b["source"], "label": int(b["label"]), "clips": args.clips})
                    shape, count = list(feats.shape[1:]), count + len(good)
                break
            except WORKER_DEATH_ERRORS:  # from next(): "DataLoader worker (pid(s) …) exited unexpectedly" and the like
                dead = dead_workers(batches, data.notes, rank, advice="", wait=2.0)
                culprits = [data.notes.read(w) for w, p in enumerate(getattr(batches, "_workers", ())) if p.exitcode]
                culprits = [(key, where) for key, where in culprits if key and key not in seen]
                if not dead or not culprits:
                    raise
                for key, where in culprits:
                    failed += 1
                    fail(key, where, dead.strip())
                    seen.add(key)
                    bar.update(1)
                log.warning("a data worker died; extraction goes on without %s", ", ".join(k for k, _ in culprits))
            finally:  # a dead worker's pid stays registered with torch until its iterator shuts down: stop it now
                stop_workers(batches)
                if sigchld is not None:
                    signal.signal(signal.SIGCHLD, sigchld)
    writer.close()
    log.info("rank %d: %d videos extracted, %d skipped (failures in %s), %.1f s", rank, count, failed,
             failures.name, time.time() - t0)
    dist.barrier()
    shapes = dist.all_gather_object(shape) if world > 1 else [shape]
    if rank == 0:
        _write_manifest(out, next((s for s in shapes if s), None), args, source, m)
    dist.shutdown()
    return 0


def _write_manifest(out: Path, shape, args, source: dict, model: dict) -> None:
    shards, failures = [], []
    for progress in sorted(out.glob("progress-*.jsonl")):
        for line in progress.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if (out / row["shard"]).is_file():
                    shards.append({"url": row["shard"], "samples": len(row["keys"])})
    for f in sorted(out.glob("failures-*.jsonl")):
        failures += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    (out / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures))
    manifest = {"kind": "features", "shards": sorted(shards, key=lambda s: s["url"]),
                "total": sum(s["samples"] for s in shards), "failed": len(failures),
                "feature": {"shape": shape, "dtype": "float16" if args.tokens else "float32",
                            "what": "tokens" if args.tokens else f"{args.pool}-pooled", "clips": args.clips,
                            "num_frames": args.num_frames or model.get("num_frames"), "stride": args.stride,
                            "size": args.size or model.get("img_size"), "mean": list(args.mean), "std": list(args.std)},
                "encoder": {**source, "model": model.get("name")}, "input": args.input}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{manifest['total']} videos → {out}/features-*.tar ({manifest['feature']['what']} {shape}); "
          f"{len(failures)} skipped: {out / 'failures.jsonl'}")


# console scripts (pyproject.toml): main() run, then the process ended through engine.dist.leave
cli = console(main)

if __name__ == "__main__":
    cli()
