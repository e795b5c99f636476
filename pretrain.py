"""Entry point for every launch: `python pretrain.py`, `torchrun … pretrain.py`, `deepspeed … pretrain.py`."""
import sys

from vssl_ds.train import main

if __name__ == "__main__":
    sys.exit(main())
