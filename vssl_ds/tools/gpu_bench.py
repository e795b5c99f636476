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

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .gpu_parts import compile_batches, part_attention, part_env, part_mae, part_mvd, part_zero3, reset, sync

ROOT = Path(__file__).resolve().parents[2]

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
                sync(device)
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
             "compile": lambda: part_mae(s, device, dtype, backends, compile_batches(s, results)),
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
            reset(device)
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
