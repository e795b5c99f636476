"""Shim: see vssl_ds/tools/fit_tokenizer.py (also installed as `vssl-fit-tokenizer`)."""
import sys

from vssl_ds.tools.fit_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
