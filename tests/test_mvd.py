"""MVD: the 3D position table, the loss against an independent computation, overfitting a fixed batch, and a
2-rank DeepSpeed run through pretrain.py with teachers loaded from local files."""

import numpy as np
import pytest
import torch

from conftest import overfit
from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.methods import build_method, mask_fns
from vssl_ds.models import create_model
from vssl_ds.models.layers import sincos_3d_table

STUDENT = ["model.name=vit_micro_video", "model.img_size=32", "model.num_frames=8", "model.patch=8",
           "data.size=32", "data.num_frames=8", "data.sampling_rate=2"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """An 'MAE image ViT' (timm layout) and a 'VideoMAE ViT' (official checkpoint layout) saved to files."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(7)
    image = create_model("vit2d_micro_patch16", img_size=32, patch=8)  # width 64
    torch.save({"model": image.state_dict()}, root / "mae_image.pth")
    video = create_model("vit_tiny_video", img_size=32, num_frames=8, patch=8)  # width 192
    torch.save({"model": {f"encoder.{k}": v for k, v in video.state_dict().items()}}, root / "videomae.pth")
    return image.eval(), video.eval(), root


def _cfg(teachers, *extra):
    _, _, root = teachers
    return load_config("mvd_vit_s", [*STUDENT, "method.mvd.image_teacher=vit2d_micro_patch16",
                                     f"method.mvd.image_teacher_weights={root / 'mae_image.pth'}",
                                     "method.mvd.video_teacher=vit_tiny_video",
                                     f"method.mvd.video_teacher_weights={root / 'videomae.pth'}", *extra])


def _batch(cfg, b=2):
    fn, _ = mask_fns(cfg)
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(b)]))
    return Batch(video=torch.randn(b, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1)), mask=mask)


def test_3d_position_table_splits_time_and_space():
    table = sincos_3d_table((4, 3, 5), 64)[0].reshape(4, 3, 5, 64)
    t_part, s_part = table[..., :16], table[..., 16:]
    assert torch.equal(t_part[:, :1, :1].expand(-1, 3, 5, -1), t_part)  # time channels ignore (h, w)
    assert torch.equal(s_part[:1].expand(4, -1, -1, -1), s_part)  # space channels ignore t
    assert torch.allclose(t_part[2, 0, 0, 0], torch.tensor(np.sin(2.0)).float())  # sin(t·ω0), ω0 = 1
    assert torch.allclose(s_part[0, 0, 3, 0], torch.tensor(np.sin(3.0)).float())  # first spatial block: w
    assert torch.allclose(s_part[0, 2, 0, 24], torch.tensor(np.sin(2.0)).float())  # second spatial block: h


def test_loss_matches_an_independent_computation(teachers):
    image, video, _ = teachers
    cfg = _cfg(teachers)
    method = build_method(cfg).eval()
    batch = _batch(cfg)
    out = method(batch)
    pred_img, pred_vid = method.trainable(batch.video, batch.mask)
    # teachers by hand: image ViT on frames 0, 2, 4, 6 (last block, no norm, no CLS), video ViT on the clip
    with torch.no_grad():
        frames = batch.video[:, :, ::2].permute(0, 2, 1, 3, 4).reshape(8, 3, 32, 32)
        t_img = image(frames, norm=False)[:, 1:].reshape(2, 4 * 16, 64)
        t_vid = video(batch.video, norm=False)
    m = batch.mask

    def smooth_l1(a, b):
        d = (a - b).abs()
        return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()

    expect_img = smooth_l1(pred_img, t_img[m].reshape(2, -1, 64))
    expect_vid = smooth_l1(pred_vid, t_vid[m].reshape(2, -1, 192))
    assert torch.allclose(out.metrics["loss/image_teacher"], expect_img, atol=1e-6)
    assert torch.allclose(out.metrics["loss/video_teacher"], expect_vid, atol=1e-6)
    assert torch.allclose(out.loss, expect_img + expect_vid, atol=1e-6)
    assert pred_img.shape == (2, int(m[0].sum()), 64) and pred_vid.shape[-1] == 192


def test_normalised_targets_and_weights(teachers):
    cfg = _cfg(teachers, "method.mvd.norm_targets=true", "method.mvd.image_weight=0.0")
    method = build_method(cfg)
    t = method.frozen(_batch(cfg).video)
    img, vid = t["img"], t["vid"]
    assert torch.allclose(img.mean(-1), torch.zeros(1), atol=1e-5) and torch.allclose(vid.std(-1), torch.ones(1), atol=0.05)
    out = method(_batch(cfg))
    assert torch.allclose(out.loss, out.metrics["loss/video_teacher"])


def test_teachers_stay_frozen_and_in_eval(teachers):
    method = build_method(_cfg(teachers)).train()
    assert not any(p.requires_grad for p in method.frozen.parameters())
    assert not any(m.training for m in method.frozen.modules())
    assert all(p.requires_grad for p in method.trainable.parameters())


def test_mvd_overfits_a_fixed_batch(teachers):
    torch.manual_seed(0)
    cfg = _cfg(teachers)
    method = build_method(cfg)
    batch = _batch(cfg)
    first, last = overfit(method, batch, steps=60, lr=2e-3)
    assert last < first / 1.4, (first, last)  # stated factor: 1.4x in 60 steps on a memorised batch


def test_missing_teacher_weights_are_a_clear_error(teachers):
    cfg = _cfg(teachers, "method.mvd.video_teacher_weights=/nowhere/videomae.pth")
    with pytest.raises(FileNotFoundError, match="/nowhere/videomae.pth"):
        build_method(cfg)
    with pytest.raises(ValueError, match="needs a weight file"):
        build_method(_cfg(teachers, "method.mvd.image_teacher_weights="))


def test_teachers_at_their_own_input_size(teachers, tmp_path):
    """MVD's ViT-H route: the image teacher (ViT-H/14 at 196² for a /16 student at 224²) sees every tubelet-th
    frame of the same crop resized to its size, on the same token grid; the video teacher sees the clip as it is
    (official --teacher_input_size 196 --video_teacher_input_size 224)."""
    import torch.nn.functional as F
    from einops import rearrange

    _, video_teacher, _ = teachers
    torch.manual_seed(3)
    image = create_model("vit2d_micro_patch16", img_size=28, patch=7).eval()
    torch.save(image.state_dict(), tmp_path / "img28.pth")
    cfg = _cfg(teachers, "method.mvd.teacher_size=28", f"method.mvd.image_teacher_weights={tmp_path / 'img28.pth'}")
    method = build_method(cfg)
    clip = _batch(cfg).video
    t = method.frozen(clip)
    frames = F.interpolate(rearrange(clip[:, :, ::2], "b c t h w -> (b t) c h w"), size=28, mode="bilinear",
                           align_corners=False, antialias=True)
    expect_img = rearrange(image(frames, norm=False)[:, 1:], "(b t) l d -> b (t l) d", b=2)
    torch.testing.assert_close(t["img"], expect_img)
    torch.testing.assert_close(t["vid"], video_teacher(clip, norm=False))
    assert torch.isfinite(method(_batch(cfg)).loss)


def test_decoders_take_the_encoders_drop_path(teachers):
    """Official MVD / VideoMAE decoders use the encoder's stochastic-depth rate, linearly over their blocks."""
    method = build_method(_cfg(teachers, "model.drop_path=0.2", "method.mvd.decoder_depth=3"))
    for decoder in (method.trainable.image_decoder, method.trainable.video_decoder):
        rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in decoder.blocks]
        assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_teachers_run_under_autocast_with_fp32_weights(teachers):
    """In a low-precision run the frozen teachers keep fp32 weights and run under autocast (the official fp16
    autocast), not a whole-model cast: their targets stay close to fp32 ones."""
    cfg = _cfg(teachers)
    method = build_method(cfg)
    batch = _batch(cfg)
    exact = method.targets(batch)
    method.frozen_dtype = torch.bfloat16
    low = method.targets(batch)
    assert all(p.dtype == torch.float32 for p in method.frozen.parameters())
    for k in ("img", "vid"):
        rel = ((low[k] - exact[k]).norm() / exact[k].norm()).item()
        assert 0 < rel < 0.02, (k, rel)


