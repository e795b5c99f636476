"""A hung rank ends the job instead of holding the allocation until the wall-clock limit.

Training makes progress in small beats (a batch taken, a step done, a checkpoint written). When no beat comes for
`run.hang_timeout` seconds, the watchdog writes what the rank was doing and every thread's stack (and asks this
rank's data workers for theirs), then leaves with exit code 6, so the launcher stops the other ranks and a SLURM
job fails (or is requeued) rather than idling its GPUs. Typical causes: a peer that died inside a collective, a
stalled network file system under the shards, a data worker stuck in a decoder.
"""
import faulthandler
import logging
import os
import signal
import sys
import threading
import time

import psutil

from ..logging import fault_stream

log = logging.getLogger(__name__)
EXIT_HUNG = 6
DUMP_SIGNAL = signal.SIGUSR2  # data workers write their stacks on it (see data.pipeline._ignore_stop_signals)


class Watchdog:
    def __init__(self, timeout: float, rank: int = 0):
        self.timeout, self.rank = float(timeout), rank
        self.phase, self.step = "starting", 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def beat(self, phase: str, step: int) -> None:
        """Progress: `phase` is what the rank does from now on (said in the report if it never comes back)."""
        self.phase, self.step, self._last = phase, step, time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.timeout > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="vssl-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 15.0)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        msg = (f"rank {self.rank} made no progress for {idle:.0f} s (run.hang_timeout={self.timeout:g}) at step "
               f"{self.step}, while {self.phase}. Every thread's stack follows, then the data workers'. Leaving with "
               f"exit code {EXIT_HUNG} so the launcher ends the job; the last checkpoint is intact (--auto-resume). "
               "Look for a rank that died first, a stalled shard file system or a stuck decoder; raise "
               "run.hang_timeout if steps or checkpoints are legitimately this slow.")
        log.error("%s", msg)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        stream = fault_stream()
        if stream is not None:
            faulthandler.dump_traceback(file=stream, all_threads=True)
        try:  # the data workers: forked children with this process's command line (not, e.g., a `pipe:` shard's shell)
            me = psutil.Process()
            workers = [c for c in me.children() if c.cmdline() == me.cmdline()]
        except psutil.Error:
            me, workers = None, []
        for worker in workers:
            try:
                os.kill(worker.pid, DUMP_SIGNAL)
            except OSError:
                pass
        time.sleep(2.0 if workers else 0.0)  # let them write before the rank goes
        sys.stderr.flush()
        try:  # no orphans: workers and what they started (a `pipe:` shard's command would outlive them)
            tree = me.children(recursive=True) if me is not None else []
        except psutil.Error:
            tree = []
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
        os._exit(EXIT_HUNG)
