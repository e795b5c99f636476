"""Shim: see vssl_ds/tools/cache_teachers.py (also installed as `vssl-cache-teachers`)."""
from vssl_ds.tools.cache_teachers import cli

if __name__ == "__main__":
    cli()