def test_monitor_token_error_map_marks_the_mispredicted_token(teachers):
    """The monitor's MVD picture: decoders that predict the teachers' targets exactly except at one masked token
    paint that token at the top of the heat scale (white) and every other masked token black; visible tokens show
    the clip dimmed."""
    from vssl_ds.monitor import heat_rows

    cfg = _cfg(teachers)
    method = build_method(cfg).eval()
    batch = _batch(cfg, b=1)
    targets = method.frozen(batch.video)
    wrong = int(batch.mask[0].nonzero()[3])  # the 4th masked token

    class Oracle(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, visible, mask):
            out = targets[self.key][mask].reshape(1, -1, targets[self.key].shape[-1]).clone()
            out[0, 3] += 1.0
            return out

    method.trainable.image_decoder, method.trainable.video_decoder = Oracle("img"), Oracle("vid")
    tag, rows = method.probe_images(batch.video, batch.mask, {})
    assert tag == "token_error" and list(rows) == ["original", "masked", "image teacher error", "video teacher error"]
    heat = torch.zeros(1, batch.mask.shape[1])
    heat[0, wrong] = 1.0
    pixels = rows["original"]
    expected = heat_rows(pixels, heat, batch.mask, method.grid)
    for name in ("image teacher error", "video teacher error"):
        torch.testing.assert_close(rows[name], expected, atol=1e-5, rtol=0)
    t, h, w = np.unravel_index(wrong, method.grid)
    block = rows["video teacher error"][0, :, 2 * t, 8 * h:8 * h + 8, 8 * w:8 * w + 8]
    assert block.min() > 0.64  # 0.35 grey + 0.65 white
    # cached targets kept with the probe clips give the same picture
    tag, cached = method.probe_images(batch.video, batch.mask, {k: v.half() for k, v in targets.items()})
    torch.testing.assert_close(cached["image teacher error"], expected, atol=1e-5, rtol=0)
