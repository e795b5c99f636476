"""Console logging (every rank, rank-prefixed; INFO on rank 0) and TensorBoard scalars (rank 0)."""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch


def setup_console(rank: int, level: str = "INFO") -> None:
    """Every rank logs warnings and errors; INFO only on rank 0. Third-party Python warnings (torch's
    FutureWarnings …) are shown once, by rank 0, not repeated by every rank."""
    if rank > 0:
        import warnings

        warnings.simplefilter("ignore")
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(stream=sys.stdout, format=fmt, datefmt="%H:%M:%S", force=True,
                        level=getattr(logging, level) if rank == 0 else logging.WARNING)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# dense bf16 peak per device, for MFU when run.peak_tflops is not given
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak_tflops(device: torch.device, configured: float) -> float:
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 0.0


class Scalars:
    """TensorBoard writer that exists only on rank 0; other ranks' calls do nothing."""

    def __init__(self, log_dir: Path | None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image [C,H,W] in [0,1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def fault_stream():
    """A stream with a file descriptor for faulthandler: stderr, or the original one when stderr was replaced
    (captured output, notebooks); None when neither has one."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
            continue
    return None
