"""Spatial transforms: parameters are drawn once, returned, and replay to exactly the same pixels."""
import numpy as np
import pytest
import torch

from vssl_ds.data.transforms import (Photometric, apply_view, multi_scale_crop_params, photometric_params,
                                     random_resized_crop_params, short_side_crop_params)
from vssl_ds.data.views import KINDS, View


@pytest.fixture
def clip():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 90, 120, 3), dtype=torch.uint8, generator=g)  # [T,H,W,C]


@pytest.mark.parametrize("draw", [
    lambda h, w, rng: multi_scale_crop_params(h, w, 64, [1, .875, .75, .66], rng),
    lambda h, w, rng: random_resized_crop_params(h, w, 64, rng),
    lambda h, w, rng: short_side_crop_params(h, w, 64, (70, 100), rng),
])
def test_boxes_stay_inside_the_frame(draw):
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = draw(90, 120, rng)["box"]
        assert 0 <= top and 0 <= left and h > 0 and w > 0 and top + h <= 90 and left + w <= 120


def test_a_recorded_view_replays_exactly(clip):
    view = {**random_resized_crop_params(90, 120, 48, np.random.default_rng(1)),
            **photometric_params(Photometric(flip=1, jitter=1, gray=0, blur=1, solarize=1), np.random.default_rng(2))}
    out = apply_view(clip, view)
    assert out.shape == (4, 48, 48, 3) and out.dtype == torch.uint8
    assert torch.equal(out, apply_view(clip, dict(view)))  # deterministic given the parameters


def test_each_photometric_op_changes_pixels_and_flip_mirrors(clip):
    base = {"box": [0, 0, 90, 120], "size": [90, 120], "flip": False}
    plain = apply_view(clip, base)
    assert torch.equal(plain, clip)
    assert torch.equal(apply_view(clip, {**base, "flip": True}), clip.flip(2))
    jitter = {"order": ["brightness", "contrast", "saturation", "hue"], "brightness": 1.3, "contrast": 0.8,
              "saturation": 1.2, "hue": 0.05}
    for extra in ({"jitter": jitter}, {"gray": True}, {"blur": 1.5}, {"solarize": True}):
        assert not torch.equal(apply_view(clip, {**base, **extra}), plain), extra
    gray = apply_view(clip, {**base, "gray": True})
    assert torch.equal(gray[..., 0], gray[..., 1])


def test_photometric_draws_are_stable_across_probabilities():
    """Changing one probability must not shift the other random choices (views stay comparable)."""
    a = photometric_params(Photometric(jitter=1.0), np.random.default_rng(5))
    b = photometric_params(Photometric(jitter=1.0, gray=1.0), np.random.default_rng(5))
    assert a["jitter"] == b["jitter"] and b["gray"] and not a["gray"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_view_kind_gives_its_clips(kind, clip):
    view = View(kind=kind, num_frames=4, stride=2, size=32, short_range=(40, 60))
    rng = np.random.default_rng(0)
    picks = view.pick(40, rng)
    params = view.spatial(90, 120, rng)
    assert len(picks) == len(params) == len(view.names())
    for idx, p in zip(picks, params):
        out = apply_view(clip[np.asarray(idx) % 4], p)
        assert out.shape[1:] == (32, 32, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_data_flip_sets_every_clips_flip_and_moves_nothing_else(kind):
    """data.flip=0 (SSv2-style data) never flips; 1 always; -1 keeps the view's default. Crops and colours stay
    the draws they were, so a run with the flip turned off sees the same crops."""
    from vssl_ds.config import load_config
    from vssl_ds.data.build import view_from

    def draws(flip):
        recipe = "toy_bevt_image" if kind == "image" else "tiny_mae"  # images: BEVT's image stage only
        d = load_config(recipe, [f"data.view={kind}", f"data.flip={flip}", "data.short_range=[40,60]"]).data
        view, rng = view_from(d), np.random.default_rng(3)
        return [view.spatial(90, 120, rng) for _ in range(40)]

    default, never, always = draws(-1), draws(0), draws(1)
    flips = [p["flip"] for views in default for p in views]
    assert not any(p["flip"] for views in never for p in views)
    assert all(p["flip"] for views in always for p in views)
    assert any(flips) == (kind != "clip") and (kind == "clip" or not all(flips))  # the defaults: 0 or 0.5
    strip = [[{k: v for k, v in p.items() if k != "flip"} for p in views] for views in default]
    assert strip == [[{k: v for k, v in p.items() if k != "flip"} for p in views] for views in never]


def test_randaugment_ops_keep_shape_and_dtype_and_do_something(clip):
    from vssl_ds.data.randaugment import OPS, apply_randaugment

    x = (clip // 2 + 40).permute(0, 3, 1, 2)  # [T,C,H,W] in 40..167, so auto-contrast / equalize have work
    for op in OPS:
        y = apply_randaugment(x, [[op, 9.0]])
        assert y.shape == x.shape and y.dtype == torch.uint8, op
        assert not torch.equal(y, x), op  # level 9 always changes random pixels
        assert torch.equal(apply_randaugment(x[:1], [[op, 9.0]]), y[:1]), op  # one op, the same on every frame


def test_finetune_view_draws_randaugment_and_per_frame_erasing():
    from vssl_ds.data.randaugment import OPS, erasing_params, randaugment_params

    rng = np.random.default_rng(0)
    counts, erased, frames = [], 0, 0
    for _ in range(400):
        ops = randaugment_params(rng)  # 4 distinct ops, each kept with probability 0.5
        assert len({o[0] for o in ops}) == len(ops) <= 4 and all(o[0] in OPS and abs(o[1]) <= 10 for o in ops)
        counts.append(len(ops))
        e = erasing_params(rng, 8, 32, 32)
        frames += 8
        for box in (e or {"boxes": []})["boxes"]:
            if box:
                top, left, h, w = box
                assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
                assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5
                erased += 1
    assert abs(np.mean(counts) - 2.0) < 0.2 and abs(erased / frames - 0.25) < 0.03
    view = View(kind="finetune", num_frames=8, stride=2, size=32)
    a = view.spatial(90, 120, np.random.default_rng(7))[0]
    assert a == view.spatial(90, 120, np.random.default_rng(7))[0] and "randaug" in a and "erase" in a
