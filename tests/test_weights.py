"""Weights from local files, no network: timm ViT/Swin files, official VideoMAE/MVD and Video Swin/BEVT
checkpoints (written here in their published key layout), frozen teachers."""
import pytest
import torch

from vssl_ds.compat import import_timm
from vssl_ds.models import create_model
from vssl_ds.models.weights import detect_format, load_pretrained
from vssl_ds.teachers import build_teacher

timm = import_timm()


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path_factory.mktemp("w") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_timm_vit_file_loads_into_the_2d_vit_unchanged(timm_vit):
    ref, path = timm_vit
    ours = create_model("vit2d_micro_patch16", embed_dim=192, num_heads=3, depth=12).eval()
    assert load_pretrained(ours, path).fmt == "vit2d"
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(ours(x), ref.forward_features(x), atol=1e-5)


def test_timm_vit_file_inflates_into_the_video_vit(timm_vit):
    ref, path = timm_vit
    video = create_model("vit_tiny_video", img_size=224, num_frames=4, pos_embed="learned").eval()
    assert load_pretrained(video, path).fmt == "vit2d"
    assert torch.allclose(video.blocks[3].attn.qkv.weight, ref.blocks[3].attn.qkv.weight)
    assert video.patch_embed.proj.weight.shape == (192, 3, 2, 16, 16)
    torch.testing.assert_close(video.pos_embed[:, :196], ref.pos_embed[:, 1:])  # every time slot


def test_timm_teacher_from_a_local_file_matches_timm(timm_vit):
    ref, path = timm_vit
    teacher = build_teacher("timm:vit_tiny_patch16_224", weights=str(path))
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(teacher(x, norm=True), ref.forward_features(x)[:, 1:], atol=1e-6)
    no_norm = teacher(x)  # MVD's target: last block, no final norm, no CLS
    assert no_norm.shape == (2, 196, 192) and not torch.allclose(no_norm, teacher(x, norm=True))
    teacher.train()
    assert not teacher.encoder.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(FileNotFoundError):
        build_teacher("timm:vit_tiny_patch16_224", weights=str(path) + ".missing")


def _videomae_official(model) -> dict:
    """Our weights in the layout of VideoMAE's pretraining checkpoints (`checkpoint-799.pth`)."""
    enc = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            enc[k.replace("qkv.bias", "q_bias")], enc[k.replace("qkv.bias", "v_bias")] = q, vb
        else:
            enc[k] = v
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    sd.update({"decoder.blocks.0.attn.qkv.weight": torch.randn(96, 32), "mask_token": torch.zeros(1, 1, 32),
               "encoder_to_decoder.weight": torch.randn(32, 64), "decoder.head.weight": torch.randn(1536, 32)})
    return {"model": sd, "epoch": 799}


def test_official_videomae_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    src = create_model("vit_micro_video", img_size=32, num_frames=4, patch=16).eval()
    for blk in src.blocks:  # VideoMAE has no key bias
        blk.attn.qkv.bias.data[64:128] = 0
    torch.save(_videomae_official(src), tmp_path / "checkpoint-799.pth")
    dst = create_model("vit_micro_video", img_size=32, num_frames=4, patch=16).eval()
    assert load_pretrained(dst, tmp_path / "checkpoint-799.pth").fmt == "videomae"
    x = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(dst(x), src(x))
    teacher = build_teacher("vit_micro_video", weights=str(tmp_path / "checkpoint-799.pth"), img_size=32,
                            num_frames=4, patch=16)
    assert torch.allclose(teacher(x), src(x, norm=False))


def test_official_video_swin_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    src = create_model("swin3d_micro", img_size=32, num_frames=4).eval()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    sd["cls_head.fc_cls.weight"] = torch.randn(400, 128)
    torch.save({"state_dict": sd, "meta": {"epoch": 30}}, tmp_path / "swin.pth")
    dst = create_model("swin3d_micro", img_size=32, num_frames=4).eval()
    assert load_pretrained(dst, tmp_path / "swin.pth").fmt == "video_swin"
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(dst(x), src(x))


