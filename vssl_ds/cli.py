"""What every command-line tool shares: help that shows the whole description and every default, and the way a
command that may run as one rank of many ends its process."""
import argparse
import traceback
from typing import Callable, NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written (not re-wrapped, not cut to its first paragraph) and `(default: …)`
    after every option that has one."""


def console(main: Callable[[], int | None]) -> Callable[[], NoReturn]:
    """The console-script target of a command that can run under a launcher (`vssl-pretrain = "vssl_ds.train:cli"`):
    it runs `main()` and ends the process through `engine.dist.leave` (see there why), while `main` itself stays a
    plain function that returns its exit code (the tests call it in-process). An error that escapes `main` while the
    process group is up is printed as Python prints it and ends the process with exit code 1 the same way: the
    group's threads are then running for certain, and the teardown could turn the rank's traceback into an abort."""

    def run() -> NoReturn:
        import torch.distributed

        from .engine import dist

        try:
            code = main()
        except Exception:  # not SystemExit / KeyboardInterrupt: those keep Python's own ending
            if not torch.distributed.is_initialized():
                raise
            traceback.print_exc()
            dist.abandon()
            code = 1
        dist.leave(code)

    run.__doc__ = main.__doc__
    return run
