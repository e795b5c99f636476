"""The engine: the only module that imports deepspeed.

Wraps `deepspeed.initialize` around the method's trainable module with a torch AdamW over the method's
parameter groups; the loop sees backward / step / save / load and nothing of DeepSpeed's API.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would detect, without its notice on every rank
import deepspeed  # noqa: E402

from ..config.schema import Config
from ..methods.base import Method
from . import dist
from .checkpoint import LATEST, prune, rank_state_path, read_latest, save_rank_state, write_atomic
from .ds_config import build_ds_config, resolve_precision

log = logging.getLogger(__name__)
SETUP = "vssl_setup.json"  # in every checkpoint folder: the settings a resume must match


def init_distributed(cfg: Config) -> torch.device:
    """Join (or create) the process group for any launch kind; returns this rank's device."""
    kind = dist.prepare_env()
    device = dist.device_for_local_rank()
    if device.type == "cpu":
        _skip_cpu_shm_allreduce()
    deepspeed.init_distributed(dist_backend=dist.resolve_backend(cfg.engine.backend, device),
                               auto_mpi_discovery=False, verbose=False)
    dist.init_control_group()
    log.debug("launch: %s, device %s", kind, device)
    return device


def _skip_cpu_shm_allreduce() -> None:
    """Leave out DeepSpeed's CPU shared-memory all-reduce op: only its inference all-reduce uses it (training
    collectives go through torch.distributed / gloo either way), and building it costs more than it could save.

    Its first use JIT-compiles C++ (30 s), every later start takes a lock file in ~/.cache/torch_extensions that a
    process killed at that moment leaves behind (every later start then waits on it forever), its init spins
    until every peer's 66 MB /dev/shm workspace exists, and it never unlinks those files.
    """
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")  # (the attribute deepspeed.comm.torch is torch itself)
    backend.build_shm_op = lambda: None


class SkippingAdamW(torch.optim.AdamW):
    """torch's fused AdamW, told through `found_inf` (a 0-d float on the device, as torch's GradScaler does) to skip
    an update without the host reading anything: when it is 1 the fused kernel leaves the parameters and both
    moments untouched and the step count is restored, so a skipped step is exactly no step. DeepSpeed's ZeRO
    optimizers and its fp32/bf16 wrappers call this object's `step` on their master partitions (ZeRO-3 and fp16
    also skip by themselves when the gradients are not finite; the flag covers every stage, and a non-finite loss
    whose gradients happen to be finite)."""

    def __init__(self, groups, device: torch.device, **kwargs):
        super().__init__(groups, lr=0.0, fused=True, **kwargs)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of the unfused AdamW (before 2026-12) restores its flags
            group.update(fused=True, foreach=None)


