"""`vssl-benchmark gpu`: the one prepared device check whose figures go into docs/BENCHMARKS.md (GPU section).

One command, one process (the end-to-end run is two `pretrain.py` children), every part guarded: a part that
fails is recorded with its error and the next one runs; a part that would start after `--budget` seconds is
recorded as skipped. Results are rewritten after every part (`--out`/gpu.json and gpu.md), so a run that is
killed still leaves what it measured.

  env        device, versions, a measured bf16 matrix-product rate (the practical ceiling beside the datasheet's)
  attention  xformers / SDPA / math on ViT attention (1568 tokens, with and without a dense bias) and through a
             whole Video Swin (relative-position bias + shift masks): error against an fp32 reference, fwd+bwd time
  mae        MAE steps through the DeepSpeed engine (ViT-B, ViT-L; bf16, ZeRO-1): attention backend x activation
             checkpointing, and torch.compile, at the largest batch that fits (from two probe batches' memory);
             achieved TFLOP/s (model FLOPs counted by torch's FLOP counter), MFU, peak memory
  zero3      MAE ViT-L at one batch under ZeRO stage 0 and stage 3 (single rank): peak memory and step time
  mvd        the MVD student step with cached targets vs online teachers (bf16)
  data       the data pipeline (generated H.264 shards) into the device with 8 and 16 workers: clips/s
  e2e        a 200-step tiny MVD run through pretrain.py on the device: stop at step 100 with a checkpoint,
             `--auto-resume` to 200; checks the resume step, the loss trend, the final weights; with
             run.sync_check, where its micro-steps still make the host wait for the GPU (ours or DeepSpeed's)
  compile    the MAE steps again with model.compile=true (SDPA, the eager variant's batch): compile time, speed

`--cpu` runs every part at toy sizes on the CPU (tests/test_benchmark_cli.py), so the script is never broken
when a GPU finally runs it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, for MFU (vssl_ds.logging.PEAK_TFLOPS)

GPU = dict(attn=(4, 12, 1568, 64), swin=("swin3d_base", 2, 32, 224), mae_models=("vit_base_video", "vit_large_video"),
           frames=16, size=224, probe=8, max_batch=512, iters=5, zero3=("vit_large_video", 32),
           mvd=("vit_base_video", "vit2d_base_patch16", "vit_base_video", 16), data_workers=(8, 16), data_batch=32,
           data_clips=48, data_shards=16, data_src=288, data_frames=64, data_seconds=15.0, e2e_steps=200,
           e2e_workers=4, e2e_ckpts=4, e2e_batch=8)
CPU = dict(attn=(1, 2, 64, 16), swin=("swin3d_micro", 1, 8, 64), mae_models=("vit_micro_video",),
           frames=8, size=32, probe=2, max_batch=4, iters=2, zero3=("vit_micro_video", 2),
           mvd=("vit_micro_video", "vit2d_micro_patch16", "vit_micro_video", 2), data_workers=(1, 2), data_batch=2,
           data_clips=8, data_shards=4, data_src=48, data_frames=40, data_seconds=1.5, e2e_steps=8,
           e2e_workers=1, e2e_ckpts=2, e2e_batch=2)
PARTS = ("env", "attention", "mae", "zero3", "mvd", "data", "e2e", "compile")


def add_args(sub) -> None:
    g = sub.add_parser("gpu", help="the prepared device check: attention backends, MAE/ZeRO-3/MVD steps, data, e2e")
    g.add_argument("--cpu", action="store_true", help="every part at toy sizes on the CPU (the CI test)")
    g.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    g.add_argument("--budget", type=float, default=480.0, help="seconds; a part that would start later is skipped")
    g.add_argument("--out", default="bench/gpu", help="folder for gpu.json and gpu.md")
    g.add_argument("--scratch", default="", help="folder for generated shards and run folders (default: in --out)")


# --- helpers ------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, device, warmup: int = 2) -> float:
    """Median seconds of fn() over `iters` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: the error on the scale of the values (bf16 keeps ~3 significant digits)."""
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --- parts --------------------------------------------------------------------------------------------------
def part_env(s, device, dtype) -> dict:
    import deepspeed
    import timm

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}",
           "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
           "timm": timm.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import xformers

        out["xformers"] = xformers.__version__
    except ImportError:
        out["xformers"] = None
    n = 8192 if device.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sec = _time(lambda: a @ b, 10 if device.type == "cuda" else 2, device, warmup=3)
    out["matmul_tflops"] = round(2 * n**3 / sec / 1e12, 1)
    out["matmul_shape"] = f"{n}x{n}x{n} {str(dtype).split('.')[-1]}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["memory_gib"] = round(total / 2**30, 1)
    print(f"  {out}", flush=True)
    return out


def _guarded(fn) -> dict:
    """fn() → its row, or {'error': …} (one backend failing leaves the others measured)."""
    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def part_attention(s, device, dtype, backends) -> dict:
    from ..models import create_model
    from ..models.layers import attention

    out = {"vit": {}, "swin": {}}
    B, H, N, D = s["attn"]
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, H, N, D, device=device) for _ in range(4))
    bias = torch.randn(1, H, N, N, device=device)

    def vit_row(backend, b, ref, ref_grads) -> dict:
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        bb = None if b is None else b.to(dtype)
        y = attention(*leaves, bb, backend)
        y.backward(g.to(dtype))
        err = max([_rel_err(y, ref)] + [_rel_err(t.grad, r) for t, r in zip(leaves, ref_grads)])
        ms = 1000 * _time(lambda: attention(*leaves, bb, backend).backward(g.to(dtype)), s["iters"] * 2, device)
        return {"fwd_bwd_ms": round(ms, 3), "max_rel_err": float(f"{err:.3g}")}

    for bname, b in (("no_bias", None), ("bias", bias)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, b, "math")  # fp32 reference
        ref.backward(g)
        ref_grads = [t.grad for t in leaves]
        for backend in backends:
            row = out["vit"][f"{backend}/{bname}"] = _guarded(lambda: vit_row(backend, b, ref, ref_grads))
            print(f"  ViT attention {B}x{H}x{N}x{D} {backend:9s} {bname:8s} {row}", flush=True)

    name, batch, frames, size = s["swin"]
    torch.manual_seed(1)
    clip = torch.randn(batch, 3, frames, size, size, device=device)
    reference = create_model(name, img_size=size, num_frames=frames, attn_backend="math").to(device).eval()
    with torch.no_grad():
        ref = reference(clip)
    state = reference.state_dict()
    del reference

    def swin_row(backend) -> dict:
        model = create_model(name, img_size=size, num_frames=frames, attn_backend=backend).to(device)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            err = _rel_err(model(clip), ref)
        model.train()

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(clip).float().pow(2).mean().backward()
        _reset(device)
        ms = 1000 * _time(step, s["iters"], device)
        return {"fwd_bwd_ms": round(ms, 2), "max_rel_err": float(f"{err:.3g}"), "peak_mem_gib": round(_peak_gib(device), 2)}

    for backend in backends:
        row = out["swin"][backend] = _guarded(lambda: swin_row(backend))
        print(f"  {name} {batch}x{frames}x{size}² {backend:9s} {row} (features vs fp32 math)", flush=True)
        _reset(device)
    out["swin_setup"] = {"model": name, "batch": batch, "frames": frames, "size": size,
                         "reference": "fp32, math backend, same weights", "relative_bias_and_shift_masks": True}
    out["vit_setup"] = {"B_H_N_D": [B, H, N, D], "dtype": str(dtype).split(".")[-1],
                        "reference": "fp32 math; error over output and q/k/v gradients", "bias": "dense [1,H,N,N]"}
    return out


def _mae_config(s, name: str, sets: list[str]):
    from ..config import load_config

    return load_config("videomae_vit_b", [f"model.name={name}", f"model.img_size={s['size']}",
                                          f"model.num_frames={s['frames']}", f"data.size={s['size']}",
                                          f"data.num_frames={s['frames']}", "model.drop_path=0.0", *sets])


def _mae_inputs(cfg, batch: int, device):
    from ..data.batch import Batch
    from ..methods import mask_fns

    fn, _ = mask_fns(cfg)
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(batch)])).to(device)
    m = cfg.model
    video = torch.randn(batch, 3, m.num_frames, m.img_size, m.img_size, device=device)
    return lambda b: Batch(video=video[:b], mask=mask[:b])


def _train_flops_per_clip(cfg, device) -> float:
    """Forward + backward FLOPs of one MAE clip, counted by torch's FLOP counter on the SDPA path, fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..methods import build_method

    cfg.model.attn_backend, cfg.model.compile = "sdpa", False
    method = build_method(cfg).to(device).train()
    counter = FlopCounterMode(display=False)
    with counter:
        method(_mae_inputs(cfg, 1, device)(1)).loss.backward()
    del method
    return float(counter.get_total_flops())


