"""The model parts of `vssl-benchmark gpu` (gpu_bench.py runs them, with the data and end-to-end parts, and writes the
report): env, attention, mae (and compile), zero3, mvd. Each takes the size table `s` (gpu_bench.GPU or CPU)."""
from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np
import torch

from ..logging import PEAK_TFLOPS
from .bench_model import timed

DATASHEET_BF16_TFLOPS = PEAK_TFLOPS["H100"]  # H100/H200 SXM dense bf16, for MFU


# --- helpers ------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset(device) -> None:
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
    sec = timed(lambda: a @ b, 10 if device.type == "cuda" else 2, device, "matmul", warmup=3)
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
        ms = 1000 * timed(lambda: attention(*leaves, bb, backend).backward(g.to(dtype)), s["iters"] * 2, device)
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
        reset(device)
        ms = 1000 * timed(step, s["iters"], device)
        return {"fwd_bwd_ms": round(ms, 2), "max_rel_err": float(f"{err:.3g}"), "peak_mem_gib": round(_peak_gib(device), 2)}

    for backend in backends:
        row = out["swin"][backend] = _guarded(lambda: swin_row(backend))
        print(f"  {name} {batch}x{frames}x{size}² {backend:9s} {row} (features vs fp32 math)", flush=True)
        reset(device)
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
        reset(self.device)


def _largest_batch(s, step: _EngineStep, inputs, device) -> tuple[int, dict]:
    """Peak memory at two probe batches → bytes per clip → the largest batch under 85 % of the memory."""
    if device.type != "cuda":
        return s["max_batch"], {}
    peaks = []
    for b in (s["probe"], 2 * s["probe"]):
        reset(device)
        step(inputs(b))
        step(inputs(b))
        sync(device)
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
                        sync(device)
                        row = {"first_step_s": round(time.perf_counter() - t0, 1)}
                    for attempt in range(3):
                        try:
                            reset(device)
                            sec = timed(lambda: step(inputs(batch)), s["iters"], device)
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
                reset(device)
            out[key] = row
            print(f"  {key:55s} {row}", flush=True)
    out["setup"] = {"frames": s["frames"], "size": s["size"], "mask_ratio": 0.9, "compiled": compiled is not None, "precision": "engine auto (bf16 on "
                    "GPU)", "zero_stage": 1, "optimizer": "torch AdamW (vssl_ds engine)",
                    "batch": f"largest under 85 % of memory from two probe batches, capped at {s['max_batch']}"
                    if compiled is None else "the eager SDPA variant's batch",
                    "mfu_peak_tflops": peak}
    return out


def compile_batches(s, results: dict) -> dict:
    """The batch each model's eager SDPA variant ran at (the probe batch if the mae part did not run)."""
    mae = results.get("mae", {})
    return {name: mae.get(f"{name}/sdpa/ckpt=off/compile=off", {}).get("batch", s["probe"]) for name in s["mae_models"]}


def part_zero3(s, device) -> dict:
    name, batch = s["zero3"]
    out = {"setup": {"model": name, "batch": batch, "method": "MAE, mask 0.9", "ranks": 1}}
    for stage in (0, 3):
        cfg = _mae_config(s, name, [f"engine.zero_stage={stage}", f"data.batch_size={batch}", "model.attn_backend=sdpa"])
        inputs = _mae_inputs(cfg, batch, device)
        reset(device)
        step = _EngineStep(cfg, device)
        try:
            sec = timed(lambda: step(inputs(batch)), s["iters"], device)
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
