"""Top-1 / top-5 accuracy, accumulated per rank and summed over ranks."""
from __future__ import annotations

import torch
import torch.distributed as tdist

from ..engine import dist


class TopK:
    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, videos

    def add(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """scores [B,K] (any monotone score per class), labels [B]."""
        if bool((labels < 0).any()):
            raise ValueError("the test shards hold unlabelled samples (label -1): evaluation needs labelled shards "
                             "(make_shards from class folders, or a CSV with a label column)")
        k = min(5, scores.shape[1])
        top = scores.topk(k, dim=1).indices  # [B,k]
        hit = top == labels.to(top.device)[:, None]
        self.sums += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(labels)],
                                  dtype=torch.float64, device=self.sums.device)

    def reduce(self) -> "TopK":
        if tdist.is_initialized() and dist.world() > 1:
            tdist.all_reduce(self.sums)
        return self

    @property
    def count(self) -> int:
        return int(self.sums[2])

    @property
    def top1(self) -> float:
        return 100.0 * float(self.sums[0]) / max(self.count, 1)

    @property
    def top5(self) -> float:
        return 100.0 * float(self.sums[1]) / max(self.count, 1)
