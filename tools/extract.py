"""Shim: see vssl_ds/tools/extract.py (also installed as `vssl-extract`)."""
import sys

from vssl_ds.tools.extract import main

if __name__ == "__main__":
    sys.exit(main())
