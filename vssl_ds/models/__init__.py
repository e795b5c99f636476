"""Models: plain single-device nn.Modules, registered by name (`create_model`, `list_models`)."""
from ..compat import patch_torchvision

patch_torchvision()  # timm imports torchvision; see vssl_ds/compat.py

from .registry import create_model, list_models, register_model  # noqa: E402
from . import swin3d, vit, vit2d, vit_divided  # noqa: E402,F401  (register their variants)

__all__ = ["create_model", "list_models", "register_model"]
