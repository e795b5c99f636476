"""The data benchmarks of `vssl-benchmark` (see benchmark.py): `data` (the pipeline against a VideoMAE-style
loader, per CPU-second, with each decoder's ceiling), `shards` (make_shards encodings: disk and decode cost) and
`copies` (the data worker's host copies)."""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


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


def _tree_cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and every live descendant (the data workers) → (tree, this
    process alone)."""
    import psutil

    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    total = own
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total, own


def _measure(batches, warmup: int, seconds: float, batch: int, what: str = "measuring") -> dict:
    """Clips per second of wall time and per CPU-second of the whole process tree (rank + workers), after warm-up."""
    from tqdm import tqdm

    it = iter(batches)
    for _ in tqdm(range(warmup), desc=f"{what}: warm-up", unit="batch", leave=False):
        next(it)
    n, (cpu0, own0), t0 = 0, _tree_cpu_seconds(), time.perf_counter()
    with tqdm(total=round(seconds), desc=what, unit="s", leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}") as bar:
        while (now := time.perf_counter() - t0) < seconds:
            next(it)
            n += batch
            bar.update(min(now, seconds) - bar.n)
            bar.set_postfix_str(f"{n / max(now, 1e-9):.1f} clips/s", refresh=False)
    dt, (cpu, own) = time.perf_counter() - t0, _tree_cpu_seconds()
    cpu, own = cpu - cpu0, own - own0
    if hasattr(it, "close"):
        it.close()
    return {"clips": n, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "rank_cpu_seconds": round(own, 2),
            "clips_per_s": round(n / dt, 2), "clips_per_cpu_s": round(n / max(cpu, 1e-9), 2)}


# What one GPU consumes: training FLOPs per clip of MAE pretraining (forward + backward, decoder included, 16x224²,
# 90 % tube mask; counted by torch's FLOP counter in the H200 run of docs/BENCHMARKS.md) and an H100's dense bf16 peak.
MAE_FLOPS_PER_CLIP = {"ViT-B": 217.0e9, "ViT-L": 433.4e9}
MFU = 0.40


def cores_per_gpu(clips_per_cpu_s: float) -> dict[str, float]:
    """CPU cores (at this pipeline's clips per CPU-second) that feed one H100 training MAE at 40 % MFU."""
    from .gpu_parts import DATASHEET_BF16_TFLOPS

    return {m: round(MFU * DATASHEET_BF16_TFLOPS * 1e12 / f / clips_per_cpu_s, 1)
            for m, f in MAE_FLOPS_PER_CLIP.items()}


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
                       "encode": args.encode, "short_side": args.short_side, "clips": len(paths),
                       "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__}
    # about a third of a pipeline's time for each decoder
    result["decoders"] = decoder_ceilings(paths, args.frames, args.stride, max(args.seconds / 3, 2.0))
    return result


# make_shards options measured by `shards` (each beside the default: --short-side 320 --gop 16, preset veryfast)
SHARD_SETTINGS = {"default": [], "gop8": ["--gop", "8"], "gop32": ["--gop", "32"], "bframes0": ["--bframes", "0"],
                  "fastdecode": ["--tune", "fastdecode"],
                  "bframes0+fastdecode": ["--bframes", "0", "--tune", "fastdecode"],
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
    timed = decoder_ceilings(paths, args.frames, args.stride, args.seconds, decoders)
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
    take turns clip by clip, so a slow spell of a shared machine weighs on all of them alike, for `seconds` of CPU
    time each (per setting). `paths` may be {setting: paths} (the same sources encoded several ways, taking turns
    too) → {setting: {decoder: figures}}; a plain list → {decoder: figures}."""
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

    def frame_scaler(data, pick, stats):  # the RGB conversion before the reused scaler: PyAV's own per frame
        reused, dec._rgb = dec._rgb, lambda frame: frame.to_ndarray(format="rgb24")
        try:
            return dec.decode_pyav(data, pick, stats)
        finally:
            dec._rgb = reused

    runs = {"decord": lambda data, pick, stats: dec.decode_decord(data, pick),
            "pyav": lambda data, pick, stats: dec.decode_pyav(data, pick, stats),
            "pyav_no_skip": lambda data, pick, stats: dec.decode_pyav(data, pick, stats, skip=False),
            "pyav_from_start": sequential, "pyav_frame_scaler": frame_scaler,
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
          f"for {seconds * len(live):.0f} CPU-s):", flush=True)
    while live and sum(cpu.values()) < seconds * len(live):
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


def bench_copies(args) -> dict:
    """The data worker's host copies, side by side on the same tensors: a clip that is exactly its decoded frames
    gathered (a full-resolution copy) or used as is; and a batch collated the old way (stack, permute to
    [B,C,T,H,W], contiguous, then the DataLoader's copy into shared memory) or written once into shared memory."""
    from ..data.pipeline import _batched, _gather
    from .bench_model import timed

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
        out[name] = round(1000 * timed(fn, args.iters, torch.device("cpu"), name), 3)
        print(f"  {name:32s} {out[name]:9.3f} ms", flush=True)
    torch.testing.assert_close(old_collate(), _batched(parts, (3, 0, 1, 2), shared=True), rtol=0, atol=0)
    out["collate_speedup"] = round(out["collate: stack + copy to shm"] / out["collate: written once into shm"], 2)
    print(f"decoded {args.frames}x{args.height}x{args.width}, batch {args.batch} x {args.frames}x{args.size}²: collate "
          f"{out['collate_speedup']}x faster written once; the gather saves {out['gather: copy']:.2f} ms per clip",
          flush=True)
    return out
