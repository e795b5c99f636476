"""Methods by name. Each is a small module over the Method interface (base.py)."""
from __future__ import annotations

import numpy as np

from ..config.schema import Config
from .base import Method, StepOutput


def _mae(cfg: Config) -> Method:
    from .mae import VideoMAE

    return VideoMAE(cfg)


def _mvd(cfg: Config) -> Method:
    from .mvd import MVD

    return MVD(cfg)


def _bevt(cfg: Config) -> Method:
    from .bevt import BEVT

    return BEVT(cfg)


def _lstcl(cfg: Config) -> Method:
    from .lstcl import LSTCL

    return LSTCL(cfg)


def _vicmae(cfg: Config) -> Method:
    from .vicmae import ViCMAE

    return ViCMAE(cfg)


def _iboot(cfg: Config) -> Method:
    from .iboot import IBoot

    return IBoot(cfg)


def _classifier(cfg: Config) -> Method:
    from ..eval.classifier import Classifier

    return Classifier(cfg)


METHODS = {"mae": _mae, "mvd": _mvd, "bevt": _bevt, "lstcl": _lstcl, "vicmae": _vicmae, "iboot": _iboot,
           "finetune": _classifier, "linear": _classifier, "attentive": _classifier}
# where each method keeps its encoder inside its trainable module (tools/export.py takes it from there)
ENCODER_PREFIX = {"mae": "encoder.", "mvd": "encoder.", "bevt": "encoder.", "vicmae": "encoder.",
                  "lstcl": "embed.backbone.", "iboot": "embed.backbone.", "finetune": "encoder."}


def build_method(cfg: Config) -> Method:
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name '{cfg.method.name}' is not one of: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg)


def token_grid(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return (m.num_frames // m.tubelet, m.img_size // m.patch, m.img_size // m.patch)


def mask_fns(cfg: Config):
    """The masks the method needs, drawn in the data workers: (video mask, image mask); None = no mask."""
    from functools import partial

    from ..data.masking import MASKS, mask_fn

    if cfg.method.name in ("mae", "mvd"):
        section = getattr(cfg.method, cfg.method.name)
        return mask_fn(section.mask, token_grid(cfg), section.mask_ratio), None
    if cfg.method.name == "bevt":  # masks on 16-px cells: the grid of Swin's stage 3 and of the tokenizer
        b, m = cfg.method.bevt, cfg.model
        cells = (m.num_frames // m.tubelet, m.img_size // 16, m.img_size // 16)
        image = partial(MASKS["block"], cells[1:], b.image_mask_ratio, min_block=b.min_block)
        if cfg.data.view == "image":  # the image-only stage: data.train streams images
            return image, None
        return partial(MASKS["block_tube"], cells, b.mask_ratio, min_block=b.min_block), image
    if cfg.method.name == "vicmae":  # one random mask per frame of the pair, drawn together
        grid = (cfg.model.img_size // cfg.model.patch,) * 2
        return partial(_mask_pair, grid, cfg.method.vicmae.mask_ratio), None
    return None, None


def _mask_pair(grid, ratio, rng):
    from ..data.masking import random_mask

    n = grid[0] * grid[1]
    return np.concatenate([random_mask(n, ratio, rng), random_mask(n, ratio, rng)])  # [2N]


def cache_targets(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of the cached targets the method reads from the batch: (video stream, image stream); empty when
    the teachers run online."""
    if cfg.method.name == "mvd" and cfg.method.mvd.targets == "cache":
        return ("img", "vid"), ()
    if cfg.method.name == "bevt" and cfg.method.bevt.targets == "cache":
        return ("tok",), ("tok",)
    if cfg.method.name == "iboot" and cfg.method.iboot.targets == "cache":
        return ("emb_video", "emb_long"), ()
    return (), ()


__all__ = ["ENCODER_PREFIX", "cache_targets", "Method", "StepOutput", "build_method", "token_grid", "mask_fns", "METHODS"]
