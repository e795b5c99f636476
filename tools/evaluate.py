"""Shim: see vssl_ds/eval/run.py. `python tools/evaluate.py {finetune,linear,attentive,knn} --config … --set …`,
also under `deepspeed --num_gpus N tools/evaluate.py …` and torchrun (console scripts: vssl-finetune, …)."""
from vssl_ds.eval.run import cli

if __name__ == "__main__":
    cli()
