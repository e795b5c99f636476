"""Console logging (every rank, rank-prefixed; INFO on rank 0), TensorBoard scalars (rank 0) and, with
run.wandb=true, the same scalars, images and texts in Weights & Biases (rank 0)."""
from __future__ import annotations

import html
import logging
import resource
import secrets
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


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
    """TensorBoard writer (and, given `wandb` settings, a Weights & Biases run) that exists only on rank 0; other
    ranks' calls do nothing. W&B never stops a run: a missing package, a failed start (no network, no API key) or a
    failed call is one warning, and TensorBoard goes on alone."""

    def __init__(self, log_dir: Path | None, wandb: dict | None = None):
        self.writer, self.wandb = None, None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            if wandb:
                self.wandb = start_wandb(**wandb)

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        self._wandb(lambda w: {k: float(v) for k, v in scalars.items()}, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image [C,H,W] in [0,1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1), step)
        self._wandb(lambda w: {tag: w.Image(image.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())}, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
        self._wandb(lambda w: {tag: w.Html(f"<pre>{html.escape(text)}</pre>")}, step)

    def _wandb(self, payload, step: int) -> None:
        if self.wandb is None:
            return
        run, module = self.wandb
        try:
            run.log(payload(module), step=step)
        except Exception as e:  # noqa: BLE001 - W&B is optional: never a reason to stop training
            log.warning("W&B logging failed at step %d (%s: %s): W&B is off for the rest of the run, TensorBoard "
                        "goes on", step, type(e).__name__, e)
            self.wandb = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            try:
                self.wandb[0].finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B could not finish its run (%s: %s)", type(e).__name__, e)
            self.wandb = None


def wandb_settings(cfg, run_dir: Path, config: dict) -> dict | None:
    """Scalars' `wandb` argument from run.wandb* (None when off). The run id is kept in <run>/wandb_id, so a
    resumed run continues the same W&B run."""
    r = cfg.run
    if not r.wandb:
        return None
    return {"project": r.wandb_project, "entity": r.wandb_entity, "mode": r.wandb_mode, "run_dir": run_dir,
            "name": r.name, "config": config}


def start_wandb(project: str, entity: str, mode: str, run_dir: Path, name: str, config: dict):
    """→ (W&B run, the wandb module), or None with a warning that says why and what to do."""
    try:
        import wandb
    except ImportError:
        log.warning("run.wandb=true but the wandb package is not installed: pip install wandb (or EXTRAS=test,wandb "
                    "bash tools/install.sh); logging to TensorBoard only")
        return None
    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id"
    try:
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        run = wandb.init(project=project, entity=entity or None, mode=mode or None, dir=str(run_dir), name=name,
                         id=run_id, resume="allow", config=config)
    except Exception as e:  # noqa: BLE001 - no network, no API key, a bad entity: say so, train on
        log.warning("W&B could not start (%s: %s): logging to TensorBoard only. On a machine without network set "
                    "run.wandb_mode=offline (then `wandb sync %s/wandb/offline-run-*`); online runs need `wandb "
                    "login` or WANDB_API_KEY", type(e).__name__, e, run_dir)
        return None
    log.info("W&B run %s (project %s, mode %s) in %s", run_id, project, mode or "wandb's default", run_dir / "wandb")
    return run, wandb


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


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A run's TensorBoard scalar `tag` (from RUN/tb) → [(step, value)] by step (a resumed run's last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(points.items())
