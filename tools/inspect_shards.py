"""Shim: see vssl_ds/tools/inspect_shards.py (also installed as `vssl-inspect-shards`)."""
import sys

from vssl_ds.tools.inspect_shards import main

if __name__ == "__main__":
    sys.exit(main())
