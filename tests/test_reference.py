"""Parity with the official code, held against the golden fixtures in ../shared/reference (its README is the
data card: architectures, conventions, tolerance). Every file is loaded through the public paths a user takes
(`model.pretrained`, `eval.weights`, `build_teacher`, the methods' constructors); nothing here knows a fixture's
keys. Sections: 1 VideoMAE pretraining, 2 MVD, 3 fine-tuned VideoMAE, 4 continued pretraining."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.methods import build_method
from vssl_ds.methods.losses import pixel_targets
from vssl_ds.teachers import build_teacher

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
pytestmark = pytest.mark.skipif(not (REF / "MANIFEST.json").is_file(), reason="../shared/reference is not beside the repo")

# the fixtures' common architecture (data card, "Conventions"): 16 frames of 64², tubelet 2, patch 16
VIDEO = ["data.size=64", "data.num_frames=16", "model.img_size=64", "model.num_frames=16", "model.tubelet=2",
         "model.patch=16", "model.drop_path=0.0", "model.attn_backend=math", "model.name=vit_micro_video"]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The data card's tolerance (section 6): |a − e| ≤ 1e-5 + 1e-4·|e| element-wise."""
    torch.testing.assert_close(actual.detach().float(), expected.float(), rtol=1e-4, atol=1e-5)


