"""Parameters and FLOPs (GMACs, the papers' convention) of every registered model at its default input.

    vssl-model-stats [--filter vit_] [--set num_frames=32]
"""
from __future__ import annotations

import argparse
import sys

import yaml

from ..models import list_models
from ..models.stats import model_stats
from ..cli import HelpFormatter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vssl-model-stats", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--filter", default="", help="only models whose name contains this")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="constructor argument, e.g. num_frames=32")
    args = p.parse_args(argv)
    kwargs = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got '{item}'")
        kwargs[key] = yaml.safe_load(value)
    print(f"{'model':28s} {'params (M)':>11s} {'GFLOPs':>10s}")
    for name in list_models(args.filter):
        try:
            s = model_stats(name, **kwargs)
        except (TypeError, ValueError) as e:
            print(f"{name:28s} skipped: {e}")
            continue
        print(f"{name:28s} {s['params_m']:11.1f} {s['gflops']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
