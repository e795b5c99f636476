"""Weights from elsewhere, offline: files on disk in the formats people have.

Every released layout is read by a table of rules (`_VIDEOMAE_RULES`, `_TIMESFORMER_RULES`, `_MAE_RULES`,
`_SWIN_RULES`): each key of the file is mapped into one part (the encoder, a decoder, the fine-tuning
`fc_norm` / `head`, …) or ignored by a rule that names why; a key no rule matches is an error that names it.
What a caller does not use is reported once.

- **VideoMAE / MVD** (`checkpoint-*.pth`, `{"model" | "module": …}`), pretraining and fine-tuned files, and
  vssl_ds's own `final_model.pt`:
  - `encoder.*` (VideoMAE pretraining) or un-prefixed `patch_embed / blocks / norm / cls_token` → encoder;
  - `decoder.*`, `encoder_to_decoder` (→ `embed`), `mask_token` → part `decoder` (VideoMAE's pixel decoder);
  - `decoder_{img,vid}.*`, `down_{img,vid}` (→ `embed`), `mask_token_{img,vid}` → parts `decoder_img` /
    `decoder_vid` (MVD's feature decoders); vssl_ds's `image_decoder.*` / `video_decoder.*` likewise;
  - `fc_norm.*` → part `fc_norm` (the fine-tuned model's norm of the *pooled* token), `head.*` → part `head`;
  - stored fixed position tables (`pos_embed`, `pos_embed_{img,vid}`) are compared with the table the model
    computes: a different table (MVD's 3D one into a 1D model) is an error naming `model.pos_embed`;
  - attention biases `q_bias` + `v_bias` (k has none) → `qkv.bias = [q_bias, 0, v_bias]`.
- **TimeSformer** (`.pyth`, `{"model_state": {"model.…"}}`): the `model.` prefix stripped (as the official
  `load_pretrained`), `head.*` → part `head`, the rest (with `temporal_*`, `time_embed`) → the divided ViT.
- **MAE-style pretraining** (ViC-MAE / MAE `{"model": …}`): `decoder_embed / decoder_blocks / decoder_norm /
  decoder_pred / mask_token` → part `decoder` (its `decoder_pos_embed` checked), `projector.*` → part
  `projector`, the rest → the 2D ViT encoder.
- **Video Swin / BEVT** (mmaction, `{"state_dict": …}`): `backbone.` prefix dropped; `cls_head.`, BEVT's
  pretraining head kept in the backbone (`lm_down*`, `fpn*`), `relative_position_index` and `attn_mask`
  buffers ignored by named rules; BEVT's `patch_embed_2d` loads when the model has an image embedding.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A weight file split by what each part initialises (keys already in vssl_ds's module names)."""
    path: str
    fmt: str
    encoder: dict[str, torch.Tensor]
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # decoder | decoder_img | … | head
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # fixed position tables stored in the file
    ignored: dict[str, str] = field(default_factory=dict)  # file key → the rule that leaves it out


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors / .pth / .pt / .bin / .pyth, unwrapped from `model` / `module` /
    `state_dict` / `model_state`."""
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
        raise ValueError(f"'{path}' is not a state dict (nor one under 'model'/'module'/'state_dict'/'model_state')")
    return dict(obj)


# (pattern on the file key, destination, replacement). Destination: a part name ("encoder", "decoder", …),
# "table:<part>" for a stored fixed position table, or "ignore:<why>". The first full match wins.
_VIDEOMAE_RULES = [
    (r"encoder\.pos_embed", "table:encoder", ""),
    (r"encoder\.(.*)", "encoder", r"\1"),
    (r"encoder_to_decoder\.(.*)", "decoder", r"embed.\1"),
    (r"mask_token", "decoder", "mask_token"),
    (r"decoder\.(.*)", "decoder", r"\1"),
    (r"down_(img|vid)\.(.*)", r"decoder_\1", r"embed.\2"),
    (r"mask_token_(img|vid)", r"decoder_\1", "mask_token"),
    (r"pos_embed_(img|vid)", r"table:decoder_\1", ""),
    (r"decoder_(img|vid)\.(.*)", r"decoder_\1", r"\2"),
    (r"image_decoder\.(.*)", "decoder_img", r"\1"),
    (r"video_decoder\.(.*)", "decoder_vid", r"\1"),
    (r"fc_norm\.(.*)", "fc_norm", r"\1"),
    (r"head\.(.*)", "head", r"\1"),
    (r"pos_embed", "table:encoder", ""),
    (r"((?:patch_embed|blocks|norm|cls_token)(?:\..*)?)", "encoder", r"\1"),
]
_TIMESFORMER_RULES = [  # facebookresearch/TimeSformer .pyth: {"model_state": {"model.…"}} (the registry wraps the ViT)
    (r"model\.(.*)", "again", r"\1"),
    (r"head\.(.*)", "head", r"\1"),
    (r"((?:cls_token|pos_embed|time_embed|patch_embed|blocks|norm)(?:\..*)?)", "encoder", r"\1"),
]
_MAE_RULES = [  # MAE-style pretraining (ViC-MAE, MAE): {"model": encoder, decoder_*, mask_token[, projector]}
    (r"mask_token", "decoder", "mask_token"),
    (r"decoder_pos_embed", "table:decoder", ""),
    (r"decoder_embed\.(.*)", "decoder", r"embed.\1"),
    (r"decoder_blocks\.(.*)", "decoder", r"blocks.\1"),
    (r"decoder_norm\.(.*)", "decoder", r"norm.\1"),
    (r"decoder_pred\.(.*)", "decoder", r"head.\1"),
    (r"projector\.(.*)", "projector", r"\1"),
    (r"(fc_norm|head)\.(.*)", r"\1", r"\2"),
    (r"pos_embed", "table:encoder", ""),
    (r"((?:cls_token|patch_embed|blocks|norm)(?:\..*)?)", "encoder", r"\1"),
]
_SWIN_RULES = [
    (r"backbone\.(.*)", "again", r"\1"),
    (r".*relative_position_index|.*attn_mask", "ignore:a buffer the model computes from its window", ""),
    (r"cls_head\.fc_cls\.(.*)", "head", r"\1"),  # mmaction's I3DHead: the classifier
    (r"cls_head\.lm_head\.(.*)", "lm_head", r"\1"),  # BEVT's token classifier
    (r"cls_head\.vae_encoder\.(.*)", "tokenizer", r"\1"),  # BEVT's head holds the DALL-E encoder
    (r"neck\..*", "ignore:an mmaction neck (not part of the encoder)", ""),
    (r"encoder\.(.*)", "again", r"\1"),  # vssl_ds's own BEVT runs (encoder.*, fpn_s.*, lm_head.*)
    (r"(fpn|fpn_s|fpn_t|lm_down_st)\.0\.(.*)", "bevt_head", r"\1.\2"),  # BEVT's head inside the backbone
    (r"((?:fpn|fpn_s|fpn_t|lm_down_st|lm_down)\.(?:weight|bias))", "bevt_head", r"\1"),
    (r"lm_head\.(.*)", "lm_head", r"\1"),
    (r"(.*)", "encoder", r"\1"),
]


def stored_patch(path: str | Path) -> int | None:
    """The patch size of the image ViT in a weight file (its patch-embedding kernel), None when it has none."""
    kernels = {tuple(v.shape[-2:]) for k, v in load_file(path).items()
               if k.endswith("patch_embed.proj.weight") and v.dim() == 4}
    if len(kernels) == 1 and len(next(iter(kernels))) == 2 and len(set(next(iter(kernels)))) == 1:
        return next(iter(kernels))[0]
    return None


def _apply_rules(sd: dict, rules: list, path: str, fmt: str) -> Checkpoint:
    """Split `sd` by `rules`; a `module.` prefix (DDP / DeepSpeed wrappers) is dropped in every layout."""
    ck = Checkpoint(str(path), fmt, {})
    for key, value in sd.items():
        k = key.removeprefix("module.")
        while True:
            for pattern, dest, repl in rules:
                m = re.fullmatch(pattern, k)
                if m:
                    break
            else:
                raise ValueError(f"'{path}' ({fmt} layout): unexpected key '{key}' — no rule maps it; is this the "
                                 "file you meant? (the layouts vssl_ds reads are listed in vssl_ds/models/weights.py)")
            if dest != "again":
                break
            k = m.expand(repl)
        dest = m.expand(dest)
        if dest.startswith("ignore:"):
            ck.ignored[key] = dest.removeprefix("ignore:")
        elif dest.startswith("table:"):
            ck.tables[dest.removeprefix("table:")] = value
        else:
            part = ck.encoder if dest == "encoder" else ck.parts.setdefault(dest, {})
            part[m.expand(repl)] = value
    for part in [ck.encoder, *ck.parts.values()]:
        _fuse_qv_bias(part)
    return ck


def _fuse_qv_bias(sd: dict) -> None:
    """VideoMAE's attention has q_bias and v_bias but no k bias → one qkv.bias = [q_bias, 0, v_bias]."""
    for k in [k for k in sd if k.endswith("attn.q_bias")]:
        q, vb = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), vb])


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
    """Swin 2D state dict (official layout or timm ≥ 0.9) → keys and shapes of `model` (a VideoSwin). As BEVT's
    `inflate_weights`: `module.` / `backbone.` / `encoder.` prefixes stripped, `fc_norm` → `norm`, and a model with
    an image patch embedding (BEVT) keeps the 2D kernel there as it is."""
    sd2d = {re.sub(r"^(module\.|backbone\.|encoder\.)+", "", k): v for k, v in sd2d.items()}
    sd2d = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in sd2d.items()}
    timm_layout = not any(k.startswith("layers.0.downsample") for k in sd2d)
    out = {}
    if getattr(model, "patch_embed_2d", None) is not None:
        out.update({k.replace("patch_embed.", "patch_embed_2d.", 1): v for k, v in sd2d.items()
                    if k.startswith("patch_embed.")})
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


