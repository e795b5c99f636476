"""Models: plain single-device nn.Modules, registered by name (`create_model`, `list_models`)."""
from ..compat import patch_torchvision

patch_torchvision()  # timm imports torchvision; see vssl_ds/compat.py

from .registry import create_model, list_models, register_model  # noqa: E402
from . import swin3d, vit, vit2d, vit_divided  # noqa: E402,F401  (register their variants)

__all__ = ["create_model", "list_models", "register_model"]


def architecture_overrides(m) -> dict:
    """`model.embed_dim / depth / num_heads` as create_model kwargs (ViT: one value each; Swin: one per stage)."""
    swin = m.name.startswith("swin")
    out = {"embed_dim": m.embed_dim} if m.embed_dim else {}
    for field_name, vit_kw, swin_kw in (("depth", "depth", "depths"), ("num_heads", "num_heads", "heads")):
        values = list(getattr(m, field_name))
        if not values:
            continue
        if not swin and len(values) != 1:
            raise ValueError(f"model.{field_name}: a ViT takes one value, got {values}")
        out[swin_kw if swin else vit_kw] = tuple(values) if swin else values[0]
    return out


def build_encoder(m, with_checkpoint: bool = False, drop: tuple[str, ...] = (), **extra):
    """The encoder a `ModelConfig` describes, with `m.pretrained` (a local file in any supported format,
    see weights.py) loaded into it. `with_checkpoint=True` → (model, Checkpoint or None): the caller loads
    the file's other parts (decoders, fc_norm, head) and reports what it leaves; `drop`: encoder key prefixes
    deliberately not loaded."""
    import logging

    from .weights import load_pretrained, report_unused

    if m.pos_embed != "sincos":  # only the ViTs take it
        extra["pos_embed"] = m.pos_embed
    if m.name.startswith("swin3d") and list(m.window) != [8, 7, 7]:
        extra["window"] = tuple(m.window)
    if m.name.startswith("swin3d") and m.swin_index != "official":
        extra["rel_index"] = m.swin_index
    if m.name.startswith("swin3d") and m.swin_image_path != "auto":
        extra["image_path"] = m.swin_image_path
    extra.update(architecture_overrides(m))
    model = create_model(m.name, img_size=m.img_size, num_frames=m.num_frames, tubelet=m.tubelet, patch=m.patch,
                         drop_path=m.drop_path, attn_backend=m.attn_backend, grad_ckpt=m.grad_ckpt, **extra)
    ck = None
    if m.pretrained:
        ck = load_pretrained(model, m.pretrained, drop=drop)
        logging.getLogger(__name__).info("encoder %s initialised from %s (%s format)", m.name, m.pretrained, ck.fmt)
        if not with_checkpoint:
            report_unused(ck, who=f"encoder {m.name}")
    if m.compile:
        from .layers import compile_blocks

        logging.getLogger(__name__).info("model.compile: %d blocks of %s compiled (torch.compile)",
                                         compile_blocks(model), m.name)
    return (model, ck) if with_checkpoint else model


__all__ += ["build_encoder"]
