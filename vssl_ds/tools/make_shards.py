"""Videos or images (folder tree or CSV) → WebDataset tar shards + manifest.json + failures.jsonl.

    vssl-make-shards /data/k400/train  /shards/k400 --prefix train --short-side 320 --fps 30 --workers 16
    vssl-make-shards train.csv         /shards/k400 --copy
    vssl-make-shards /data/imagenet/train /shards/in1k --kind image --prefix in1k

Items are processed in a fixed order (pool workers encode, the main process writes), so the shards are
the same however many workers run. Resumable: every finished shard is recorded in OUT/progress.jsonl; a
rerun with the same inputs and options keeps those shards and continues after them. An input that cannot
be read is listed in failures.jsonl and never stops the job — nor does one whose worker process dies (a crash
in the codec libraries, the kernel's out-of-memory killer): that input is retried alone, then listed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.encode import EncodeOptions, SourceError, make_sample
from ..data.sources import Item, from_csv, from_folder, kind_of, load_classes
from ..cli import HelpFormatter

PROGRESS, MANIFEST, FAILURES = "progress.jsonl", "manifest.json", "failures.jsonl"


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"--shard-size: '{text}' is not a size like 512MB, 1GB, 300000") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vssl-make-shards", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("src", help="a folder (one class per subfolder) or a CSV: path,label[,start,end]")
    p.add_argument("out", nargs="?", default="", help="output folder for the shards, manifest.json and failures.jsonl")
    p.add_argument("--split-csv", type=float, default=0.0, metavar="FRACTION",
                   help="instead of sharding: split the CSV by source video into SRC.train.csv / SRC.val.csv (this "
                        "fraction of the videos to val; every segment of a video lands in one split) and write "
                        "SRC.classes.txt, the class list both splits are then made with (--classes)")
    p.add_argument("--seed", type=int, default=0, help="--split-csv: which videos go to val")
    p.add_argument("--kind", choices=["auto", "video", "image"], default="auto")
    p.add_argument("--root", help="CSV only: folder that relative paths are relative to (default: the CSV's)")
    p.add_argument("--classes", default="", help="fixed class list: a text file (one name per line) or another "
                   "split's manifest.json; every split made with it numbers classes alike (default: this input's own)")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("512MB"), help="target bytes per shard")
    p.add_argument("--max-per-shard", type=int, default=10000, help="at most this many samples per shard")
    p.add_argument("--copy", action="store_true", help="store the files unchanged (after checking they decode)")
    p.add_argument("--short-side", type=int, default=320, help="resize so the short side is this (0 = keep)")
    p.add_argument("--fps", type=float, default=0.0, help="output frame rate (0 = keep the source's)")
    p.add_argument("--max-duration", type=float, default=0.0, help="keep at most this many seconds (0 = all)")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval in frames (random access cost)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality (lower = better, bigger)")
    p.add_argument("--preset", default="veryfast", help="x264 preset")
    p.add_argument("--bframes", type=int, default=-1, help="B-frames between reference frames (-1: the preset's; "
                   "0: none, every frame decodes in display order)")
    p.add_argument("--tune", default="", choices=["", "fastdecode", "film", "animation", "grain", "stillimage"],
                   help="x264 tune; fastdecode drops CABAC and the deblocking filter: cheaper to decode, bigger files "
                        "(see docs/BENCHMARKS.md for measured costs)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of image samples")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="encoding processes (default: all cores but one)")
    p.add_argument("--limit", type=int, default=0, help="only the first N inputs (trial runs)")
    return p.parse_args(argv)


def _work(job):
    item, kind, opt, classes = job
    try:
        return item, make_sample(item, kind, opt, classes), None
    except SourceError as e:
        return item, None, str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end a multi-day job
        return item, None, f"unexpected {type(e).__name__}: {e}"


def _results(jobs, workers: int):
    """(item, sample, error) of each job, in the jobs' order, encoded by `workers` processes (2 jobs each in flight).

    A worker that dies mid-job breaks the whole pool (with multiprocessing.Pool the job was lost and the run waited
    forever). The jobs in flight then run again one at a time, each in a fresh process of its own: those that were
    only collateral damage (or were killed for memory while others ran) succeed; one whose process dies alone too
    is reported as failed, with how it died. A new pool takes the rest."""
    jobs, window = iter(jobs), deque()
    pool = ProcessPoolExecutor(workers)
    try:
        while True:
            broken = False
            while not broken and len(window) < 2 * workers and (job := next(jobs, None)) is not None:
                try:
                    window.append((job, pool.submit(_work, job)))
                except BrokenProcessPool:  # it broke since the last result
                    window.append((job, None))
                    broken = True
            if not window:
                return
            if not broken:
                try:
                    result = window[0][1].result()
                except BrokenProcessPool:
                    broken = True
            if broken:
                pool.shutdown(wait=True, cancel_futures=True)
                for job, future in window:
                    done = future is not None and future.done() and not future.cancelled() and \
                        future.exception() is None
                    yield future.result() if done else _alone(job)
                window.clear()
                pool = ProcessPoolExecutor(workers)
                continue
            window.popleft()
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _alone(job):
    """One job in a process of its own: its result, or a failure naming how the process died."""
    one, processes = ProcessPoolExecutor(1), []
    try:
        future = one.submit(_work, job)
        processes = list(getattr(one, "_processes", {}).values())  # to read the exit code if it dies
        return future.result()
    except BrokenProcessPool:
        codes = [p.exitcode for p in processes if p.exitcode]
        how = next((f"killed by {signal.Signals(-c).name}" for c in codes if c < 0 and -c in signal.valid_signals()),
                   f"exit code {codes[0]}" if codes else "died")
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if "SIGKILL" in how else ""
        return job[0], None, f"the worker process encoding this input {how}{hint}, also when run alone; skipped"
    finally:
        one.shutdown(wait=True)


class ShardWriter:
    """Writes PREFIX-NNNNNN.tar via a .tmp file renamed when whole; records each finished shard."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, max_count: int, start_index: int):
        self.out, self.prefix, self.max_bytes, self.max_count = out, prefix, max_bytes, max_count
        self.index, self.sink, self.count, self.bytes = start_index, None, 0, 0

    def write(self, sample: dict) -> None:
        import webdataset as wds

        if self.sink is None:
            self.tmp = self.out / f"{self.prefix}-{self.index:06d}.tar.tmp"
            # fixed header times: a rerun writes the same tar around the same bytes
            self.sink = wds.TarWriter(str(self.tmp), mtime=0)
        self.sink.write(sample)
        self.count += 1
        self.bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))

    def full(self) -> bool:
        return self.sink is not None and (self.bytes >= self.max_bytes or self.count >= self.max_count)

    def close(self) -> dict | None:
        if self.sink is None:
            return None
        self.sink.close()
        name = f"{self.prefix}-{self.index:06d}.tar"
        self.tmp.replace(self.out / name)
        entry = {"url": name, "samples": self.count, "bytes": (self.out / name).stat().st_size}
        self.index, self.sink, self.count, self.bytes = self.index + 1, None, 0, 0
        return entry


