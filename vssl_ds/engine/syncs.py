"""run.sync_check: where a training micro-step makes the host wait for the GPU.

torch's CUDA sync debug mode warns at every operation that blocks the host until the device has drained its queue
(`.item()`, `.tolist()`, a copy to pageable memory, `nonzero`, ...). Around each micro-step (forward, backward and
the optimizer step; not the log lines, checkpoints or monitor probes, which read by design) those warnings are
counted by the Python line that caused them, so a GPU run says whether the loop still waits per micro-step and
whose code does (ours or DeepSpeed's).
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_MARK = "synchroniz"  # torch: "called a synchronizing CUDA operation"


class SyncCounter:
    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = bool(enabled) and device.type == "cuda"
        if enabled and not self.enabled:
            log.info("run.sync_check counts CUDA synchronisations; on %s there are none to count: off", device)
        self.places: Counter[str] = Counter()
        self.micro_steps = 0
        self.waiting_steps = 0  # micro-steps with at least one synchronisation

    @contextlib.contextmanager
    def watch(self):
        if not self.enabled:
            yield
            return
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.count(caught)

    def count(self, caught: list[warnings.WarningMessage]) -> None:
        """Add one micro-step's warnings (the others are shown again, as they would have been)."""
        syncs = 0
        for w in caught:
            if _MARK in str(w.message):
                self.places[f"{w.filename}:{w.lineno}"] += 1
                syncs += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.micro_steps += 1
        self.waiting_steps += syncs > 0

    def summary(self) -> dict:
        total = sum(self.places.values())
        return {"micro_steps": self.micro_steps, "micro_steps_that_wait": self.waiting_steps,
                "synchronisations": total, "per_micro_step": round(total / max(self.micro_steps, 1), 3),
                "places": dict(self.places.most_common())}

    def report(self, path: Path) -> None:
        if not self.enabled:
            return
        s = self.summary()
        path.write_text(json.dumps(s, indent=1))
        log.info("run.sync_check: %d host waits for the GPU in %d micro-steps (%d of them wait); by place: %s "
                 "(also in %s)", s["synchronisations"], s["micro_steps"], s["micro_steps_that_wait"],
                 ", ".join(f"{k} x{v}" for k, v in list(s["places"].items())[:5]) or "none", path)
