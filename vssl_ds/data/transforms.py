"""Spatial transforms on uint8 clips `[T,H,W,C]`. Each `*_params` draws its parameters from an rng and
returns them as a plain dict (a "view"), so the view can be recorded (teacher cache) and replayed exactly
with `apply_view`. The same parameters apply to every frame of a clip.

A view: {"box": [top, left, h, w] in decoded pixels, "size": [h, w], "flip": bool,
         "jitter": None | {"order": [...], "brightness": f, "contrast": f, "saturation": f, "hue": f},
         "gray": bool, "blur": sigma (0 = none), "solarize": bool}
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..compat import tv_functional


def multi_scale_crop_params(height: int, width: int, size: int, scales, rng: np.random.Generator,
                            max_distort: int = 1) -> dict:
    """VideoMAE/TSN multi-scale crop: side lengths from `scales` of the short side, at most
    `max_distort` steps of aspect change, and one of 13 fixed offsets (corners, centre, …)."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(ch, cw) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(rng.integers(len(pairs)))]
    ch, cw = min(ch, height), min(cw, width)
    hs, ws = (height - ch) // 4, (width - cw) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),
               (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
               (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]
    top, left = offsets[int(rng.integers(len(offsets)))]
    return {"box": [int(top), int(left), int(ch), int(cw)], "size": [size, size], "flip": False}


def random_resized_crop_params(height: int, width: int, size: int, rng: np.random.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> dict:
    """Inception-style crop (torchvision's algorithm): area fraction in `scale`, log-uniform aspect in `ratio`,
    10 tries, then a centre crop clamped to `ratio`."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return {"box": [top, left, h, w], "size": [size, size], "flip": False}
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    h, w = min(h, height), min(w, width)
    return {"box": [(height - h) // 2, (width - w) // 2, h, w], "size": [size, size], "flip": False}


def short_side_crop_params(height: int, width: int, size: int, short_range, rng: np.random.Generator) -> dict:
    """Rescale the short side to a random length in `short_range` and take a random `size` crop (BEVT / Video
    Swin training view), expressed as the equivalent box in decoded pixels."""
    short = int(rng.integers(short_range[0], short_range[1] + 1))
    side = min(round(size * min(height, width) / short), height, width)  # the crop, in decoded pixels
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    return {"box": [top, left, side, side], "size": [size, size], "flip": False}


@dataclass(frozen=True)
class Photometric:
    """Probabilities and strengths of the colour augmentations (SimCLR/BYOL family)."""
    flip: float = 0.0
    jitter: float = 0.0  # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray: float = 0.0
    blur: float = 0.0  # probability; sigma ~ U(0.1, 2.0)
    solarize: float = 0.0


def photometric_params(p: Photometric, rng: np.random.Generator) -> dict:
    """Always draws the same number of random values, so one view's choices never shift another's."""
    u = rng.random(5)
    order = [str(x) for x in rng.permutation(["brightness", "contrast", "saturation", "hue"])]
    f = rng.uniform(-1, 1, 4)
    sigma = float(rng.uniform(0.1, 2.0))
    jitter = None
    if u[1] < p.jitter:
        jitter = {"order": order, "brightness": 1 + p.brightness * f[0], "contrast": 1 + p.contrast * f[1],
                  "saturation": 1 + p.saturation * f[2], "hue": p.hue * f[3]}
    return {"flip": bool(u[0] < p.flip), "jitter": jitter, "gray": bool(u[2] < p.gray),
            "blur": sigma if u[3] < p.blur else 0.0, "solarize": bool(u[4] < p.solarize)}


def crop_resize(frames: torch.Tensor, box, size) -> torch.Tensor:
    """Crop `box=[top,left,h,w]` (decoded pixels) and resize to `size=[h,w]`.  # [T,H,W,C] uint8"""
    top, left, h, w = box
    clip = frames[:, top:top + h, left:left + w]
    if list(clip.shape[1:3]) == list(size):
        return clip.contiguous()
    x = clip.permute(0, 3, 1, 2)  # [T,C,h,w] uint8, channels-last in memory: torch's fast uint8 kernel
    if x.device.type == "cpu":
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    else:  # the uint8 antialiased kernel is the CPU's: on a GPU (data.decode_device) in float, rounded back
        x = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def _photometric(clip: torch.Tensor, view: dict) -> torch.Tensor:
    """Colour ops via torchvision's tensor functional API, on [T,C,H,W] uint8."""
    TF = tv_functional()
    x = clip.permute(0, 3, 1, 2)
    jitter = view.get("jitter")
    if jitter:
        ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
               "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
        for name in jitter["order"]:
            x = ops[name](x, jitter[name])
    if view.get("gray"):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if view.get("blur"):
        sigma = float(view["blur"])
        k = 2 * math.ceil(3 * sigma) + 1  # the kernel covers ±3σ
        x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    if view.get("solarize"):
        x = TF.solarize(x, threshold=128)
    return x.permute(0, 2, 3, 1).contiguous()


def apply_view(frames: torch.Tensor, view: dict) -> torch.Tensor:
    """Replay a recorded view: crop box, output size, flip, colour, then (fine-tuning) RandAugment and random
    erasing.  # [T,H,W,C] uint8"""
    clip = crop_resize(frames, view["box"], view["size"])
    if view.get("flip"):
        clip = clip.flip(2)
    if view.get("jitter") or view.get("gray") or view.get("blur") or view.get("solarize"):
        clip = _photometric(clip, view)
    if view.get("randaug") or view.get("erase"):
        from .randaugment import apply_erasing, apply_randaugment

        if view.get("randaug"):
            clip = apply_randaugment(clip.permute(0, 3, 1, 2), view["randaug"]).permute(0, 2, 3, 1).contiguous()
        if view.get("erase"):
            clip = apply_erasing(clip, view["erase"])
    return clip


def normalize(video: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 `[B,C,...]` → float, per-channel normalised (done on the device, after the copy)."""
    shape = (1, -1) + (1,) * (video.dim() - 2)
    m = torch.tensor(mean, device=video.device).view(shape) * 255
    s = torch.tensor(std, device=video.device).view(shape) * 255
    return (video.float() - m) / s
