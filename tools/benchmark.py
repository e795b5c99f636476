"""Shim: see vssl_ds/tools/benchmark.py (also installed as `vssl-benchmark`)."""
import sys

from vssl_ds.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
