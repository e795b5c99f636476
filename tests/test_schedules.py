import numpy as np
import pytest

from vssl_ds.config import load_config
from vssl_ds.engine.schedules import build_schedules, cosine, scaled_lr


def test_cosine_warmup_then_decay():
    s = cosine(1.0, 0.1, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    np.testing.assert_allclose(s[:10], np.arange(10) / 10)
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1, abs=1e-3)
    assert np.all(np.diff(s[10:]) <= 0)


def test_linear_scaling_rule_and_absolute_override():
    assert scaled_lr(1.5e-4, 0.0, 1024) == pytest.approx(6e-4)
    assert scaled_lr(1.5e-4, 1e-3, 1024) == 1e-3


def test_build_schedules_from_config():
    cfg = load_config("videomae_vit_b", ["optim.min_blr=1e-5", "optim.weight_decay_end=0.2"])
    s = build_schedules(cfg.optim, total_steps=1000, steps_per_epoch=10, global_batch=512)
    assert s["lr"].argmax() == 400  # 40 warmup epochs x 10 steps
    assert s["lr"].max() == pytest.approx(1.5e-4 * 2)
    assert s["lr"][-1] == pytest.approx(1e-5 * 2, rel=1e-2)
    assert s["wd"][0] == pytest.approx(0.05) and s["wd"][-1] == pytest.approx(0.2, rel=1e-2)


def test_finetune_recipe_matches_the_official_k400_vit_b_budget():
    """VideoMAE's K400 ViT-B fine-tuning on 64 GPUs: 6 videos x 2 repeats per GPU (768 clips, 384 videos per step),
    lr 5e-4 x 384 / 256, min lr 1e-6 x 384 / 256, warmup from 1e-6 x 384 / 256, 75 epochs counted in videos."""
    from vssl_ds.config.loader import load_config
    from vssl_ds.engine.schedules import global_batch

    cfg = load_config("finetune_vit_b")
    d, o = cfg.data, cfg.optim
    clips, videos = global_batch(d.batch_size, d.repeats, 64, cfg.engine.grad_accum)
    assert (d.batch_size // d.repeats, d.repeats, clips, videos) == (6, 2, 768, 384)
    k400 = 240_436
    steps_per_epoch = k400 // videos
    lr = build_schedules(o, cfg.run.epochs * steps_per_epoch, steps_per_epoch, videos)["lr"]
    assert lr.max() == pytest.approx(5e-4 * 384 / 256)
    assert lr[0] == pytest.approx(1e-6 * 384 / 256) and lr[-1] == pytest.approx(1e-6 * 384 / 256, rel=1e-3)
    assert int(np.argmax(lr)) == 5 * steps_per_epoch and cfg.run.epochs == 75


@pytest.mark.parametrize("recipe,min_blr", [("videomae_vit_b", 1e-5), ("mvd_vit_b", 1e-4), ("mvd_vit_l", 1e-4),
                                            ("mvd_vit_l_800", 1e-5), ("mvd_vit_h", 1e-5)])
def test_pretraining_recipes_end_the_cosine_at_the_official_min_lr(recipe, min_blr):
    from vssl_ds.config.loader import load_config

    o = load_config(recipe).optim
    assert (o.min_blr, o.warmup_blr) == (min_blr, 1e-6)
