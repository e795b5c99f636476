"""Shim: see vssl_ds/tools/benchmark.py (also installed as `vssl-benchmark`)."""
from vssl_ds.tools.benchmark import cli

if __name__ == "__main__":
    cli()
