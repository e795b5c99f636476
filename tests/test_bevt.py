"""BEVT: tokenizers (DALL-E encoder architecture, k-means fitted offline), the loss against an independent
computation, overfitting a fixed batch, and a 2-rank DeepSpeed run with an image and a video stream."""

import numpy as np
import pytest
import torch

from conftest import check_run, launch, overfit, overrides
from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.methods import build_method, mask_fns
from vssl_ds.teachers.tokenizers import DalleEncoder, KMeansTokenizer, build_tokenizer, fit_kmeans

TINY = ["model.name=swin3d_micro", "model.img_size=64", "model.num_frames=4", "model.window=[2,4,4]",
        "data.size=64", "data.num_frames=4", "method.bevt.tokenizer=kmeans", "method.bevt.min_block=2"]


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory):
    torch.manual_seed(0)
    codebook = fit_kmeans(KMeansTokenizer.patches(torch.rand(32, 3, 32, 32), 8).flatten(0, 1), 16, iters=5)
    path = tmp_path_factory.mktemp("tok") / "kmeans.pt"
    torch.save({"codebook": codebook, "patch": 8}, path)
    return path


def _method(kmeans_file, *extra):
    return build_method(load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}", *extra]))


def _batch(method_cfg):
    vf, imf = mask_fns(method_cfg)
    g = torch.Generator().manual_seed(0)
    return Batch(video=torch.randn(2, 3, 4, 64, 64, generator=g),
                 mask=torch.from_numpy(np.stack([vf(np.random.default_rng(i)) for i in range(2)])),
                 image=torch.randn(3, 3, 64, 64, generator=g),
                 image_mask=torch.from_numpy(np.stack([imf(np.random.default_rng(9 + i)) for i in range(3)])))


def test_dalle_encoder_architecture_and_offline_loading(tmp_path):
    full = DalleEncoder()
    names = dict(full.named_parameters())
    assert {"blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w",
            "blocks.group_4.block_2.res_path.conv_4.b", "blocks.output.conv.w"} <= set(names)
    assert names["blocks.output.conv.w"].shape == (8192, 2048, 1, 1) and names["blocks.input.w"].shape == (256, 3, 7, 7)
    small = DalleEncoder(n_hid=16, vocab_size=64)
    torch.save(small.state_dict(), tmp_path / "dalle.pt")
    tok = build_tokenizer("dalle", str(tmp_path / "dalle.pt"))
    x = torch.rand(2, 3, 112, 112)
    ids = tok(x)
    assert ids.shape == (2, 14 * 14) and ids.max() < 64  # 112² → 14×14 codes
    assert torch.equal(ids, small.eval()(x)) and not any(p.requires_grad for p in tok.parameters())
    with pytest.raises(FileNotFoundError, match="fit one with tools/fit_tokenizer.py"):
        build_tokenizer("dalle", str(tmp_path / "missing.pt"))


def test_kmeans_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 12, generator=g) * 10
    points = torch.cat([c + 0.1 * torch.randn(50, 12, generator=g) for c in centers])
    found = fit_kmeans(points, 4, iters=10)
    assert torch.cdist(centers, found).min(1).values.max() < 0.5


def test_loss_matches_an_independent_computation(kmeans_file):
    method = _method(kmeans_file).eval()
    batch = _batch(load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}"]))
    out = method(batch)
    logits_vid, logits_img = method.trainable(batch.video, batch.mask, batch.image, batch.image_mask)
    # targets by hand: un-normalise, halve the resolution, nearest code per normalised 8×8 patch
    tok = method.frozen
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def ids(frames):
        px = torch.nn.functional.interpolate((frames * std + mean).clamp(0, 1), size=32, mode="bilinear",
                                             antialias=True, align_corners=False)
        p = KMeansTokenizer.patches(px, 8)
        return torch.cdist(p, tok.codebook.expand(len(p), -1, -1)).argmin(-1)

    ids_vid = ids(batch.video.permute(0, 2, 1, 3, 4).reshape(8, 3, 64, 64)).reshape(2, 4, 16)  # 4 frames x 4x4
    mask_vid = batch.mask.reshape(2, 2, 16)[:, [0, 0, 1, 1]]  # each of the 2 mask slots covers 2 frames
    lv = logits_vid.reshape(2, 4, 16, -1)

    def ce(logits, target):
        return -logits.log_softmax(-1).gather(-1, target[:, None]).mean()

    expect_vid = ce(lv[mask_vid], ids_vid[mask_vid])
    expect_img = ce(logits_img[batch.image_mask], ids(batch.image)[batch.image_mask])
    assert torch.allclose(out.metrics["loss/video_tokens"], expect_vid, atol=1e-5)
    assert torch.allclose(out.metrics["loss/image_tokens"], expect_img, atol=1e-5)
    assert torch.allclose(out.loss, expect_vid + expect_img, atol=1e-5)


