"""Export a vssl_ds checkpoint's encoder: fp32 safetensors with timm-style names + a JSON of the architecture.

    vssl-export runs/mvd_b                       # the run's latest checkpoint → runs/mvd_b/export/encoder.*
    vssl-export runs/mvd_b/checkpoints/step00050000 --out /models/mvd_b.safetensors
    vssl-export runs/videomae_b --format hf      # → runs/videomae_b/export/hf/: transformers.VideoMAEModel folder

Any ZeRO stage (ZeRO-3 partitions included) is consolidated on CPU without GPUs or a process group. The result
loads with `vssl_ds.models.exported.load_exported` and, for 2D ViTs, into timm directly (see its JSON's "timm").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..config import load_config
from ..engine.checkpoint import read_latest
from ..cli import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-export", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or one checkpoint folder (step…)")
    p.add_argument("--out", default="", help="output .safetensors (default: <run>/export/encoder.safetensors); with "
                                             "--format hf a folder (default: <run>/export/hf)")
    p.add_argument("--format", choices=("vssl", "hf"), default="vssl",
                   help="vssl: safetensors + architecture JSON (every encoder); hf: a Hugging Face folder that "
                        "transformers.VideoMAEModel.from_pretrained loads (joint-attention video ViTs with VideoMAE's "
                        "1D sin-cos positions and no CLS token)")
    return p.parse_args(argv)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder that `path` names (run folder → checkpoints/latest)."""
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = read_latest(path)
        return path / tag
    if any(path.glob("*mp_rank_00_model_states.pt")):
        return path
    raise FileNotFoundError(f"no checkpoint at '{path}': give a run folder (with checkpoints/latest), a "
                            "checkpoints/ folder or one checkpoint folder holding DeepSpeed's *model_states.pt")


def export(checkpoint: str | Path, out: str | Path = "", fmt: str = "vssl") -> tuple[Path, dict]:
    from tqdm import tqdm

    from ..engine.deepspeed import consolidated_weights
    from ..models.exported import save_exported

    tag_dir = find_checkpoint(Path(checkpoint))
    with tqdm(total=3, desc="export", unit="stage", bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]") as bar:
        bar.set_postfix_str(f"consolidating {tag_dir.name} (every ZeRO partition)")
        state, saved = consolidated_weights(tag_dir)
        bar.update()
        bar.set_postfix_str("matching the encoder's weights")
        model, cfg, extra, method = _encoder(tag_dir, state, saved)
        bar.update()
        meta = {"method": method, "step": int(saved.get("step", 0)), "source": str(tag_dir.resolve())}
        if fmt == "hf":
            from ..models.hf import hf_config_for, save_hf

            hf_config_for(model)  # what VideoMAE cannot express fails before anything is written
            out = Path(out) if out else tag_dir.parent.parent / "export" / "hf"
            bar.set_postfix_str(f"writing {out}")
            save_hf(model, out, meta)
            info = {**meta, "model": {"name": cfg.model.name}, "params": sum(p.numel() for p in model.parameters()),
                    "timm": None, "hf": str(out)}
        else:
            out = Path(out) if out else tag_dir.parent.parent / "export" / "encoder.safetensors"
            bar.set_postfix_str(f"writing {out}")
            info = save_exported(model, cfg.model, extra, out, meta)
        bar.update()
    return out, info


def _encoder(tag_dir: Path, state: dict, saved: dict):
    """The exported encoder with the checkpoint's weights → (model, config, extra build args, method name)."""
    from ..methods import ENCODER_PREFIX
    from ..models import build_encoder

    if "config" not in saved:
        raise ValueError(f"{tag_dir} carries no vssl_ds config in its client state; was it written by pretrain.py?")
    with tempfile.TemporaryDirectory() as tmp:  # the config travels inside the checkpoint: read it as a recipe
        recipe = Path(tmp) / "config.yaml"
        recipe.write_text(saved["config"])
        cfg = load_config(str(recipe))
    method = cfg.method.name
    if method not in ENCODER_PREFIX:
        raise ValueError(f"method '{method}' keeps no exportable encoder (exportable: {sorted(ENCODER_PREFIX)})")
    prefix = ENCODER_PREFIX[method]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{tag_dir}: no parameter starts with '{prefix}' (the {method} encoder); keys look like "
                         f"{sorted(state)[:3]}")
    extra = {"image_embed": True} if any(k.startswith("patch_embed_2d.") for k in weights) else {}
    cfg.model.pretrained = ""
    model = build_encoder(cfg.model, **extra)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"the {method} encoder of {tag_dir} does not match model.name={cfg.model.name}: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model, cfg, extra, method


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out, info = export(args.checkpoint, args.out, args.format)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "hf":
        print(f"encoder of {info['method']} step {info['step']} ({info['model']['name']}, {info['params'] / 1e6:.2f}M "
              f"values) → {out}\n  transformers.VideoMAEModel.from_pretrained('{out}')  (last_hidden_state = the "
              "encoder's tokens after its final norm; feed pixel_values [B,T,C,H,W] normalised like the training data)")
        return 0
    print(f"encoder of {info['method']} step {info['step']} ({info['model']['name']}, {info['params'] / 1e6:.2f}M "
          f"values) → {out}\n  architecture: {out.with_suffix('.json')}")
    if info["timm"]:
        print(f"  timm: timm.create_model('{info['timm']['name']}', **{info['timm']['kwargs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