def expected(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REF / name / "expected.safetensors"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references were computed with one intra-op thread
    yield
    torch.set_num_threads(threads)


def test_every_listed_fixture_file_is_present_and_intact():
    """The data card's MANIFEST lists every file with its sha256: a damaged fixture fails here, not as a
    mysterious mismatch further down."""
    import hashlib

    manifest = json.loads((REF / "MANIFEST.json").read_text())
    files = manifest.get("files", manifest)
    items = files.items() if isinstance(files, dict) else [(f["path"], f) for f in files]
    checked = 0
    for rel, info in items:
        digest = info.get("sha256") if isinstance(info, dict) else None
        if digest and (REF / rel).is_file():
            assert hashlib.sha256((REF / rel).read_bytes()).hexdigest() == digest, rel
            checked += 1
    assert checked >= 8


# --- 1 and 4: VideoMAE pretraining, continued from the released checkpoint ------------------------------------
def videomae(extra=()):
    cfg = load_config("videomae_vit_b", [*VIDEO, f"model.pretrained={REF / 'videomae_pretrain/checkpoint.pth'}",
                                         "method.mae.decoder_dim=48", "method.mae.decoder_depth=2",
                                         "method.mae.decoder_heads=3", *extra])
    return build_method(cfg).eval()


def test_videomae_pretraining_matches_the_official_model_engine_and_loss():
    ref = expected("videomae_pretrain")
    clip, mask = ref["clip"], ref["mask"]
    method = videomae()
    student = method.trainable
    close(student.encoder.pos_embed, ref["pos_embed_encoder"])
    close(student.decoder.pos_embed, ref["pos_embed_decoder"])
    close(student.encoder(clip, mask), ref["encoder_visible"])
    close(student(clip, mask), ref["decoder_pred"])  # section 4: the decoder continues from the file
    pixels = clip * method.std + method.mean
    close(pixel_targets(pixels, student.encoder.patch_size, True)[mask].reshape(1, -1, 1536), ref["target_norm"])
    with torch.no_grad():
        close(method(Batch(video=clip, mask=mask)).loss, ref["loss_norm"])
        close(videomae(["method.mae.norm_pix_loss=false"])(Batch(video=clip, mask=mask)).loss, ref["loss_raw"])


def test_a_decoder_that_does_not_fit_the_file_is_an_error_naming_the_fields():
    with pytest.raises(ValueError, match="decoder.*method.mae.decoder_dim"):
        videomae(["method.mae.decoder_dim=32", "method.mae.decoder_heads=2"])


# --- 2 and 4: MVD ----------------------------------------------------------------------------------------------
def mvd_teachers(cfg):
    from vssl_ds.methods.mvd import MVDTeachers

    # the fixture's teachers have widths no registered variant has: built through build_teacher, as a user would
    image = build_teacher("vit2d_micro_patch16", weights=str(REF / "mvd_pretrain/image_teacher_mae.pth"),
                          img_size=64, patch=16, embed_dim=96, num_heads=3, attn_backend="math")
    video = build_teacher("vit_micro_video", weights=str(REF / "mvd_pretrain/video_teacher_videomae.pth"),
                          img_size=64, num_frames=16, tubelet=2, patch=16, embed_dim=80, num_heads=2,
                          attn_backend="math")
    return MVDTeachers(cfg, image=image, video=video)


def mvd(extra=()):
    from vssl_ds.methods.mvd import MVD

    cfg = load_config("mvd_vit_b", [*VIDEO, f"model.pretrained={REF / 'mvd_pretrain/student_checkpoint.pth'}",
                                    "model.pos_embed=sincos3d", "method.mvd.decoder_dim=48",
                                    "method.mvd.decoder_heads=3", "method.mvd.decoder_depth=2", *extra])
    return MVD(cfg, teachers=mvd_teachers(cfg)).eval()


def test_mvd_matches_the_official_student_teachers_targets_and_losses():
    ref = expected("mvd_pretrain")
    clip, mask = ref["clip"], ref["mask"]
    method = mvd()
    student = method.trainable
    close(student.encoder.pos_embed, ref["pos_embed_encoder"])
    close(student.image_decoder.pos_embed, ref["pos_embed_decoder"])
    close(student.encoder(clip, mask), ref["student_encoder_visible"])
    image_pred, video_pred = student(clip, mask)
    close(image_pred, ref["image_pred"])  # section 4: both decoders continue from the file
    close(video_pred, ref["video_pred"])
    feats = method.frozen(clip)
    close(feats["img"], ref["image_teacher_features"])
    close(feats["vid"], ref["video_teacher_features"])
    close(feats["img"][mask].reshape(1, -1, 96), ref["image_target"])
    close(feats["vid"][mask].reshape(1, -1, 80), ref["video_target"])
    with torch.no_grad():
        out = method(Batch(video=clip, mask=mask))
        close(out.loss, ref["loss"])
        close(out.metrics["loss/image_teacher"], ref["loss_img"])
        close(out.metrics["loss/video_teacher"], ref["loss_vid"])
        normed = mvd(["method.mvd.norm_targets=true"])(Batch(video=clip, mask=mask))
        close(normed.loss, ref["loss_normfeat"])
        close(normed.metrics["loss/image_teacher"], ref["loss_img_normfeat"])
        close(normed.metrics["loss/video_teacher"], ref["loss_vid_normfeat"])


def test_an_mvd_checkpoint_into_a_1d_position_model_names_model_pos_embed():
    cfg = load_config("finetune_vit_b", [*VIDEO, f"model.pretrained={REF / 'mvd_pretrain/student_checkpoint.pth'}",
                                         "eval.num_classes=10"])
    with pytest.raises(ValueError, match="model.pos_embed=sincos3d"):
        build_method(cfg)


# --- 1, 2 and 3: fine-tuning as the official code -----------------------------------------------------------------
def classifier(pretrained: str, extra=()):
    cfg = load_config("finetune_vit_b", [*VIDEO, "eval.num_classes=10", f"model.pretrained={REF / pretrained}",
                                         *extra])
    return build_method(cfg).eval()


@pytest.mark.parametrize("fixture,pretrained,extra", [
    ("videomae_pretrain", "videomae_pretrain/checkpoint.pth", []),
    ("mvd_pretrain", "mvd_pretrain/student_checkpoint.pth", ["model.pos_embed=sincos3d"]),
])
def test_finetuning_from_a_pretraining_checkpoint_pools_into_a_fresh_fc_norm(fixture, pretrained, extra):
    """The official fine-tuning model drops the pretrained final norm and normalises the mean token afresh."""
    net = classifier(pretrained, extra).trainable
    with torch.no_grad():
        close(net.features(expected(fixture)["clip"]), expected(fixture)["finetune_init_pooled"])


@pytest.mark.parametrize("field", ["model.pretrained", "eval.weights"])
def test_a_fine_tuned_checkpoint_loads_fc_norm_after_pooling_and_its_head(field):
    ref = expected("videomae_finetune")
    path = REF / "videomae_finetune/checkpoint.pth"
    cfg = load_config("finetune_vit_b", [*VIDEO, "eval.num_classes=10", f"{field}={path}", "model.drop_path=0.1"])
    net = build_method(cfg).eval().trainable
    with torch.no_grad():
        close(net.features(ref["clip"]), ref["pooled"])
        close(net(ref["clip"]), ref["logits"])


# --- strict loading -----------------------------------------------------------------------------------------------
def test_an_unexpected_key_in_a_released_layout_is_an_error_naming_it(tmp_path):
    ck = torch.load(REF / "videomae_pretrain/checkpoint.pth", map_location="cpu", weights_only=False)
    ck["model"]["encoder.blocks.0.attn.extra_scale"] = torch.ones(1)
    torch.save({"model": ck["model"]}, tmp_path / "ck.pth")
    with pytest.raises(ValueError, match="extra_scale"):
        classifier(str(tmp_path / "ck.pth"))
    ck["model"].pop("encoder.blocks.0.attn.extra_scale")
    ck["model"]["teacher_proj.weight"] = torch.ones(1)
    torch.save({"model": ck["model"]}, tmp_path / "ck.pth")
    with pytest.raises(ValueError, match="unexpected key 'teacher_proj.weight'"):
        classifier(str(tmp_path / "ck.pth"))


# --- 7: TimeSformer (divided space-time attention) -----------------------------------------------------------------
TIMESFORMER = ["model.name=vit_micro_divided_st", "model.img_size=64", "model.num_frames=8", "model.tubelet=1",
               "model.patch=16", "model.embed_dim=48", "model.depth=[2]", "model.num_heads=[3]",
               "model.attn_backend=math", "data.size=64", "data.num_frames=8", "eval.num_classes=10",
               "model.drop_path=0.1", f"model.pretrained={REF / 'timesformer_divided/checkpoint.pyth'}"]


def official_order(x: torch.Tensor) -> torch.Tensor:
    """vssl_ds keeps patches in (t, s) order, TimeSformer in (s, t) order (time fastest): [CLS, patches]."""
    from einops import rearrange

    return torch.cat([x[:, :1], rearrange(x[:, 1:], "b (t s) d -> b (s t) d", t=8)], 1)


def test_timesformer_checkpoint_loads_and_matches_block_by_block():
    ref = expected("timesformer_divided")
    net = build_method(load_config("finetune_vit_b", TIMESFORMER)).eval().trainable  # the .pyth, head included
    seen = {}
    for i, blk in enumerate(net.encoder.blocks):
        blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"block{i}_in", args[0]))
        blk.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"block{i}_out", out))
    with torch.no_grad():
        close(net(ref["clip"]), ref["logits"])
        close(net.features(ref["clip"]), ref["features"])
    for name in ("block0_in", "block0_out", "block1_in", "block1_out"):
        close(official_order(seen[name]), ref[name])