def test_bevt_overfits_a_fixed_batch(kmeans_file):
    torch.manual_seed(0)
    cfg = load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}"])
    method = build_method(cfg)
    batch = _batch(cfg)
    first, last = overfit(method, batch, steps=30, lr=2e-3)
    assert last < first / 3, (first, last)  # stated factor: 3x in 30 steps on a memorised batch


def test_bevt_needs_a_swin_and_an_image_stream(kmeans_file):
    with pytest.raises(ValueError, match="Video Swin"):
        _method(kmeans_file, "model.name=vit_micro_video", "model.patch=16")
    method = _method(kmeans_file)
    cfg = load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}"])
    batch = _batch(cfg)
    batch.image = None
    with pytest.raises(ValueError, match="data.images"):
        method(batch)


def test_fit_tokenizer_tool(shards, tmp_path):
    from vssl_ds.tools.fit_tokenizer import main

    out = tmp_path / "tok.pt"
    assert main([str(shards), str(out), "--codes", "8", "--frames", "40", "--size", "32", "--short-range", "32", "40",
                 "--iters", "3", "--workers", "1"]) == 0
    tok = build_tokenizer("kmeans", str(out))
    assert tok.vocab_size == 8 and tok(torch.rand(1, 3, 16, 16)).shape == (1, 4)


@pytest.mark.slow
def test_bevt_runs_with_two_deepspeed_ranks(shards, image_shards, kmeans_file, tmp_path):
    tok = tmp_path / "tok.pt"
    torch.save({"codebook": fit_kmeans(torch.randn(400, 192), 16, iters=3), "patch": 8}, tok)
    sets = ["model.name=swin3d_micro", "model.img_size=32", "model.num_frames=4", "model.window=[2,4,4]",
            "data.size=32", "data.num_frames=4", "data.sampling_rate=2", "data.short_range=[32,40]",
            "data.batch_size=2", "data.image_batch_size=2", f"data.images={image_shards}", "data.num_workers=1",
            "method.bevt.tokenizer=kmeans", f"method.bevt.tokenizer_weights={tok}", "method.bevt.min_block=1",
            "optim.warmup_epochs=0", "optim.warmup_steps=2", "run.log_every=2", "run.ckpt_every=0", "run.max_steps=6",
            "engine.grad_accum=1", f"data.train={shards}", f"run.out_dir={tmp_path}", "run.name=bevt"]
    launch(["--config", "bevt_swin_b", *overrides(*sets)])
    check_run(tmp_path / "bevt", ("train/loss", "loss/video_tokens", "loss/image_tokens", "acc/video_tokens",
                                  "acc/image_tokens"), points=3)  # token accuracies reach TensorBoard too


def test_recipe_batch_per_update_is_the_official_one():
    """Official BEVT: 8 videos + 64 images per GPU per optimizer update, split over update_interval 2."""
    from vssl_ds.config.loader import load_config

    cfg = load_config("bevt_swin_b")
    accum = cfg.engine.grad_accum
    assert (cfg.data.batch_size * accum, cfg.data.image_batch_size * accum, accum) == (8, 64, 2)


