"""Process-group environment and the few collectives the loop needs (torch.distributed only)."""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

import torch
import torch.distributed as dist


def prepare_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for launches that do not set them; returns the launch kind.

    deepspeed and torchrun set them; `srun python pretrain.py` gives SLURM_* (MASTER_ADDR/PORT must come
    from the sbatch script); plain `python pretrain.py` is one process on this host.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return "launcher"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("srun launch without MASTER_ADDR: export it in the sbatch script "
                               "(see launchers/slurm_srun.sbatch)")
        os.environ.setdefault("MASTER_PORT", "29500")
        return "slurm"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # port 0: the store of a one-process group binds a port the kernel picks as it listens. A port probed free
    # beforehand could be taken by another process before the store binds it (EADDRINUSE, seen when single-process
    # runs start side by side)
    os.environ.setdefault("MASTER_PORT", "0")
    return "single"


def device_for_local_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and world() > 1:
        dist.barrier()


def shutdown() -> None:
    """The end of every multi-rank entry point: wait for all ranks, then tear the process group down
    explicitly. A rank that just exits while a peer still talks to it, or leaves gloo's threads to the
    interpreter's teardown, can die with `terminate called without an active exception` (SIGABRT)."""
    global _control, _shut_down
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
        _shut_down = True
    _control = None


def abandon() -> None:
    """The end of a rank that stops alone (a local fault, e.g. a data worker that died under it) while its peers are
    in the middle of a step: no barrier and no destroy_process_group (both would wait for ranks that are waiting in a
    collective themselves, until the hang timeout); `leave` then ends the process at once, and the launcher (deepspeed,
    torchrun, `srun --kill-on-bad-exit`) stops the other ranks when it sees the exit code."""
    global _shut_down
    if dist.is_initialized():
        _shut_down = True


_shut_down = False  # this process had a process group and took it down (shutdown) or gave it up (abandon)


def leave(code: int | str | None = 0) -> NoReturn:
    """How a command-line entry point ends its process (the `pretrain.py` / tool shims and console scripts).

    After `shutdown`, gloo's threads are still running: destroy_process_group() drops the groups from torch's
    registry, but DeepSpeed keeps references to them, so their worker and socket threads live on into the
    interpreter's teardown, where a C++ thread that still needs the interpreter is ended inside a destructor and
    the whole process aborts (`terminate called without an active exception`, SIGABRT): a rank whose work was
    done and written then fails the job (seen in CI on a finished 3-step run). So a process that took its group
    down leaves the way a finished one should without that teardown: its other threads finished as at exit, the
    exit handlers run (logging flushed, data workers stopped, multiprocessing's children joined), stdout and
    stderr flushed, then os._exit(code). A process that never had a group exits as usual (sys.exit)."""
    if not _shut_down:
        sys.exit(code)
    if isinstance(code, str):  # as sys.exit does with a message
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # what the interpreter's exit does first: thread-exit hooks (executors), then joins
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(code or 0)


_control = None  # a gloo group for the loop's flags, when the training backend is not gloo (see any_true)


def init_control_group() -> None:
    """Collective (every rank calls it once, after the process group is up): under NCCL, a gloo group of the same
    ranks for the loop's small host-side flags."""
    global _control
    if dist.is_initialized() and world() > 1 and dist.get_backend() != "gloo" and _control is None:
        _control = dist.new_group(backend="gloo")


def any_true(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of host-side boolean flags across ranks, in one small all-reduce. Over gloo (the default
    group on CPU, the control group under NCCL) the flags never touch the device, so reading the result does not
    wait for the work the device has queued (an NCCL all-reduce read back with .tolist() would drain the queue)."""
    host = not dist.is_initialized() or dist.get_backend() == "gloo" or _control is not None
    t = torch.tensor([float(f) for f in flags], device="cpu" if host else device)
    if dist.is_initialized() and world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control if host else None)
    return [bool(x) for x in t.tolist()]


def finite_everywhere(value: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on value's device: True when `value` is finite on every rank (a MIN all-reduce on the
    device; nothing is read back here)."""
    ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if dist.is_initialized() and world() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok[0] > 0


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and world() > 1):
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (then returns that slice).

    Every rank computes the same global loss over the gathered batch; the engine averages parameter
    gradients over ranks, so the result equals the single-process gradient over the whole global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """[b,...] on each rank → [world*b,...] in rank order, differentiable (contrastive negatives, NT-Xent).
    Every rank must pass the same shape (equal per-rank batches)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """[b,...] → [world*b,...] without a gradient path (keys from a momentum encoder)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
