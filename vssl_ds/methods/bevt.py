"""BEVT — BERT pretraining of video transformers (Wang et al., CVPR 2022): a Video Swin with mask tokens predicts
the visual-tokenizer ids of masked cells, for an image stream and a video stream in every step.

Head (as in the official code): stage-3 features ⊕ stage-4 features upsampled ×2 in space → Linear → (video:
×2 in time, back to the input frame count) → the backbone's final LayerNorm → Linear to the vocabulary, shared
by both streams. Targets: the frozen tokenizer on a half-resolution copy of each frame (112² for 224²)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..teachers.cache import bevt_fingerprint, check_fingerprint, load_manifest
from ..teachers.tokenizers import build_tokenizer, tokenizer_from_state
from .base import Method, StepOutput, restore_decoders


class BEVTStudent(nn.Module):
    def __init__(self, encoder: nn.Module, vocab: int, video: bool = True):
        super().__init__()
        c4 = encoder.num_features
        c3 = encoder.stage_dims[-2]
        self.encoder = encoder
        if video:  # the image-only stage has no video head
            self.fpn_s = nn.ConvTranspose3d(c4, c4, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.lm_down_st = nn.Linear(c4 + c3, c4)
            self.fpn_t = nn.ConvTranspose3d(c4, c4, kernel_size=(2, 1, 1), stride=(2, 1, 1))
        self.fpn = nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2)
        self.lm_down = nn.Linear(c4 + c3, c4)
        self.lm_head = nn.Linear(c4, vocab)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def video_features(self, video, mask=None):
        """→ per-cell features after the final norm [B,T*h*w,C4] (T = input frames)."""
        *_, x3, x4 = self.encoder(video, mask, stages=True)  # [B,C3,T',h,w], [B,C4,T',h/2,w/2]
        x = torch.cat([x3, self.fpn_s(x4)], 1)  # [B,C3+C4,T',h,w]
        x = self.lm_down_st(rearrange(x, "b c t h w -> b t h w c"))
        x = self.fpn_t(rearrange(x, "b t h w c -> b c t h w"))  # [B,C4,2T',h,w]
        return self.encoder.norm(rearrange(x, "b c t h w -> b (t h w) c"))

    def image_features(self, image, mask=None):
        """→ per-cell features after the final norm [Bi,h*w,C4]."""
        *_, y3, y4 = self.encoder(image, mask, stages=True)  # [Bi,C3,1,h,w], [Bi,C4,1,h/2,w/2]
        y = torch.cat([y3[:, :, 0], self.fpn(y4[:, :, 0])], 1)  # [Bi,C3+C4,h,w]
        return self.encoder.norm(self.lm_down(rearrange(y, "b c h w -> b (h w) c")))

    def forward(self, video, mask, image, image_mask):
        """→ logits per cell: video [B,T*h*w,V] (T = input frames; None without a video), image [Bi,h*w,V]"""
        logits_img = self.lm_head(self.image_features(image, image_mask))
        return (None if video is None else self.lm_head(self.video_features(video, mask))), logits_img


class BEVT(Method):
    def __init__(self, cfg: Config):
        c, m = cfg.method.bevt, cfg.model
        if not m.name.startswith("swin3d"):
            raise ValueError(f"BEVT needs a Video Swin backbone (model.name=swin3d_*), got model.name={m.name}")
        if c.targets == "cache":  # token ids were computed once, offline: no tokenizer in the step
            manifest = load_manifest(cfg.data.targets)
            check_fingerprint(manifest, bevt_fingerprint(cfg), cfg.data.targets)
            tokenizer, vocab = None, int(manifest["vocab"])
        self.image_only = cfg.data.view == "image"  # the image-only stage: data.train holds image shards
        encoder, ck = build_encoder(m, with_checkpoint=True, image_embed=True, video_embed=not self.image_only)
        if c.targets != "cache":
            if not c.tokenizer_weights and ck is not None and "tokenizer" in ck.parts:  # BEVT's file holds its dVAE
                tokenizer = tokenizer_from_state(c.tokenizer, ck.parts["tokenizer"], f"{ck.path} (cls_head.vae_encoder)")
            else:
                tokenizer = build_tokenizer(c.tokenizer, c.tokenizer_weights)
            vocab = tokenizer.vocab_size
        student = BEVTStudent(encoder, vocab, video=not self.image_only)
        if ck is not None and not self.image_only:  # a BEVT checkpoint continues with its head (lm_down*, fpn*, lm_head)
            head = nn.ModuleDict({k: getattr(student, k) for k in ("fpn_s", "lm_down_st", "fpn_t", "fpn", "lm_down")})
            restore_decoders(ck, {"bevt_head": head, "lm_head": student.lm_head},
                             "method.bevt (vocabulary) and model.* sizes",
                             used=("tokenizer",) if not c.tokenizer_weights and c.targets != "cache" else ())
        super().__init__(student, tokenizer)
        self.cfg, self.tok_size = c, m.img_size // 2  # the tokenizer sees a half-size copy (112² for 224²)
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def token_ids(self, frames: torch.Tensor) -> torch.Tensor:
        """normalised frames [B,3,H,W] → token ids [B,(H/16)*(W/16)]"""
        pixels = (frames.float() * self.std + self.mean).clamp(0, 1)
        pixels = F.interpolate(pixels, size=self.tok_size, mode="bilinear", align_corners=False, antialias=True)
        return self.run_frozen(self.frozen, pixels)

    @torch.no_grad()
    def probe_images(self, video, mask, targets=None):
        """The health monitor's picture (vssl_ds/monitor.py): the masked cells of the video stream whose tokenizer id
        the model predicts (green) or misses (red), over the clip."""
        from ..monitor import heat_rows

        if self.image_only:
            return None
        b, t = video.shape[0], video.shape[2]
        if targets and "tok" in targets:
            ids = targets["tok"].long()
        elif self.cfg.targets == "cache":
            return None  # (no cached token ids kept for these clips)
        else:
            ids = self.token_ids(rearrange(video, "b c t h w -> (b t) c h w")).reshape(b, -1)  # [B,T*h*w]
        logits = self.trainable.lm_head(self.trainable.video_features(video, mask))  # [B,T*h*w,V]
        cells = mask.shape[1] // (t // 2)
        hidden = mask.reshape(b, t // 2, cells).repeat_interleave(2, dim=1).reshape(b, -1).cpu()  # [B,T*h*w]
        right = (logits.argmax(-1) == ids).cpu()
        colors = torch.where(right[..., None], torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0.95, 0.1, 0.1]))
        pixels = (video.float() * self.std[..., None] + self.mean[..., None]).clamp(0, 1)  # [B,3,T,H,W]
        side = int(round(cells ** 0.5))
        grid = (t, side, cells // side)
        return "token_accuracy", {
            "original": pixels,
            "masked": heat_rows(pixels, torch.zeros(hidden.shape), hidden, grid,
                                colors=torch.full((*hidden.shape, 3), 0.5)),
            "token accuracy": heat_rows(pixels, torch.zeros(hidden.shape), hidden, grid, colors=colors)}

    def forward(self, batch: Batch) -> StepOutput:
        if batch.image is None:
            raise ValueError("BEVT trains on an image stream next to the videos: set data.images and "
                             "data.image_batch_size (or data.view=image with image shards as data.train for the "
                             "image-only stage)")
        c, video = self.cfg, batch.video
        if self.image_only:
            return self.image_step(batch)
        b, t = video.shape[0], video.shape[2]
        logits_vid, logits_img = self.student(video, batch.mask, batch.image, batch.image_mask)
        if c.targets == "cache":
            if "tok" not in batch.targets or "image_tok" not in batch.targets:
                raise ValueError("method.bevt.targets=cache but the batch has no cached token ids: set data.targets")
            ids_vid, ids_img = batch.targets["tok"].long(), batch.targets["image_tok"].long()
        else:
            ids_vid = self.token_ids(rearrange(video, "b c t h w -> (b t) c h w")).reshape(b, -1)  # [B,T*h*w]
            ids_img = self.token_ids(batch.image)  # [Bi,h*w]
        cells = batch.mask.shape[1] // (t // 2)
        mask_vid = batch.mask.reshape(b, t // 2, cells).repeat_interleave(2, dim=1).reshape(b, -1)  # doubled in time
        if ids_vid.shape != mask_vid.shape or ids_img.shape != batch.image_mask.shape:
            raise ValueError(f"tokenizer grid {tuple(ids_img.shape[1:])} does not match the mask grid "
                             f"{tuple(batch.image_mask.shape[1:])}: the tokenizer must downsample by 8")
        loss_vid = F.cross_entropy(logits_vid[mask_vid].float(), ids_vid[mask_vid])
        loss_img = F.cross_entropy(logits_img[batch.image_mask].float(), ids_img[batch.image_mask])
        with torch.no_grad():
            acc_vid = (logits_vid[mask_vid].argmax(-1) == ids_vid[mask_vid]).float().mean()
            acc_img = (logits_img[batch.image_mask].argmax(-1) == ids_img[batch.image_mask]).float().mean()
        loss = c.video_weight * loss_vid + c.image_weight * loss_img
        return StepOutput(loss, {"loss/video_tokens": loss_vid.detach(), "loss/image_tokens": loss_img.detach(),
                                 "acc/video_tokens": acc_vid, "acc/image_tokens": acc_img})

    def image_step(self, batch: Batch) -> StepOutput:
        """The image-only stage (BEiT-style masked image modelling on the image path of the Swin)."""
        _, logits = self.student(None, None, batch.image, batch.image_mask)  # [Bi,h*w,V]
        if self.cfg.targets == "cache":
            raise ValueError("the image-only BEVT stage tokenizes online: set method.bevt.targets=online")
        ids = self.token_ids(batch.image)
        if ids.shape != batch.image_mask.shape:
            raise ValueError(f"tokenizer grid {tuple(ids.shape[1:])} does not match the mask grid "
                             f"{tuple(batch.image_mask.shape[1:])}: the tokenizer must downsample by 8")
        loss = F.cross_entropy(logits[batch.image_mask].float(), ids[batch.image_mask])
        with torch.no_grad():
            acc = (logits[batch.image_mask].argmax(-1) == ids[batch.image_mask]).float().mean()
        return StepOutput(loss, {"loss/image_tokens": loss.detach(), "acc/image_tokens": acc})