def fingerprint(items: list[Item], kind: str, opt: EncodeOptions, args) -> str:
    options = asdict(opt)
    for name, default in (("bframes", -1), ("tune", "")):  # options added later: at their defaults they leave
        if options[name] == default:  # the fingerprint of a folder begun before them unchanged (it still resumes)
            del options[name]
    h = hashlib.sha256(json.dumps([kind, options, args.prefix, args.shard_size, args.max_per_shard,
                                   [(i.path, i.label, i.start, i.end) for i in items]]).encode())
    return h.hexdigest()[:16]


def load_progress(out: Path, fp: str) -> list[dict]:
    path = out / PROGRESS
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if records and records[0].get("fingerprint") != fp:
        raise SystemExit(f"error: '{out}' holds shards made from other inputs or options (fingerprint "
                         f"{records[0].get('fingerprint')} != {fp}); use a new output folder, or delete {path} "
                         "and the shards to start over")
    for tmp in out.glob("*.tar.tmp"):  # a shard that was being written when the job died
        tmp.unlink()
    records = records[1:]
    fails = out / FAILURES  # drop failures appended after the last recorded shard: they are retried
    kept = fails.read_text().splitlines(keepends=True)[:sum(r["failures"] for r in records)] if fails.exists() else []
    fails.write_text("".join(kept))
    return records


def split_csv(src: Path, fraction: float, seed: int) -> tuple[Path, Path, Path]:
    """Rows of one source video stay together (no segment of a val video in train) → (train, val, classes)."""
    import csv as csv_module

    items, classes = from_csv(src)
    videos = sorted({i.path for i in items})
    rng = np.random.default_rng(seed)
    val = set(rng.permutation(videos)[:max(1, round(fraction * len(videos)))].tolist()) if videos else set()
    lines = [r for r in csv_module.reader(src.read_text().splitlines()) if r and not r[0].startswith("#")]
    header = lines[0] if lines and lines[0][0].strip().lower() == "path" else None
    rows = lines[1:] if header else lines
    root = src.parent
    outs = {}
    for split, keep in (("train", False), ("val", True)):
        path = src.with_name(f"{src.stem}.{split}.csv")
        with open(path, "w", newline="") as f:
            w = csv_module.writer(f)
            if header:
                w.writerow(header)
            for row in rows:
                p = Path(row[0].strip())
                if (str(p if p.is_absolute() else root / p) in val) == keep:
                    w.writerow(row)
        outs[split] = path
    class_file = src.with_name(f"{src.stem}.classes.txt")
    class_file.write_text("\n".join(classes) + "\n")
    return outs["train"], outs["val"], class_file


