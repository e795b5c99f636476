"""Exported encoders: fp32 weights in safetensors with timm-style names, and a JSON of the architecture.

    encoder.safetensors   the encoder's state dict (patch_embed.proj.*, blocks.N.*, norm.*, ...; 2D ViTs with
                          their position table, exactly timm's VisionTransformer names)
    encoder.json          {"format", "model": {ModelConfig fields}, "extra": {create_model kwargs}, "timm": ...,
                          "method", "step", "source", "params"}

`load_exported(path)` rebuilds it with `create_model`; a 2D ViT also loads into timm directly:
    timm.create_model(info["timm"]["name"], **info["timm"]["kwargs"]).load_state_dict(load_file(path))
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

FORMAT = "vssl_ds.encoder/1"
ARCH_FIELDS = ("name", "img_size", "num_frames", "tubelet", "patch", "pos_embed", "window", "embed_dim", "depth", "num_heads",
               "swin_index", "swin_image_path")


def info_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_info(weights: str | Path) -> dict:
    path = info_path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"exported encoder '{weights}' has no architecture file {path}: export it with "
                                "tools/export.py, which writes both")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vssl_ds encoder description (format {info.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return info


def timm_spec(model: torch.nn.Module, name: str) -> dict | None:
    """For a 2D ViT: the timm model name and kwargs that give the same module (keys and features)."""
    if not name.startswith("vit2d"):
        return None
    blk = model.blocks[0]
    return {"name": "vit_base_patch16_224",
            "kwargs": {"img_size": model.grid[0] * model.patch_size, "patch_size": model.patch_size,
                       "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": blk.attn.heads,
                       "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
                       "class_token": model.cls_token is not None,
                       "global_pool": "token" if model.cls_token is not None else "avg", "num_classes": 0}}


def save_exported(model: torch.nn.Module, m, extra: dict, out: str | Path, meta: dict) -> dict:
    """Write `model` (built from ModelConfig `m` + create kwargs `extra`) as OUT.safetensors + OUT.json."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = {k: getattr(m, k) for k in ARCH_FIELDS}
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    if m.name.startswith("vit2d") and "pos_embed" not in state:  # a fixed table: written out, so timm (which
        state["pos_embed"] = model.pos_embed.detach().float().contiguous()  # learns it) gets the same model
        arch["pos_embed"] = "learned"
    save_file(state, str(out))
    _readable_by_group(out)  # safetensors creates 0600 files; an export is for colleagues too
    info = {"format": FORMAT, "model": arch, "extra": extra, "timm": timm_spec(model, m.name),
            "params": sum(v.numel() for v in state.values()), **meta}
    info_path(out).write_text(json.dumps(info, indent=1))
    return info


def _readable_by_group(path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # what open() would have made: rw-r--r-- under the usual 022


def load_exported(weights: str | Path, **model_overrides) -> tuple[torch.nn.Module, dict]:
    """Rebuild an exported encoder (strict load) → (model, info). `model_overrides` sets other ModelConfig
    fields (attn_backend, drop_path, grad_ckpt)."""
    from safetensors.torch import load_file

    from ..config.schema import ModelConfig
    from . import build_encoder

    info = read_info(weights)
    known = {f.name for f in fields(ModelConfig)}
    m = ModelConfig(**{**{k: v for k, v in info["model"].items() if k in known}, **model_overrides})
    model = build_encoder(m, **info.get("extra", {}))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model, info
