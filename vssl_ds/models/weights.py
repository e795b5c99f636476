"""Weights from elsewhere, offline: files on disk in the formats people have.

Key mappings (documented here, tested in tests/test_weights.py):
- **VideoMAE / MVD** (`checkpoint-*.pth`, `{"model": …}`): pretraining checkpoints prefix the encoder with
  `encoder.` (dropped), keep the decoder(s) in `decoder*.`, `encoder_to_decoder*`, `mask_token` (ignored);
  attention biases are `q_bias` + `v_bias` (k has none) → `qkv.bias = [q_bias, 0, v_bias]`; fine-tuned
  checkpoints put the last norm in `fc_norm` (→ `norm`) and a classifier in `head` (ignored).
- **Video Swin / BEVT** (mmaction, `{"state_dict": …}`): `backbone.` prefix dropped; `cls_head.`, BEVT's
  pretraining head kept in the backbone (`lm_down*`, `fpn*`), `relative_position_index` and `attn_mask`
  buffers ignored; BEVT's `patch_embed_2d` loads when the model has an image embedding. Names are otherwise
  the official ones.
- **timm 2D ViT → video ViT** (inflation): the patch kernel `[D,C,p,p]` becomes `[D,C,t,p,p]`, either
  averaged over t (`average`) or on the centre slice (`central`); a learned position table is resized
  to the grid and repeated over time; the CLS entry is dropped when the video model has no CLS.
- **Swin 2D (official or timm ≥ 0.9 layout) → Video Swin**: the patch kernel is inflated as above; each
  relative-position table `[(2Wh-1)(2Ww-1),H]` is repeated over the `2Wt-1` temporal offsets; timm's
  downsample that opens stage i becomes the official one that closes stage i-1.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors / .pth / .pt / .bin, unwrapped from `model` / `module` / `state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file '{path}' does not exist (vssl_ds never downloads: give a local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_st

        return load_st(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - official checkpoints pickle argparse Namespaces next to the weights
        log.warning("'%s' holds more than tensors; loading it with full unpickling (only use files you trust)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "module", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' is not a state dict (nor one under 'model'/'module'/'state_dict')")
    return dict(obj)


def from_videomae(sd: dict) -> dict:
    """VideoMAE / MVD checkpoint (pretraining or fine-tuning) → VideoViT keys."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("encoder."):
            k = k.removeprefix("encoder.")
        elif k.startswith(("decoder", "encoder_to_decoder", "mask_token", "teacher")):
            continue  # the pretraining decoders and their tokens are not part of the encoder
        if k.startswith("head."):
            continue
        out[k.replace("fc_norm.", "norm.")] = v
    for k in [k for k in out if k.endswith(".attn.q_bias")]:
        q, vb = out.pop(k), out.pop(k.replace("q_bias", "v_bias"))
        out[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), vb])
    return out


def from_video_swin(sd: dict) -> dict:
    """Official Video Swin / BEVT (mmaction) checkpoint → VideoSwin keys. BEVT keeps its pretraining head in the
    backbone (`lm_down*`, `fpn*`): dropped, like the classification head."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if k.startswith(("cls_head", "neck", "lm_down", "fpn")) or k.endswith(("relative_position_index", "attn_mask")):
            continue
        out[k] = v
    return out


def inflate_patch(w2d: torch.Tensor, t: int, mode: str = "average") -> torch.Tensor:
    """[D,C,p,p] → [D,C,t,p,p]; a static clip gives the 2D response either way."""
    if mode == "average":
        return w2d.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    if mode == "central":
        w = torch.zeros(*w2d.shape[:2], t, *w2d.shape[2:], dtype=w2d.dtype)
        w[:, :, t // 2] = w2d
        return w
    raise ValueError(f"inflation mode must be 'average' or 'central', got '{mode}'")


def _resize_grid(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1,N,D] over a square grid → [1,h*w,D] (bicubic, as timm does for other image sizes)."""
    n = table.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table of {n} entries is not a square grid")
    if (side, side) == tuple(grid):
        return table
    x = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(table.dtype)


