"""The temporal sanity benchmark: does pretraining teach an encoder the order of frames?

    vssl-benchmark temporal [--task drift|orbit] [--methods mae,vicmae,mvd,iboot,lstcl,bevt] [--steps 1500]

Generated labelled clips whose only difference between the two classes is the direction of a shape's motion
(data/synthetic.py: `orbit` circles clockwise / anticlockwise, `drift` moves right / left, over flat grey): a clip
of one class played backwards is a clip of the other, so every frame, and the set of frames, looks alike in both.
Each method pretrains a tiny encoder on the training clips (labels unused), the encoder is exported, and a linear
probe is trained on its frozen features; the same probe on the same architecture, randomly initialised, is the
baseline. Also per method: the monitor's curves during pretraining (kNN on labelled monitor clips, RankMe), and the
order sensitivity of the pooled features (how far reversing a test clip moves its feature; see order_sensitivity).
A supervised control (`supervised`: the MAE's architecture fine-tuned end to end on the labels, from its random
initialisation) shows what the architecture can learn of the task in the same number of steps. Every stage is the
real command (pretrain.py, export, the linear probe) in a subprocess, on CPU. MVD's teachers come from the MAE and
ViC-MAE stages of the same run (the paper's two-stage path); iBoot's frozen image model is the ViC-MAE encoder;
BEVT's tokenizer is k-means on the training frames.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

VIT = ["model.name=vit_micro_video", "model.img_size=32", "model.num_frames=8", "model.patch=8"]
# no flip anywhere: a mirrored clip of one class is a clip of the other (as SSv2 is trained without flip)
DATA = ["data.size=32", "data.num_frames=8", "data.sampling_rate=2", "data.num_workers=1", "data.flip=0"]
METHODS = {  # name → (recipe, tiny overrides); "{...}" fields are filled from earlier stages
    "mae": ("tiny_mae", [*VIT, "method.mae.decoder_dim=64", "method.mae.decoder_depth=1", "method.mae.decoder_heads=2"]),
    "vicmae": ("vicmae_vit_b", ["model.name=vit2d_micro_patch16", "model.img_size=32", "model.patch=8",
                                "data.max_gap=8", "method.vicmae.decoder_dim=64", "method.vicmae.decoder_depth=1",
                                "method.vicmae.decoder_heads=2", "method.vicmae.proj_hidden=128",
                                "method.vicmae.proj_dim=32"]),
    "mvd": ("mvd_vit_s", [*VIT, "method.mvd.image_teacher=vit2d_micro_patch16", "method.mvd.video_teacher=vit_micro_video",
                          "method.mvd.image_teacher_weights={vicmae}", "method.mvd.video_teacher_weights={mae}",
                          "method.mvd.decoder_dim=64", "method.mvd.decoder_heads=2", "method.mvd.decoder_depth=1",
                          "engine.grad_accum=1"]),
    "iboot": ("iboot_vit_b", [*VIT, "method.iboot.teacher=vit2d_micro_patch16", "method.iboot.teacher_weights={vicmae}",
                              "method.iboot.proj_hidden=128", "method.iboot.proj_dim=32", "method.iboot.pred_hidden=128",
                              "data.long_stride=4"]),
    "lstcl": ("lstcl_mocov3_vit_b", ["model.name=vit_micro_divided_st", "model.img_size=32", "model.num_frames=8",
                                     "model.patch=8", "method.lstcl.proj_hidden=128", "method.lstcl.proj_dim=32",
                                     "method.lstcl.pred_hidden=128", "data.long_stride=4"]),
    "bevt": ("bevt_swin_b", ["model.name=swin3d_micro", "model.img_size=32", "model.num_frames=8", "model.window=[2,4,4]",
                             "data.short_range=[32,40]", "data.image_batch_size={batch}", "data.images={images}",
                             "method.bevt.tokenizer=kmeans", "method.bevt.tokenizer_weights={tokenizer}",
                             "method.bevt.min_block=1", "engine.grad_accum=1"]),
}


def add_args(sub) -> None:
    t = sub.add_parser("temporal", help="linear probe after each method's pretraining vs random init, on clips "
                                        "that only frame order tells apart")
    t.add_argument("--methods", default=",".join(METHODS))
    t.add_argument("--task", choices=["orbit", "drift"], default="drift",
                   help="orbit: a shape circles clockwise / anticlockwise; drift: it moves right / left")
    t.add_argument("--steps", type=int, default=1500, help="pretraining steps per method")
    t.add_argument("--probe-steps", type=int, default=800)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--train-clips", type=int, default=256)
    t.add_argument("--val-clips", type=int, default=640, help="test clips of the probe (640: one standard error "
                                                                "<= 2 points)")
    t.add_argument("--monitor-clips", type=int, default=256, help="labelled clips of the monitor's kNN curve during "
                                                                  "pretraining (another seed)")
    t.add_argument("--no-supervised", dest="supervised", action="store_false",
                   help="skip the supervised control (the MAE's architecture trained on the labels)")
    t.add_argument("--workdir", default="bench/temporal", help="shards, runs and results go to WORKDIR/TASK (kept; "
                                                               "finished stages are reused when rerun)")
    t.add_argument("--json", default="")


def _run(args: list[str], log: Path) -> None:
    """One stage as a subprocess (single process, CPU); its output goes to `log`, a failure shows its tail."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:4])} … failed ({proc.returncode}); the tail of {log}:\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-30:]))


