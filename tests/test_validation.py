"""One validation layer (vssl_ds/config/validate.py): every bad input exits 2 before any process group, DeepSpeed,
model or data work, with `config error: <field>: <what is wrong>; <what to do>` and no traceback."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
import vssl_ds.models  # noqa: F401  (imported once here: the 5-s budget is per input, not for importing torch)
from vssl_ds.config import ConfigError, load_config
from vssl_ds.train import main

BAD = [  # (recipe, overrides, the field the message must name)
    ("tiny_mae", ["data.batch_size=0"], "data.batch_size"),
    ("tiny_mae", ["data.batch_size=-4"], "data.batch_size"),
    ("tiny_mae", ["model.num_frames=7", "data.num_frames=7"], "model.num_frames"),
    ("tiny_mae", ["data.num_frames=16"], "data.num_frames"),
    ("tiny_mae", ["data.size=112"], "data.size"),
    ("tiny_mae", ["model.name=vit_nonexistent_video"], "model.name"),
    ("tiny_mae", ["data.num_workers=-1"], "data.num_workers"),
    ("tiny_mae", ["data.prefetch=0"], "data.prefetch"),
    ("tiny_mae", ["run.out_dir=/etc/hostname/runs"], "run.out_dir"),
    ("tiny_mae", ["method.mae.mask_ratio=1.5"], "method.mae.mask_ratio"),
    ("tiny_mae", ["method.mae.mask_ratio=-0.1"], "method.mae.mask_ratio"),
    ("tiny_mae", ["method.mae.mask_ratio=1.0"], "method.mae.mask_ratio"),
    ("tiny_mae", ["method.mae.mask_ratio=0.0"], "method.mae.mask_ratio"),
    ("tiny_mae", ["optim.lr=-0.001"], "optim.lr"),
    ("tiny_mae", ["run.ckpt_every=-1"], "run.ckpt_every"),
    ("tiny_mae", ["run.name=../../x"], "run.name"),
    ("tiny_mae", ["run.name=a/b"], "run.name"),
    ("tiny_mae", ["run.name="], "run.name"),
    ("tiny_mae", ["model.img_size=60", "data.size=60"], "model.img_size"),
    ("tiny_mae", ["data.repeats=3"], "data.batch_size"),
    ("tiny_mae", ["data.sampling_rate=0"], "data.sampling_rate"),
    ("tiny_mae", ["run.log_every=0"], "run.log_every"),
    ("tiny_mae", ["run.max_nonfinite=0"], "run.max_nonfinite"),
    ("tiny_mae", ["run.keep_last=-1"], "run.keep_last"),
    ("tiny_mae", ["run.seed=-1"], "run.seed"),
    ("tiny_mae", ["run.epochs=0", "run.max_steps=0"], "run.epochs"),
    ("tiny_mae", ["engine.grad_accum=0"], "engine.grad_accum"),
    ("tiny_mae", ["optim.betas=[0.9]"], "optim.betas"),
    ("tiny_mae", ["optim.eps=0"], "optim.eps"),
    ("tiny_mae", ["optim.lr=0", "optim.blr=0"], "optim.blr"),
    ("tiny_mae", ["optim.weight_decay=-0.1"], "optim.weight_decay"),
    ("tiny_mae", ["optim.warmup_steps=-5"], "optim.warmup_steps"),
    ("tiny_mae", ["engine.offload_param=cpu"], "engine.offload_param"),
    ("tiny_mae", ["engine.zero_stage=0", "engine.offload_optimizer=cpu"], "engine.offload_optimizer"),
    ("tiny_mae", ["engine.precision=fp16"], "engine.precision"),
    ("tiny_mae", ["model.pretrained=/nowhere/videomae.pth"], "model.pretrained"),
    ("tiny_mae", ["data.train=/nowhere/manifest.json"], "data.train"),
    ("tiny_mae", ["engine.ds_config=/nowhere/ds.json"], "engine.ds_config"),
    ("tiny_mae", ["method.mae.decoder_dim=100", "method.mae.decoder_heads=3"], "method.mae.decoder_dim"),
    ("tiny_mae", ["model.drop_path=1.0"], "model.drop_path"),
    ("tiny_mae", ["data.scales=[1.5]"], "data.scales"),
    ("tiny_mae", ["data.std=[0.0,0.2,0.2]"], "data.std"),
    ("tiny_mae", ["data.mean=[0.5]"], "data.mean"),
    ("tiny_mae", ["data.short_range=[320,256]"], "data.short_range"),
    ("tiny_mae", ["data.image_batch_size=-1"], "data.image_batch_size"),
    ("tiny_mae", ["model.compile=true", "engine.zero_stage=3"], "model.compile"),
    ("tiny_mae", ["eval.knn_t=0"], "eval.knn_t"),
    ("tiny_mae", ["model.attn_backend=flash"], "model.attn_backend"),
    ("mvd_vit_s", ["method.mvd.mask_ratio=0"], "method.mvd.mask_ratio"),
    ("mvd_vit_s", ["method.mvd.targets=cache"], "data.targets"),
    ("mvd_vit_s", ["method.mvd.image_teacher_weights=/nowhere/mae.pth"], "method.mvd.image_teacher_weights"),
    ("mvd_vit_s", ["method.mvd.image_weight=0", "method.mvd.video_weight=0"], "method.mvd.image_weight"),
    ("bevt_swin_b", ["method.bevt.mask_ratio=1.2"], "method.bevt.mask_ratio"),
    ("bevt_swin_b", ["model.img_size=98", "data.size=98"], "model.img_size"),
    ("lstcl_mocov3_vit_b", ["method.lstcl.temperature=0"], "method.lstcl.temperature"),
    ("lstcl_mocov3_vit_b", ["method.lstcl.momentum=1.5"], "method.lstcl.momentum"),
    ("vicmae_vit_b", ["method.vicmae.temperature=-1"], "method.vicmae.temperature"),
    ("tiny_mae", ["data.batch_size=abc"], "data.batch_size"),  # wrong types: readable, no OmegaConf internals
    ("tiny_mae", ["data.scales=abc"], "data.scales"),
    ("tiny_mae", ["run.auto_resume=maybe"], "run.auto_resume"),
    ("tiny_mae", ["run.hang_timeout=-1"], "run.hang_timeout"),
    ("tiny_mae", ["run.out_dir=/proc/self", "run.name=status"], "run.name"),  # the run folder is a file
]


def _sets(items):
    return [a for kv in items for a in ("--set", kv)]


@pytest.mark.parametrize("recipe,items,field", BAD, ids=[f"{r}:{' '.join(i)}" for r, i, _ in BAD])
def test_bad_input_is_a_config_error_naming_the_field(recipe, items, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run folders land here
    t0 = time.monotonic()
    assert main(["--config", recipe, *_sets(items)]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and "Traceback" not in err and "full_key" not in err, err
    assert field in err, err
    assert ";" in err.split(field, 1)[1] or "choose one of" in err, f"no advice in: {err}"  # what to do


def test_the_command_line_exits_2_fast_and_refuses_unknown_or_abbreviated_flags(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [(["--set", "data.batch_size=0"], "data.batch_size"), (["--bogus"], "unrecognized arguments"),
             (["--auto"], "unrecognized arguments")]  # a prefix of --auto-resume is not --auto-resume
    for args, text in cases:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - t0 < 15  # interpreter + torch import on a loaded 2-core CI machine
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--local_rank=0", "--print-config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the launchers' flag stays accepted


def test_every_shipped_recipe_passes_validation():
    from vssl_ds.config import list_recipes, load_config

    for name in list_recipes():
        load_config(name)


def test_a_run_folder_with_checkpoints_is_never_silently_reused(tmp_path, capsys, monkeypatch):
    from vssl_ds.config import load_config
    from vssl_ds.train import open_run_dir

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny_mae"
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000004")
    (run / "tb").mkdir()
    (run / "final_model.pt").write_bytes(b"old")
    assert main(["--config", "tiny_mae"]) == 2
    err = capsys.readouterr().err
    assert "run.name: the run folder" in err and "step00000004" in err and "--auto-resume" in err, err
    assert "run.overwrite=true" in err
    cfg = load_config("tiny_mae", ["run.overwrite=true"])  # start over: the old run's files go
    open_run_dir(cfg)
    assert not (run / "checkpoints").exists() and not (run / "tb").exists() and not (run / "final_model.pt").exists()
    assert (run / "config.yaml").is_file()


def test_only_the_embedded_default_trains_on_generated_clips(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "videomae_vit_b"]) == 2  # forgot data.train with a full-size recipe
    err = capsys.readouterr().err
    assert err.startswith("config error: data.train: is empty;") and "data.synthetic" in err, err


@pytest.mark.parametrize("sets,match", [
    (["method.bevt.min_block=16"], "min_block: is 16, more than the 8 cells"),
    (["method.bevt.min_block=8"], "masks came out empty"),
    (["method.bevt.image_mask_ratio=0.01", "method.bevt.min_block=1"], "image_mask_ratio: 0.01 masks no cell of the 4x4 grid"),
])
def test_bevt_block_masks_that_cannot_mask_at_the_input_size_are_refused(sets, match):
    """At 64 px BEVT's 16-px cells form a 4x4 grid: the official 16-cell minimum block never fits and every loss
    would be a mean over no token (the toy-size failure: 20 non-finite steps)."""
    base = ["model.name=swin3d_micro", "model.img_size=64", "data.size=64", "model.num_frames=8", "data.num_frames=8",
            "model.window=[2,4,4]",
            "method.bevt.tokenizer=kmeans"]
    with pytest.raises(ConfigError, match=match):
        load_config("bevt_swin_b", [*base, *sets])
    load_config("bevt_swin_b", [*base, "method.bevt.min_block=2"])


@pytest.mark.slow
def test_more_ranks_than_shards_fails_before_training(shards, tmp_path):
    """Each rank reads whole shards: with 1 shard and 2 ranks one rank would have no batch. The run stops at the
    start with exit 4 and says how many shards are needed (it used to hang)."""
    import json

    from conftest import TINY, launch, overrides

    manifest = json.loads(shards.read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["total"] = manifest["shards"][0]["samples"]
    one = shards.parent / "one_shard.json"
    one.write_text(json.dumps(manifest))
    start = time.monotonic()
    proc = launch(["--config", "tiny_mae", *overrides(*TINY, f"data.train={one}", f"run.out_dir={tmp_path}",
                                                      "run.max_steps=4")], check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert "1 readable shard(s) for 2 ranks" in out and "Write at least 2 shards" in out and "data.resampled" in out
    assert time.monotonic() - start < 120
