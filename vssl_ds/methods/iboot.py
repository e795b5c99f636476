"""iBoot — a video encoder that subsumes a strong frozen image model: BYOL-style without EMA. The online branch
is video encoder → projector → predictor → linear map to the teacher's width; the target is the frozen image
model's global embedding of the frames of another clip of the same video, averaged over frames; loss 2−2cos.
No public code: defaults are reconstructed (see IBootConfig)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.errors import ConfigError
from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..models.heads import mlp_head
from ..models.weights import stored_patch
from ..teachers import build_teacher
from ..teachers.cache import check_fingerprint, iboot_fingerprint, load_manifest
from .base import Method, StepOutput
from .lstcl import Embed


class IBootOnline(nn.Module):
    def __init__(self, embed: Embed, predictor: nn.Module, to_teacher: nn.Module):
        super().__init__()
        self.embed, self.predictor, self.to_teacher = embed, predictor, to_teacher

    def forward(self, clip):  # [B,C,T,H,W] → [B,Dteacher]
        return self.to_teacher(self.predictor(self.embed(clip)))


def build_image_model(cfg: Config):
    """The frozen image model of `method.iboot` (timm name or a vssl_ds 2D model + weight file)."""
    c = cfg.method.iboot
    return build_teacher(c.teacher, c.teacher_weights, **teacher_shape(cfg))


def teacher_shape(cfg: Config) -> dict:
    """The image model's arguments: frames at the clip's size, the patch size of the weight file (a vssl_ds
    name's default patch need not be the file's); {} for a timm name (timm's own)."""
    c = cfg.method.iboot
    if c.teacher.startswith("timm:"):
        return {}
    shape = {"img_size": cfg.model.img_size}
    if c.teacher_weights and Path(c.teacher_weights).is_file() and not c.teacher_weights.endswith(".safetensors"):
        patch = stored_patch(c.teacher_weights)
        if patch and cfg.model.img_size % patch:
            raise ConfigError(f"method.iboot.teacher_weights: '{c.teacher_weights}' holds a ViT with {patch}-px "
                              f"patches, which do not tile model.img_size={cfg.model.img_size}; use a size that "
                              f"is a multiple of {patch}")
        if patch:
            shape["patch"] = patch
    return shape


@torch.no_grad()
def frame_embeddings(teacher, clip: torch.Tensor, pool: str, data_norm=None) -> torch.Tensor:
    """The frozen image model's global embedding (CLS, or mean of patch tokens) of every frame.  # [B,T,D]
    `data_norm` = the (mean, std) `clip` is normalised with; a teacher trained with other statistics (timm's
    pretrained_cfg: CLIP, Inception-style) gets its own."""
    b, t = clip.shape[0], clip.shape[2]
    frames = rearrange(clip, "b c t h w -> (b t) c h w")
    if data_norm is not None:
        frames = teacher.renormalise(frames, *data_norm)
    enc = teacher.encoder
    if pool == "mean":
        tokens = teacher(frames, norm=True)
        emb = tokens.mean(1) if tokens.dim() == 3 else tokens
    elif teacher.timm_model:
        emb = enc.norm(enc.blocks(enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(
            frames.to(next(enc.parameters()).dtype)))))))[:, 0]
    elif getattr(enc, "cls_token", None) is None:
        raise ValueError("method.iboot.teacher_pool=cls needs a teacher with a CLS token; use teacher_pool=mean")
    else:
        emb = enc(frames.to(next(enc.parameters()).dtype))[:, 0]
    return emb.float().reshape(b, t, -1)


class IBoot(Method):
    probe_pair = "long"  # the monitor's alignment / uniformity: the two clips' video features
    def __init__(self, cfg: Config):
        c, m = cfg.method.iboot, cfg.model
        if c.targets == "cache":  # the image model ran once, offline: only its width is needed here
            manifest = load_manifest(cfg.data.targets)
            check_fingerprint(manifest, iboot_fingerprint(cfg), cfg.data.targets)
            teacher, width_t = None, manifest["dims"]["emb_long"]
        else:
            teacher = build_image_model(cfg)
            width_t = teacher.embed_dim
        backbone = build_encoder(m)
        width = getattr(backbone, "num_features", None) or backbone.embed_dim
        online = IBootOnline(Embed(backbone, mlp_head(width, c.proj_hidden, c.proj_dim, 2, last_bn=False)),
                             mlp_head(c.proj_dim, c.pred_hidden, c.proj_dim, 2, last_bn=False),
                             nn.Linear(c.proj_dim, width_t))
        super().__init__(online, teacher)
        self.cfg, self.data_norm = c, (tuple(cfg.data.mean), tuple(cfg.data.std))

    def teacher_embedding(self, batch: Batch, name: str) -> torch.Tensor:
        """The target of clip `name` (video | long): its frames' embeddings averaged (`target=pooled`)  # [B,D]
        or each frame's (`target=frames`).  # [B,T,D]"""
        if self.cfg.targets == "cache":
            key = f"emb_{name}"
            if key not in batch.targets:
                raise ValueError("method.iboot.targets=cache but the batch has no cached frame embeddings "
                                 f"('{key}'): set data.targets to the folder tools/cache_teachers.py wrote")
            frames = batch.targets[key].float()
        else:
            clip = batch.video if name == "video" else batch.views[name]
            frames = self.run_frozen(frame_embeddings, self.frozen, clip, self.cfg.teacher_pool, self.data_norm).float()
        return frames.mean(1) if self.cfg.target == "pooled" else frames  # [B,D] | [B,T,D]

    def forward(self, batch: Batch) -> StepOutput:
        first, second = batch.video, batch.views["long"]
        pairs = [(first, "long")] + ([(second, "video")] if self.cfg.symmetric else [])
        losses = []
        for a, b in pairs:
            pred, target = self.student(a).float(), self.teacher_embedding(batch, b)
            if target.dim() == 3:  # frame-level: the clip's prediction against every frame of the other clip
                pred = pred[:, None]
            losses.append((2 - 2 * F.cosine_similarity(pred, target, dim=-1)).mean())
        loss = sum(losses) / len(losses)
        return StepOutput(loss, {"loss/iboot": loss.detach()})