def _sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _data(work: Path, a) -> dict:
    from ..data.synthetic import write_synthetic_shards

    out = {}
    for split, clips, seed in (("train", a.train_clips, 11), ("val", a.val_clips, 12),
                               ("monitor", a.monitor_clips, 14)):
        manifest = work / split / "manifest.json"
        if not manifest.is_file():
            # 16 frames: the sampled clip (8 frames at stride 2) sees the whole path
            write_synthetic_shards(manifest.parent, clips=clips, shards=4, frames=16, size=48, seed=seed, task=a.task)
        out[split] = manifest
    images = work / "images" / "manifest.json"
    if "bevt" in a.methods and not images.is_file():  # BEVT's image stream: single frames of the training clips
        import numpy as np
        from PIL import Image

        from ..data.synthetic import TASKS
        from .make_shards import main as make_shards

        rng = np.random.default_rng(13)
        for i in range(64):
            folder = work / "image_src" / "frames"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(TASKS[a.task][0](rng, i % 2, 1, 48)[0]).save(folder / f"f{i:03d}.png")
        make_shards([str(work / "image_src"), str(images.parent), "--kind", "image", "--prefix", "frames",
                     "--max-per-shard", "16", "--workers", "1"])
    out["images"] = images
    return out


def _random_like(exported: str) -> str:
    """The baseline: the exported encoder's architecture, randomly initialised, exported the same way."""
    from dataclasses import fields

    import torch

    from ..config.schema import ModelConfig
    from ..models import build_encoder
    from ..models.exported import read_info, save_exported

    out = Path(exported).with_name("random_" + Path(exported).name)
    if not out.is_file():
        info = read_info(exported)
        known = {f.name for f in fields(ModelConfig)}
        m = ModelConfig(**{k: v for k, v in info["model"].items() if k in known})
        torch.manual_seed(0)
        save_exported(build_encoder(m, **info.get("extra", {})), m, info.get("extra", {}), out,
                      {"method": "random", "step": 0})
    return str(out)