def test_timesformer_block_keeps_the_temporal_residual():
    """Block 0 with its spatial attention and MLP zeroed moves its input by the temporal residual alone."""
    import copy

    from einops import rearrange

    ref = expected("timesformer_divided")
    net = build_method(load_config("finetune_vit_b", TIMESFORMER)).eval().trainable
    block = copy.deepcopy(net.encoder.blocks[0])
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith(("attn.", "mlp.")):
                p.zero_()
        x = ref["block0_in"]
        ours = torch.cat([x[:, :1], rearrange(x[:, 1:], "b (s t) d -> b (t s) d", t=8)], 1)
        out = block(ours)
    close(official_order(out), ref["block0_temporal_only_out"])
    assert (official_order(out) - x).abs().max() > 0.1


# --- 9: the DALL-E dVAE encoder (BEVT's tokenizer) ----------------------------------------------------------------
def test_dalle_encoder_state_dict_loads_and_matches_logits_and_ids():
    from vssl_ds.teachers.tokenizers import build_tokenizer

    ref = expected("dalle_encoder")
    tok = build_tokenizer("dalle", str(REF / "dalle_encoder/encoder_state_dict.pth"))
    with torch.no_grad():
        close(tok.logits(ref["image"]), ref["logits"])
        assert torch.equal(tok(ref["image"]), ref["token_ids"].flatten(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the logits conv stays fp32 under autocast
            assert tok.logits(ref["image"]).dtype == torch.float32


# --- 8: Video Swin (SwinTransformer3D + I3D head), full and shrunk windows ------------------------------------------
@pytest.mark.parametrize("clip,frames,size", [("a", 32, 56), ("b", 16, 64)])
def test_video_swin_checkpoint_matches_every_stage_features_and_scores(clip, frames, size):
    """mmaction's released layout (backbone.*, cls_head.fc_cls.*) through the fine-tuning path; stages 2–3 run in
    windows shrunk below (8,7,7), where the official code slices the full window's index (`model.swin_index`)."""
    ref = expected("swin3d_video")
    cfg = load_config("finetune_vit_b", [
        "model.name=swin3d_tiny", "model.embed_dim=12", "model.depth=[2,2,2,2]", "model.num_heads=[1,2,2,4]",
        f"model.img_size={size}", f"model.num_frames={frames}", "model.tubelet=2", "model.patch=4",
        "model.attn_backend=math", "model.drop_path=0.1", f"data.size={size}", f"data.num_frames={frames}",
        "eval.num_classes=10", f"model.pretrained={REF / 'swin3d_video/checkpoint.pth'}"])
    net = build_method(cfg).eval().trainable
    seen = {}
    for i, stage in enumerate(net.encoder.layers):
        stage.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out[0]))
    x = ref[f"clip_{clip}"]
    with torch.no_grad():
        close(net.encoder(x), ref[f"{clip}_features"])
        close(net(x), ref[f"{clip}_cls_score"])
        close(net(x).softmax(-1), ref[f"{clip}_test_prob"])
    for i in range(4):
        close(seen[i], ref[f"{clip}_stage{i}"])


