"""Supervised heads on a pretrained encoder, as Methods on the same spine as pretraining:

    finetune   encoder + linear head, all trained: layer-wise lr decay, drop path, mixup / cutmix, label smoothing
    linear     frozen encoder → pooled feature → BatchNorm (no affine) → linear (MAE's linear probe)
    attentive  frozen encoder → all tokens → one learned query cross-attends (+ MLP) → LayerNorm → linear

The encoder comes from `eval.weights` (tools/export.py) or is randomly initialised (the baseline).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..methods.base import NO_DECAY_NAMES, Method, StepOutput
from ..models import build_encoder
from ..models.vit2d import ViT2D

log = logging.getLogger(__name__)


def official_pooling(encoder: nn.Module, pool: str) -> bool:
    """VideoMAE / MVD / MAE fine-tuning: a ViT pooled by the mean of its tokens drops the pretrained final norm
    and applies a fresh LayerNorm (`fc_norm`) to the pooled token."""
    mean = pool == "mean" or (pool == "auto" and getattr(encoder, "cls_token", None) is None)
    return mean and hasattr(encoder, "blocks") and isinstance(getattr(encoder, "norm", None), nn.LayerNorm)


def build_eval_encoder(cfg: Config, finetune: bool = False) -> tuple[nn.Module, object, bool]:
    """The encoder under evaluation → (encoder, Checkpoint or None, fc_norm?). Weights: `eval.weights` (an
    export of tools/export.py, or any released checkpoint weights.py reads), else `model.pretrained`, else a
    random init (the baseline). With `finetune` and mean pooling of a ViT the final norm is dropped (Identity)."""
    from dataclasses import replace

    from ..models.exported import info_path, load_exported
    from ..models.weights import load_pretrained

    m, e = cfg.model, cfg.eval
    path = e.weights or m.pretrained
    ck = None
    exported = e.weights.endswith(".safetensors") and info_path(e.weights).is_file()
    if exported:
        model, info = load_exported(e.weights, attn_backend=m.attn_backend, drop_path=m.drop_path,
                                    grad_ckpt=m.grad_ckpt)
        log.info("encoder %s from %s (exported: %s, step %s)", info["model"]["name"], e.weights, info.get("method"),
                 info.get("step"))
        path = ""
    else:
        model = build_encoder(replace(m, pretrained=""))
    fc_norm = finetune and official_pooling(model, e.pool)
    if fc_norm:
        model.norm = nn.Identity()  # the official fine-tuning model has no per-token final norm
    if path:
        ck = load_pretrained(model, path, drop=("norm.",) if fc_norm else ())
        log.info("encoder %s initialised from %s (%s format)%s", m.name, path, ck.fmt,
                 "; its final norm is not used (mean pooling → fc_norm, as the official fine-tuning)"
                 if fc_norm and any(k.startswith("norm.") for k in ck.encoder) else "")
    elif not exported:
        log.info("encoder %s randomly initialised (no eval.weights, no model.pretrained): the baseline", m.name)
    return model, ck, fc_norm


def encoder_tokens(encoder: nn.Module, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """video [B,C,T,H,W] → (patch tokens [B,L,D] after the final norm, CLS [B,D] or None). A 2D ViT encodes
    every frame on its own (its tokens are concatenated over frames, its CLS averaged)."""
    if isinstance(encoder, ViT2D):  # an image ViT (ViC-MAE, image models)
        b = video.shape[0]
        x = encoder(rearrange(video, "b c t h w -> (b t) c h w"))
        p = encoder.num_prefix
        cls = x[:, 0].reshape(b, -1, x.shape[-1]).mean(1) if p else None
        return rearrange(x[:, p:], "(b t) n d -> b (t n) d", b=b), cls
    x = encoder(video)
    if x.dim() == 5:  # Swin [B,C,T,H,W]
        return rearrange(x, "b c t h w -> b (t h w) c"), None
    p = 1 if getattr(encoder, "cls_token", None) is not None else 0
    return x[:, p:], (x[:, 0] if p else None)


def pooled(encoder: nn.Module, video: torch.Tensor, pool: str) -> torch.Tensor:
    """One feature per clip: CLS (pool=cls, or auto with a CLS token) or the mean of the patch tokens.  # [B,D]"""
    tokens, cls = encoder_tokens(encoder, video)
    if pool == "cls" or (pool == "auto" and cls is not None):
        if cls is None:
            raise ValueError("eval.pool=cls needs an encoder with a CLS token; use eval.pool=mean")
        return cls
    return tokens.mean(1)


