"""The model-side benchmarks of `vssl-benchmark` (see benchmark.py): `attention` (backends, forward + backward),
`model` (steps per recipe and backend), `cache` (MVD with cached targets against online teachers) and `monitor`
(the health monitor's share of the training compute)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _setup(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    backends = [b for b in args.backends.split(",") if b != "xformers" or device.type == "cuda"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"device {dev}, {name}, backends {backends}", flush=True)
    return device, dtype, backends, {"device": dev, "dtype": name, "torch": torch.__version__}


def timed(fn, iters: int, device, what: str = "timing", warmup: int = 2) -> float:
    """Median seconds of `fn()` over `iters` runs after `warmup` runs (the device synchronised around each run)."""
    from tqdm import tqdm

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
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
            ms = 1000 * timed(step, args.iters, device, f"{backend} {name}")
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
            out[f"{backend}/{name}"] = {"ms": round(ms, 2), "peak_mem_gib": round(mem, 2)}
            print(f"  {backend:9s} {name:8s} {ms:9.2f} ms (fwd+bwd)" + (f"  peak {mem:.2f} GiB" if mem else ""),
                  flush=True)
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
            s = timed(step, args.iters, device, f"{name} {backend}")
            row = {"step_s": round(s, 4), "clips_per_s": round(args.batch / s, 2)}
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                torch.cuda.reset_peak_memory_stats()
                if mask is None:  # achieved model TFLOP/s: 3x the forward MACs x 2 FLOPs per MAC
                    row["model_tflops"] = round(6 * gflops * args.batch / s / 1000, 1)
            out[f"{name}/{backend}"] = row
            extra = (f"  {row.get('model_tflops', '')} TFLOP/s  peak {row['peak_mem_gib']} GiB"
                     if "peak_mem_gib" in row else "")
            print(f"  {name:18s} {backend:9s} {s * 1000:9.1f} ms/step  {row['clips_per_s']:8.2f} clips/s" + extra,
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
            recipe = {"vit_large_video": "videomae_vit_l",
                      "vit_huge_video": "videomae_vit_h"}.get(name, "videomae_vit_b")
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
            s = timed(step, args.iters, device, f"{name} {backend} MAE step")
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
    video_teacher = create_model(args.video_teacher, img_size=args.size, num_frames=args.frames)
    torch.save(video_teacher.state_dict(), tmp / "vid.pth")
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

    t_cached = timed(lambda: step(cached_batch, True), args.iters, device, "cached targets")
    t_online = timed(lambda: step(online_batch, False), args.iters, device, "online teachers")
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
        widen_ms = 1000 * timed(lambda: widen_targets({k: v.to(device) for k, v in stored.items()}), 10, device,
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
