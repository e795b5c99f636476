"""Shim: see vssl_ds/tools/cache_teachers.py (also installed as `vssl-cache-teachers`)."""
import sys

from vssl_ds.tools.cache_teachers import main

if __name__ == "__main__":
    sys.exit(main())