class _EngineStep:
    """A method under vssl_ds's DeepSpeed engine, stepped as the training loop steps it."""

    def __init__(self, cfg, device):
        from ..engine.deepspeed import Engine
        from ..methods import build_method

        torch.manual_seed(0)
        self.method = build_method(cfg).train()
        self.engine = Engine(cfg, self.method, device)
        self.engine.set_schedule(1e-6, 0.05)
        self.device = device

    def __call__(self, batch) -> None:
        out = self.method(batch)
        self.engine.backward(out.loss)
        self.engine.step()

    def close(self) -> None:
        if hasattr(self.engine.ds, "destroy"):  # DeepSpeed >= 0.14 releases its hooks and buffers
            self.engine.ds.destroy()
        del self.engine, self.method
        _reset(self.device)


def _largest_batch(s, step: _EngineStep, inputs, device) -> tuple[int, dict]:
    """Peak memory at two probe batches → bytes per clip → the largest batch under 85 % of the memory."""
    if device.type != "cuda":
        return s["max_batch"], {}
    peaks = []
    for b in (s["probe"], 2 * s["probe"]):
        _reset(device)
        step(inputs(b))
        step(inputs(b))
        _sync(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    per_clip = max((peaks[1] - peaks[0]) / s["probe"], 1.0)
    total = torch.cuda.mem_get_info(device)[1]
    fit = int((0.85 * total - peaks[0]) / per_clip) + s["probe"]
    batch = max(s["probe"], min(s["max_batch"], fit // 8 * 8))
    return batch, {"probe_peaks_gib": [round(p / 2**30, 2) for p in peaks],
                   "mib_per_clip": round(per_clip / 2**20, 1), "predicted_fit": fit}


def part_mae(s, device, dtype, backends, compiled: dict | None = None) -> dict:
    """Eager variants (backend x checkpointing) at the largest batch; `compiled`: {model: batch} → those models
    with model.compile=true on SDPA at that batch (one shape: one compilation), the first step timed apart."""
    out = {}
    peak = DATASHEET_BF16_TFLOPS if device.type == "cuda" else 0.0
    fast = [b for b in backends if b != "math"]
    for name in (s["mae_models"] if compiled is None else compiled):
        flops = _train_flops_per_clip(_mae_config(s, name, []), device)
        out[f"{name}/train_gflops_per_clip"] = round(flops / 1e9, 1)
        if compiled is None:
            variants = [(b, ck, False) for b in fast for ck in (False, True)]
        else:
            variants = [("sdpa", False, True)]
        for backend, ckpt, comp in variants:
            key = f"{name}/{backend}/ckpt={'on' if ckpt else 'off'}/compile={'on' if comp else 'off'}"
            cfg = _mae_config(s, name, [f"model.attn_backend={backend}", f"model.grad_ckpt={str(ckpt).lower()}",
                                        f"model.compile={str(comp).lower()}", "engine.zero_stage=1",
                                        f"data.batch_size={s['probe']}"])
            row = {}
            try:
                inputs = _mae_inputs(cfg, s["max_batch"], device)
                step = _EngineStep(cfg, device)
                try:
                    t0 = time.perf_counter()
                    if compiled is None:
                        batch, row = _largest_batch(s, step, inputs, device)
                    else:  # the first step compiles (forward and backward graphs)
                        batch = compiled[name]
                        step(inputs(batch))
                        _sync(device)
                        row = {"first_step_s": round(time.perf_counter() - t0, 1)}
                    for attempt in range(3):
                        try:
                            _reset(device)
                            sec = _time(lambda: step(inputs(batch)), s["iters"], device)
                            break
                        except RuntimeError as e:
                            if not _is_oom(e) or attempt == 2:
                                raise
                            row.setdefault("oom_at", []).append(batch)
                            step.close()
                            batch = max(8, int(batch * 0.75) // 8 * 8)
                            step = _EngineStep(cfg, device)
                    clips = batch / sec
                    row.update(batch=batch, step_s=round(sec, 4), clips_per_s=round(clips, 1),
                               peak_mem_gib=round(_peak_gib(device), 2), tflops=round(flops * clips / 1e12, 1),
                               wall_s=round(time.perf_counter() - t0, 1))
                    if peak:
                        row["mfu"] = round(flops * clips / (peak * 1e12), 3)
                finally:
                    step.close()
            except Exception as e:  # one variant failing leaves the others measured
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                _reset(device)
            out[key] = row
            print(f"  {key:55s} {row}", flush=True)
    out["setup"] = {"frames": s["frames"], "size": s["size"], "mask_ratio": 0.9, "compiled": compiled is not None, "precision": "engine auto (bf16 on "
                    "GPU)", "zero_stage": 1, "optimizer": "torch AdamW (vssl_ds engine)",
                    "batch": f"largest under 85 % of memory from two probe batches, capped at {s['max_batch']}"
                    if compiled is None else "the eager SDPA variant's batch",
                    "mfu_peak_tflops": peak}
    return out


def _compile_batches(s, results: dict) -> dict:
    """The batch each model's eager SDPA variant ran at (the probe batch if the mae part did not run)."""
    mae = results.get("mae", {})
    return {name: mae.get(f"{name}/sdpa/ckpt=off/compile=off", {}).get("batch", s["probe"]) for name in s["mae_models"]}


def part_zero3(s, device) -> dict:
    name, batch = s["zero3"]
    out = {"setup": {"model": name, "batch": batch, "method": "MAE, mask 0.9", "ranks": 1}}
    for stage in (0, 3):
        cfg = _mae_config(s, name, [f"engine.zero_stage={stage}", f"data.batch_size={batch}", "model.attn_backend=sdpa"])
        inputs = _mae_inputs(cfg, batch, device)
        _reset(device)
        step = _EngineStep(cfg, device)
        try:
            sec = _time(lambda: step(inputs(batch)), s["iters"], device)
            out[f"zero{stage}"] = {"step_s": round(sec, 4), "clips_per_s": round(batch / sec, 1),
                                   "peak_mem_gib": round(_peak_gib(device), 2)}
        finally:
            step.close()
        print(f"  ZeRO-{stage} {name} batch {batch}: {out[f'zero{stage}']}", flush=True)
    return out


def part_mvd(s, device) -> dict:
    from .bench_model import bench_cache

    student, image_teacher, video_teacher, batch = s["mvd"]
    args = argparse.Namespace(student=student, image_teacher=image_teacher, video_teacher=video_teacher, batch=batch,
                              frames=s["frames"], size=s["size"], backends="sdpa", iters=s["iters"], dtype="auto",
                              clips_per_s=0.0)
    return bench_cache(args)


def _shards(s, root: Path) -> Path:
    from ..data.synthetic import write_synthetic_shards

    manifest = root / "shards" / "manifest.json"
    if not manifest.is_file():
        write_synthetic_shards(manifest.parent, clips=s["data_clips"], shards=s["data_shards"],
                               frames=s["data_frames"], size=s["data_src"])
    return manifest


def part_data(s, device, root: Path) -> dict:
    from ..config import load_config
    from ..data.build import build_loader
    from ..methods import mask_fns

    t0 = time.perf_counter()
    manifest = _shards(s, root)
    out = {"setup": {"clips": s["data_clips"], "shards": s["data_shards"], "mode": "resampled shards", "source_px": s["data_src"],
                     "frames": s["frames"], "stride": 4, "size": s["size"], "batch": s["data_batch"],
                     "generate_s": round(time.perf_counter() - t0, 1), "cpus": os.cpu_count()}}
    from ..data.decode import DecodeError, torchcodec_decoder

    try:
        torchcodec_decoder()
        codec = "torchcodec on the device"
    except DecodeError as e:
        codec = f"CPU fallback ({e})"
    # the CPU-decoding rows, then data.decode_device=cuda (workers only draw the plan; the rank decodes)
    runs = [(w, "cpu") for w in s["data_workers"]] + [(s["data_workers"][0], "cuda")]
    for workers, where in runs:
        cfg = load_config("videomae_vit_b", [f"data.train={manifest}", f"data.num_workers={workers}",
                                             f"data.batch_size={s['data_batch']}", f"data.num_frames={s['frames']}",
                                             "data.sampling_rate=4", f"data.size={s['size']}",
                                             "data.resampled=true", "data.epoch_size=1000000",
                                             f"model.img_size={s['size']}", f"model.num_frames={s['frames']}",
                                             f"data.decode_device={where}"])
        d = cfg.data
        loader, _ = build_loader(d, *mask_fns(cfg), 0, 1, 0)
        clips, batches, start, warm = 0, 0, None, workers + 1  # skip the first round: workers start together
        deadline = None
        while True:
            for batch in loader:
                b = batch.to(device, d.mean, d.std)
                _sync(device)
                batches += 1
                if batches == warm:
                    start, deadline = time.perf_counter(), time.perf_counter() + s["data_seconds"]
                elif start is not None:
                    clips += b.size
                if deadline is not None and time.perf_counter() > deadline:
                    break
            if deadline is not None and time.perf_counter() > deadline:
                break
            loader.next_epoch()
        seconds = time.perf_counter() - start
        name = f"workers={workers}" + ("" if where == "cpu" else ",decode_device=cuda")
        out[name] = {"clips_per_s": round(clips / seconds, 1), "clips": clips, "seconds": round(seconds, 1)}
        if where != "cpu":
            out[name]["decoder"] = codec
        print(f"  data, {name}: {out[name]}", flush=True)
    return out


def part_e2e(s, device, root: Path) -> dict:
    """pretrain.py as a user runs it (one process on this device): stop at half-way with a checkpoint, resume."""
    from ..logging import tb_scalars
    from ..models import create_model

    work = root / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    torch.save({"model": create_model("vit2d_micro_patch16", img_size=64, patch=8).state_dict()}, work / "img.pth")
    video = create_model("vit_tiny_video", img_size=64, num_frames=8, patch=8)
    torch.save({"model": {f"encoder.{k}": v for k, v in video.state_dict().items()}}, work / "vid.pth")
    from ..data.synthetic import write_synthetic_shards

    manifest = work / "shards" / "manifest.json"
    if not manifest.is_file():
        write_synthetic_shards(manifest.parent, clips=64, shards=8, frames=24, size=72)
    steps = s["e2e_steps"]
    sets = ["model.name=vit_tiny_video", "model.img_size=64", "model.num_frames=8", "model.patch=8",
            "data.size=64", "data.num_frames=8", "data.sampling_rate=2", f"data.batch_size={s['e2e_batch']}",
            f"data.num_workers={s['e2e_workers']}",
            f"data.train={manifest}", "method.mvd.image_teacher=vit2d_micro_patch16",
            f"method.mvd.image_teacher_weights={work / 'img.pth'}", "method.mvd.video_teacher=vit_tiny_video",
            f"method.mvd.video_teacher_weights={work / 'vid.pth'}", "optim.lr=1e-3", "optim.warmup_steps=10",
            "run.epochs=0", f"run.max_steps={steps}", f"run.ckpt_every={steps // s['e2e_ckpts']}", f"run.log_every={max(steps // 20, 1)}",
            f"run.out_dir={work / 'runs'}", "run.name=mvd_e2e",
            "run.sync_check=true"]  # where a micro-step still makes the host wait for the GPU
    args = [a for kv in sets for a in ("--set", kv)]
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process's own group
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("OMP_NUM_THREADS", "1")
    out, runs = {}, []
    for label, extra in (("first", ["--set", f"run.stop_at={steps // 2}"]), ("resumed", ["--auto-resume"])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--config", "mvd_vit_s", *args, *extra],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        runs.append(proc)
        (work / f"{label}.log").write_text(proc.stdout + proc.stderr)
        out[label] = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0:
            raise RuntimeError(f"pretrain.py ({label}) exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    run_dir = work / "runs" / "mvd_e2e"
    loss = tb_scalars(run_dir, "train/loss")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    digests = json.loads((run_dir / "final_digests.json").read_text())
    out.update(resumed_from=f"step {steps // 2}" if f"resumed at step {steps // 2}" in runs[1].stdout else "NOT RESUMED",
               latest=latest, final_step=digests["step"], loss_first=round(loss[0][1], 4), loss_last=round(loss[-1][1], 4),
               loss_points=len(loss), clips_per_s=round(tb_scalars(run_dir, "perf/clips_per_s")[-1][1], 1))
    sync_file = run_dir / "sync_check.json"  # the resumed half's count (issue 15, item 7)
    if sync_file.is_file():
        syncs = json.loads(sync_file.read_text())
        out.update(syncs_per_micro_step=syncs["per_micro_step"], micro_steps_that_wait=syncs["micro_steps_that_wait"],
                   sync_places=dict(list(syncs["places"].items())[:6]))
    ok = out["resumed_from"] != "NOT RESUMED" and digests["step"] == steps and math.isfinite(out["loss_last"])
    out["ok"] = bool(ok)
    print(f"  e2e: {out}", flush=True)
    if not ok:
        raise RuntimeError(f"end-to-end run did not resume and finish as expected: {out}")
    return out


# --- report -------------------------------------------------------------------------------------------------
def _markdown(results: dict, command: str) -> str:
    lines = ["# vssl_ds GPU check", "", f"`{command}`", ""]
    env = results.get("env", {})
    if "device" in env:
        lines += [f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, "
                  f"xformers {env.get('xformers')} ({results.get('xformers')}); measured matmul {env['matmul_tflops']} TFLOP/s ({env['matmul_shape']}).", ""]
    for part in PARTS[1:]:
        r = results.get(part)
        if r is None:
            continue
        lines += [f"## {part}", ""]
        if "error" in r or "skipped" in r:
            lines += [f"**{'failed' if 'error' in r else 'skipped'}**: {r.get('error', r.get('skipped'))}", ""]
            continue
        rows = [(k, v) for k, v in r.items() if isinstance(v, dict) and not k.endswith("setup")]
        for sub in ("vit", "swin"):
            if sub in r:
                rows = [(f"{sub} {k}", v) for k, v in r[sub].items()]
                lines += _table(rows)
        if part != "attention":
            lines += _table(rows)
        scalars = {k: v for k, v in r.items() if not isinstance(v, dict)}
        if scalars:
            lines += ["", ", ".join(f"{k}: {v}" for k, v in scalars.items())]
        for key in ("setup", "vit_setup", "swin_setup"):
            if key in r:
                lines += ["", f"{key}: " + ", ".join(f"{k}={v}" for k, v in r[key].items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def _table(rows) -> list[str]:
    if not rows:
        return []
    cols = []
    for _, v in rows:
        cols += [c for c in v if c not in cols]
    out = ["", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, v in rows:
        out.append(f"| {k} | " + " | ".join(str(v.get(c, "")) for c in cols) + " |")
    return out


def bench_gpu(args) -> dict:
    s = CPU if args.cpu else GPU
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("vssl-benchmark gpu: no CUDA device here; --cpu runs the same parts at toy sizes on the CPU")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from ..models.layers.attention import xformers_unusable

    why_not = xformers_unusable() if device.type == "cuda" else "xformers runs on CUDA only"
    backends = ["math", "sdpa"] + ([] if why_not else ["xformers"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "vssl-benchmark gpu " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["gpu"] else "vssl-benchmark gpu"
    results: dict = {"command": command, "backends": backends, "xformers": why_not or "kernels run"}
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    started = time.monotonic()
    engine_parts = {"mae", "zero3", "compile"} & set(wanted)
    if engine_parts:  # the engine parts share one single-rank process group, as `python pretrain.py` creates
        from ..config import load_config
        from ..engine.deepspeed import init_distributed

        init_distributed(load_config("videomae_vit_b", ["engine.backend=auto"]))
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="scratch-", dir=out_dir))
    scratch.mkdir(parents=True, exist_ok=True)
    calls = {"env": lambda: part_env(s, device, dtype),
             "attention": lambda: part_attention(s, device, dtype, backends),
             "mae": lambda: part_mae(s, device, dtype, backends),
             "compile": lambda: part_mae(s, device, dtype, backends, _compile_batches(s, results)),
             "zero3": lambda: part_zero3(s, device), "mvd": lambda: part_mvd(s, device),
             "data": lambda: part_data(s, device, scratch), "e2e": lambda: part_e2e(s, device, scratch)}
    for part in wanted:
        elapsed = time.monotonic() - started
        print(f"[{elapsed:6.1f}s] {part}", flush=True)
        if elapsed > args.budget:
            results[part] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
        else:
            t0 = time.monotonic()
            try:
                results[part] = calls[part]()
            except Exception as e:  # guarded: report and go on with the next part
                traceback.print_exc()
                results[part] = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
            results[part]["part_s"] = round(time.monotonic() - t0, 1)
            _reset(device)
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=1))
        (out_dir / "gpu.md").write_text(_markdown(results, command))
    results["total_s"] = round(time.monotonic() - started, 1)
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=1))
    if engine_parts:
        from ..engine import dist

        dist.shutdown()
    failed = [p for p in wanted if "error" in results.get(p, {})]
    print(f"done in {results['total_s']} s; {len(wanted) - len(failed)}/{len(wanted)} parts ran"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"\n  {out_dir / 'gpu.json'}\n  {out_dir / 'gpu.md'}")
    return results
