"""iBoot: the loss against an independent computation, frozen teacher, overfitting, 2-rank DeepSpeed run."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import overfit
from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.methods import build_method
from vssl_ds.models import create_model


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    path = tmp_path_factory.mktemp("iboot") / "teacher.pth"
    torch.manual_seed(5)
    torch.save(create_model("vit2d_micro_patch16", img_size=32).state_dict(), path)
    return ["model.name=vit_micro_video", "model.img_size=32", "model.num_frames=4", "data.size=32",
            "data.num_frames=4", "method.iboot.teacher=vit2d_micro_patch16", f"method.iboot.teacher_weights={path}",
            "method.iboot.proj_hidden=32", "method.iboot.proj_dim=16", "method.iboot.pred_hidden=32"]


def _batch():
    g = torch.Generator().manual_seed(0)
    return Batch(video=torch.randn(4, 3, 4, 32, 32, generator=g), views={"long": torch.randn(4, 3, 4, 32, 32, generator=g)})


@pytest.mark.parametrize("target", ["pooled", "frames"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_loss_matches_an_independent_computation(sets, pool, target):
    """Each clip's prediction against the teacher's embedding of the *other* clip: its frames averaged (pooled)
    or every frame on its own (frames)."""
    torch.manual_seed(0)
    method = build_method(load_config("iboot_vit_b", [*sets, f"method.iboot.teacher_pool={pool}",
                                                      f"method.iboot.target={target}"])).eval()
    batch = _batch()
    out = method(batch)
    teacher = method.frozen.encoder
    with torch.no_grad():
        def emb(clip):  # every frame through the image model, CLS or mean of patch tokens, averaged over frames
            frames = clip.permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32)
            tok = teacher(frames)
            e = (tok[:, 0] if pool == "cls" else tok[:, 1:].mean(1)).reshape(4, 4, -1)
            return e.mean(1) if target == "pooled" else e
        a, b = batch.video, batch.views["long"]

        def term(clip, other):
            pred = method.trainable(clip)
            return (2 - 2 * F.cosine_similarity(pred if target == "pooled" else pred[:, None], emb(other), dim=-1)).mean()
        expect = (term(a, b) + term(b, a)) / 2
    assert torch.allclose(out.loss, expect, atol=1e-5)
    assert not any(p.requires_grad for p in method.frozen.parameters())


def test_iboot_overfits_a_fixed_batch(sets):
    torch.manual_seed(0)
    method = build_method(load_config("iboot_vit_b", sets))
    first, last = overfit(method, _batch(), steps=40, lr=2e-3)
    assert last < first / 2, (first, last)  # stated factor: 2x in 40 steps on a memorised batch


# iBoot runs through the CLI in tests/test_readme.py (online and cached); BatchNorm buffers under 2 ranks: the
# 2-rank SimSiam run in test_lstcl.py (the same broadcast in methods/base.py)


def test_cached_frame_embeddings_give_the_online_step(sets, shards, tmp_path, capsys):
    """Both clips of each long-short view are cached; replaying view k gives the online loss (fp16 storage)."""
    from vssl_ds.data.build import build_loader
    from vssl_ds.methods import cache_targets, mask_fns
    from vssl_ds.tools.cache_teachers import main as cache_main

    data = [*sets, "data.sampling_rate=2", "data.long_stride=2", "data.batch_size=2", "data.num_workers=0",
            f"data.train={shards}", "data.shuffle_buffer=0"]
    args = [str(tmp_path / "emb"), "--config", "iboot_vit_b", "--views", "2", "--batch", "4"]
    for s in data:
        args += ["--set", s]
    assert cache_main(args) == 0
    capsys.readouterr()
    assert cache_main([*args, "--verify", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["views"] == 4 and report["emb_long"]["cosine_min"] > 0.999 and report["emb_video"]["rel_err_max"] < 2e-3
    cfg = load_config("iboot_vit_b", [*data, "method.iboot.targets=cache", f"data.targets={tmp_path / 'emb'}"])
    loader, _ = build_loader(cfg.data, *mask_fns(cfg), 0, 1, 0, *cache_targets(cfg))
    epochs, seen = [], []  # per epoch: one batch, and {key: (long clip, its cached embedding)}
    for _ in range(3):
        clips = {}
        for i, batch in enumerate(loader):
            batch = batch.to("cpu", cfg.data.mean, cfg.data.std)
            assert batch.targets["emb_video"].shape == batch.targets["emb_long"].shape == (2, 4, 64)  # [B,T,D]
            epochs.append(batch) if i == 0 else None
            clips.update({k: (batch.views["long"][j], batch.targets["emb_long"][j]) for j, k in enumerate(batch.keys)})
        seen.append(clips)
    key = next(iter(seen[0]))
    for part in range(2):  # views 0, 1, 0 (K = 2): the clip and its embedding come back together
        assert torch.equal(seen[0][key][part], seen[2][key][part])
        assert not torch.equal(seen[0][key][part], seen[1][key][part])
    cached, online = build_method(cfg), build_method(load_config("iboot_vit_b", data))
    assert not list(cached.frozen.parameters())  # the image model is not even built
    online.trainable.load_state_dict(cached.trainable.state_dict())
    for batch in epochs[:2]:
        a, b = cached.eval()(batch), online.eval()(batch)
        assert torch.allclose(a.loss, b.loss, rtol=2e-3, atol=1e-4), (a.loss, b.loss)
    assert "iboot" in json.loads((tmp_path / "emb" / "targets.json").read_text())["fingerprint"]["method"]
    bad = load_config("iboot_vit_b", [*data, "method.iboot.targets=cache", f"data.targets={tmp_path / 'emb'}",
                                      "method.iboot.teacher_pool=mean"])
    with pytest.raises(ValueError, match="teacher_pool"):
        build_method(bad)


def test_a_timm_teacher_gets_its_own_normalisation(tmp_path):
    """A teacher trained with other statistics (CLIP, Inception-style: timm's pretrained_cfg) sees the frames
    re-normalised from the data's ImageNet statistics to its own."""
    from vssl_ds.compat import import_timm
    from vssl_ds.methods.iboot import frame_embeddings
    from vssl_ds.teachers import build_teacher

    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=False, num_classes=0,
                            img_size=32, depth=2).eval()
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    teacher = build_teacher("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights=str(tmp_path / "t.pth"),
                            img_size=32, depth=2)
    assert teacher.norm_stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.rand(2, 3, 1, 32, 32)
    clip = (pixels - torch.tensor(imagenet[0]).view(1, 3, 1, 1, 1)) / torch.tensor(imagenet[1]).view(1, 3, 1, 1, 1)
    got = frame_embeddings(teacher, clip, "cls", imagenet)[:, 0]
    with torch.no_grad():
        expect = ref.forward_features((pixels[:, :, 0] - 0.5) / 0.5)[:, 0]
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_a_vssl_ds_teacher_takes_the_patch_of_its_weight_file(tmp_path):
    """The README's MVD image teacher (vit2d_micro_patch16 saved at 64 px with 8-px patches) serves iBoot too: the
    name's default 16-px patch would not load the file (the toy-size failure)."""
    from vssl_ds.config.loader import load_config

    path = tmp_path / "img_teacher.pth"
    torch.manual_seed(3)
    saved = create_model("vit2d_micro_patch16", img_size=64, patch=8)
    torch.save(saved.state_dict(), path)
    cfg = load_config("iboot_vit_b", ["model.name=vit_micro_video", "model.img_size=64", "data.size=64",
                                      "model.num_frames=4", "data.num_frames=4", "method.iboot.teacher=vit2d_micro_patch16",
                                      f"method.iboot.teacher_weights={path}", "method.iboot.proj_hidden=32",
                                      "method.iboot.proj_dim=16", "method.iboot.pred_hidden=32"])
    method = build_method(cfg)
    teacher = method.frozen.encoder
    assert teacher.patch_embed.proj.kernel_size == (8, 8)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(Exception, match="8-px patches, which do not tile model.img_size=60"):
        build_method(load_config("iboot_vit_b", ["model.name=vit_micro_video", "model.img_size=60", "data.size=60",
                                                 "model.patch=6", "model.num_frames=4", "data.num_frames=4",
                                                 "method.iboot.teacher=vit2d_micro_patch16",
                                                 f"method.iboot.teacher_weights={path}"]))
