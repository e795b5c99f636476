"""What one shard sample becomes: the clips a method needs, each with its frame indices and spatial view.

A `View` first picks frame indices for each clip from the video's length (so one decode serves all clips),
then draws the spatial parameters of each clip once the decoded size is known. Every choice comes from the
sample's rng, so it can be recorded and replayed (teacher cache). Defaults follow ../shared/METHODS.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .sampling import frame_pair, long_short_pair, strided_clip
from .transforms import (Photometric, multi_scale_crop_params, photometric_params, random_resized_crop_params,
                         short_side_crop_params)

NO_COLOR = Photometric()


@dataclass(frozen=True)
class View:
    kind: str  # clip | scale_crop | long_short | frame_pair | image | finetune
    num_frames: int = 16
    stride: int = 4
    size: int = 224
    policy: str = "loop"  # a video shorter than the clip span: loop | pad | skip
    scales: tuple = (1.0, 0.875, 0.75, 0.66)  # clip: multi-scale crop
    short_range: tuple = (256, 320)  # scale_crop / image: random short side before the crop
    long_stride: int = 8  # long_short: stride of the long clip
    max_gap: int = 16  # frame_pair: most frames between the two frames
    repeats: int = 1  # repeated augmentation: samples drawn per video
    photometric: tuple = field(default=())  # one Photometric per clip; () = the kind's default
    flip: float = -1.0  # horizontal flip probability of every clip (-1: the kind's default; data.flip)

    def names(self) -> tuple[str, ...]:
        """Batch field of each clip of one sample."""
        return {"long_short": ("video", "long"), "frame_pair": ("video", "second"),
                "image": ("image",)}.get(self.kind, ("video",))

    def pick(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Frame indices of each clip, for a video of `n` frames (an image has n = 1)."""
        if self.kind == "long_short":
            return list(long_short_pair(n, self.num_frames, self.stride, self.long_stride, rng, self.policy))
        if self.kind == "frame_pair":
            first, second = frame_pair(n, self.max_gap, rng)
            return [np.array([first]), np.array([second])]
        if self.kind == "image":
            return [np.array([int(rng.integers(0, n))])]
        return [strided_clip(n, self.num_frames, self.stride, rng, self.policy)]

    def spatial(self, height: int, width: int, rng: np.random.Generator) -> list[dict]:
        """The spatial view of each clip (see transforms.py for the dict)."""
        out = []
        photos = self.photometric or DEFAULT_PHOTOMETRIC[self.kind]
        if self.flip >= 0:  # same number of draws either way: the other choices do not move
            photos = tuple(replace(p, flip=self.flip) for p in photos)
        for i, photo in enumerate(photos):
            if self.kind == "clip":
                box = multi_scale_crop_params(height, width, self.size, self.scales, rng)
            elif self.kind in ("scale_crop", "image"):
                box = short_side_crop_params(height, width, self.size, self.short_range, rng)
            else:
                box = random_resized_crop_params(height, width, self.size, rng)
            view = {**box, **photometric_params(photo, rng)}
            if self.kind == "finetune":  # VideoMAE's fine-tuning: RandAugment m7 n4 mstd 0.5, erasing p 0.25
                from .randaugment import erasing_params, randaugment_params

                view["randaug"] = randaugment_params(rng)
                view["erase"] = erasing_params(rng, self.num_frames, self.size, self.size)
            out.append(view)
        return out


_SSL = Photometric(flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray=0.2)
DEFAULT_PHOTOMETRIC = {
    "clip": (NO_COLOR,),  # VideoMAE / MVD: multi-scale crop only, no flip, no colour
    "finetune": (Photometric(flip=0.5),),  # VideoMAE fine-tuning: RRC (0.08-1, 3/4-4/3), flip, + RandAugment, erasing
    "scale_crop": (Photometric(flip=0.5),),  # BEVT video stream
    "image": (Photometric(flip=0.5, jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),),  # BEVT/BEiT
    "long_short": (_SSL, _SSL),  # LSTCL: independent augmentation per clip (MoCo v3 style; reconstructed)
    "frame_pair": (Photometric(**{**_SSL.__dict__, "blur": 1.0}),  # ViC-MAE view 1: + Gaussian blur
                   Photometric(**{**_SSL.__dict__, "solarize": 0.2})),  # view 2: + solarize
}
KINDS = tuple(DEFAULT_PHOTOMETRIC)
