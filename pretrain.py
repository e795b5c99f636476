"""Entry point for every launch: `python pretrain.py`, `torchrun … pretrain.py`, `deepspeed … pretrain.py`."""
from vssl_ds.train import cli

if __name__ == "__main__":
    cli()
