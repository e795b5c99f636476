"""VideoMAE's fine-tuning augmentation as recordable parameters: RandAugment (timm's `rand-m7-n4-mstd0.5-inc1`,
the same ops on every frame of a clip) and random erasing (timm's `RandomErasing`, p 0.25, pixel mode, one box
drawn per frame). Like every view, the choices are drawn from the sample's rng and replayed by `apply_view`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..compat import tv_functional

MAX_LEVEL = 10.0
FILL = [128, 128, 128]  # timm's fill colour for the geometric ops
# timm's "increasing" RandAugment set: a higher level is always a stronger distortion
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Brightness", "Sharpness"}


def randaugment_params(rng: np.random.Generator, num_ops: int = 4, magnitude: float = 7.0, mstd: float = 0.5,
                       prob: float = 0.5) -> list[list]:
    """`num_ops` distinct ops, each kept with probability `prob`, level ~ N(magnitude, mstd) in [0, 10], a random
    sign for the signed ops → [[op, signed level], ...]. Draws the same count of values every time."""
    picks = rng.choice(len(OPS), num_ops, replace=False)
    keep, levels, signs = rng.random(num_ops), rng.normal(magnitude, mstd, num_ops), rng.random(num_ops)
    out = []
    for i, k in enumerate(picks):
        if keep[i] >= prob:
            continue
        level = float(np.clip(levels[i], 0.0, MAX_LEVEL))
        op = OPS[int(k)]
        out.append([op, -level if op in SIGNED and signs[i] < 0.5 else level])
    return out


def apply_randaugment(x: torch.Tensor, ops: list[list]) -> torch.Tensor:
    """x [T,C,H,W] uint8 → the same ops applied to every frame (timm's level → strength mapping; the geometric
    ops interpolate bilinearly, where timm on PIL images picks bilinear or bicubic at random)."""
    TF = tv_functional()
    from torchvision.transforms import InterpolationMode  # importable once tv_functional() has run

    interp = InterpolationMode.BILINEAR
    for op, level in ops:
        f = level / MAX_LEVEL if op in SIGNED else abs(level) / MAX_LEVEL  # in [-1, 1]; unsigned ops [0, 1]
        h, w = x.shape[-2:]
        if op == "AutoContrast":
            x = TF.autocontrast(x)
        elif op == "Equalize":
            x = TF.equalize(x)
        elif op == "Invert":
            x = TF.invert(x)
        elif op == "Rotate":
            x = TF.rotate(x, 30.0 * f, interpolation=interp, fill=FILL)
        elif op == "Posterize":
            x = TF.posterize(x, 4 - int(4 * f))
        elif op == "Solarize":
            if int(256 * f) > 0:  # a threshold of 256 would leave every pixel alone
                x = TF.solarize(x, 256 - int(256 * f))
        elif op == "SolarizeAdd":
            x = torch.where(x < 128, (x.int() + int(110 * f)).clamp(0, 255).to(torch.uint8), x)
        elif op in ("Color", "Contrast", "Brightness", "Sharpness"):
            adjust = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
                      "Brightness": TF.adjust_brightness, "Sharpness": TF.adjust_sharpness}[op]
            x = adjust(x, 1.0 + 0.9 * f)
        elif op in ("ShearX", "ShearY"):
            shear = math.degrees(math.atan(0.3 * f))
            x = TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, interpolation=interp, fill=FILL,
                          shear=[shear, 0.0] if op == "ShearX" else [0.0, shear])
        elif op in ("TranslateX", "TranslateY"):
            shift = [round(0.45 * f * w), 0] if op == "TranslateX" else [0, round(0.45 * f * h)]
            x = TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=interp,
                          fill=FILL)
        else:
            raise ValueError(f"unknown RandAugment op '{op}' in a recorded view (known: {', '.join(OPS)})")
    return x


def erasing_params(rng: np.random.Generator, frames: int, height: int, width: int, prob: float = 0.25,
                   area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))) -> dict | None:
    """timm's RandomErasing applied frame by frame (as VideoMAE does on its [T,C,H,W] buffer): each frame erased
    with probability `prob`, one box of random area and aspect (10 tries) → {"boxes": [...], "seed": int}."""
    boxes = []
    for _ in range(frames):
        u, tries = rng.random(), rng.random((10, 4))
        box = None
        if u < prob:
            for a, r, y, x in tries:
                target = height * width * (area[0] + a * (area[1] - area[0]))
                aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if 0 < h < height and 0 < w < width:
                    box = [int(y * (height - h + 1)), int(x * (width - w + 1)), h, w]
                    break
        boxes.append(box)
    seed = int(rng.integers(2**31))
    return {"boxes": boxes, "seed": seed} if any(boxes) else None


def apply_erasing(clip: torch.Tensor, erase: dict) -> torch.Tensor:
    """clip [T,H,W,C] uint8: every recorded box filled with per-pixel random values ("pixel" mode; uniform bytes
    here, as the clip is still uint8: normalisation happens on the device)."""
    gen = torch.Generator().manual_seed(int(erase["seed"]))
    clip = clip.clone()
    for t, box in enumerate(erase["boxes"]):
        if box:
            top, left, h, w = box
            clip[t, top:top + h, left:left + w] = torch.randint(0, 256, (h, w, clip.shape[-1]), generator=gen,
                                                                 dtype=torch.uint8)
    return clip
