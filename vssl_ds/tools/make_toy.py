"""Everything the toy_* recipes read, written under data/toy/ (relative to where you run pretrain.py):

    data/toy/videos/     64 generated, labelled H.264 clips in 8 shards (the training set of every toy run)
    data/toy/val/        32 more clips of the same classes (the evaluation recipes' test split)
    data/toy/images/     48 generated images in 2 image shards (BEVT's image stream)
    data/toy/*.pth, *.pt the files the toy recipes name: stand-in teachers (random initialisation at the exact
                         shape each recipe builds them with) and a k-means tokenizer fitted on the video shards

    vssl-make-toy                    # then: pretrain.py --config toy_mvd (toy_bevt, toy_lstcl_byol_swin, …)

The files are derived from the toy recipes themselves (tokenizer codes, teacher shapes), so a recipe and its
inputs cannot drift apart. Existing files are kept: delete data/toy/ to start over. A toy run proves that a
method's path works end to end on CPU in seconds; stand-in teachers make its numbers meaningless.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..cli import HelpFormatter
from ..config import ConfigError, load_config
from ..config.loader import list_recipes
from ..config.validate import PRETRAINING

ROOT = "data/toy"  # the toy recipes name their inputs relative to the working folder
TOKENIZER_CODES = 64  # a k-means codebook for 16 cells of 8x8 px: DALL-E's 8192 would be mostly empty


def toy_recipes() -> list[str]:
    """The toy recipes (their shared settings are recipes/parts/toy.yaml and the backbone parts beside it)."""
    return [r for r in list_recipes() if r.startswith("toy_")]


def _write_images(root: Path, count: int) -> Path:
    from PIL import Image

    from ..data.synthetic import SHAPES, render_clip
    from .make_shards import main as make_shards

    src = root / "images_src"
    rng = np.random.default_rng(2)
    for i in range(count):
        folder = src / SHAPES[i % len(SHAPES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_clip(rng, i % len(SHAPES), 1, 80)[0]).save(folder / f"img{i:03d}.png")
    if make_shards([str(src), str(root / "images"), "--kind", "image", "--prefix", "img",
                    "--max-per-shard", str(count // 2), "--workers", "1"]) != 0:
        raise RuntimeError("make_shards failed on the generated images (see above)")
    return root / "images" / "manifest.json"


def _save_model(path: Path, name: str, seed: int, **shape) -> None:
    from ..models import create_model

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(create_model(name, **shape).state_dict(), path)
    print(f"  {path}: stand-in {name} {shape} (random initialisation)")


def _stand_ins(recipe: str) -> None:
    """The teacher / tokenizer files `recipe` names, when missing."""
    cfg = load_config(recipe)
    m = cfg.method
    if m.name not in PRETRAINING:  # evaluation recipes read toy_mae's export, written by its run
        return
    if m.name == "mvd":
        from ..methods.mvd import teacher_shapes

        img, vid = teacher_shapes(cfg)
        for spec, file, shape, seed in ((m.mvd.image_teacher, m.mvd.image_teacher_weights, img, 11),
                                        (m.mvd.video_teacher, m.mvd.video_teacher_weights, vid, 12)):
            if file and not Path(file).is_file() and not spec.startswith("timm:"):
                _save_model(Path(file), spec, seed, **shape)
    elif m.name == "iboot":
        from ..methods.iboot import teacher_shape

        file = m.iboot.teacher_weights
        if file and not Path(file).is_file() and not m.iboot.teacher.startswith("timm:"):
            _save_model(Path(file), m.iboot.teacher, 13, **teacher_shape(cfg))
    elif m.name == "bevt" and m.bevt.tokenizer == "kmeans" and not Path(m.bevt.tokenizer_weights).is_file():
        from .fit_tokenizer import main as fit_tokenizer

        if fit_tokenizer([cfg.data.train, m.bevt.tokenizer_weights, "--codes", str(TOKENIZER_CODES), "--frames",
                          "512", "--patches", "8192", "--size", str(cfg.data.size), "--short-range",
                          *map(str, cfg.data.short_range), "--iters", "10", "--workers", "1"]) != 0:
            raise RuntimeError(f"fit_tokenizer failed for {recipe} (see above)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vssl-make-toy", description=__doc__, formatter_class=HelpFormatter)
    p.parse_args(argv)
    from ..data.synthetic import write_synthetic_shards

    root = Path(ROOT)
    for name, clips, seed in (("videos", 64, 0), ("val", 32, 1)):
        if not (root / name / "manifest.json").is_file():
            write_synthetic_shards(root / name, clips=clips, shards=8 if name == "videos" else 4, frames=32, size=80,
                                   seed=seed)
            print(f"  {root / name}/manifest.json: {clips} generated clips")
    if not (root / "images" / "manifest.json").is_file():
        _write_images(root, 48)
    try:
        # iBoot's teacher takes the patch of whatever file it names: write MVD's grid-bound teachers first
        for recipe in sorted(toy_recipes(), key=lambda r: load_config(r).method.name == "iboot"):
            _stand_ins(recipe)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"toy inputs ready in {root}/: run .venv/bin/python pretrain.py --config <recipe>, recipes: "
          + ", ".join(toy_recipes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