def load_into(module: nn.Module, sd: dict, what: str, allow_missing=()) -> None:
    """Strict: every key of `sd` must land and every parameter of `module` must be given, but for the ones a
    method adds on top of a released encoder (`allow_missing`: mask / CLS tokens)."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{what}: {str(e)[:600]} — is the model name/size right for this file?") from None
    missing = [k for k in missing if not any(a in k for a in allow_missing)]
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:6]}; is the model name/size right for this file?")


def bevt_image_stage(sd: dict) -> tuple[dict, dict]:
    """A vssl_ds BEVT image-only stage (encoder.* with patch_embed_2d and no 3D patch embedding, + its image
    head) → (the encoder as a 2D Swin state dict, {key: why left out} for the head)."""
    out, ignored = {}, {}
    for k, v in sd.items():
        k2 = re.sub(r"^(module\.)?(encoder\.)?", "", k)
        if k2.startswith(("fpn", "lm_down", "lm_head")):
            ignored[k] = "the image stage's token head (the joint stage starts its head afresh, as the official code)"
        else:
            out[k2.replace("patch_embed_2d.", "patch_embed.", 1)] = v
    return out, ignored


def detect_format(sd: dict) -> str:
    keys = list(sd)
    patch = next((sd[k] for k in keys if k.endswith("patch_embed.proj.weight")), None)
    if any("relative_position_bias_table" in k for k in keys):
        return "video_swin" if patch is not None and patch.dim() == 5 else "swin2d"
    if any(".temporal_attn." in k for k in keys):
        return "timesformer"
    if any(k.startswith(("decoder_blocks.", "decoder_embed.")) for k in keys):
        return "mae"
    if any(k.endswith("attn.q_bias") for k in keys) or any(k.startswith(("encoder.", "module.encoder.")) for k in keys):
        return "videomae"
    if patch is not None and patch.dim() == 4:
        return "vit2d"
    return "native"


def read_checkpoint(path: str | Path, model: nn.Module, mode: str = "average") -> Checkpoint:
    """Read `path` and split it by the rules of its layout; 2D files are inflated to `model`'s shapes. A Hugging
    Face VideoMAE folder (config.json + model.safetensors) is renamed to the official VideoMAE layout first."""
    from .hf import is_hf_folder, read_hf_folder

    if is_hf_folder(path):
        return _apply_rules(read_hf_folder(path), _VIDEOMAE_RULES, path, "hf_videomae")
    sd = load_file(path)
    fmt = detect_format(sd)
    from .swin3d import VideoSwin
    from .vit import VideoViT

    if fmt == "videomae":
        return _apply_rules(sd, _VIDEOMAE_RULES, path, fmt)
    if fmt == "video_swin":
        return _apply_rules(sd, _SWIN_RULES, path, fmt)
    if fmt == "timesformer":
        return _apply_rules(sd, _TIMESFORMER_RULES, path, fmt)
    if fmt == "mae":
        return _apply_rules(sd, _MAE_RULES, path, fmt)
    if fmt == "swin2d" and isinstance(model, VideoSwin) and any(k.endswith("patch_embed_2d.proj.weight") for k in sd):
        sd, ignored = bevt_image_stage(sd)
        log.info("'%s' is a BEVT image-only stage: its 2D patch embedding fills the image one and is inflated "
                 "into the video one (as the official inflate_weights)", path)
        return Checkpoint(str(path), "bevt_image_stage", inflate_swin(sd, model, mode), ignored=ignored)
    if fmt == "swin2d" and isinstance(model, VideoSwin):
        sd = inflate_swin(sd, model, mode)
    elif fmt == "vit2d" and isinstance(model, VideoViT):
        sd = inflate_vit(sd, model, mode)
    return Checkpoint(str(path), fmt, sd)


def table_kind(table: torch.Tensor, grid: tuple, dim: int) -> str:
    """Which fixed sin-cos table `table` [1,N,D] is, over a (t, h, w) token grid: the `model.pos_embed` value."""
    from .layers import sincos_3d_table, sincos_table

    candidates = {"sincos": lambda: sincos_table(table.shape[1], dim)}
    if len(grid) == 3 and math.prod(grid) == table.shape[1]:
        candidates["sincos3d"] = lambda: sincos_3d_table(grid, dim)
    for name, make in candidates.items():
        try:
            ref = make()
        except ValueError:  # a width that table cannot have
            continue
        if ref.shape == table.shape and torch.allclose(ref, table.float(), atol=1e-5):
            return name
    return "learned"


def check_table(stored: torch.Tensor, module: nn.Module, what: str, field_name: str) -> None:
    """A fixed table stored in a file must be the one `module` computes (else the file was trained with another)."""
    own = module.pos_embed
    if stored.shape[1] == own.shape[1] + 1 and not stored[:, 0].any():
        stored = stored[:, 1:]  # MAE's tables carry a zero row for the CLS token, which gets no position here
    if own.shape == stored.shape and torch.allclose(own.float(), stored.float(), atol=1e-5):
        return
    grid = getattr(module, "grid", (own.shape[1],))
    have, want = table_kind(own, grid, own.shape[-1]), table_kind(stored, grid, stored.shape[-1])
    raise ValueError(f"{what}: the file's position table is {want!r} {tuple(stored.shape)} but the model uses "
                     f"{have!r} {tuple(own.shape)}: set {field_name}={want}" if want != "learned" else
                     f"{what}: the file's position table {tuple(stored.shape)} is not the fixed table the model "
                     f"computes ({have}); a learned table needs {field_name}=learned")


def load_encoder(model: nn.Module, ck: Checkpoint, drop: tuple[str, ...] = ()) -> None:
    """Load the encoder part of `ck` into `model` (strict), checking or loading its position table. `drop`:
    encoder key prefixes deliberately left out (fine-tuning drops the pretrained final norm)."""
    what = f"loading '{ck.path}' ({ck.fmt} format) into {type(model).__name__}"
    sd = {k: v for k, v in ck.encoder.items() if not k.startswith(drop)}
    own = getattr(model, "pos_embed", None)
    stored = ck.tables.get("encoder")
    if stored is None and not isinstance(own, nn.Parameter) and "pos_embed" in sd:
        stored = sd.pop("pos_embed")  # a file that stores the fixed table the model computes
    if stored is not None and isinstance(own, nn.Parameter):
        sd["pos_embed"] = stored
    elif stored is not None and own is not None:
        check_table(stored, model, what, "model.pos_embed")
    if getattr(model, "patch_embed_2d", True) is None:  # BEVT's image patch embedding, for a video-only model
        sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed_2d.")}
    from .vit_divided import DividedViT

    allow = ("mask_token", "cls_token") + (("temporal_", "time_embed") if isinstance(model, DividedViT) else ())
    load_into(model, sd, what, allow)


def report_unused(ck: Checkpoint, used: tuple[str, ...] = (), who: str = "") -> None:
    """One log line naming what of the file is not used (parts, ignored keys) — never silent."""
    unused = {p: len(v) for p, v in ck.parts.items() if p not in used}
    if unused or ck.ignored:
        log.info("%s: not used from '%s': %s%s", who or "loader", ck.path,
                 ", ".join(f"{p} ({n} tensors)" for p, n in unused.items()),
                 (("; " if unused else "") + "ignored: " + ", ".join(sorted(set(ck.ignored.values())))) if ck.ignored else "")


def load_pretrained(model: nn.Module, path: str | Path, mode: str = "average", drop: tuple[str, ...] = ()) -> Checkpoint:
    """Load the encoder of any supported file into `model` → the split checkpoint (its other parts — decoders,
    fc_norm, head — for the caller that uses them)."""
    ck = read_checkpoint(path, model, mode)
    load_encoder(model, ck, drop)
    return ck


def load_part(module: nn.Module, ck: Checkpoint, part: str, field_name: str) -> bool:
    """Load part `part` of `ck` (a decoder, fc_norm, head) into `module` strictly; False when the file has none.
    A stored fixed position table is checked against the module's."""
    if part not in ck.parts:
        return False
    what = f"loading {part} of '{ck.path}' into {type(module).__name__}"
    if part in ck.tables and getattr(module, "pos_embed", None) is not None:
        check_table(ck.tables[part], module, what, field_name)
    load_into(module, ck.parts[part], what + f" (check {field_name})")
    return True