# --- 11: ViC-MAE (two frames: MAE + contrastive) --------------------------------------------------------------------
def test_vicmae_checkpoint_continues_and_matches_encoder_decoder_projector_and_losses():
    ref = expected("vicmae_pretrain")
    cfg = load_config("vicmae_vit_b", [
        "model.name=vit2d_micro_patch16", "model.img_size=64", "model.patch=16", "model.attn_backend=math",
        "data.size=64", "method.vicmae.decoder_dim=48", "method.vicmae.decoder_depth=2",
        "method.vicmae.decoder_heads=3", "method.vicmae.proj_hidden=96", "method.vicmae.proj_dim=32",
        f"model.pretrained={REF / 'vicmae_pretrain/checkpoint.pth'}"])
    method = build_method(cfg).train()  # the official step runs in train mode (projector BN: batch statistics)
    student = method.trainable
    frames = torch.cat([ref["frame1"], ref["frame2"]])
    mask = torch.cat([ref["mask1"], ref["mask2"]])
    with torch.no_grad():
        tokens = student.encoder(frames, mask)  # visible tokens in patch order; the official keeps ids_keep order
        for v, (ids, out) in enumerate([(ref["ids_keep1"], ref["encoder_out1"]), (ref["ids_keep2"], ref["encoder_out2"])]):
            order = ids.argsort(1)  # official visible tokens → patch order
            official = torch.cat([out[:, :1], out[:, 1:].gather(1, order[..., None].expand(-1, -1, 64))], 1)
            close(tokens[2 * v:2 * v + 2], official)
        close(student.decoder(tokens, mask, every_token=True), torch.cat([ref["pred1"], ref["pred2"]]))
        close(method.pixel_targets(frames), torch.cat([ref["target1"], ref["target2"]]))
        # The projector's BatchNorms normalise over two samples per view, which amplifies rounding: a 4e-7 change of
        # the pooled features (summation order: the official pools tokens in shuffle order) moves its output by up
        # to 5e-5, and its fp32 evaluation differs by 2e-5 between CPUs. So the projector is checked on the official
        # pooled features (the encoder outputs are checked above), evaluated in float64: within 6e-6 of the
        # reference, the reference's own fp32 rounding.
        import copy

        projector = copy.deepcopy(student.projector).double()
        pooled = [ref[f"encoder_out{v}"][:, 1:].mean(1).double() for v in (1, 2)]  # visible tokens, no CLS
        close(torch.cat([projector(p) for p in pooled]).float(),
              torch.cat([ref["projector_out1"], ref["projector_out2"]]))
        fresh = build_method(cfg).train()  # the step from the checkpoint's BN statistics (two projector calls)
        out = fresh(Batch(video=ref["frame1"][:, :, None], views={"second": ref["frame2"][:, :, None]},
                          mask=torch.cat([ref["mask1"], ref["mask2"]], 1)))
    close(fresh.trainable.projector[1].running_mean, ref["projector_bn1_running_mean"])
    close(out.loss, ref["loss"])
    close(out.metrics["loss/reconstruction"], ref["loss_recon"])
    close(out.metrics["loss/contrastive"], ref["loss_contrast"])