def feature_dim(encoder: nn.Module) -> int:
    return getattr(encoder, "num_features", None) or encoder.embed_dim


class FinetuneNet(nn.Module):
    """encoder → pooled feature (→ `fc_norm` for mean-pooled ViTs, as VideoMAE's fine-tuning model) → head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str, dropout: float, init_scale: float,
                 fc_norm: bool = False):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.fc_norm = nn.LayerNorm(feature_dim(encoder), eps=1e-6) if fc_norm else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim(encoder), num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)

    def features(self, video: torch.Tensor) -> torch.Tensor:  # [B,D]
        if self.fc_norm is None:
            return pooled(self.encoder, video, self.pool)
        tokens, _ = encoder_tokens(self.encoder, video)  # the encoder's norm is Identity here
        return self.fc_norm(tokens.mean(1))

    def forward(self, video):
        return self.head(self.dropout(self.features(video)))


class LinearHead(nn.Module):
    """MAE's linear probe: BatchNorm without affine parameters, then a linear layer (trunc_normal 0.01)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feature):  # [B,D]
        return self.fc(self.bn(feature.to(self.fc.weight.dtype)))  # the engine may hold the head in bf16


class AttentiveHead(nn.Module):
    """One learned query cross-attends over all tokens, a residual MLP, LayerNorm, linear (V-JEPA's probe)."""

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"eval.probe_heads={heads} does not divide the encoder width {dim}")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_kv, self.q, self.kv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), \
            nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens):  # [B,L,D]
        b = tokens.shape[0]
        kv = self.kv(self.norm_kv(tokens.to(self.q.weight.dtype)))
        k, v = rearrange(kv, "b l (two h d) -> two b h l d", two=2, h=self.heads)
        q = rearrange(self.q(self.query.expand(b, -1, -1)), "b l (h d) -> b h l d", h=self.heads)
        x = self.query + self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
        x = x + self.mlp(self.norm_mlp(x))
        return self.fc(self.norm(x[:, 0]))


def load_classifier_parts(net: FinetuneNet, ck) -> None:
    """A fine-tuned checkpoint brings its `fc_norm` (the norm of the pooled token) and, when the class counts
    agree, its head; whatever is not used is reported by name."""
    from ..models.weights import load_part, report_unused

    used = []
    if net.fc_norm is not None and load_part(net.fc_norm, ck, "fc_norm", "eval.pool"):
        used.append("fc_norm")
    head = ck.parts.get("head", {})
    if head and head.get("weight") is not None and head["weight"].shape == net.head.weight.shape:
        load_part(net.head, ck, "head", "eval.num_classes")
        used.append("head")
        log.info("fc_norm and head restored from %s (a fine-tuned checkpoint)", ck.path)
    elif head:
        log.info("the head of %s (%s classes) is not used: %d classes here, a fresh head", ck.path,
                 head["weight"].shape[0] if "weight" in head else "?", net.head.out_features)
    report_unused(ck, used=tuple(used), who="fine-tuning")


def num_classes_of(cfg: Config) -> int:
    if cfg.eval.num_classes > 0:
        return cfg.eval.num_classes
    if cfg.data.train.endswith(".json") and Path(cfg.data.train).is_file():
        classes = json.loads(Path(cfg.data.train).read_text()).get("classes") or []
        if classes:
            return len(classes)
    raise ValueError(f"cannot tell the number of classes: data.train ({cfg.data.train or 'empty'}) is not a "
                     "manifest with a 'classes' list; set eval.num_classes")