def check_ds_config(ds_config: dict, world_size: int = 1) -> None:
    """Let DeepSpeed itself parse the config (as `initialize` would) and raise on anything it rejects."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class _OneGroup:  # stands in for the data-parallel group so no process group is needed
        def get_data_parallel_world_size(self):
            return world_size

        def get_model_parallel_world_size(self):
            return 1

    DeepSpeedConfig(dict(ds_config), mpu=_OneGroup())


class Engine:
    def __init__(self, cfg: Config, method: Method, device: torch.device):
        self.device = device
        self.precision = resolve_precision(cfg.engine.precision, device)
        self.ds_config = build_ds_config(cfg, self.precision)
        method.to(device)
        o = cfg.optim
        self.optimizer = SkippingAdamW(method.param_groups(o.weight_decay), device, betas=tuple(o.betas), eps=o.eps)
        self.ds, _, _, _ = deepspeed.initialize(model=method.trainable, optimizer=self.optimizer, config=self.ds_config)
        m = cfg.model
        self.setup = {"engine.zero_stage": self.ds.zero_optimization_stage(), "engine.precision": self.precision,
                      "world size": dist.world(), "global batch": global_batch_of(cfg, dist.world()),
                      "method.name": cfg.method.name, "model.name": m.name,
                      "model.img_size": m.img_size, "model.num_frames": m.num_frames, "model.patch": m.patch,
                      "model.tubelet": m.tubelet}
        method.bind_student(self.ds)
        # BatchNorm statistics are buffers DeepSpeed does not synchronise: like DDP, rank 0's are broadcast after
        # every step so all ranks (and their checkpoints) agree. (Projector BNs are SyncBatchNorm on GPU.)
        self._bn_buffers = [b for m in method.trainable.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                            for b in m.buffers()]
        stage3 = self.ds.zero_optimization_stage() == 3
        for module in method.frozen.modules():  # EMA targets read the full online weights under ZeRO-3
            if hasattr(module, "gather") and hasattr(module, "update"):
                module.gather = lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                                                                   enabled=stage3)
        if self.precision != "fp32":  # frozen modules keep fp32 weights and run under autocast (Method.run_frozen)
            method.frozen_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16

    @property
    def param_groups(self) -> list[dict]:
        return self.ds.optimizer.param_groups

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise lr decay (fine-tuning)
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of a micro-batch, whatever its loss; → a 0-d float on the device, 1.0 when the loss is not finite
        on some rank (an all-reduce on the device: nothing is read back). The optimizer step that closes the
        accumulation window then leaves the weights, AdamW's moments and its step count exactly as they were
        (`SkippingAdamW`): a non-finite loss costs its window's update, never the weights."""
        bad = 1.0 - dist.finite_everywhere(loss).to(torch.float32)
        torch.maximum(self.optimizer.found_inf, bad, out=self.optimizer.found_inf)
        self.ds.backward(loss)
        return bad

    def step(self) -> None:
        """DeepSpeed's step: the optimizer update at the accumulation boundary, a micro-step count otherwise."""
        boundary = self.at_boundary()
        self.ds.step()
        if boundary:
            self.optimizer.found_inf.zero_()  # queued after the update that read it
        if self._bn_buffers and torch.distributed.is_initialized():
            for b in self._bn_buffers:
                torch.distributed.broadcast(b, 0)

    def at_boundary(self) -> bool:
        """True when the next step() applies the optimizer (gradient accumulation boundary)."""
        return self.ds.is_gradient_accumulation_boundary()

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable module's full weights on every rank (gathered from ZeRO-3 partitions), fp32, CPU."""
        module = self.ds.module
        stage3 = self.ds.zero_optimization_stage() == 3
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=stage3):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict, rank_state: dict, keep_last: int) -> None:
        """Write `tag`; `latest` moves only once every rank's files are on disk. Too little space (checked on
        every rank first, so all ranks stop together) or a failed write → CheckpointError; the partial folder is
        removed, the previous checkpoint and `latest` stay as they were."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        need = self._checkpoint_bytes(ckpt_dir)
        free = shutil.disk_usage(ckpt_dir).free
        (short,) = dist.any_true([free < need], self.device)
        if short:
            raise CheckpointError(self._disk_message(ckpt_dir, tag, f"about {need / 2**20:.1f} MiB are needed"))
        try:
            self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
            save_rank_state(rank_state_path(ckpt_dir, tag, dist.rank()), rank_state)
        except (OSError, RuntimeError) as e:
            if not _is_disk_error(e):
                raise
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            raise CheckpointError(self._disk_message(ckpt_dir, tag, f"the write failed: {e}")) from None
        if dist.rank() == 0:
            write_atomic(ckpt_dir / tag / SETUP, json.dumps(self.setup, indent=1))
        dist.barrier()  # every rank's files are on disk before `latest` moves
        if dist.rank() == 0:
            write_atomic(ckpt_dir / LATEST, tag)
            prune(ckpt_dir, keep_last, protect=tag)
        dist.barrier()

    def _checkpoint_bytes(self, ckpt_dir: Path) -> int:
        """This rank's share of a checkpoint: the size of the last one written, else weights + AdamW moments."""
        tag = read_latest(ckpt_dir)
        if tag and (ckpt_dir / tag).is_dir():
            files = [f for f in (ckpt_dir / tag).iterdir() if f.is_file()]
            return int(sum(f.stat().st_size for f in files) / max(dist.world(), 1) * 1.05)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.ds.module.parameters())
        return params * 4 * 4 // max(dist.world(), 1)  # fp32 weights, master copy, two moments

    def _check_setup(self, tag_dir: Path) -> dict:
        """A checkpoint resumes only under the settings that wrote it, the world size aside (DeepSpeed's own failure
        across ZeRO stages is `Empty ds_version in checkpoint` or a shape error): name what differs and what to do.
        → the saved settings ({} for a checkpoint written before vssl_ds recorded them)."""
        path = tag_dir / SETUP
        if not path.is_file():  # written before vssl_ds recorded it
            return {}
        saved = json.loads(path.read_text())
        differ = [f"{k} {saved[k]} → {v}" for k, v in self.setup.items()
                  if k in saved and saved[k] != v and k != "world size"]
        if differ:
            raise CheckpointError(
                f"cannot resume from {tag_dir}: it was written with other settings ({'; '.join(differ)}). Resume with "
                f"the settings that wrote it, or start a new run (another run.name, or run.overwrite=true); "
                f"consolidated weights of any checkpoint can start a new run: model.pretrained=<run>/final_model.pt")
        return saved

    def _universal(self, tag_dir: Path) -> Path:
        """DeepSpeed's universal checkpoint of `tag_dir` (per-parameter fp32 weights and Adam moments, loadable on
        any number of ranks), converted once by rank 0 into tag_dir/universal (atomically: a killed conversion
        leaves only a .tmp folder that the next attempt replaces)."""
        out = tag_dir / "universal"
        if dist.rank() == 0 and not out.is_dir():
            tmp = tag_dir / "universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            workers = str(max(1, min(4, os.cpu_count() or 1)))
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                   "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", workers,
                   "--num_merge_workers", workers]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed (exit "
                                      f"{proc.returncode}): {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, out)
            log.info("converted %s to DeepSpeed's universal checkpoint in %.1f s", tag_dir, time.perf_counter() - t0)
        dist.barrier()
        return out

    def _load_universal(self, ckpt_dir: Path, tag: str, saved_world: int):
        log.warning("world size %d → %d: loading %s through DeepSpeed's universal checkpoint (model, optimizer moments "
                    "and step re-partitioned over %d ranks)", saved_world, dist.world(), ckpt_dir / tag, dist.world())
        universal = self._universal(ckpt_dir / tag)
        self.ds._config.load_universal_checkpoint = True  # read by load_checkpoint only; later saves are as usual
        try:
            return self.ds.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            self.ds._config.load_universal_checkpoint = False

    @staticmethod
    def _disk_message(ckpt_dir: Path, tag: str, what: str) -> str:
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        return (f"cannot write checkpoint {tag} to {ckpt_dir}: {what}, {free:.1f} MiB free there. The previous "
                f"checkpoint ({read_latest(ckpt_dir) or 'none'}) and 'latest' are untouched: free space (or lower "
                f"run.keep_last, or move run.out_dir), then rerun with --auto-resume")

    def load(self, ckpt_dir: Path) -> tuple[dict, dict, Callable[[], list[dict]]] | None:
        """Restore the newest complete checkpoint → (client_state, this rank's state, `peers()`: every saved rank's
        state), or None if there is none. Written on another number of ranks: through the universal checkpoint."""
        tag = read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            return None
        saved = self._check_setup(ckpt_dir / tag)
        saved_world = int(saved.get("world size", dist.world()))
        if saved_world != dist.world() and self.ds.zero_optimization_stage() > 0:
            path, client_state = self._load_universal(ckpt_dir, tag, saved_world)
        else:  # same world size, or no ZeRO (the optimizer state is whole in the model-states file)
            if saved_world != dist.world():
                log.warning("world size %d → %d: ZeRO-0 keeps whole optimizer states, loading them as they are",
                            saved_world, dist.world())
            path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint '{ckpt_dir / tag}'")
        rank_file = rank_state_path(ckpt_dir, tag, dist.rank())
        rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}
        if not rank_state:
            log.warning("%s is missing (rank %d did not exist when it was written): this rank's RNG starts afresh",
                        rank_file, dist.rank())

        def peers() -> list[dict]:
            files = [rank_state_path(ckpt_dir, tag, r) for r in range(saved_world)]
            return [torch.load(f, weights_only=False) for f in files if f.is_file()]

        return client_state or {}, rank_state, peers