def _probe(work: Path, name: str, data: dict, a, weights: str, mode: str = "linear") -> dict:
    """Linear probe on the frozen features of the exported encoder `weights` → its results.json. mode="finetune":
    the supervised control instead: the whole encoder trained on the labels for as many steps as the pretraining
    (the probe's clip view, no mixup: nothing that would blur the direction)."""
    run = work / "probes" / name
    if not (run / "results.json").is_file():
        steps = a.steps if mode == "finetune" else a.probe_steps
        sets = [*DATA, f"data.train={data['train']}", f"eval.val={data['val']}", f"data.batch_size={a.batch}",
                f"run.max_steps={steps}", "optim.lr=1e-3", "optim.warmup_epochs=0", "optim.warmup_steps=20",
                "run.log_every=50", "run.ckpt_every=0", "eval.test_clips=2", "eval.test_crops=1",
                f"run.out_dir={run.parent}", f"run.name={name}", f"eval.weights={weights}"]
        if mode == "finetune":
            sets += ["run.epochs=0", "data.view=clip", "eval.mixup=0", "eval.cutmix=0"]
        recipe = {"linear": "linear_probe", "finetune": "finetune_vit_b"}[mode]
        _run(["-m", "vssl_ds.eval.run", mode, "--config", recipe, *_sets(sets)], work / f"probe_{name}.log")
    return json.loads((run / "results.json").read_text())


def _pretrain(work: Path, name: str, data: dict, a, filled: dict) -> str:
    """Pretrain `name` and export its encoder → the exported .safetensors path."""
    from .export import export

    out = work / "export" / f"{name}.safetensors"
    if out.is_file():
        return str(out)
    recipe, sets = METHODS[name]
    sets = [s.format(**filled) for s in sets] + [
        *DATA, f"data.train={data['train']}", f"data.batch_size={a.batch}", f"run.max_steps={a.steps}",
        "optim.lr=1e-3", "optim.warmup_epochs=0", "optim.warmup_steps=20", "run.log_every=50", "run.ckpt_every=0",
        f"run.out_dir={work / 'runs'}", f"run.name={name}", f"monitor.every={max(a.steps // 10, 1)}",
        f"monitor.val={data['monitor']}", "monitor.clips=64", "monitor.images=0"]
    _run(["-c", "import sys; from vssl_ds.train import main; sys.exit(main())", "--config", recipe, *_sets(sets)],
         work / f"pretrain_{name}.log")
    export(work / "runs" / name, out)
    return str(out)


def order_sensitivity(weights: str, spec: str) -> float:
    """How far an encoder's pooled feature of a test clip moves when the clip's frames are played backwards (which
    turns it into a clip of the other class), relative to how far apart two different test clips lie: mean over
    clips of ||f(x) - f(reversed x)||² / mean over pairs of ||f(x) - f(y)||², every feature dimension standardised
    over the clips first (as the probe's BatchNorm does). 0: the pooled features cannot see frame order, so no
    probe on them can beat chance here; label-free, and measured the same way on the random initialisation."""
    import torch

    from ..config import load_config
    from ..eval.classifier import pooled
    from ..eval.testing import view_batches
    from ..models.exported import load_exported

    encoder, _ = load_exported(weights, attn_backend="sdpa")
    encoder.eval()
    cfg = load_config("linear_probe", DATA)  # the probe's test views
    forward, backward = [], []
    with torch.no_grad():
        for video, _, _, _ in view_batches(spec, cfg, 1, 1, torch.device("cpu"), 32):
            forward.append(pooled(encoder, video, cfg.eval.pool).double())
            backward.append(pooled(encoder, video.flip(2), cfg.eval.pool).double())  # [B,C,T,H,W]: T reversed
    f, r = torch.cat(forward), torch.cat(backward)
    mean, std = f.mean(0), f.std(0).clamp_min(1e-12)
    f, r = (f - mean) / std, (r - mean) / std
    n = len(f)
    between = torch.cdist(f, f).pow(2).sum() / (n * (n - 1))
    return float((f - r).pow(2).sum(1).mean() / between.clamp_min(1e-30))


def _standard_error(top1: float, n: int) -> float:
    """One standard error of an accuracy (%) measured on n test clips (binomial)."""
    p = top1 / 100
    return 100 * (max(p * (1 - p), 1e-4) / max(n, 1)) ** 0.5


def _curves(run_dir: Path) -> dict:
    """The monitor's curves of a pretraining run: kNN top-1 on the labelled monitor clips and RankMe, by step."""
    from ..logging import tb_scalars

    return {key: [[step, round(value, 3)] for step, value in tb_scalars(run_dir, f"monitor/{key}")]
            for key in ("knn_top1", "rankme")}


