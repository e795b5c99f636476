"""One validation layer: every value range and cross-field constraint, checked when the config is loaded, before any
process group, DeepSpeed, model or data work (docs/RELIABILITY.md). Each failure is a ConfigError that reads
`<field>: <what is wrong>; <what to do>`.

`check_values(cfg)` is pure (load_config calls it); `check_environment(cfg)` looks at files, folders and the
device (pretrain.py calls it before it starts anything).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import ConfigError
from .schema import Config

PRETRAINING = ("mae", "mvd", "bevt", "lstcl", "vicmae", "iboot")


def _get(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _fail(key: str, problem: str, fix: str):
    raise ConfigError(f"{key}: {problem}; {fix}")


def _at_least(cfg, minimum, *keys, fix: str = ""):
    for key in keys:
        value = _get(cfg, key)
        if value < minimum:
            _fail(key, f"is {value}, must be >= {minimum}", fix or f"set {key} to {minimum} or more")


def _ratio(cfg, key: str, low_open: bool = True, fix: str = ""):
    """A fraction hidden or kept: 0 < r < 1 (or 0 <= r < 1)."""
    value = _get(cfg, key)
    ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        bounds = "0 < r < 1" if low_open else "0 <= r < 1"
        _fail(key, f"is {value}, must satisfy {bounds}", fix or f"give a fraction, e.g. {key}=0.9")


def check_values(cfg: Config) -> None:
    """Ranges and cross-field constraints; no file system, no device."""
    r, d, o, e = cfg.run, cfg.data, cfg.optim, cfg.engine
    # --- run
    if not r.name or r.name in (".", "..") or "/" in r.name or "\\" in r.name or not re.fullmatch(r"[\w.+=,@-]+", r.name):
        _fail("run.name", f"{r.name!r} is not a plain folder name (no path separators, no '..')",
              "use letters, digits and - _ . + = , @; put the folder in run.out_dir")
    _at_least(cfg, 0, "run.seed", "run.epochs", "run.max_steps", "run.stop_at", "run.ckpt_every", "run.keep_last")
    _at_least(cfg, 1, "run.log_every", "run.max_nonfinite", "monitor.knn_k")
    _at_least(cfg, 0, "run.peak_tflops", "run.hang_timeout", "monitor.every",
              "monitor.images")
    _at_least(cfg, 2, "monitor.clips", fix="set monitor.clips to 2 or more (64 is the default)")
    _ratio(cfg, "monitor.collapse_drop", fix="give a fraction of the best value, e.g. monitor.collapse_drop=0.5")
    if r.epochs == 0 and r.max_steps == 0 and cfg.method.name in PRETRAINING + ("finetune", "linear", "attentive"):
        _fail("run.epochs", "is 0 and run.max_steps is 0: there is nothing to train", "set run.epochs or run.max_steps")
    # --- data
    _at_least(cfg, 1, "data.batch_size", "data.num_frames", "data.sampling_rate", "data.size", "data.repeats",
              "data.synthetic_clips", "data.long_stride", "data.max_gap")
    _at_least(cfg, 0, "data.num_workers", "data.epoch_size", "data.shuffle_buffer", "data.image_batch_size")
    _at_least(cfg, 1, "data.prefetch", fix="set data.prefetch to 1 or more batches per worker (2 is the default)")
    if d.batch_size % d.repeats:
        _fail("data.batch_size", f"{d.batch_size} is not a multiple of data.repeats ({d.repeats})",
              "make the per-device batch a multiple of the repeats so no video's repeats are split")
    if not d.scales or any(not 0 < s <= 1 for s in d.scales):
        _fail("data.scales", f"{d.scales} must be crop fractions in (0, 1]", "e.g. data.scales=[1.0,0.875,0.75,0.66]")
    if d.flip != -1 and not 0 <= d.flip <= 1:
        _fail("data.flip", f"{d.flip} is not a probability", "give 0..1 (0: no flip, for left/right-sensitive labels) "
              "or -1 for the view's default")
    if len(d.short_range) != 2 or not 0 < d.short_range[0] <= d.short_range[1]:
        _fail("data.short_range", f"{d.short_range} must be [low, high] with 0 < low <= high", "e.g. [256, 320]")
    for key in ("data.mean", "data.std"):
        if len(_get(cfg, key)) != 3:
            _fail(key, f"{_get(cfg, key)} must have 3 values (R, G, B)", "give one value per channel")
    if any(s <= 0 for s in d.std):
        _fail("data.std", f"{d.std} has a value <= 0", "give the positive per-channel standard deviations")
    # --- model
    _check_model(cfg)
    # --- method
    _check_method(cfg)
    # --- optim
    for key in ("optim.lr", "optim.blr", "optim.min_lr", "optim.min_blr", "optim.warmup_blr", "optim.warmup_epochs",
                "optim.warmup_steps", "optim.weight_decay", "optim.clip_grad"):
        if _get(cfg, key) < 0:
            _fail(key, f"is {_get(cfg, key)}, must be >= 0", f"set {key} to a non-negative value")
    if o.lr == 0 and o.blr == 0:
        _fail("optim.blr", "is 0 and optim.lr is 0: nothing would move", "set optim.blr (scaled by the batch) or optim.lr")
    if len(o.betas) != 2 or any(not 0 <= b < 1 for b in o.betas):
        _fail("optim.betas", f"{o.betas} must be two values in [0, 1)", "e.g. optim.betas=[0.9,0.95]")
    if o.eps <= 0:
        _fail("optim.eps", f"is {o.eps}, must be > 0", "e.g. optim.eps=1e-8")
    # --- engine
    _at_least(cfg, 1, "engine.grad_accum")
    if e.offload_param != "none" and e.zero_stage != 3:
        _fail("engine.offload_param", f"is {e.offload_param} but engine.zero_stage is {e.zero_stage}",
              "parameter offload needs engine.zero_stage=3")
    if e.offload_optimizer != "none" and e.zero_stage == 0:
        _fail("engine.offload_optimizer", f"is {e.offload_optimizer} but engine.zero_stage is 0",
              "optimizer offload needs engine.zero_stage >= 1")
    # --- eval
    _at_least(cfg, 1, "eval.knn_k", "eval.test_clips", "eval.test_crops", "eval.test_batch_size", "eval.knn_train_views",
              "eval.probe_heads")
    _at_least(cfg, 0, "eval.num_classes", "eval.mixup", "eval.cutmix", "eval.head_dropout")
    for key in ("eval.label_smoothing", "eval.head_dropout"):
        _ratio(cfg, key, low_open=False)
    for key in ("eval.mix_prob", "eval.switch_prob"):
        if not 0 <= _get(cfg, key) <= 1:
            _fail(key, f"is {_get(cfg, key)}, must be a probability in [0, 1]", f"set {key} between 0 and 1")
    if cfg.eval.knn_t <= 0:
        _fail("eval.knn_t", f"is {cfg.eval.knn_t}, must be > 0", "e.g. eval.knn_t=0.07")


def _check_model(cfg: Config) -> None:
    from ..models import list_models

    m, d = cfg.model, cfg.data
    known = list_models()
    if m.name not in known:
        close = [n for n in known if n.split("_")[0] == m.name.split("_")[0]][:6] or known[:6]
        _fail("model.name", f"unknown model {m.name!r}", f"choose a registered one, e.g. {', '.join(close)}")
    _at_least(cfg, 1, "model.img_size", "model.num_frames", "model.tubelet", "model.patch")
    _at_least(cfg, 0, "model.embed_dim")
    _ratio(cfg, "model.drop_path", low_open=False)
    video = not m.name.startswith("vit2d")
    if m.name.startswith("swin"):  # windows and patch merging pad what does not divide, as the official code
        if m.img_size % 4:
            _fail("model.img_size", f"{m.img_size} is not a multiple of 4 (Video Swin embeds 4-px patches)",
                  "use e.g. 56, 64, 224")
        if m.num_frames % 2:
            _fail("model.num_frames", f"{m.num_frames} is odd; Video Swin embeds 2-frame tubelets", "use an even count")
    else:
        if m.img_size % m.patch:
            _fail("model.img_size", f"{m.img_size} is not a multiple of model.patch ({m.patch})",
                  "choose a size the patch divides, or another model.patch")
        if video and m.num_frames % m.tubelet:
            _fail("model.num_frames", f"{m.num_frames} is not a multiple of model.tubelet ({m.tubelet})",
                  "choose a frame count the tubelet divides, or another model.tubelet")
    if cfg.method.name in PRETRAINING:  # the model sees exactly what the loader cuts
        if d.size != m.img_size:
            _fail("data.size", f"is {d.size} but model.img_size is {m.img_size}", "set both to the same size")
        if video and cfg.method.name != "vicmae" and d.num_frames != m.num_frames:
            _fail("data.num_frames", f"is {d.num_frames} but model.num_frames is {m.num_frames}",
                  "set both to the same number of frames")
    if m.compile and cfg.engine.zero_stage == 3:
        _fail("model.compile", "is true with engine.zero_stage=3 (ZeRO-3 gathers parameters in per-module hooks "
              "that compiled blocks would bake in)", "use engine.zero_stage <= 2 with model.compile, or turn it off")


def _check_block_masks(cfg: Config) -> None:
    """BEVT's block masks live on the 16-px cells of the input: at a small input, 98-of-196-style settings mask
    nothing (the loss is then a mean over no token). Refuse what cannot mask, naming the fields."""
    import numpy as np

    from ..data.masking import block_mask_2d

    b, side = cfg.method.bevt, cfg.model.img_size // 16
    for key, ratio in (("method.bevt.mask_ratio", b.mask_ratio), ("method.bevt.image_mask_ratio", b.image_mask_ratio)):
        budget = int(round(ratio * side * side))
        where = f"the {side}x{side} grid of 16-px cells at model.img_size={cfg.model.img_size}"
        if budget < 1:
            _fail(key, f"{ratio} masks no cell of {where}", "raise the ratio or model.img_size / data.size")
        if b.min_block > budget:
            _fail("method.bevt.min_block", f"is {b.min_block}, more than the {budget} cells {key}={ratio} masks on "
                  f"{where}", f"set method.bevt.min_block <= {budget} (e.g. {max(1, budget // 4)}) or a larger size")
        rng = np.random.default_rng(0)
        if any(not block_mask_2d(side, side, budget, rng, b.min_block).any() for _ in range(16)):
            _fail("method.bevt.min_block", f"is {b.min_block}: blocks that large do not fit {where} (masks came "
                  f"out empty)", f"lower it (e.g. {max(1, budget // 4)}) or use a larger size")


def _check_method(cfg: Config) -> None:
    name, md = cfg.method.name, cfg.method
    if cfg.data.view == "image" and name in PRETRAINING and name != "bevt":
        _fail("data.view", f"image streams single images, which only BEVT's image-only stage trains on (method "
              f"{name} takes clips)", "choose another view, e.g. the recipe's")
    if name == "mae":
        _ratio(cfg, "method.mae.mask_ratio", fix="e.g. method.mae.mask_ratio=0.9 (VideoMAE)")
        _decoder(cfg, "method.mae")
    elif name == "mvd":
        _ratio(cfg, "method.mvd.mask_ratio", fix="e.g. method.mvd.mask_ratio=0.9 (MVD)")
        _at_least(cfg, 0, "method.mvd.teacher_size", "method.mvd.decoder_dim", "method.mvd.decoder_heads",
                  "method.mvd.image_weight", "method.mvd.video_weight")
        _at_least(cfg, 1, "method.mvd.decoder_depth")
        if md.mvd.image_weight == 0 and md.mvd.video_weight == 0:
            _fail("method.mvd.image_weight", "and method.mvd.video_weight are both 0: no target", "give one a weight")
    elif name == "bevt":
        _ratio(cfg, "method.bevt.mask_ratio")
        _ratio(cfg, "method.bevt.image_mask_ratio")
        _at_least(cfg, 1, "method.bevt.min_block")
        _at_least(cfg, 0, "method.bevt.video_weight", "method.bevt.image_weight")
        _check_block_masks(cfg)
        if cfg.data.view == "image":  # the image-only stage
            if cfg.data.images or cfg.data.image_batch_size:
                _fail("data.images", "is a second image stream, but data.view=image already streams the images of "
                      "data.train (BEVT's image-only stage)", "set data.images='' and data.image_batch_size=0")
            if md.bevt.targets != "online":
                _fail("method.bevt.targets", "must be online for the image-only stage (data.view=image)",
                      "set method.bevt.targets=online")
    elif name == "lstcl":
        _at_least(cfg, 1, "method.lstcl.proj_hidden", "method.lstcl.proj_dim", "method.lstcl.proj_layers",
                  "method.lstcl.pred_hidden")
        if md.lstcl.temperature <= 0:
            _fail("method.lstcl.temperature", f"is {md.lstcl.temperature}, must be > 0", "e.g. 0.2 (MoCo v3)")
        if not 0 <= md.lstcl.momentum <= 1:
            _fail("method.lstcl.momentum", f"is {md.lstcl.momentum}, must be in [0, 1]", "e.g. 0.99")
    elif name == "vicmae":
        _ratio(cfg, "method.vicmae.mask_ratio", low_open=False)
        _decoder(cfg, "method.vicmae")
        _at_least(cfg, 1, "method.vicmae.proj_hidden", "method.vicmae.proj_dim")
        _at_least(cfg, 0, "method.vicmae.contrastive_weight", "method.vicmae.reconstruction_weight")
        if md.vicmae.temperature <= 0:
            _fail("method.vicmae.temperature", f"is {md.vicmae.temperature}, must be > 0", "e.g. 0.1")
    elif name == "iboot":
        _at_least(cfg, 1, "method.iboot.proj_hidden", "method.iboot.proj_dim", "method.iboot.pred_hidden")


def _decoder(cfg, section: str) -> None:
    _at_least(cfg, 1, f"{section}.decoder_dim", f"{section}.decoder_depth", f"{section}.decoder_heads")
    dim, heads = _get(cfg, f"{section}.decoder_dim"), _get(cfg, f"{section}.decoder_heads")
    if dim % heads:
        _fail(f"{section}.decoder_dim", f"{dim} is not divisible by {section}.decoder_heads ({heads})",
              "choose a width the head count divides")


def check_environment(cfg: Config) -> None:
    """Files that must exist, a writable run folder, a precision this machine has: before anything starts."""
    import torch

    from ..data.shards import is_local

    files = [("model.pretrained", cfg.model.pretrained), ("engine.ds_config", cfg.engine.ds_config)]
    md = cfg.method
    if md.name == "mvd" and md.mvd.targets == "online":
        files += [("method.mvd.image_teacher_weights", md.mvd.image_teacher_weights),
                  ("method.mvd.video_teacher_weights", md.mvd.video_teacher_weights)]
    if md.name == "iboot" and md.iboot.targets == "online":
        files.append(("method.iboot.teacher_weights", md.iboot.teacher_weights))
    if md.name == "bevt" and md.bevt.targets == "online":
        files.append(("method.bevt.tokenizer_weights", md.bevt.tokenizer_weights))
    cached = {"mvd": md.mvd.targets, "iboot": md.iboot.targets, "bevt": md.bevt.targets}.get(md.name) == "cache"
    if cached:
        if not cfg.data.targets:
            _fail("data.targets", f"is empty but method.{md.name}.targets=cache",
                  "give the folder tools/cache_teachers.py wrote, or set the targets to online")
        files.append(("data.targets", cfg.data.targets))
    if cfg.data.decode_device == "cuda":
        if not torch.cuda.is_available():
            _fail("data.decode_device", "is cuda but this machine has no usable CUDA device",
                  "set data.decode_device=cpu (the default: decoding in the data workers)")
        from ..data.decode import DecodeError, torchcodec_decoder

        try:
            torchcodec_decoder()
        except DecodeError as e:
            _fail("data.decode_device", f"is cuda but {e}",
                  "pip install 'vssl_ds[codec]' (torchcodec, built for this torch, needs the FFmpeg libraries), "
                  "or set data.decode_device=cpu")
    for key, value in files:
        if value and not value.startswith(("timm:", "hf:")) and not Path(value).exists():
            _fail(key, f"{value!r} does not exist", "give the path of a local file (vssl_ds never downloads)")
    train = cfg.data.train
    if not train and not cfg.data.synthetic and md.name in PRETRAINING:
        _fail("data.train", "is empty", "give a manifest.json, a brace pattern of shards or URLs (tools/make_shards.py "
              "writes them); only the embedded default (tiny_mae, data.synthetic=true) trains on generated toy clips")
    if train and not any(c in train for c in "{}*") and is_local(train):
        if not Path(train).exists():
            _fail("data.train", f"{train!r} does not exist", "give a manifest.json, a brace pattern of shards or URLs "
                  "(tools/make_shards.py writes them)")
    val = cfg.monitor.val
    if val and not any(c in val for c in "{}*") and is_local(val) and not Path(val).exists():
        _fail("monitor.val", f"{val!r} does not exist", "give labelled shards (a manifest.json from "
              "tools/make_shards.py), or leave monitor.val empty for the label-free monitor only")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if run_dir.exists() and not run_dir.is_dir():
        _fail("run.name", f"{run_dir} exists and is not a folder", "choose another run.name or run.out_dir")
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file() and not cfg.run.auto_resume and not cfg.run.overwrite:
        _fail("run.name", f"the run folder {run_dir} already holds checkpoints (latest: {latest.read_text().strip()})",
              "add --auto-resume to continue that run, choose another run.name, or set run.overwrite=true to start "
              "over (its checkpoints and TensorBoard logs are deleted)")
    out = Path(cfg.run.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        _fail("run.out_dir", f"{str(out)!r} is not writable ({exc.strerror or exc})",
              "choose a folder this user can write to")
    if cfg.engine.precision == "fp16" and not torch.cuda.is_available():
        _fail("engine.precision", "fp16 needs a CUDA device and there is none here", "use bf16 or fp32 on the CPU")
    if cfg.engine.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        _fail("engine.precision", f"bf16 is not supported by {torch.cuda.get_device_name()}", "use fp16 or fp32")
    if cfg.data.num_workers > (os.cpu_count() or 1) * 8:
        _fail("data.num_workers", f"is {cfg.data.num_workers} for {os.cpu_count()} CPUs", "use about one per core")
