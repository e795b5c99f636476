"""MVD — masked video distillation (Wang et al., CVPR 2023): a masked video student regresses the features of
two frozen teachers, an MAE image ViT (per frame, every `tubelet`-th frame) and a VideoMAE video ViT (whole
clip), with one feature decoder per teacher. Targets: the teachers' last block without its final norm, CLS
dropped, optionally LayerNorm-ed without parameters; loss on masked tokens in the mask's token order."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..models.heads import MaskedDecoder
from ..teachers import build_teacher
from ..teachers.cache import check_fingerprint, load_manifest, mvd_fingerprint
from .base import Method, StepOutput, restore_decoders

LOSSES = {"smooth_l1": F.smooth_l1_loss, "l2": F.mse_loss, "l1": F.l1_loss}


class MVDStudent(nn.Module):
    def __init__(self, encoder: nn.Module, image_decoder: nn.Module, video_decoder: nn.Module):
        super().__init__()
        self.encoder, self.image_decoder, self.video_decoder = encoder, image_decoder, video_decoder

    def forward(self, video, mask):  # [B,C,T,H,W], [B,N] → ([B,Nm,Di], [B,Nm,Dv])
        visible = self.encoder(video, mask)
        return self.image_decoder(visible, mask), self.video_decoder(visible, mask)


def teacher_shapes(cfg: Config) -> tuple[dict, dict]:
    """The model arguments the image and the video teacher are built with ({} for a timm name: timm's own)."""
    m, c = cfg.model, cfg.method.mvd
    size = c.teacher_size or cfg.data.size  # only the image teacher is resized (official --teacher_input_size)
    patch = size * m.patch // m.img_size  # the same token grid as the student (e.g. 196 / 14 = 224 / 16)
    img = {} if c.image_teacher.startswith("timm:") else {"img_size": size, "patch": patch}
    vid = {} if c.video_teacher.startswith("timm:") else {
        "img_size": cfg.data.size, "num_frames": m.num_frames, "tubelet": m.tubelet, "patch": m.patch}
    return img, vid


class MVDTeachers(nn.Module):
    """The two frozen teachers, run on the unmasked clip (online in the step, or once by tools/cache_teachers.py).
    `image` / `video`: ready Teacher modules (build_teacher) instead of the ones the config names."""

    def __init__(self, cfg: Config, image: nn.Module | None = None, video: nn.Module | None = None):
        super().__init__()
        m, c = cfg.model, cfg.method.mvd
        img_shape, vid_shape = teacher_shapes(cfg)
        self.image = image or build_teacher(c.image_teacher, c.image_teacher_weights, **img_shape)
        self.video = video or build_teacher(c.video_teacher, c.video_teacher_weights, **vid_shape)
        self.dims = {"img": self.image.embed_dim, "vid": self.video.embed_dim}
        self.tubelet, self.teacher_size, self.norm_targets = m.tubelet, c.teacher_size, c.norm_targets

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher features of the unmasked clip, in the student's (t, h, w) token order.  # img [B,N,Di], vid [B,N,Dv]"""
        t = video.shape[2] // self.tubelet
        frames = rearrange(video[:, :, ::self.tubelet], "b c t h w -> (b t) c h w")  # every tubelet-th frame
        if self.teacher_size and self.teacher_size != frames.shape[-1]:  # the same crop at the image teacher's size
            frames = F.interpolate(frames, size=self.teacher_size, mode="bilinear", align_corners=False,
                                   antialias=True)
        img = rearrange(self.image(frames), "(b t) l d -> b (t l) d", t=t)
        vid = self.video(video)
        if self.norm_targets:
            img, vid = F.layer_norm(img, img.shape[-1:], eps=1e-6), F.layer_norm(vid, vid.shape[-1:], eps=1e-6)
        return {"img": img.float(), "vid": vid.float()}


class MVD(Method):
    def __init__(self, cfg: Config, teachers: MVDTeachers | None = None):
        m, c = cfg.model, cfg.method.mvd
        if teachers is not None:  # built by the caller (e.g. teachers of sizes no registered variant has)
            dims = teachers.dims
        elif c.targets == "cache":  # teachers ran once, offline: only their output widths are needed here
            manifest = load_manifest(cfg.data.targets)
            check_fingerprint(manifest, mvd_fingerprint(cfg), cfg.data.targets)
            teachers, dims = None, manifest["dims"]
        else:
            teachers = MVDTeachers(cfg)
            dims = teachers.dims
        encoder, ck = build_encoder(m, with_checkpoint=True)
        prefix = 1 if getattr(encoder, "cls_token", None) is not None else 0
        dim = c.decoder_dim or encoder.embed_dim
        heads = c.decoder_heads or encoder.blocks[0].attn.heads

        def decoder(out_dim):  # MVD: Linear(enc→dec, with bias), mask token, 3D sin-cos positions, blocks, LN, head
            return MaskedDecoder(encoder.num_patches, encoder.embed_dim, dim, c.decoder_depth, heads, out_dim,
                                 m.attn_backend, m.grad_ckpt, grid=encoder.grid, embed_bias=True, num_prefix=prefix,
                                 drop_path=m.drop_path)

        student = MVDStudent(encoder, decoder(dims["img"]), decoder(dims["vid"]))
        if ck is not None:  # an MVD pretraining checkpoint continues with both decoders
            restore_decoders(ck, {"decoder_img": student.image_decoder, "decoder_vid": student.video_decoder},
                             "method.mvd.decoder_dim/decoder_depth/decoder_heads and the teachers' widths")
        super().__init__(student, teachers)
        self.cfg, self.grid = c, encoder.grid
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1, 1), persistent=False)

    def targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.targets == "cache":
            if "img" not in batch.targets:
                raise ValueError("method.mvd.targets=cache but the batch has no cached targets: set data.targets")
            return {k: batch.targets[k].float() for k in ("img", "vid")}
        return self.run_frozen(self.frozen, batch.video)

    @torch.no_grad()
    def probe_images(self, video, mask, targets=None):
        """The health monitor's picture (vssl_ds/monitor.py): each teacher's regression error per masked token
        (this method's loss, per token) as a heat map over the clip, scaled by the largest error shown."""
        from ..monitor import heat_rows

        t = {k: v.float() for k, v in targets.items()} if targets else None
        if t is None or "img" not in t:
            if self.cfg.targets == "cache":
                return None  # (no cached targets kept for these clips)
            t = self.run_frozen(self.frozen, video)
        student = self.trainable
        visible = student.encoder(video, mask)
        loss_fn = LOSSES[self.cfg.loss]
        pixels = (video.float() * self.std + self.mean).clamp(0, 1)
        rows = {"original": pixels, "masked": heat_rows(pixels, torch.zeros(mask.shape), mask, self.grid,
                                                         colors=torch.full((*mask.shape, 3), 0.5))}
        for name, decoder, key in (("image teacher error", student.image_decoder, "img"),
                                   ("video teacher error", student.video_decoder, "vid")):
            pred = decoder(visible, mask).float()  # [B,Nm,D]
            err = loss_fn(pred, t[key][mask].reshape(pred.shape), reduction="none").mean(-1)  # [B,Nm]
            heat = torch.zeros(mask.shape, device=err.device)
            heat[mask] = (err / err.max().clamp_min(1e-12)).flatten()
            rows[name] = heat_rows(pixels, heat.cpu(), mask.cpu(), self.grid)
        return "token_error", rows

    def forward(self, batch: Batch) -> StepOutput:
        c, mask = self.cfg, batch.mask
        pred_img, pred_vid = self.student(batch.video, mask)  # [B,Nm,Di], [B,Nm,Dv]
        t = self.targets(batch)
        img, vid = t["img"], t["vid"]
        b = mask.shape[0]
        if img.shape[1] != mask.shape[1] or vid.shape[1] != mask.shape[1]:
            raise ValueError(f"teacher token counts (image {img.shape[1]}, video {vid.shape[1]}) differ from the "
                             f"student's {mask.shape[1]}: teachers need the same patch grid (see method.mvd.teacher_size)")
        loss_fn = LOSSES[c.loss]
        loss_img = loss_fn(pred_img.float(), img[mask].reshape(b, -1, img.shape[-1]))
        loss_vid = loss_fn(pred_vid.float(), vid[mask].reshape(b, -1, vid.shape[-1]))
        loss = c.image_weight * loss_img + c.video_weight * loss_vid
        return StepOutput(loss, {"loss/image_teacher": loss_img.detach(), "loss/video_teacher": loss_vid.detach()})
