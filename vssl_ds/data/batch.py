"""The one thing that travels from the data pipeline to a method."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .targets import widen_targets
from .transforms import normalize


@dataclass
class Batch:
    video: torch.Tensor | None = None  # [B,C,T,H,W] uint8 on the host; float, normalised after .to(device)
    mask: torch.Tensor | None = None  # [B,N] bool, True = hidden
    label: torch.Tensor | None = None  # [B] int64, -1 when unlabelled
    keys: list[str] = field(default_factory=list)
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # other clips of the same videos, [B,C,T,H,W]
    image: torch.Tensor | None = None  # [Bi,C,H,W] the image stream (methods that mix images and videos)
    image_mask: torch.Tensor | None = None  # [Bi,Ni] bool
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # cached teacher targets, by name
    encoded: list = field(default_factory=list)  # data.decode_device: [(video bytes, plan)], decoded by .decoded()

    @property
    def size(self) -> int:
        if self.encoded:
            return len(self.encoded)
        main = self.video if self.video is not None else self.image
        return 0 if main is None else main.shape[0]

    def decoded(self, device) -> "Batch":
        """The encoded videos decoded on `device` into `video` / `views` (uint8, like a worker's batch); a batch
        without encoded videos is returned as it is."""
        if not self.encoded:
            return self
        from .device_decode import decode_batch

        clips = decode_batch(self.encoded, device)
        video = clips.pop("video", None)
        return Batch(video=video, mask=self.mask, label=self.label, keys=self.keys, views={**self.views, **clips},
                     image=self.image, image_mask=self.image_mask, targets=self.targets)

    def to(self, device, mean, std) -> "Batch":
        if self.encoded:
            return self.decoded(device).to(device, mean, std)
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        norm = lambda t: None if t is None else normalize(move(t), mean, std)  # noqa: E731
        return Batch(video=norm(self.video), mask=move(self.mask), label=move(self.label), keys=self.keys,
                     views={k: norm(v) for k, v in self.views.items()}, image=norm(self.image),
                     image_mask=move(self.image_mask),
                     targets=widen_targets({k: move(v) for k, v in self.targets.items()}))  # widened on the device

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(video=pin(self.video), mask=pin(self.mask), label=pin(self.label), keys=self.keys,
                     views={k: pin(v) for k, v in self.views.items()}, image=pin(self.image),
                     image_mask=pin(self.image_mask), targets={k: pin(v) for k, v in self.targets.items()},
                     encoded=self.encoded)

    @classmethod
    def from_worker(cls, item: dict) -> "Batch":
        if "video" not in item and "image" in item:  # an image stream: its mask is the image mask
            return cls(image=item["image"], image_mask=item.get("mask"), label=item.get("label"),
                       keys=item.get("keys", []), targets=item.get("targets", {}))
        return cls(video=item.get("video"), mask=item.get("mask"), label=item.get("label"),
                   keys=item.get("keys", []), views=item.get("views", {}), targets=item.get("targets", {}),
                   encoded=item.get("encoded", []))

    def with_images(self, images: "Batch") -> "Batch":
        """This video batch joined with a batch of the image stream (BEVT: both streams every step)."""
        self.image, self.image_mask = images.image, images.image_mask
        self.targets.update({f"image_{k}": v for k, v in images.targets.items()})  # cached image-stream targets
        return self
