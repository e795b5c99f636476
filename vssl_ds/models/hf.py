"""Hugging Face `transformers` VideoMAE format, out and in, without needing `transformers` installed.

Out (`tools/export.py --format hf`): a folder that `transformers.VideoMAEModel.from_pretrained(folder)` loads —
`config.json` (model_type videomae, use_mean_pooling false so the model applies the encoder's final LayerNorm and its
`last_hidden_state` is vssl_ds's encoder output) and `model.safetensors` with VideoMAE's hub names (`q_bias` /
`v_bias`, as the released MCG-NJU checkpoints). Only what VideoMAE can express is written: a joint space-time video ViT
with VideoMAE's fixed 1D sin-cos position table, no CLS token, 3D patch embedding. The key bias of vssl_ds's fused qkv
is dropped: a bias added to every key shifts each query's scores by a constant, which the softmax removes, so the
outputs are unchanged.

In (`model.pretrained=<folder>`): a `VideoMAEModel`, `VideoMAEForPreTraining` or `VideoMAEForVideoClassification`
folder is renamed to the official VideoMAE layout (encoder.*, encoder_to_decoder, decoder.*, mask_token, fc_norm,
head) and read by that layout's rules (weights.py), so the decoder continues pretraining and a classifier's head
loads for fine-tuning.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def hf_config_for(model: nn.Module) -> dict:
    """VideoMAE's config.json for a vssl_ds video ViT, or a ValueError naming what VideoMAE cannot express."""
    from .layers import sincos_table
    from .vit import VideoViT

    if not isinstance(model, VideoViT):
        raise ValueError(f"the Hugging Face VideoMAE format holds a joint space-time video ViT; {type(model).__name__} "
                         "(divided attention, Swin or a 2D ViT) has no VideoMAE equivalent: export it with --format "
                         "vssl (the default) instead")
    if model.cls_token is not None:
        raise ValueError("this encoder has a CLS token (model.cls_token=true); VideoMAE has none: export with "
                         "--format vssl")
    n, d = model.num_patches, model.embed_dim
    if isinstance(model.pos_embed, nn.Parameter) or not torch.equal(model.pos_embed.cpu(), sincos_table(n, d)):
        raise ValueError("VideoMAE computes VideoMAE's fixed 1D sin-cos position table; this encoder has "
                         f"{'a learned' if isinstance(model.pos_embed, nn.Parameter) else 'another (3D, MVD-style)'} "
                         "table (model.pos_embed): export with --format vssl")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    t, p, _ = model.patch_size
    return {
        "architectures": ["VideoMAEModel"], "model_type": "videomae",
        "image_size": model.grid[1] * p, "patch_size": p, "num_channels": model.patch_embed.proj.weight.shape[1],
        "num_frames": model.grid[0] * t, "tubelet_size": t, "hidden_size": d, "num_hidden_layers": len(model.blocks),
        "num_attention_heads": attn.heads, "intermediate_size": mlp.fc1.out_features, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": model.norm.eps, "qkv_bias": attn.qkv.bias is not None, "use_mean_pooling": False,
        "norm_pix_loss": True, "torch_dtype": "float32",
    }


def to_hf(state: dict[str, torch.Tensor], heads_bias: bool = True) -> dict[str, torch.Tensor]:
    """vssl_ds video ViT state dict → VideoMAEModel's (hub names)."""
    out = {}
    for key, v in state.items():
        v = v.detach().float().contiguous()
        if key == "pos_embed":
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", key)
        if key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("norm."):
            out["layernorm." + key.split(".", 1)[1]] = v
        elif m:
            i, rest = m.groups()
            base = f"encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, k, w = v.chunk(3)
                out.update({base + "attention.attention.query.weight": q.clone(),
                            base + "attention.attention.key.weight": k.clone(),
                            base + "attention.attention.value.weight": w.clone()})
            elif rest == "attn.qkv.bias":  # the key bias is dropped: the softmax cancels it
                q, _k, w = v.chunk(3)
                out.update({base + "attention.attention.q_bias": q.clone(), base + "attention.attention.v_bias": w.clone()})
            else:
                names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                         "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}
                part, leaf = rest.rsplit(".", 1)
                if part not in names:
                    raise ValueError(f"no VideoMAE name for '{key}'")
                out[base + names[part] + "." + leaf] = v
        else:
            raise ValueError(f"no VideoMAE name for '{key}'")
    return out


def save_hf(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `out_dir/config.json` + `out_dir/model.safetensors` for VideoMAEModel."""
    from safetensors.torch import save_file

    config = hf_config_for(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(model.state_dict()), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, **({"vssl_ds": extra} if extra else {})}, indent=1))
    return out


# Hugging Face VideoMAE names (with or without the `videomae.` prefix) → the official VideoMAE checkpoint's
_LAYER = [  # (query / key / value weights are fused into qkv separately)
    (r"attention\.attention\.(?:q_bias|query\.bias)", "attn.q_bias"),
    (r"attention\.attention\.(?:v_bias|value\.bias)", "attn.v_bias"),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"intermediate\.dense\.(weight|bias)", r"mlp.fc1.\1"),
    (r"output\.dense\.(weight|bias)", r"mlp.fc2.\1"),
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
]


def read_hf_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """A VideoMAE folder → a state dict in the official VideoMAE checkpoint layout (weights.py reads it by rules)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "videomae":
        raise ValueError(f"'{path}' is a Hugging Face folder of model_type {config.get('model_type')!r}; vssl_ds reads "
                         "VideoMAE folders (model_type 'videomae')")
    weights = next((path / f for f in HF_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"'{path}' has a config.json but none of {', '.join(HF_FILES)} (sharded or "
                                "missing weights: save it with save_pretrained(..., max_shard_size='100GB'))")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(weights))
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    out, qkv = {}, {}
    for key, v in sd.items():
        key = key.removeprefix("videomae.")
        m = re.fullmatch(r"(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.*)", key)
        if m:
            where, i, rest = m.groups()
            prefix = f"{'encoder' if where == 'encoder.layer' else 'decoder'}.blocks.{i}."
            w = re.fullmatch(r"attention\.attention\.(query|key|value)\.weight", rest)
            if w:
                qkv.setdefault(prefix, {})[w.group(1)] = v
                continue
            for pattern, repl in _LAYER:
                if re.fullmatch(pattern, rest):
                    out[prefix + re.sub(pattern, repl, rest)] = v
                    break
            else:
                raise ValueError(f"'{weights}': no rule maps VideoMAE key '{key}'")
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["encoder.patch_embed.proj." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("layernorm."):
            out["encoder.norm." + key.split(".", 1)[1]] = v
        elif key.startswith(("fc_norm.", "decoder.norm.", "decoder.head.", "encoder_to_decoder.")) or key == "mask_token":
            out[key] = v
        elif key.startswith("classifier."):
            out["head." + key.split(".", 1)[1]] = v
        else:
            raise ValueError(f"'{weights}': no rule maps VideoMAE key '{key}'")
    for prefix, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"'{weights}': {prefix} has attention weights {sorted(parts)}, not query, key and value")
        out[prefix + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out
