"""Shim: see vssl_ds/tools/make_ds_configs.py (also installed as `vssl-make-ds-configs`)."""
import sys

from vssl_ds.tools.make_ds_configs import main

if __name__ == "__main__":
    sys.exit(main())
