"""Backbones on CPU at tiny input sizes, parametrised over the registry; published sizes; equivalences."""
import math

import pytest
import torch

from vssl_ds.models import create_model, list_models
from vssl_ds.models.layers import attention
from vssl_ds.models.stats import model_stats


def _tiny_input(name):
    if name.startswith("vit2d"):
        size = 28 if "patch14" in name else 32
        return dict(img_size=size), torch.randn(2, 3, size, size)
    kw = dict(img_size=32, num_frames=4)
    if name.startswith("vit_") and "divided" not in name:
        kw["patch"] = 16
    return kw, torch.randn(2, 3, 4, 32, 32)


@pytest.mark.parametrize("name", list_models())
def test_every_variant_runs_forward_and_backward(name):
    torch.manual_seed(0)
    kw, x = _tiny_input(name)
    # L / H in bf16, each gradient read and dropped as it arrives: the peak stays near the bf16 weights
    # (the H variants alone would otherwise hold 2 x 2.5 GB of fp32 weights and gradients); and 2 of their blocks:
    # every block is the same module at the variant's width, so two show the wiring (a full L / H took 35-45 s each
    # on 2 CPU cores; their sizes are held by test_parameters_and_flops_match_the_papers)
    large = model_stats(name, **kw)["params_m"] > 250
    dtype = torch.bfloat16 if large else torch.float32
    if large:
        kw["depth"] = 2
    torch.set_default_dtype(dtype)
    try:
        model = create_model(name, attn_backend="sdpa", **kw)
    finally:
        torch.set_default_dtype(torch.float32)
    signal = {}  # name → gradient not all zero (keyed by name: no model ↔ hook reference cycle)

    def recorder(name):
        def record(p):
            signal[name] = bool(p.grad.abs().sum() > 0)
            p.grad = None
        return record

    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(recorder(n))
    out = model(x.to(dtype))
    assert out.dim() in (3, 5) and out.shape[0] == 2 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    names = [n for n, _ in model.named_parameters() if "mask_token" not in n]  # used only with a mask
    assert all(n in signal for n in names), [n for n in names if n not in signal]  # all on the graph
    # most get a signal at once (TimeSformer's zero-initialised temporal_fc silences its branch at step 0)
    assert sum(signal[n] for n in names) >= 0.65 * len(names)


# published figures: VideoMAE (ViT 16×224², tubelet 2×16×16), Video Swin (32×224²), TimeSformer (8×224²), timm's
# ViT-L/16 and ViT-H/14 at 224² (304 M / 61.6 GMACs, 632 M / 167.4 GMACs, with their 1000-class heads)
PUBLISHED = [
    ("vit_small_video", {}, 22, 57), ("vit_base_video", {}, 87, 180), ("vit_large_video", {}, 305, 597),
    ("vit_huge_video", {}, 633, 1192), ("swin3d_tiny", {"num_frames": 32}, 28, 88),
    ("swin3d_base", {"num_frames": 32}, 88, 282), ("vit_base_divided_st", {}, 121, 196),
    ("vit2d_large_patch16", {"img_size": 224}, 304, 61.6), ("vit2d_huge_patch14", {"img_size": 224}, 632, 167.4),
]


@pytest.mark.parametrize("name,kw,params_m,gflops", PUBLISHED)
def test_parameters_and_flops_match_the_papers(name, kw, params_m, gflops):
    s = model_stats(name, **kw)
    assert abs(s["params_m"] - params_m) / params_m < 0.02, s  # heads are not counted: within 2 %
    assert abs(s["gflops"] - gflops) / gflops < 0.01, s


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_backends_agree(with_bias):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 49, 16) for _ in range(3))
    bias = None
    if with_bias:  # a relative-position-like bias plus a shifted-window style -100 mask
        bias = torch.randn(1, 4, 49, 49) + torch.where(torch.rand(3, 1, 49, 49) < 0.3, -100.0, 0.0)
    ref = attention(q, k, v, bias, "math")
    assert torch.allclose(attention(q, k, v, bias, "sdpa"), ref, atol=1e-5)
    low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None if bias is None else bias.bfloat16(), "sdpa")
    assert (low.float() - ref).abs().max() < 0.1  # bf16 stays close


