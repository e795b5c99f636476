import numpy as np
import pytest
import torch

from vssl_ds.config import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.data.masking import tube_mask
from vssl_ds.data.synthetic import render_clip
from vssl_ds.methods import build_method, token_grid
from vssl_ds.methods.losses import masked_mse, pixel_targets

from conftest import TINY, overfit


def _reference_loss(video, mask, pred, patch):
    """Per-token loops in numpy: VideoMAE's normalised-pixel MSE over the masked tokens, in mask order."""
    pt, ph, pw = patch
    b, c, t, h, w = video.shape
    errs = []
    for i in range(b):
        k = 0
        for n in np.flatnonzero(mask[i]):
            ti, rem = divmod(n, (h // ph) * (w // pw))
            hi, wi = divmod(rem, w // pw)
            cube = video[i, :, ti * pt:(ti + 1) * pt, hi * ph:(hi + 1) * ph, wi * pw:(wi + 1) * pw]
            pix = cube.reshape(c, -1).T  # [P, C] in (t,h,w) pixel order
            norm = (pix - pix.mean(0)) / (pix.std(0, ddof=1) + 1e-6)
            errs.append((pred[i, k] - norm.reshape(-1)) ** 2)
            k += 1
    return np.mean(np.concatenate(errs))


def test_masked_mse_matches_reference():
    rng = np.random.default_rng(0)
    video = rng.random((2, 3, 4, 16, 16)).astype(np.float64)
    mask = np.stack([tube_mask((2, 2, 2), 0.5, rng) for _ in range(2)])
    pred = rng.normal(size=(2, int(mask[0].sum()), 2 * 8 * 8 * 3))
    targets = pixel_targets(torch.from_numpy(video), (2, 8, 8), normalize=True).double()
    ours = masked_mse(torch.from_numpy(pred), targets, torch.from_numpy(mask))
    np.testing.assert_allclose(float(ours), _reference_loss(video, mask, pred, (2, 8, 8)), rtol=1e-5)


def _fixed_batch(cfg):
    rng = np.random.default_rng(0)
    clips = [render_clip(rng, label, 8, 32) for label in range(4)]  # [T,H,W,C] uint8 each
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3)  # [B,C,T,H,W]
    mask = torch.from_numpy(np.stack([tube_mask(token_grid(cfg), 0.9, rng) for _ in range(4)]))
    return Batch(video=video, mask=mask).to("cpu", cfg.data.mean, cfg.data.std)


def test_mae_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config("tiny_mae", TINY)
    method = build_method(cfg)
    batch = _fixed_batch(cfg)
    first, last = overfit(method, batch, steps=150, lr=3e-3)
    assert last < first / 2.5, (first, last)  # stated factor: 2.5x on a memorised batch


def test_no_weight_decay_on_norms_biases_positions_tokens():
    method = build_method(load_config("tiny_mae", TINY))
    decay, no_decay = method.param_groups(0.05)
    names = {id(p): n for n, p in method.trainable.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.mask_token" in skipped and "encoder.norm.weight" in skipped
    assert all(not n.endswith("bias") for n in (names[id(p)] for p in decay["params"]))
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("recipe,model,decoder,batch", [
    ("videomae_vit_b", "vit_base_video", (384, 4, 6), 32),
    ("videomae_vit_l", "vit_large_video", (512, 12, 8), 8),
    ("videomae_vit_h", "vit_huge_video", (640, 12, 8), 16),
])
def test_videomae_teacher_recipes_follow_the_official_scripts(recipe, model, decoder, batch):
    """MVD's video-teacher stage at each size: official pretrain_videomae_{base,large,huge} with the K400 scripts'
    --decoder_depth and --batch_size."""
    from vssl_ds.config.loader import load_config

    cfg = load_config(recipe)
    m = cfg.method.mae
    assert (cfg.model.name, (m.decoder_dim, m.decoder_depth, m.decoder_heads), cfg.data.batch_size) == \
        (model, decoder, batch)