def main(argv=None) -> int:
    args = parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if args.split_csv:
        if src.suffix.lower() != ".csv" or not 0 < args.split_csv < 1:
            print("error: --split-csv takes a CSV source and a fraction in (0, 1)", file=sys.stderr)
            return 2
        try:
            train, val, classes = split_csv(src, args.split_csv, args.seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"split by source video: {train}, {val}; class list {classes}\n  next: make_shards {train} OUT_TRAIN "
              f"--classes {classes}; make_shards {val} OUT_VAL --classes {classes}")
        return 0
    if not args.out:
        print("error: the output folder is missing (make_shards SRC OUT)", file=sys.stderr)
        return 2
    try:
        fixed = load_classes(Path(args.classes)) if args.classes else None
        items, classes = from_csv(src, Path(args.root) if args.root else None, fixed) if src.suffix.lower() == ".csv" \
            else from_folder(src, "image" if args.kind == "image" else "video", fixed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = args.kind if args.kind != "auto" else (kind_of(items[0].path) or "video")
    if args.limit:
        items = items[:args.limit]
    if args.copy and any(i.start or i.end for i in items):
        print("error: the CSV has start/end columns but --copy cannot trim; drop --copy to re-encode", file=sys.stderr)
        return 2
    opt = EncodeOptions(copy=args.copy, short_side=args.short_side, fps=args.fps, max_duration=args.max_duration,
                        gop=args.gop, crf=args.crf, preset=args.preset, bframes=args.bframes, tune=args.tune,
                        jpeg_quality=args.jpeg_quality)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(items, kind, opt, args)
    done = load_progress(out, fp)
    if not done:
        (out / PROGRESS).write_text(json.dumps({"fingerprint": fp, "source": str(src), "items": len(items)}) + "\n")
        (out / FAILURES).write_text("")
    first = done[-1]["next_item"] if done else 0
    shards = [r["shard"] for r in done if r.get("shard")]
    failures = sum(r["failures"] for r in done)
    print(f"{len(items)} {kind} inputs, {len(classes)} classes → {out}"
          + (f" (resuming: {len(shards)} shards done, continuing at input {first})" if done else ""))
    writer = ShardWriter(out, args.prefix, args.shard_size, args.max_per_shard, len(shards))
    pending_fail: list[dict] = []
    short: list[str] = []  # segments with under half the frames their span should give (variable frame rate)
    t0 = time.time()
    jobs = ((it, kind, opt, classes) for it in items[first:])
    with tqdm(total=len(items), initial=first, unit=kind[:3] + "s", desc="sharding", dynamic_ncols=True) as bar:
        for item, sample, error in _results(jobs, args.workers):
            if error:
                pending_fail.append({"path": item.path, "index": item.index, "error": error})
            else:
                writer.write(sample)
                meta = json.loads(sample["json"])
                if meta.get("frames_expected") and meta["frames"] < 0.5 * meta["frames_expected"]:
                    short.append(f"{item.path} [{item.start:g}, {item.end:g}) s: {meta['frames']} frames, "
                                 f"{meta['frames_expected']} expected")
            bar.update(1)
            bar.set_postfix(shard=writer.index, failed=failures + len(pending_fail))
            last = item.index == len(items) - 1
            if writer.full() or last:
                entry = writer.close()
                _record(out, entry, pending_fail, item.index + 1)
                shards += [entry] if entry else []
                failures += len(pending_fail)
                pending_fail = []
    manifest = {"kind": kind, "shards": shards, "classes": classes, "total": sum(s["samples"] for s in shards),
                "failures": failures, "source": str(src), "options": asdict(opt), "fingerprint": fp}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"done in {time.time() - t0:.0f}s: {manifest['total']} samples in {len(shards)} shards, "
          f"{failures} failed inputs{f' (see {out / FAILURES})' if failures else ''}\n  manifest: {out / MANIFEST}\n"
          f"  each data worker of each rank reads whole shards: enough for ranks x data.num_workers <= {len(shards)}")
    if short:  # the source's declared rate does not match its timestamps (variable frame rate)
        print(f"warning: {len(short)} segments have under half the frames their span should give at the source's "
              f"declared rate (variable-frame-rate sources?); pass --fps to resample to a constant rate:\n  "
              + "\n  ".join(short[:10]) + (f"\n  … and {len(short) - 10} more" if len(short) > 10 else ""),
              file=sys.stderr)
    return 0


def _record(out: Path, entry: dict | None, failed: list[dict], next_item: int) -> None:
    """Failures first, then the shard's progress line (the resume trims failures that no line accounts for)."""
    if failed:
        with open(out / FAILURES, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in failed)
    with open(out / PROGRESS, "a") as f:
        f.write(json.dumps({"shard": entry, "failures": len(failed), "next_item": next_item}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
