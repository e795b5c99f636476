"""Frozen teachers from a timm name or a local file, offline when the weights are local.

    build_teacher("timm:vit_base_patch16_224.mae", weights="/models/mae_vitb.pth")   # any timm ViT
    build_teacher("vit_base_video", weights="/models/videomae_vitb_k400.pth")         # a vssl_ds model
    build_teacher("vit2d_base_patch16", weights="/models/mae_pretrain_vit_base.pth")
    build_teacher("vit2d_base_patch16", weights="runs/x/export/encoder.safetensors")    # tools/export.py output

`Teacher.forward(x, norm=False)` returns tokens `[B,N,D]` without the prefix (CLS) tokens: the last block's
output without the final norm (MVD's targets), or after it with `norm=True`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..models import create_model
from ..models.weights import load_pretrained, report_unused

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen encoder: eval mode always (dropout / drop path off), no gradients."""

    def __init__(self, encoder: nn.Module, num_prefix: int, timm_model: bool):
        super().__init__()
        self.encoder, self.num_prefix, self.timm_model = encoder, num_prefix, timm_model
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.embed_dim = getattr(encoder, "embed_dim", None) or getattr(encoder, "num_features")
        cfg = getattr(encoder, "pretrained_cfg", None) or {}  # timm: the normalisation the weights were trained with
        self.norm_stats = (tuple(cfg["mean"]), tuple(cfg["std"])) if timm_model and "mean" in cfg else None

    def renormalise(self, x: torch.Tensor, mean, std) -> torch.Tensor:
        """Input normalised with (mean, std) [B,C,H,W] → normalised as the model expects (CLIP-family and
        Inception-style weights have their own mean / std; vssl_ds models take the data's)."""
        if self.norm_stats is None or (tuple(self.norm_stats[0]), tuple(self.norm_stats[1])) == (tuple(mean), tuple(std)):
            return x
        view = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # noqa: E731
        pixels = x * view(std) + view(mean)
        return (pixels - view(self.norm_stats[0])) / view(self.norm_stats[1])

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    @torch.no_grad()
    def forward(self, x: torch.Tensor, norm: bool = False) -> torch.Tensor:
        x = x.to(next(self.encoder.parameters()).dtype)  # the engine may hold teachers in bf16 / fp16
        if self.timm_model:  # timm's ViT internals: the same steps as forward_features, norm optional
            m = self.encoder
            h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            h = m.blocks(h)
            h = m.norm(h) if norm else h
        else:
            h = self.encoder(x, norm=norm)
        return h[:, self.num_prefix:]


def build_teacher(spec: str, weights: str = "", **model_kwargs) -> Teacher:
    """`timm:<name>` (weights from `weights` if given, else timm's own cache/hub) or a vssl_ds model name
    (weights required: VideoMAE / MVD / BEVT / timm-format files are converted, see models/weights.py)."""
    if spec.startswith("timm:"):
        from ..compat import import_timm

        timm = import_timm()
        name = spec.removeprefix("timm:")
        kwargs = dict(num_classes=0, **model_kwargs)
        if weights:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"teacher weights '{weights}' for {spec} do not exist")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - timm raises many kinds when a hub download is impossible
            raise RuntimeError(f"cannot build teacher {spec}: {e}. Offline, save the weights to a file and pass "
                               "it as the teacher's weights") from e
        log.info("teacher %s loaded%s", spec, f" from {weights}" if weights else "")
        return Teacher(model, getattr(model, "num_prefix_tokens", 1), timm_model=True)
    if not weights:
        raise ValueError(f"teacher '{spec}' needs a weight file (a vssl_ds model is never pretrained by itself)")
    from ..models.exported import info_path, load_exported

    if info_path(weights).is_file() and str(weights).endswith(".safetensors"):  # exported: its JSON has the arch
        model, info = load_exported(weights)
        arch = info["model"]
        if arch["name"] != spec:
            raise ValueError(f"teacher '{spec}': {weights} holds a {arch['name']} (name that model instead)")
        differ = {k: (v, arch[k]) for k, v in model_kwargs.items() if k in arch and v != arch[k]}
        if differ:
            raise ValueError(f"teacher '{spec}' from {weights}: the input needs " + ", ".join(
                f"{k}={v}" for k, (v, _) in differ.items()) + " but the exported encoder was built with " + ", ".join(
                f"{k}={a}" for k, (_, a) in differ.items()) + " (see its .json)")
        log.info("teacher %s loaded from %s (exported by vssl_ds, %s step %s)", spec, weights, info.get("method"),
                 info.get("step"))
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
        return Teacher(model, prefix, timm_model=False)
    model = create_model(spec, **model_kwargs)
    ck = load_pretrained(model, weights)
    log.info("teacher %s loaded from %s (%s format)", spec, weights, ck.fmt)
    report_unused(ck, who=f"teacher {spec}")
    prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    return Teacher(model, prefix, timm_model=False)