def test_image_only_stage_learns_and_initialises_the_joint_stage(kmeans_file, tmp_path):
    """BEVT's first stage (data.view=image: image shards as data.train) trains the Swin's 2D path alone; its
    final weights start the joint stage: the 2D patch embedding fills the image one and is inflated into the video
    one (official inflate_weights: the 2D kernel averaged over the tubelet), every block carried over."""
    from vssl_ds.models.weights import inflate_patch

    image_stage = ["data.view=image", "data.images=", "data.image_batch_size=0"]
    cfg = load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}", *image_stage])
    method = build_method(cfg)
    assert method.trainable.encoder.patch_embed is None and not hasattr(method.trainable, "fpn_s")
    image_fn, video_fn = mask_fns(cfg)
    assert video_fn is None
    g = torch.Generator().manual_seed(0)
    batch = Batch(image=torch.randn(4, 3, 64, 64, generator=g),
                  image_mask=torch.from_numpy(np.stack([image_fn(np.random.default_rng(i)) for i in range(4)])))
    out = method(batch)
    assert set(out.metrics) == {"loss/image_tokens", "acc/image_tokens"} and torch.isfinite(out.loss)
    first, last = overfit(method, batch, steps=30, lr=1e-3)
    assert last < first - 0.1, (first, last)
    path = tmp_path / "final_model.pt"
    torch.save(method.trainable.state_dict(), path)  # what pretrain.py writes at the end of the stage

    joint = _method(kmeans_file, f"model.pretrained={path}")
    img_enc, enc = method.trainable.encoder, joint.trainable.encoder
    assert torch.equal(enc.patch_embed_2d.proj.weight, img_enc.patch_embed_2d.proj.weight)
    assert torch.allclose(enc.patch_embed.proj.weight, inflate_patch(img_enc.patch_embed_2d.proj.weight, 2))
    assert torch.equal(enc.patch_embed.proj.bias, img_enc.patch_embed_2d.proj.bias)
    own = dict(img_enc.named_parameters())
    for name, p in enc.named_parameters():
        if not name.startswith("patch_embed"):
            assert torch.equal(p, own[name]), name
    with pytest.raises(Exception, match="data.view=image already streams"):
        load_config("bevt_swin_b", [*TINY, "data.view=image", "data.images=x.json"])
    with pytest.raises(Exception, match="only BEVT's image-only stage"):
        load_config("videomae_vit_b", ["data.view=image"])


def test_monitor_token_accuracy_map_is_green_where_the_id_is_right(kmeans_file):
    """The monitor's BEVT picture: with a head that predicts the tokenizer's ids exactly, every masked cell is
    painted green; with one that is always wrong, red; visible cells show the clip dimmed. Token ids from the
    probe's cached targets give the same picture as online ones."""
    cfg = load_config("bevt_swin_b", [*TINY, f"method.bevt.tokenizer_weights={kmeans_file}"])
    method, batch = build_method(cfg).eval(), _batch(cfg)
    b, t = batch.video.shape[:3:2]
    ids = method.token_ids(batch.video.permute(0, 2, 1, 3, 4).flatten(0, 1)).reshape(b, -1)
    vocab = method.trainable.lm_head.out_features

    class Head(torch.nn.Module):  # logits that pick the tokenizer's id shifted by `shift`
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, features):
            return torch.nn.functional.one_hot((ids + self.shift) % vocab, vocab).float()

    method.trainable.video_features = lambda video, mask: torch.zeros(b, ids.shape[1], 1)
    for shift, colour in ((0, torch.tensor([0.1, 0.9, 0.2])), (1, torch.tensor([0.95, 0.1, 0.1]))):
        method.trainable.lm_head = Head(shift)
        tag, rows = method.probe_images(batch.video, batch.mask, {})
        assert tag == "token_accuracy" and list(rows) == ["original", "masked", "token accuracy"]
        cells = batch.mask.shape[1] // (t // 2)
        hidden = batch.mask.reshape(b, t // 2, cells).repeat_interleave(2, 1).reshape(b, t, 4, 4)
        hidden = hidden.repeat_interleave(16, 2).repeat_interleave(16, 3)  # [B,T,H,W]
        pixels, acc = rows["original"], rows["token accuracy"]
        grey = pixels.mean(1)
        for c in range(3):
            painted = 0.35 * grey + 0.65 * colour[c]
            torch.testing.assert_close(acc[:, c][hidden], painted[hidden], atol=1e-5, rtol=0)
            torch.testing.assert_close(acc[:, c][~hidden], 0.5 * pixels[:, c][~hidden], atol=1e-5, rtol=0)
        _, cached = method.probe_images(batch.video, batch.mask, {"tok": ids.short()})
        torch.testing.assert_close(cached["token accuracy"], acc)
