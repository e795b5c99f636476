"""Shim: see vssl_ds/tools/extract.py (also installed as `vssl-extract`)."""
from vssl_ds.tools.extract import cli

if __name__ == "__main__":
    cli()
