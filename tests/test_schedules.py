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
