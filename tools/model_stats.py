"""Shim: see vssl_ds/tools/model_stats.py (also installed as `vssl-model-stats`)."""
import sys

from vssl_ds.tools.model_stats import main

if __name__ == "__main__":
    sys.exit(main())
