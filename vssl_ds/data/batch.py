"""The one thing that travels from the data pipeline to a method."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .transforms import normalize


@dataclass
class Batch:
    video: torch.Tensor  # [B,C,T,H,W] uint8 on the host; float, normalised after .to(device)
    mask: torch.Tensor | None = None  # [B,N] bool, True = hidden
    label: torch.Tensor | None = None  # [B] int64, -1 when unlabelled
    keys: list[str] = field(default_factory=list)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.video.shape[0]

    def to(self, device, mean, std) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            video=normalize(move(self.video), mean, std),
            mask=move(self.mask),
            label=move(self.label),
            keys=self.keys,
            targets={k: move(v) for k, v in self.targets.items()},
        )

    @classmethod
    def from_worker(cls, item: dict) -> "Batch":
        return cls(video=item["video"], mask=item.get("mask"), label=item.get("label"),
                   keys=item.get("keys", []))