def _skip_unless_xformers_runs():
    pytest.importorskip("xformers")
    from vssl_ds.models.layers.attention import xformers_unusable

    if xformers_unusable():
        pytest.skip(xformers_unusable())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_xformers_agrees_with_math_on_gpu():
    _skip_unless_xformers_runs()
    q, k, v = (torch.randn(2, 4, 1568, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 4, 1568, 1568, device="cuda", dtype=torch.bfloat16)
    for b in (None, bias):
        ref = attention(q.float(), k.float(), v.float(), None if b is None else b.float(), "math")
        assert (attention(q, k, v, b, "xformers").float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("name", ["swin3d_micro", "swin3d_micro_st", "vit_micro_divided_st", "vit_micro_video"])
def test_models_give_the_same_output_on_every_backend(name):
    kw, x = _tiny_input(name)
    torch.manual_seed(0)
    a = create_model(name, attn_backend="math", **kw).eval()
    b = create_model(name, attn_backend="sdpa", **kw).eval()
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("name,cls", [("vit_micro_video", False), ("vit_micro_video", True),
                                      ("vit2d_micro_patch16", True)])
def test_masked_forward_equals_full_forward_restricted_to_visible_tokens(name, cls):
    """Encoding only the visible tokens = encoding all of them with hidden keys masked out, then keeping
    the visible rows: the gather keeps token order and positions right."""
    torch.manual_seed(0)
    kw, x = _tiny_input(name)
    model = create_model(name, attn_backend="math", cls_token=cls, **{**kw, "img_size": 64}).eval()
    x = torch.randn(2, 3, *x.shape[2:-2], 64, 64)
    n = model.num_patches
    mask = torch.zeros(2, n, dtype=torch.bool)
    for i in range(2):
        mask[i, torch.randperm(n)[: n * 3 // 4]] = True
    prefix = 1 if cls else 0
    keep = torch.cat([torch.zeros(2, prefix, dtype=torch.bool), mask], 1)
    bias = torch.zeros(2, 1, 1, prefix + n).masked_fill(keep[:, None, None, :], float("-inf"))
    h = model.embed(x)  # all tokens
    for blk in model.blocks:
        h = blk(h, bias)
    full = model.norm(h)[~keep].reshape(2, -1, full_dim := h.shape[-1])
    assert torch.allclose(model(x, mask), full, atol=1e-5) and full_dim == model.embed_dim


def test_a_2d_vit_inflated_to_video_gives_its_features_on_a_static_clip():
    from vssl_ds.models.weights import inflate_vit, load_into

    torch.manual_seed(0)
    vit2d = create_model("vit2d_micro_patch16", img_size=32, cls_token=False, attn_backend="math").eval()
    video = create_model("vit_micro_video", img_size=32, num_frames=4, patch=16, pos_embed="learned",
                         attn_backend="math").eval()
    load_into(video, inflate_vit(vit2d.state_dict(), video), "inflation")
    frame = torch.randn(1, 3, 32, 32)
    clip = frame[:, :, None].repeat(1, 1, 4, 1, 1)
    per_slice = video(clip).reshape(1, 2, 4, -1)  # [B, T', H'W', D]
    for t in range(2):
        assert torch.allclose(per_slice[:, t], vit2d(frame), atol=1e-5)


@pytest.mark.parametrize("name", ["vit_micro_video", "vit_micro_divided_st", "swin3d_micro"])
def test_checkpointed_blocks_give_the_same_gradients(name):
    kw, x = _tiny_input(name)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model(name, attn_backend="math", grad_ckpt=ckpt, **kw).train()
        model(x).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_swin_mask_token_replaces_hidden_patches_and_coarse_masks_upsample():
    torch.manual_seed(0)
    model = create_model("swin3d_micro", img_size=64, num_frames=4).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    coarse = torch.zeros(1, 2 * 4 * 4, dtype=torch.bool)  # 2×4×4 grid (16-px cells) over a 2×16×16 patch grid
    assert torch.equal(model(x, coarse), model(x))  # nothing hidden: unchanged
    coarse[0, :5] = True
    fine = model._upsample_mask(coarse, (2, 16, 16))
    assert fine.sum() == 5 * 16 and not torch.equal(model(x, coarse), model(x))


def test_divided_vit_refuses_a_mask():
    model = create_model("vit_micro_divided_st", img_size=32, num_frames=4)
    with pytest.raises(ValueError, match="no masked forward"):
        model(torch.randn(1, 3, 4, 32, 32), torch.zeros(1, 16, dtype=torch.bool))


def test_divided_vit_starts_as_timesformer_does():
    """TimeSformer's initialisation: time table and every temporal_fc at zero, so a fresh model encodes each frame
    on its own (a clip played backwards gives the same pooled features); the time table gets no weight decay."""
    from vssl_ds.methods.base import NO_DECAY_NAMES

    torch.manual_seed(0)
    model = create_model("vit_micro_divided_st", img_size=32, num_frames=4).eval()
    assert not model.time_embed.any() and all(not b.temporal_fc.weight.any() for b in model.blocks)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x.flip(2))  # [B,1+T*S,D] tokens; frames reversed
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # CLS, averaged over frames
    assert torch.allclose(a[:, 1:].mean(1), b[:, 1:].mean(1), atol=1e-5)
    assert any(k in "time_embed" for k in NO_DECAY_NAMES)


def test_unknown_model_suggests_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'swin3d_base'"):
        create_model("swin3d_bsae")


def test_swin_window_fits_small_inputs():
    from vssl_ds.models.swin3d import fit_window

    assert fit_window((2, 14, 14), (8, 7, 7), (4, 3, 3)) == ((2, 7, 7), (0, 3, 3))
    assert math.prod(fit_window((8, 5, 9), (8, 7, 7), (4, 3, 3))[0]) == 8 * 5 * 7


def test_compile_blocks_finds_every_kind_of_transformer_block():
    from vssl_ds.models.layers import compile_blocks

    for name, blocks in (("vit_micro_video", 2), ("swin3d_micro", 4), ("vit_micro_divided_st", 2)):
        kw, _ = _tiny_input(name)
        model = create_model(name, **kw)
        expected = sum(1 for m in model.modules() if getattr(m, "compilable_block", False))
        assert compile_blocks(model) == expected >= blocks


def test_model_compile_trains_the_same_as_eager():
    """model.compile=true: torch.compile of each encoder block in place; same loss, same gradients, same state-dict
    keys (checkpoints and released weights load unchanged), activation checkpointing still applies."""
    import numpy as np

    from vssl_ds.config import load_config
    from vssl_ds.data.batch import Batch
    from vssl_ds.methods import build_method, mask_fns

    sets = ["model.name=vit_micro_video", "model.img_size=32", "model.num_frames=8", "model.patch=8",
            "data.num_frames=8", "data.size=32", "method.mae.decoder_dim=32", "method.mae.decoder_depth=1",
            "method.mae.decoder_heads=2", "model.grad_ckpt=true"]
    runs = []
    for compiled in ("false", "true"):
        cfg = load_config("videomae_vit_b", [*sets, f"model.compile={compiled}"])
        torch.manual_seed(0)
        method = build_method(cfg).train()
        fn, _ = mask_fns(cfg)
        mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(2)]))
        video = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
        loss = method(Batch(video=video, mask=mask)).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in method.trainable.named_parameters()},
                     list(method.state_dict())))
    (eager_loss, eager_grads, eager_keys), (comp_loss, comp_grads, comp_keys) = runs
    assert comp_keys == eager_keys
    assert torch.allclose(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, g in eager_grads.items():
        assert torch.allclose(comp_grads[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_swin_through_xformers_agrees_with_math_on_gpu():
    """Relative-position bias and shift masks through xformers' kernel (bias padded to an aligned stride)."""
    _skip_unless_xformers_runs()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 112, 112, device="cuda")
    ref = create_model("swin3d_tiny", img_size=112, num_frames=16, attn_backend="math").cuda().eval()
    fast = create_model("swin3d_tiny", img_size=112, num_frames=16, attn_backend="xformers").cuda().eval()
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        want = ref(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x).float()
    assert (got - want).abs().max() / want.abs().max() < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_backend_on_gpu_is_one_that_runs():
    """auto never picks an xformers whose kernels do not load (a wheel built for another torch/CUDA)."""
    from vssl_ds.models.layers import resolve_backend
    from vssl_ds.models.layers.attention import xformers_unusable

    backend = resolve_backend("auto", torch.device("cuda"))
    assert backend == ("sdpa" if xformers_unusable() else "xformers")
    q = torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.bfloat16)
    assert torch.isfinite(attention(q, q, q, None, backend)).all()


def test_an_xformers_that_imports_but_cannot_run_is_never_chosen(monkeypatch):
    """The H200 case: xformers imports, its kernels fail at the first call → auto is SDPA (with a warning), an
    explicit xformers is an error that says why and what to do."""
    import importlib
    import types

    att = importlib.import_module("vssl_ds.models.layers.attention")  # the module (the package exports the function)

    def broken(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    fake_ops = types.SimpleNamespace(memory_efficient_attention=broken)
    monkeypatch.setitem(__import__("sys").modules, "xformers", types.SimpleNamespace(__version__="0.0.0-test"))
    monkeypatch.setattr(att, "_xformers_ops", lambda: fake_ops)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: torch.empty(0))  # no CUDA tensor on this machine
    att.xformers_unusable.cache_clear()
    try:
        assert "CUDA kernels do not run" in att.xformers_unusable()
        assert att.resolve_backend("auto", torch.device("cuda")) == "sdpa"
        with pytest.raises(RuntimeError, match="model.attn_backend=sdpa"):
            att.resolve_backend("xformers", torch.device("cuda"))
    finally:
        att.xformers_unusable.cache_clear()


def test_own_mlp_and_drop_path_match_timms():
    """The backbones use vssl_ds's DropPath / Mlp (no timm import per process): same parameter names, outputs and
    random draws as timm's, so timm checkpoints load and training randomness is unchanged."""
    from vssl_ds.compat import import_timm
    from vssl_ds.models.layers.common import DropPath, Mlp

    layers = import_timm().layers
    torch.manual_seed(0)
    ours, theirs = Mlp(8, 32), layers.Mlp(8, 32, act_layer=torch.nn.GELU)
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in theirs.named_parameters()]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 8)
    assert torch.equal(ours(x), theirs(x))
    outs = []
    for module in (DropPath(0.3), layers.DropPath(0.3)):
        torch.manual_seed(1)
        outs.append(module.train()(x.repeat(16, 1, 1)))  # 64 samples: some dropped
    assert torch.equal(outs[0], outs[1]) and (outs[0] == 0).all(-1).all(-1).any()
    assert torch.equal(DropPath(0.3).eval()(x), x)