def bench_temporal(a) -> dict:
    work = Path(a.workdir) / a.task
    work.mkdir(parents=True, exist_ok=True)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    need = {"mvd": ["mae", "vicmae"], "iboot": ["vicmae"]}  # stages whose encoders a later method uses
    order = [m for m in METHODS if m in a.methods or any(m in need.get(x, []) for x in a.methods)]
    data = _data(work, a)
    filled = {"batch": a.batch, "images": data["images"]}
    if "bevt" in order:
        tok = work / "kmeans.pt"
        if not tok.is_file():
            from .fit_tokenizer import main as fit

            fit([str(data["train"]), str(tok), "--codes", "64", "--frames", "2000", "--patches", "20000",
                 "--size", "32", "--short-range", "32", "40", "--workers", "1"])
        filled["tokenizer"] = tok
    rows = {}
    print(f"temporal sanity benchmark in {work}: {', '.join(a.methods)}", flush=True)
    from tqdm import tqdm

    stages = tqdm(total=len(order) + 2 * len(a.methods) + int(a.supervised and "mae" in order),
                  desc="temporal benchmark", unit="stage")
    for name in order:
        t0 = time.time()
        stages.set_postfix_str(f"pretraining {name}")
        filled[name] = _pretrain(work, name, data, a, filled)
        stages.update()
        if name not in a.methods:  # only a teacher stage for a later method
            continue
        stages.set_postfix_str(f"probing {name}")
        trained = _probe(work, name, data, a, filled[name])
        stages.update()
        stages.set_postfix_str(f"probing {name}'s random init")
        random_init = _random_like(filled[name])
        baseline = _probe(work, f"random_{name}", data, a, random_init)
        stages.update()
        stages.set_postfix_str(f"order sensitivity of {name}")
        sens = [order_sensitivity(w, str(data["val"])) for w in (filled[name], random_init)]
        se = max(_standard_error(r["top1"], r["videos"]) for r in (trained, baseline))
        gain = trained["top1"] - baseline["top1"]
        rows[name] = {"encoder": trained["encoder"], "pretrained_top1": trained["top1"],
                      "random_top1": baseline["top1"], "gain": round(gain, 2), "standard_error": round(se, 2),
                      "beats_random": gain > 3 * se, "order_sensitivity": round(sens[0], 5),
                      "random_order_sensitivity": round(sens[1], 5), "monitor": _curves(work / "runs" / name),
                      "seconds": round(time.time() - t0, 1)}
        knn = rows[name]["monitor"]["knn_top1"]
        print(f"{name:7s} {trained['encoder']:22s} pretrained {trained['top1']:6.2f} %   random init "
              f"{baseline['top1']:6.2f} %   gain {gain:+.1f} (SE {se:.1f}{', > 3 SE' if gain > 3 * se else ''})   "
              f"order sensitivity {sens[0]:.4f} (random {sens[1]:.4f})   monitor kNN "
              f"{' → '.join(f'{v:.0f}' for _, v in knn[::max(len(knn) // 4, 1)]) or '-'}   "
              f"({rows[name]['seconds']:.0f} s)", flush=True)
    control = None
    if a.supervised and "mae" in filled:
        stages.set_postfix_str("supervised control")
        sup = _probe(work, "supervised", data, a, _random_like(filled["mae"]), mode="finetune")
        control = {"encoder": sup["encoder"], "top1": sup["top1"], "steps": a.steps,
                   "standard_error": round(_standard_error(sup["top1"], sup["videos"]), 2)}
        print(f"supervised control: {sup['encoder']} trained on the labels from its random init, {a.steps} steps: "
              f"{sup['top1']:.2f} %", flush=True)
        stages.update()
    stages.close()
    result = {"task": f"{a.task} direction (2 classes, chance 50 %)", "train_clips": a.train_clips,
              "val_clips": a.val_clips, "pretrain_steps": a.steps, "probe_steps": a.probe_steps, "batch": a.batch,
              "methods": {m: rows[m] for m in a.methods}, "supervised_control": control}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    return result