def mix(video: torch.Tensor, labels: torch.Tensor, num_classes: int, e, rng: np.random.Generator):
    """Mixup or cutmix (the same box on every frame) with label smoothing → (video, soft targets [B,K])."""
    off = e.label_smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=video.device)
    target.scatter_(1, labels[:, None], 1.0 - e.label_smoothing + off)
    if (e.mixup <= 0 and e.cutmix <= 0) or rng.random() >= e.mix_prob:
        return video, target
    use_cutmix = e.cutmix > 0 and (e.mixup <= 0 or rng.random() < e.switch_prob)
    lam = float(rng.beta(e.cutmix, e.cutmix) if use_cutmix else rng.beta(e.mixup, e.mixup))
    other = video.flip(0)
    if use_cutmix:
        h, w = video.shape[-2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        video = video.clone()
        video[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually swapped
    else:
        video = lam * video + (1 - lam) * other
    return video, lam * target + (1 - lam) * target.flip(0)


def layer_id(name: str, depth_of) -> int:
    """Layer of a parameter for layer-wise lr decay: embeddings 0, block i → i + 1, final norm / head last."""
    if not name.startswith("encoder."):
        return depth_of(None)
    rest = name[len("encoder."):]
    m = re.match(r"blocks\.(\d+)\.", rest)
    if m:
        return int(m.group(1)) + 1
    m = re.match(r"layers\.(\d+)\.(?:blocks\.(\d+)\.)?", rest)  # Swin: blocks counted across stages
    if m:
        return depth_of((int(m.group(1)), None if m.group(2) is None else int(m.group(2))))
    if rest.startswith("norm"):
        return depth_of(None)
    return 0


class Classifier(Method):
    def __init__(self, cfg: Config):
        mode, e = cfg.method.name, cfg.eval
        self.num_classes = num_classes_of(cfg)
        encoder, ck, fc_norm = build_eval_encoder(cfg, finetune=mode == "finetune")
        dim = feature_dim(encoder)
        if mode == "finetune":
            net = FinetuneNet(encoder, self.num_classes, e.pool, e.head_dropout, e.head_init_scale, fc_norm)
            if ck is not None:
                load_classifier_parts(net, ck)
            super().__init__(net)
        elif mode == "linear":
            super().__init__(LinearHead(dim, self.num_classes), encoder)
        elif mode == "attentive":
            super().__init__(AttentiveHead(dim, self.num_classes, e.probe_heads), encoder)
        else:
            raise ValueError(f"Classifier serves method.name finetune | linear | attentive, got '{mode}'")
        self.mode, self.cfg = mode, e
        self.rng = np.random.default_rng(cfg.run.seed)  # mixup / cutmix draws

    def encoder(self) -> nn.Module:
        return self.trainable.encoder if self.mode == "finetune" else self.frozen

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        if self.mode == "finetune":
            return self.student(video)
        with torch.no_grad():
            if self.mode == "linear":
                x = pooled(self.frozen, video, self.cfg.pool)
            else:
                x, _ = encoder_tokens(self.frozen, video)
        return self.student(x)

    def forward(self, batch: Batch) -> StepOutput:
        labels = batch.label
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"sample '{batch.keys[i] if batch.keys else i}' has label {int(labels[i])}, outside "
                             f"0..{self.num_classes - 1}: the shards need labels (make_shards from class folders "
                             "or a CSV with labels) and eval.num_classes must cover them")
        video = batch.video
        if self.mode == "finetune" and self.training:
            video, target = mix(video, labels, self.num_classes, self.cfg, self.rng)
            logits = self.logits(video).float()
            loss = torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
        else:
            logits = self.logits(video).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return StepOutput(loss, {"loss/ce": loss.detach(), "acc/train_top1": acc.detach()})

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Fine-tuning: AdamW groups per layer with lr scale decay^(last - layer); probes: the base groups."""
        if self.mode != "finetune" or self.cfg.layer_decay >= 1.0:
            return super().param_groups(weight_decay)
        enc = self.trainable.encoder
        if hasattr(enc, "blocks"):
            total = len(enc.blocks)

            def depth_of(key):
                return total + 1
        else:  # Swin: stage s, block b → blocks before stage s + b + 1; a stage's downsample ends that stage
            starts = np.cumsum([0] + [len(layer.blocks) for layer in enc.layers])
            total = int(starts[-1])

            def depth_of(key):
                if key is None:
                    return total + 1
                stage, block = key
                return int(starts[stage + 1]) if block is None else int(starts[stage]) + block + 1
        groups: dict[tuple, dict] = {}
        for name, p in self.trainable.named_parameters():
            if not p.requires_grad:
                continue
            lid = layer_id(name, depth_of)
            skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)
            g = groups.setdefault((lid, skip), {
                "params": [], "weight_decay": 0.0 if skip else weight_decay, "wd_scale": 0.0 if skip else 1.0,
                "lr_scale": self.cfg.layer_decay ** (total + 1 - lid), "name": f"layer{lid}_{'no_decay' if skip else 'decay'}"})
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]
