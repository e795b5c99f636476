"""Methods by name. Each is a small module over the Method interface (base.py)."""
from __future__ import annotations

from ..config.schema import Config
from .base import Method, StepOutput


def _mae(cfg: Config) -> Method:
    from .mae import VideoMAE

    return VideoMAE(cfg)


def _mvd(cfg: Config) -> Method:
    from .mvd import MVD

    return MVD(cfg)


METHODS = {"mae": _mae, "mvd": _mvd}


def build_method(cfg: Config) -> Method:
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name '{cfg.method.name}' is not one of: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg)


def token_grid(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return (m.num_frames // m.tubelet, m.img_size // m.patch, m.img_size // m.patch)


def mask_fns(cfg: Config):
    """The masks the method needs, drawn in the data workers: (video mask, image mask); None = no mask."""
    from ..data.masking import mask_fn

    if cfg.method.name in ("mae", "mvd"):
        section = getattr(cfg.method, cfg.method.name)
        return mask_fn(section.mask, token_grid(cfg), section.mask_ratio), None
    return None, None


__all__ = ["Method", "StepOutput", "build_method", "token_grid", "mask_fns", "METHODS"]