def global_batch_of(cfg: Config, world: int) -> int:
    """Clips per optimizer step over all ranks."""
    return cfg.data.batch_size * world * cfg.engine.grad_accum


def keep_global_batch(cfg: Config, ckpt_dir: Path, world: int) -> None:
    """Resuming on another number of ranks: set engine.grad_accum so the global batch (and with it the lr schedule
    and the epoch length) stays the checkpoint's; CheckpointError when no whole accumulation does."""
    tag = read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    path = ckpt_dir / tag / SETUP if tag else None
    if path is None or not path.is_file():
        return
    saved = json.loads(path.read_text())
    was, want = saved.get("world size"), saved.get("global batch")
    if was is None or want is None or was == world or global_batch_of(cfg, world) == want:
        return
    per_step = cfg.data.batch_size * world
    if want % per_step:
        fits = [b for b in range(1, want + 1) if want % (b * world) == 0 and b % cfg.data.repeats == 0]
        raise CheckpointError(
            f"cannot resume {ckpt_dir / tag} on {world} ranks: it trained with a global batch of {want} clips "
            f"({was} ranks), and data.batch_size={cfg.data.batch_size} x {world} ranks x a whole accumulation never "
            f"makes {want}. Set data.batch_size to one of {fits[-4:] or 'none'} (engine.grad_accum is then chosen "
            f"for you), or run on a number of ranks that divides {want // cfg.data.batch_size}")
    accum = want // per_step
    log.warning("resuming on %d ranks (was %d): engine.grad_accum %d → %d keeps the global batch of %d clips, so the "
                "lr schedule and the epoch length stay as they were", world, was, cfg.engine.grad_accum, accum, want)
    cfg.engine.grad_accum = accum


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, quota): the run stops, the previous checkpoint stays."""


def _is_disk_error(e: BaseException) -> bool:
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(e).lower()
        if "no space left" in text or "file write failed" in text or "quota" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def consolidated_weights(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable module's full fp32 weights from one DeepSpeed checkpoint folder of any ZeRO stage
    (ZeRO-3 partitions included), on CPU, without a process group → (state dict, client state)."""
    tag_dir = Path(tag_dir)
    states = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (*mp_rank_00_model_states.pt): "
                                "give a run folder, its checkpoints/ folder or one checkpoint folder in it")
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: the fp32 master weights are partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:  # no ZeRO: the module's own weights (fp32 unless trained in bf16/fp16 without master copies)
        state = saved["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, saved
