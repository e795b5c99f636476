"""What every command-line tool shares: help that shows the whole description and every default, and the way a
command that may run as one rank of many ends its process."""
import argparse
from typing import Callable, NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written (not re-wrapped, not cut to its first paragraph) and `(default: …)`
    after every option that has one."""


def console(main: Callable[[], int | None]) -> Callable[[], NoReturn]:
    """The console-script target of a command that can run under a launcher (`vssl-pretrain = "vssl_ds.train:cli"`):
    it runs `main()` and ends the process through `engine.dist.leave` (see there why), while `main` itself stays a
    plain function that returns its exit code (the tests call it in-process)."""

    def run() -> NoReturn:
        from .engine.dist import leave

        leave(main())

    run.__doc__ = main.__doc__
    return run
