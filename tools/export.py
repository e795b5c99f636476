"""Shim: see vssl_ds/tools/export.py (also installed as `vssl-export`)."""
import sys

from vssl_ds.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
