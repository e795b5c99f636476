"""Shim: see vssl_ds/tools/make_toy.py (also installed as `vssl-make-toy`)."""
import sys

from vssl_ds.tools.make_toy import main

if __name__ == "__main__":
    sys.exit(main())
