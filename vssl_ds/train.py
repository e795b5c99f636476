"""The one training loop, method-agnostic: data → method → engine, with logging, checkpoints, resume."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import torch

from .config import ConfigError, load_config, save_config, to_yaml
from .config.schema import Config
from .cli import HelpFormatter, console
from .config.validate import check_environment
from .data.build import build_loader
from .data.shards import DataError
from .engine import dist
from .engine.syncs import SyncCounter
from .engine.checkpoint import rng_state, set_rng_state
from .engine.schedules import build_schedules, global_batch
from .engine.watchdog import Watchdog
from .monitor import HealthMonitor
from .logging import Scalars, device_peak_tflops, peak_memory_gib, setup_console, wandb_settings
from .methods import build_method, cache_targets, mask_fns

log = logging.getLogger("vssl_ds.train")


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(  # prog: as called (pretrain.py, vssl-pretrain); a mistyped flag is an error, never a prefix
        description="Self-supervised video pretraining (vssl_ds). Exit codes: 0 done (or stopped with a checkpoint), "
                    "2 config error, 3 non-finite losses, 4 data error, 5 checkpoint not written, 6 no progress for "
                    "run.hang_timeout seconds (docs/RELIABILITY.md).",
        formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default="tiny_mae", help="recipe name (see --list-recipes) or path to a .yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set optim.blr=3e-4 (repeatable)")
    p.add_argument("--auto-resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ensure_default_data(cfg: Config) -> None:
    """The embedded default: no data.train → write small generated shards once (rank 0), then use them."""
    if cfg.data.train or not cfg.data.synthetic:
        return
    manifest = Path(cfg.data.synthetic_dir) / "manifest.json"
    val = Path(cfg.data.synthetic_dir + "_val") / "manifest.json"  # other clips of the same kind, for monitor.val
    want_val = cfg.data.synthetic_val_clips > 0 and not cfg.monitor.val and cfg.monitor.every > 0
    if dist.rank() == 0:
        from .data.synthetic import write_synthetic_shards

        if not manifest.is_file():
            log.info("data.train is empty: writing %d generated clips to %s", cfg.data.synthetic_clips,
                     manifest.parent)
            write_synthetic_shards(manifest.parent, clips=cfg.data.synthetic_clips, shards=8,
                                   task=cfg.data.synthetic_task)
        if want_val and not val.is_file():
            log.info("writing %d generated labelled clips (another seed) to %s for the monitor's kNN probe",
                     cfg.data.synthetic_val_clips, val.parent)
            write_synthetic_shards(val.parent, clips=cfg.data.synthetic_val_clips, shards=4, seed=1,
                                   task=cfg.data.synthetic_task)
    dist.barrier()
    cfg.data.train = str(manifest)
    if want_val:
        cfg.monitor.val = str(val)


class StopRequest:
    """SIGTERM / SIGUSR1 (cluster preemption) and a first SIGINT (Ctrl-C): finish the current optimizer step,
    checkpoint, exit 0. A second SIGINT leaves at once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: leaving without a checkpoint")
        if signum == signal.SIGINT:
            print("Ctrl-C: finishing this step and checkpointing (Ctrl-C again leaves at once, without one)",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum


class Trainer:
    def __init__(self, cfg: Config, device: torch.device):
        from .engine.deepspeed import Engine, keep_global_batch

        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.rank(), dist.world()
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.run.auto_resume:  # on another number of ranks: the same global batch, through the accumulation
            keep_global_batch(cfg, self.ckpt_dir, self.world)
        d = cfg.data
        self.loader, self.samples = build_loader(d, *mask_fns(cfg), self.rank, self.world, cfg.run.seed, *cache_targets(cfg))

        self.accum = cfg.engine.grad_accum
        self.global_batch, self.global_videos = global_batch(d.batch_size, d.repeats, self.world, self.accum)
        self.steps_per_epoch = max(self.samples // self.global_videos, 1)
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * self.steps_per_epoch
        self.schedules = build_schedules(cfg.optim, self.total_steps, self.steps_per_epoch, self.global_videos)

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.method = build_method(cfg)
        self.method.total_steps = self.total_steps  # momentum / temperature schedules span the run
        self.engine = Engine(cfg, self.method, device)
        torch.manual_seed(cfg.run.seed + 1000 * self.rank + 1)  # per-rank stream (drop path)

        self.step, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []  # (step, keys, non-finite flag) not read yet
        self.syncs = SyncCounter(cfg.run.sync_check, device)
        self.watchdog = Watchdog(cfg.run.hang_timeout, self.rank)
        self.preempted = False  # stopped by a signal, with a checkpoint
        self.bar = None  # rank 0's progress bar on a terminal
        self._started, self._windows = time.monotonic(), deque(maxlen=10)  # (steps, seconds) of recent log windows
        self._first_window = None
        self.scalars = Scalars(self.run_dir / "tb" if self.rank == 0 else None,
                               wandb_settings(cfg, self.run_dir, dataclasses.asdict(cfg)) if self.rank == 0 else None)
        self.flops_per_clip = 0.0
        self.peak_tflops = device_peak_tflops(device, cfg.run.peak_tflops)
        self.monitor = self._health_monitor()
        self._monitor_seconds = 0.0
        self.loss_ends: list[tuple[int, float]] = []  # (step, loss) of the first and the latest log line

    @contextlib.contextmanager
    def _progress_bar(self):
        """Rank 0 on a terminal: a progress bar (steps, rate, ETA, last loss) with the log lines printed above it."""
        self.bar = None
        if self.rank != 0 or not sys.stderr.isatty():
            yield
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        with tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                  desc=self.cfg.run.name) as bar, logging_redirect_tqdm():
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def _health_monitor(self) -> HealthMonitor | None:
        from .methods import ENCODER_PREFIX

        prefix = ENCODER_PREFIX.get(self.cfg.method.name)
        if not self.cfg.monitor.every or prefix is None:
            return None
        encoder = self.engine.ds.module.get_submodule(prefix.rstrip("."))
        return HealthMonitor(self.cfg, encoder, self.device, self.run_dir, self.scalars, self.method,
                             mask_fns(self.cfg)[0], beat=lambda: self.watchdog.beat("running the health monitor",
                                                                                    self.step))

    # --- state ------------------------------------------------------------------------------------
    def save(self) -> None:
        tag = f"step{self.step:08d}"
        self._settle_nonfinite()
        self.watchdog.beat(f"writing checkpoint {tag}", self.step)
        client = {"step": self.step, "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                  "config": to_yaml(self.cfg),
                  "evolving": self.method.evolving_state()}  # EMA targets (identical on every rank)
        ranks = {"rng": rng_state(), "data": self.loader.state_dict()}
        self.engine.save(self.ckpt_dir, tag, client, ranks, self.cfg.run.keep_last)
        log.info("checkpoint %s written to %s", tag, self.ckpt_dir / tag)

    def resume(self) -> None:
        restored = self.engine.load(self.ckpt_dir)
        if restored is None:
            log.info("auto-resume: no checkpoint in %s, starting from step 0", self.ckpt_dir)
            return
        client, ranks, peers = restored
        self.step, self.nonfinite_total = int(client["step"]), int(client.get("nonfinite_total", 0))
        self.nonfinite_run = int(client.get("nonfinite_run", 0))
        if "evolving" in client:
            self.method.load_evolving_state(client["evolving"])
        elif self.method.evolving_state():
            log.warning("the checkpoint has no EMA target state (written before vssl_ds saved it): the momentum "
                        "target restarts from the initial weights")
        data = ranks.get("data") or next((p["data"] for p in peers() if "data" in p), None)
        if data is not None:  # another layout: the loader reads every saved rank's record of trained samples
            self.loader.load_state_dict(data, lambda: [p["data"] for p in peers() if "data" in p])
        if "rng" in ranks:
            set_rng_state(ranks["rng"])
        log.info("resumed at step %d (epoch %d) from %s", self.step, self.loader.epoch, self.ckpt_dir)

    # --- loop ---------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg = self.cfg
        if cfg.run.auto_resume:
            self.resume()
        stop = StopRequest()
        self._started = time.monotonic()
        log.info("training %d steps (%d/epoch), global batch %d clips (%d videos x %d repeats) = %d/device x %d "
                 "devices x %d accumulation, precision %s, ZeRO-%d", self.total_steps, self.steps_per_epoch,
                 self.global_batch, self.global_videos, cfg.data.repeats,
                 cfg.data.batch_size, self.world, self.accum, self.engine.precision, cfg.engine.zero_stage)
        self._fresh_epoch = not self._resumed_mid_epoch()
        self._batches = iter(self.loader)
        with self.watchdog, self._progress_bar():
            if self.monitor is not None and self.monitor.val and self.step == 0:
                self.monitor.knn(0)  # the random initialisation: where the monitor/knn_top1 curve starts
            try:
                saved, preempted = self._loop(stop)
            finally:  # shut the data workers down while the interpreter is whole (else exit can hang)
                self._batches.close()
                if self.rank == 0:
                    self.syncs.report(self.run_dir / "sync_check.json")
            self.preempted = preempted
            if preempted:
                return self.run_dir
            if saved != self.step or not self.ckpt_dir.joinpath("latest").is_file():
                self.save()
            if self.loss_ends and len(self.loss_ends) > 1:
                (s0, first), (s1, last) = self.loss_ends
                log.info("loss %.4f at step %d → %.4f at step %d (%+.0f %%)", first, s0, last, s1,
                         100 * (last - first) / abs(first) if first else 0.0)
            if self.monitor is not None and len(self.monitor.knn_history) > 1:
                (s0, first), (s1, last) = self.monitor.knn_history[0], self.monitor.knn_history[-1]
                log.info("monitor kNN top-1 on %s: %.1f %% at step %d → %.1f %% at step %d (%d classes: chance "
                         "%.1f %%; leave-one-out kNN of uninformative features scores below chance)", self.cfg.monitor.val,
                         first, s0, last, s1, self.monitor.knn_classes, 100 / max(self.monitor.knn_classes, 1))
            if self._monitor_seconds:
                log.info("health monitor: %.1f s, %.2f%% of the training time (monitor.every=%d)", self._monitor_seconds,
                         100 * self._monitor_seconds / max(time.monotonic() - self._started, 1e-9),
                         self.cfg.monitor.every)
            self.watchdog.beat("exporting the final weights", self.step)
            self.export_final()
        self.scalars.close()
        return self.run_dir

    def export_final(self) -> None:
        """Write the trained weights and check that every rank ends with the same parameters."""
        state = self.engine.full_state_dict()
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].numpy().tobytes())
        digests = dist.all_gather_object(digest.hexdigest())
        if self.rank == 0:
            torch.save(state, self.run_dir / "final_model.pt")
            (self.run_dir / "final_digests.json").write_text(json.dumps({"step": self.step, "ranks": digests}))
        if len(set(digests)) > 1:
            log.error("parameters differ across ranks at the end of training: %s", digests)
        else:
            log.info("final weights (%s) identical on all %d ranks", self.run_dir / "final_model.pt", self.world)

    def _loop(self, stop: StopRequest) -> tuple[int, bool]:
        """Micro-steps until the end (or stop_at / a stop signal); → (last step saved, preempted)."""
        cfg = self.cfg
        window = defaultdict(float)
        micro, last_saved, epoch_micro = 0, self.step, 0
        tick = time.perf_counter()
        while self.step < self.total_steps:
            if micro == 0:  # between optimizer steps, before the next batch is taken from the loader (whose
                # position then still counts only trained batches: the resume neither loses nor repeats one)
                (stopping,) = dist.any_true([stop.signum is not None], self.device)
                if stopping:
                    log.warning("signal %s received (on some rank): checkpointing at step %d and exiting",
                                stop.signum or "", self.step)
                    self.save()
                    return self.step, True
            t_fetch = time.perf_counter()
            self.watchdog.beat("waiting for a batch from the data loader", self.step)
            batch = next(self._batches, None)
            window["data_time"] += time.perf_counter() - t_fetch
            self.watchdog.beat("in a training micro-step (forward, backward, collectives, optimizer)", self.step)
            (ran_out,) = dist.any_true([batch is None], self.device)
            if ran_out:  # some rank finished its shards: everyone starts the next epoch together
                if batch is not None:
                    self._batches.close()
                    self.loader.next_epoch()
                if self._fresh_epoch and epoch_micro == 0:  # ranks step in lockstep: none got a batch
                    raise self._no_batch_error()
                log.info("epoch %d done at step %d", self.loader.epoch - 1, self.step)
                self._batches = iter(self.loader)
                self._fresh_epoch, epoch_micro = True, 0
                continue
            if self.flops_per_clip == 0.0 and self.peak_tflops > 0:
                self.flops_per_clip = self._measure_flops(batch)
            epoch_micro += 1
            with self.syncs.watch():  # run.sync_check (GPU): where a micro-step makes the host wait
                self._micro_step(batch, window)
            micro = (micro + 1) % self.accum
            if micro:
                continue
            self.step += 1
            self.method.after_step(self.step)
            if self.bar is not None:
                self.bar.update(1)
            if self.monitor is not None and self.monitor.due(self.step):
                t_monitor = time.perf_counter()
                self.monitor.run(self.step)
                self._monitor_seconds += time.perf_counter() - t_monitor
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                self._log(window, time.perf_counter() - tick)
                window, tick = defaultdict(float), time.perf_counter()
            if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0:
                self.save()
                last_saved = self.step
            if cfg.run.stop_at and self.step >= cfg.run.stop_at:
                log.info("run.stop_at=%d reached: leaving; --auto-resume continues the run", cfg.run.stop_at)
                break
        return last_saved, False

    def _micro_step(self, batch, window) -> None:
        """Forward, backward and (at the accumulation boundary) the optimizer step. Nothing is read back here: the
        engine flags a loss that is not finite on some rank on the device, and the optimizer step closing that
        accumulation window then changes nothing (weights, moments, step count); the loop reads the flags with the
        losses at the next log line or checkpoint (`_settle_nonfinite`)."""
        batch = batch.decoded(self.device)  # data.decode_device: the videos are decoded here, on the device
        if self.monitor is not None:
            self.monitor.collect(batch.video, batch.views, batch.targets)  # the probe: the first clips trained on
        batch = batch.to(self.device, self.cfg.data.mean, self.cfg.data.std)
        out = self.method(batch)
        bad = self.engine.backward(out.loss)
        self._pending.append((self.step + 1, batch.keys[:4], bad))
        if self.cfg.run.record_keys:
            self._record_keys(batch.keys)
        if self.engine.at_boundary():
            self.engine.set_schedule(float(self.schedules["lr"][self.step]), float(self.schedules["wd"][self.step]))
        self.engine.step()
        good = bad < 0.5
        # summed on the device over the micro-steps whose loss was finite everywhere, read at the log line
        window["loss"] = window["loss"] + torch.where(good, out.loss.detach().float(), 0.0)
        for name, value in out.metrics.items():  # (a Python number goes in as a kernel argument, not a copy)
            window[name] = window[name] + torch.where(good, value.detach().float() if torch.is_tensor(value)
                                                      else float(value), 0.0)
        window["trained"] = window["trained"] + good.float()
        window["micro"] += 1
        window["clips"] += batch.size

    def _settle_nonfinite(self) -> None:
        """Read the non-finite flags of the micro-steps since the last call (one read), count and report them, and
        stop the run (every rank: the flags are all-reduced) after run.max_nonfinite of them in a row."""
        if not self._pending:
            return
        flags = torch.stack([bad.reshape(()) for _, _, bad in self._pending]).tolist()
        seen, longest = [], (0, 0)  # (step, keys, run) of the bad ones; (run, step) of the longest run
        for (step, keys, _), flag in zip(self._pending, flags):
            if flag > 0.5:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                seen.append((step, keys, self.nonfinite_run))
                longest = max(longest, (self.nonfinite_run, step))
            else:
                self.nonfinite_run = 0
        self._pending.clear()
        for step, keys, run in seen[:3]:
            log.warning("non-finite loss at step %d (keys %s): that optimizer step left the weights unchanged "
                        "(%d in a row)", step, keys, run)
        if len(seen) > 3:
            log.warning("... and %d more non-finite losses up to step %d", len(seen) - 3, seen[-1][0])
        run, step = longest
        if run >= self.cfg.run.max_nonfinite:
            self.scalars.add({"train/nonfinite_total": self.nonfinite_total}, self.step)  # seen before the abort
            self.scalars.close()
            raise NonFiniteLoss(
                f"{run} non-finite losses in a row up to step {step}: look at the learning rate "
                f"(optim.blr / optim.lr, warmup), engine.precision (fp16 overflows; try bf16 or fp32), "
                f"optim.clip_grad, and the data ('loss/*' and 'data/faults' in TensorBoard)")

    def _resumed_mid_epoch(self) -> bool:
        loader = getattr(self.loader, "videos", self.loader)
        return bool(loader.positions)

    def _no_batch_error(self) -> "DataError":
        d, loader = self.cfg.data, getattr(self.loader, "videos", self.loader)
        listed = len(loader.dataset.shards) + loader.missing_shards
        faults = self.loader.fault_counts()
        unreadable = int(faults.get("unreadable", 0))
        workers = max(d.num_workers, 1)
        return DataError(
            f"epoch {self.loader.epoch - 1} ended before its first step (a rank got no batch): {listed} shards listed, {loader.missing_shards} "
            f"missing, {unreadable} read errors; {self.samples} samples for {self.world} ranks x {workers} data workers "
            f"at data.batch_size={d.batch_size} (each worker keeps only whole batches, so it needs at least "
            f"{d.batch_size} readable samples per epoch). Fix the shards, or lower data.batch_size / data.num_workers")

    def _record_keys(self, keys: list[str]) -> None:
        """run.record_keys: this rank's sample keys per micro-step (what the fault tests compare)."""
        path = self.run_dir / "keys" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.step, "keys": list(keys)}) + "\n")

    def _measure_flops(self, batch) -> float:
        """Training FLOPs per clip (forward x3), counted once on the first batch."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            self.method(batch.to(self.device, self.cfg.data.mean, self.cfg.data.std))
        return 3.0 * counter.get_total_flops() / batch.size

    def _log(self, window, seconds: float) -> None:
        self._settle_nonfinite()
        n = max(window["micro"], 1)
        # every term a method returns
        names = sorted(k for k in window if k not in ("data_time", "micro", "clips", "trained"))
        trained = torch.as_tensor(window["trained"], dtype=torch.float32, device=self.device).reshape(())
        # means over the micro-steps whose loss was finite (the flags are global: the same count on every rank);
        # NaN when none was
        per = torch.where(trained > 0, 1.0 / trained.clamp(min=1.0), float("nan"))
        totals = torch.stack([torch.as_tensor(window[k], dtype=torch.float32, device=self.device).reshape(()) * per
                              for k in names] + [torch.tensor(float(window["clips"]), device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        means = {k: float(v) / self.world for k, v in zip(names, totals[:-1])}
        clips_per_s = float(totals[-1]) / max(seconds, 1e-9)
        faults = self.loader.fault_counts()
        scalars = {("train/" + k if "/" not in k else k): v for k, v in means.items()}
        scalars.update({
            "opt/lr": max(g["lr"] for g in self.engine.param_groups),  # the base lr (layer decay scales down)
            "opt/weight_decay": self.engine.param_groups[0]["weight_decay"],
            "perf/step_time_s": seconds / max(n / self.accum, 1),
            "perf/clips_per_s": clips_per_s,
            "perf/data_wait_frac": window["data_time"] / max(seconds, 1e-9),
            "perf/peak_mem_gib": peak_memory_gib(self.device),
            "train/nonfinite_total": self.nonfinite_total,
            "data/faults": float(sum(faults.values())),
        })
        grad_norm = self.engine.grad_norm()
        if grad_norm is not None:
            scalars["opt/grad_norm"] = grad_norm
        if self.flops_per_clip and self.peak_tflops:
            scalars["perf/mfu"] = self.flops_per_clip * clips_per_s / (self.world * self.peak_tflops * 1e12)
        eta = self._eta(n / self.accum, seconds)
        if self.bar is not None and "loss" in means:
            self.bar.set_postfix_str(f"loss {means['loss']:.4f}", refresh=False)
        if math.isfinite(means.get("loss", math.nan)):  # the first and the latest logged loss: how far it fell
            self.loss_ends = (self.loss_ends or [(self.step, means["loss"])])[:1] + [(self.step, means["loss"])]
        scalars["perf/eta_h"] = eta / 3600
        self.scalars.add(scalars, self.step)
        terms = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        log.info("step %d/%d epoch %d %s lr=%.2e %.1f clips/s data-wait %.0f%% mem %.2f GiB elapsed %s eta %s",
                 self.step, self.total_steps, self.loader.epoch, terms, scalars["opt/lr"], clips_per_s,
                 100 * scalars["perf/data_wait_frac"], scalars["perf/peak_mem_gib"],
                 _clock(time.monotonic() - self._started), _clock(eta))

    def _eta(self, steps: float, seconds: float) -> float:
        """Seconds to the last step, at the mean step time of the last 10 log windows (the first window, which
        holds start-up and compilation, drops out once there are others)."""
        if self._first_window is None:
            self._first_window = (steps, seconds)
        else:
            self._windows.append((steps, seconds))
        recent = self._windows or [self._first_window]
        per_step = sum(t for _, t in recent) / max(sum(n for n, _ in recent), 1e-9)
        return max(self.total_steps - self.step, 0) * per_step


def _clock(seconds: float) -> str:
    """h:mm:ss (d days h:mm:ss beyond a day)."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def start_process(cfg: Config) -> torch.device:
    """Join the process group (any launcher) and set up this rank's console log → its device."""
    from .engine.deepspeed import init_distributed

    device = init_distributed(cfg)
    setup_console(dist.rank())
    return device


