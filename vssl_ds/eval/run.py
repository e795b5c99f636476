"""Downstream evaluation entry points, on the same spine as pretraining (config, DeepSpeed, resume, TensorBoard):

    vssl-finetune         encoder + head trained end to end, then the multi-clip x multi-crop test pass
    vssl-linear-probe     frozen encoder, BatchNorm + linear head
    vssl-attentive-probe  frozen encoder, cross-attention probe
    vssl-knn              frozen encoder, weighted kNN (no training)

Each writes <run>/results.json (top-1 / top-5 on `eval.val`) and logs `eval/top1`, `eval/top5` to TensorBoard.
Under the DeepSpeed launcher: `deepspeed --num_gpus 8 tools/evaluate.py linear --config linear_probe --set …`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from ..cli import HelpFormatter, console
from ..config import ConfigError, load_config
from ..config.schema import Config
from ..data.shards import DataError
from ..engine import dist
from ..logging import Scalars, wandb_settings
from .metrics import TopK
from .testing import test_pass

log = logging.getLogger("vssl_ds.eval")

MODES = ("finetune", "linear", "attentive", "knn")
RECIPES = {"finetune": "finetune_vit_b", "linear": "linear_probe", "attentive": "attentive_probe", "knn": "knn"}


def parse_args(argv=None, mode: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"vssl-eval{' ' + mode if mode else ''}", description=__doc__,
                                formatter_class=HelpFormatter)
    if mode is None:
        p.add_argument("mode", choices=MODES)
    p.add_argument("--config", default="", help="recipe name or .yaml (default: the mode's recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (repeatable)")
    p.add_argument("--auto-resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = mode or args.mode
    args.config = args.config or RECIPES[args.mode]
    return args


def adopt_exported_architecture(cfg: Config) -> None:
    """With eval.weights, the encoder's architecture comes from its JSON: copy it into cfg.model (so the run's
    config.yaml records it) and check that the data produce clips of the size the encoder was built for."""
    if not cfg.eval.weights:
        return
    from ..models.exported import read_info

    if not Path(cfg.eval.weights).is_file():
        raise ConfigError(f"eval.weights: no file '{cfg.eval.weights}' (export one with tools/export.py RUN_DIR)")
    for key, value in read_info(cfg.eval.weights)["model"].items():
        setattr(cfg.model, key, list(value) if isinstance(value, (list, tuple)) else value)
    m, d = cfg.model, cfg.data
    if d.size != m.img_size:
        raise ConfigError(f"data.size={d.size} but the encoder in {cfg.eval.weights} takes {m.img_size}x{m.img_size} "
                          f"inputs: set data.size={m.img_size}")
    if not m.name.startswith("vit2d") and d.num_frames != m.num_frames:
        raise ConfigError(f"data.num_frames={d.num_frames} but the encoder in {cfg.eval.weights} takes "
                          f"{m.num_frames} frames: set data.num_frames={m.num_frames}")


def check_test_set(cfg: Config) -> None:
    """eval.val must name readable shards (checked before any work: it is read only after training)."""
    from ..data.shards import resolve_shards

    if not cfg.eval.val:
        return
    try:
        resolve_shards(cfg.eval.val)
    except ValueError as e:
        raise ConfigError(f"eval.val: {e}") from None
    check_class_lists(cfg.data.train, cfg.eval.val)


def check_class_lists(train: str, val: str) -> None:
    """Train and test manifests must number classes alike: a val split that lacks a class and was numbered on
    its own shifts every later id (top-1 10.5 % instead of 94.7 % on one such set). Make both with
    `make_shards --classes` (one list, or the train manifest)."""
    if not (train.endswith(".json") and val.endswith(".json")):
        return
    lists = []
    for path in (train, val):
        try:
            lists.append(json.loads(Path(path).read_text()).get("classes") or [])
        except (OSError, json.JSONDecodeError, AttributeError):
            return  # unreadable manifests are reported where they are read
    a, b = lists
    if a and b and a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = f"class {i} is {a[i] if i < len(a) else '(none)'!r} in {train} but {b[i] if i < len(b) else '(none)'!r} in {val}"
        raise ConfigError(f"eval.val: its class list differs from data.train's ({len(a)} vs {len(b)} classes; {first}): "
                          f"labels would not mean the same class. Remake the val shards with "
                          f"`make_shards --classes {train}`")


def write_results(cfg: Config, run_dir: Path, mode: str, scores: TopK, num_classes: int, step: int,
                  extra: dict) -> dict:
    e = cfg.eval
    results = {"mode": mode, "weights": e.weights or None, "encoder": cfg.model.name, "top1": scores.top1,
               "top5": scores.top5, "videos": scores.count, "num_classes": num_classes,
               "val": e.val, "train": cfg.data.train, "step": step, **extra}
    if dist.rank() == 0:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        tb = Scalars(run_dir / "tb", wandb_settings(cfg, run_dir, {**dataclasses.asdict(cfg), "results": results}))
        tb.add({"eval/top1": scores.top1, "eval/top5": scores.top5}, step)
        tb.close()
    return results


def train_and_test(cfg: Config, device: torch.device, mode: str) -> dict:
    from ..train import Trainer

    trainer = Trainer(cfg, device)
    run_dir = trainer.fit()
    if trainer.step < trainer.total_steps:  # preempted or stop_at: the test pass waits for the end of training
        log.info("training left at step %d of %d: no test pass yet (rerun with --auto-resume)", trainer.step,
                 trainer.total_steps)
        return {}
    e = cfg.eval
    if not e.val:
        log.warning("eval.val is empty: trained, but no test pass (give labelled test shards)")
        return {}
    method = trainer.method
    method.eval()
    scores = test_pass(method.logits, cfg, e.test_clips, e.test_crops, device,
                       lockstep=cfg.engine.zero_stage == 3)  # ZeRO-3: every forward gathers weights
    return write_results(cfg, run_dir, mode, scores, method.num_classes, trainer.step,
                         {"clips": e.test_clips, "crops": e.test_crops})


def knn_eval(cfg: Config, device: torch.device, run_dir: Path) -> dict:
    from .knn import knn_classify

    scores, num_classes = knn_classify(cfg, device, run_dir)
    e = cfg.eval
    return write_results(cfg, run_dir, "knn", scores, num_classes, 0,
                         {"k": e.knn_k, "t": e.knn_t, "clips": e.test_clips, "crops": e.test_crops})


def main(argv=None, mode: str | None = None) -> int:
    args = parse_args(argv, mode)
    try:
        cfg = load_config(args.config, args.set)
        if args.mode != "knn" and cfg.method.name != args.mode:
            cfg.method.name = args.mode  # the entry point names the mode; a recipe of another mode still serves
        adopt_exported_architecture(cfg)
        check_test_set(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cfg.run.auto_resume = cfg.run.auto_resume or args.auto_resume
    if args.print_config:
        from ..config import to_yaml

        print(to_yaml(cfg))
        return 0
    from ..train import NonFiniteLoss, open_run_dir, start_process

    device = start_process(cfg)
    run_dir = open_run_dir(cfg)
    try:
        results = knn_eval(cfg, device, run_dir) if args.mode == "knn" else train_and_test(cfg, device, args.mode)
    except NonFiniteLoss as e:  # every rank agreed on it: stop cleanly, as pretraining does
        log.error("%s", e)
        dist.shutdown()
        return 3
    except DataError as e:
        if not e.local:
            raise
        log.error("data error: %s", e)  # a data worker died under this rank alone: leave, the launcher stops the rest
        dist.abandon()
        return 4
    if results and dist.rank() == 0:
        print(f"\n{args.mode}: top-1 {results['top1']:.2f} %  top-5 {results['top5']:.2f} %  on {results['videos']} "
              f"videos\n  results: {run_dir / 'results.json'}\n  tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    dist.shutdown()
    return 0


def finetune(argv=None) -> int:
    return main(argv, "finetune")


def linear_probe(argv=None) -> int:
    return main(argv, "linear")


def attentive_probe(argv=None) -> int:
    return main(argv, "attentive")


def knn(argv=None) -> int:
    return main(argv, "knn")


# console scripts (pyproject.toml): main() run, then the process ended through engine.dist.leave
cli = console(main)
finetune_cli = console(finetune)
linear_probe_cli = console(linear_probe)
attentive_probe_cli = console(attentive_probe)

if __name__ == "__main__":
    cli()