def test_timm_swin_inflates_and_matches_on_a_static_clip(tmp_path):
    """Video Swin inflated from a 2D Swin sees a static clip as the 2D model sees the frame."""
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_dim=32,
                            depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    torch.save(ref.state_dict(), tmp_path / "swin2d.pth")
    video = create_model("swin3d_tiny", embed_dim=32, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=(2, 7, 7),
                         num_frames=4, attn_backend="math").eval()
    assert detect_format(torch.load(tmp_path / "swin2d.pth")) == "swin2d"
    load_pretrained(video, tmp_path / "swin2d.pth")
    frame = torch.randn(1, 3, 224, 224)
    out = video(frame[:, :, None].repeat(1, 1, 4, 1, 1))  # [1,C,2,7,7]
    expect = ref.forward_features(frame).permute(0, 3, 1, 2)  # [1,C,7,7]
    for t in range(2):
        assert torch.allclose(out[:, :, t], expect, atol=1e-4)


def test_wrong_size_is_a_clear_error(timm_vit):
    _, path = timm_vit
    model = create_model("vit2d_small_patch16")
    with pytest.raises(ValueError, match="size mismatch.*model name/size right"):
        load_pretrained(model, path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(model, "/nonexistent/weights.pth")


def test_model_pretrained_initialises_the_methods_encoder(tmp_path):
    from vssl_ds.config.loader import load_config
    from vssl_ds.methods import build_method

    torch.manual_seed(0)
    src = create_model("vit_micro_video", img_size=32, num_frames=8, patch=8)
    ck = _videomae_official(src)
    encoder_only = {k: v for k, v in ck["model"].items() if k.startswith("encoder.")}
    torch.save({"model": encoder_only}, tmp_path / "ckpt.pth")
    cfg = load_config("tiny_mae", ["model.name=vit_micro_video", "model.img_size=32", "model.patch=8", "data.size=32",
                                   f"model.pretrained={tmp_path / 'ckpt.pth'}"])
    method = build_method(cfg)
    assert torch.equal(method.trainable.encoder.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    torch.save(ck, tmp_path / "ckpt.pth")  # a decoder of other sizes than the recipe's: continuing is impossible
    with pytest.raises(ValueError, match="decoder.*method.mae.decoder_dim"):
        build_method(cfg)


def test_a_vssl_mae_run_is_an_mvd_video_teacher(tmp_path):
    """Stage 1 → stage 2: the final_model.pt of a vssl_ds MAE run (encoder.* + decoder.*) loads as a teacher."""
    from vssl_ds.config.loader import load_config
    from vssl_ds.methods import build_method

    cfg = load_config("tiny_mae", ["model.name=vit_micro_video", "model.img_size=32", "model.patch=8", "data.size=32"])
    mae = build_method(cfg)
    torch.save(mae.trainable.state_dict(), tmp_path / "final_model.pt")
    teacher = build_teacher("vit_micro_video", weights=str(tmp_path / "final_model.pt"), img_size=32, num_frames=8,
                            patch=8)
    x = torch.randn(1, 3, 8, 32, 32)
    assert torch.allclose(teacher(x), mae.trainable.encoder.eval()(x, norm=False))


def test_official_bevt_checkpoint_loads_into_a_video_swin(tmp_path):
    """A BEVT pretraining checkpoint: backbone + image patch embedding + its head inside the backbone."""
    torch.manual_seed(0)
    src = create_model("swin3d_micro", img_size=32, num_frames=4, image_embed=True).eval()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd.update({"backbone.lm_down.weight": torch.randn(128, 192), "backbone.fpn_s.0.weight": torch.randn(128, 128, 1, 2, 2),
               "cls_head.lm_head.weight": torch.randn(8192, 128)})
    torch.save({"state_dict": sd}, tmp_path / "bevt.pth")
    for image_embed in (False, True):
        dst = create_model("swin3d_micro", img_size=32, num_frames=4, image_embed=image_embed).eval()
        assert load_pretrained(dst, tmp_path / "bevt.pth").fmt == "video_swin"
        x = torch.randn(1, 3, 4, 32, 32)
        assert torch.equal(dst(x), src(x))