# --- 10: BEVT (video + image streams, tokenizer targets) and the 2D → BEVT inflation ---------------------------------
BEVT_TOY = ["model.name=swin3d_tiny", "model.embed_dim=8", "model.depth=[2,2,2,2]", "model.num_heads=[1,1,2,4]",
        "model.img_size=224", "model.num_frames=4", "model.tubelet=2", "model.patch=4", "model.attn_backend=math",
        "model.drop_path=0.0", "data.size=224", "data.num_frames=4", "method.bevt.tokenizer=dalle",
        "method.bevt.tokenizer_weights="]
IMAGENET_255 = (torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375]))


def mmaction_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """mmaction's Normalize on 0..255 values, channel axis 1."""
    shape = (1, 3) + (1,) * (pixels.dim() - 2)
    return (pixels.float() - IMAGENET_255[0].view(shape)) / IMAGENET_255[1].view(shape)


def test_bevt_checkpoint_continues_with_its_head_and_tokenizer_and_matches_both_streams():
    from vssl_ds.methods.bevt import BEVT

    ref = expected("bevt_pretrain")
    cfg = load_config("bevt_swin_b", [*BEVT_TOY, f"model.pretrained={REF / 'bevt_pretrain/checkpoint.pth'}"])
    method = BEVT(cfg).eval()  # the tokenizer comes from the checkpoint's head (cls_head.vae_encoder)
    s = method.trainable
    video, image = mmaction_normalize(ref["video_pixels"]), mmaction_normalize(ref["image_pixels"])
    vmask, imask = ref["video_input_mask"].flatten(1), ref["image_mask"].flatten(1)
    with torch.no_grad():
        close(s.video_features(video, vmask), ref["video_features"])
        close(s.image_features(image, imask), ref["image_features"])
        close(s.image_features(image), ref["image_features_unmasked"])
        half = lambda p: p[..., ::2, ::2].float() / 255  # noqa: E731 - the data card's stand-in for the 112² copy
        ids_vid = method.frozen(half(rearrange_frames(ref["video_pixels"])))
        assert torch.equal(ids_vid.reshape(1, 4, 196), ref["tokenizer_ids_video"])
        assert torch.equal(method.frozen(half(ref["image_pixels"])), ref["tokenizer_ids_image"])
        out = method(Batch(video=video, mask=vmask, image=image, image_mask=imask))
        logits_vid, logits_img = s(video, vmask, image, imask)
    omask = ref["video_output_mask"].flatten(1)
    close(logits_vid[omask], ref["video_masked_logits"])
    close(logits_img[imask], ref["image_masked_logits"])
    close(out.metrics["loss/video_tokens"], ref["loss_cls_3d"])
    close(out.metrics["loss/image_tokens"], ref["loss_cls_2d"])
    close(out.loss, ref["loss"])
    close(out.metrics["acc/video_tokens"], ref["mask_acc_3d"] / 100)
    close(out.metrics["acc/image_tokens"], ref["mask_acc_2d"] / 100)


def rearrange_frames(video: torch.Tensor) -> torch.Tensor:
    from einops import rearrange

    return rearrange(video, "b c t h w -> (b t) c h w")


def test_a_2d_swin_inflates_into_bevt_as_the_official_inflate_weights():
    """The image-stage 2D Swin starts BEVT: kernel averaged over time, 2D kernel kept for the image stream,
    relative-position tables repeated over the temporal offsets."""
    from vssl_ds.methods.bevt import BEVT

    ref = expected("bevt_pretrain")
    cfg = load_config("bevt_swin_b", [*BEVT_TOY, f"model.pretrained={REF / 'bevt_pretrain/swin2d_for_inflation.pth'}",
                                      f"method.bevt.tokenizer_weights={REF / 'dalle_encoder/encoder_state_dict.pth'}"])
    enc = BEVT(cfg).eval().trainable.encoder
    close(enc.patch_embed.proj.weight, ref["inflated_patch_embed_weight"])
    close(enc.layers[0].blocks[0].attn.relative_position_bias_table, ref["inflated_rpb_table_l0b0"])
    with torch.no_grad():
        image_stage3 = enc(mmaction_normalize(ref["image_pixels"]), stages=True)[3]  # [B,C,1,H,W]
        video_stage3 = enc(mmaction_normalize(ref["video_pixels"]), stages=True)[3]
    close(image_stage3[:, :, 0], ref["inflated_image_stage3"])
    close(video_stage3, ref["inflated_video_stage3"])