def open_run_dir(cfg: Config) -> Path:
    """The run folder, with the fully resolved config written into it (rank 0)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if dist.rank() == 0:
        if cfg.run.overwrite and not cfg.run.auto_resume:  # start over: nothing of the old run stays beside the new
            import shutil

            for name in ("checkpoints", "tb", "keys", "export"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            for name in ("final_model.pt", "final_digests.json"):
                (run_dir / name).unlink(missing_ok=True)
            log.warning("run.overwrite=true: the earlier run in %s was deleted", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()
    return run_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_recipes:
        from .config import list_recipes

        print("\n".join(list_recipes()))
        return 0
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg.run.auto_resume = cfg.run.auto_resume or args.auto_resume
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    try:
        check_environment(cfg)  # files, run folder, precision: before any process group or DeepSpeed work
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .engine.deepspeed import CheckpointError

    device = start_process(cfg)
    ensure_default_data(cfg)
    run_dir = open_run_dir(cfg)
    try:
        trainer = Trainer(cfg, device)
        run_dir = trainer.fit()
    except NonFiniteLoss as e:  # every rank agreed on it (the check is all-reduced): stop cleanly
        log.error("%s", e)
        dist.shutdown()
        return 3
    except DataError as e:  # every rank meets the same data (listing, or an epoch without a batch): stop cleanly
        log.error("data error: %s", e)
        dist.abandon() if e.local else dist.shutdown()  # local: a data worker died under this rank alone
        return 4
    except CheckpointError as e:  # disk full: every rank saw the space check (all-reduced); nothing half-written
        log.error("%s", e)
        dist.shutdown()
        return 5
    if dist.rank() == 0 and trainer.preempted:
        print(f"\nstopped at step {trainer.step} of {trainer.total_steps} with a checkpoint in {trainer.ckpt_dir}: "
              "rerun with --auto-resume to continue")
    elif dist.rank() == 0:
        print(f"\ndone: {trainer.step} steps\n  config:      {run_dir / 'config.yaml'}\n"
              f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}\n  checkpoint:  {trainer.ckpt_dir}")
    dist.shutdown()
    return 0


# console scripts (pyproject.toml): main() run, then the process ended through engine.dist.leave
cli = console(main)

if __name__ == "__main__":
    cli()
