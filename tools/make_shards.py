"""Shim: see vssl_ds/tools/make_shards.py (also installed as `vssl-make-shards`)."""
import sys

from vssl_ds.tools.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