def inflate_vit(sd2d: dict, model: nn.Module, mode: str = "average") -> dict:
    """timm 2D ViT state dict → keys and shapes of `model` (a VideoViT)."""
    out = {k: v for k, v in sd2d.items() if not k.startswith(("head", "fc_norm", "pos_embed", "patch_embed.proj.weight"))}
    t = model.patch_size[0]
    out["patch_embed.proj.weight"] = inflate_patch(sd2d["patch_embed.proj.weight"], t, mode)
    if "cls_token" in out and getattr(model, "cls_token", None) is None:
        out.pop("cls_token")
    if isinstance(model.pos_embed, nn.Parameter) and "pos_embed" in sd2d:
        table = sd2d["pos_embed"]
        table = table[:, table.shape[1] - math.isqrt(table.shape[1]) ** 2:]  # drop CLS / prefix entries
        spatial = _resize_grid(table, model.grid[1:])
        out["pos_embed"] = spatial.repeat(1, model.grid[0], 1)  # (t, h, w) order: the same table for every t
    return out


def inflate_swin(sd2d: dict, model: nn.Module, mode: str = "average") -> dict:
    """Swin 2D state dict (official layout or timm ≥ 0.9) → keys and shapes of `model` (a VideoSwin)."""
    timm_layout = not any(k.startswith("layers.0.downsample") for k in sd2d)
    out = {}
    for k, v in sd2d.items():
        if k.startswith(("head", "norm_pre")) or k.endswith(("relative_position_index", "attn_mask")):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if timm_layout and m:  # timm merges at the start of stage i; the official code at the end of i-1
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k] = v
    target = model.state_dict()
    out["patch_embed.proj.weight"] = inflate_patch(sd2d["patch_embed.proj.weight"], model.patch_size[0], mode)
    for k in [k for k in out if k.endswith("relative_position_bias_table")]:
        need = target[k].shape[0]
        reps = need // out[k].shape[0]
        if reps * out[k].shape[0] != need:
            raise ValueError(f"{k}: 2D table of {out[k].shape[0]} rows does not inflate to {need} "
                             "(the 2D window must equal the video window's spatial size)")
        out[k] = out[k].repeat(reps, 1)  # temporal offset is the slowest index of the 3D table
    return out


def load_into(model: nn.Module, sd: dict, what: str, allow_missing=("mask_token", "cls_token")) -> None:
    """Strict about everything but the parameters a pretraining method adds (mask/CLS tokens)."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{what}: {str(e)[:600]} — is the model name/size right for this file?") from None
    missing = [k for k in missing if not any(a in k for a in allow_missing)]
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:6]}; is the model name/size right for this file?")


def detect_format(sd: dict) -> str:
    keys = list(sd)
    patch = next((sd[k] for k in keys if k.endswith("patch_embed.proj.weight")), None)
    if any("relative_position_bias_table" in k for k in keys):
        return "video_swin" if patch is not None and patch.dim() == 5 else "swin2d"
    if any(k.endswith("attn.q_bias") for k in keys) or any(k.startswith(("encoder.", "module.encoder.")) for k in keys):
        return "videomae"
    if patch is not None and patch.dim() == 4:
        return "vit2d"
    return "native"


def load_pretrained(model: nn.Module, path: str | Path, mode: str = "average") -> str:
    """Load any supported file into `model`, converting by detected format; → the format it used."""
    sd = load_file(path)
    fmt = detect_format(sd)
    from .swin3d import VideoSwin
    from .vit import VideoViT

    if fmt == "videomae":
        sd = from_videomae(sd)
    elif fmt == "video_swin":
        sd = from_video_swin(sd)
    elif fmt == "swin2d" and isinstance(model, VideoSwin):
        sd = inflate_swin(sd, model, mode)
    elif fmt == "vit2d" and isinstance(model, VideoViT):
        sd = inflate_vit(sd, model, mode)
    if getattr(model, "patch_embed_2d", True) is None:  # BEVT's image patch embedding, for a video-only model
        sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed_2d.")}
    if "pos_embed" in sd and not isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        sd.pop("pos_embed")  # the model uses its fixed sin-cos table
    from .vit_divided import DividedViT

    allow = ("mask_token", "cls_token") + (("temporal_", "time_embed") if isinstance(model, DividedViT) else ())
    load_into(model, sd, f"loading '{path}' ({fmt} format) into {type(model).__name__}", allow)
    return fmt
