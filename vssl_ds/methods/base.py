"""The Method interface: what the training loop and the engine see of any method."""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..data.batch import Batch

NO_DECAY_NAMES = ("pos_embed", "time_embed", "cls_token", "mask_token", "relative_position_bias_table", "dist_token")


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, what backward() gets
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # every loss term, detached


class Method(nn.Module, abc.ABC):
    """`trainable` goes to the engine; `frozen` (teachers, tokenizers, EMA targets) stays outside it.

    A method never calls backward and never samples masks or views: those travel in the Batch.
    The loop calls `forward(batch)`; trainable compute goes through `self.student(...)`, which the
    engine rebinds to the DeepSpeed-wrapped module (so ZeRO hooks, precision and accumulation apply).
    """

    def __init__(self, trainable: nn.Module, frozen: nn.Module | None = None):
        super().__init__()
        self.trainable = trainable
        self.frozen = frozen if frozen is not None else nn.Module()
        self._student: Callable | None = None
        self.frozen.requires_grad_(False)

    frozen_dtype: torch.dtype | None = None  # set by the engine: frozen models run under autocast to it
    probe_pair: str | None = None  # two-clip methods: the Batch.views entry whose features pair with batch.video's
    # (the health monitor's alignment / uniformity)
    probe_images: Callable | None = None  # (video, mask [B,N], cached targets) → (tag, {row: [B,C,T,H,W] in [0,1]})

    def run_frozen(self, fn: Callable, *args):
        """Frozen models keep fp32 weights and run under autocast in the engine's low precision, as the official
        code runs its teachers under fp16 autocast: matmuls in bf16/fp16, norms and softmax in fp32 (a whole-model
        bf16 cast put 1.2 % error on MVD's targets; autocast 0.15 %)."""
        if self.frozen_dtype is None:
            return fn(*args)
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, dtype=self.frozen_dtype):
            return fn(*args)

    def student(self, *args, **kwargs):
        return (self._student or self.trainable)(*args, **kwargs)

    def bind_student(self, fn: Callable) -> None:
        self._student = fn

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # teachers never switch to train mode (dropout, BN statistics)
        return self

    @abc.abstractmethod
    def forward(self, batch: Batch) -> StepOutput:
        """The loss of one micro-batch, with its terms as metrics."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA / momentum updates)."""

    def evolving_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What training changes outside the engine (EMA targets), per module name: saved in every checkpoint.
        Teachers and tokenizers never change, so they are not in it (they come from their files on resume)."""
        from .ema import EMA

        return {name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                for name, module in self.frozen.named_modules() if isinstance(module, EMA)}

    def load_evolving_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        modules = dict(self.frozen.named_modules())
        mine = set(self.evolving_state())
        if set(state) != mine:
            raise ValueError(f"the checkpoint holds evolving state for {sorted(state)} but this method has "
                             f"{sorted(mine)}: resume with the method and model that wrote it")
        for name, sd in state.items():
            modules[name].load_state_dict(sd)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on norms, biases, position tables and special tokens."""
        decay, no_decay = [], []
        for name, p in self.trainable.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)
            (no_decay if skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0, "name": "no_decay"},
        ]


def restore_decoders(ck, decoders: dict[str, nn.Module], fields: str, used: tuple[str, ...] = ()) -> None:
    """Continued pretraining: load each decoder `ck` (a models.weights.Checkpoint) holds; report the rest."""
    from ..models.weights import load_part, report_unused

    log = logging.getLogger(__name__)
    for part, module in decoders.items():
        if load_part(module, ck, part, fields):
            log.info("%s restored from %s: pretraining continues from its weights", part, ck.path)
    report_unused(ck, used=tuple(decoders) + used, who="pretraining")
