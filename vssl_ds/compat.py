"""Import shims for the CPU-only install, kept in one place.

torchvision wheels on PyPI are built against CUDA torch; with a CPU-only torch their compiled ops
(`torchvision/_C.so`) fail to load, and `import torchvision` then dies while registering fake
kernels for `torchvision::nms` / `torchvision::qnms` — ops that were never defined. timm imports
torchvision, so every model import would fail with `operator torchvision::nms does not exist`.

`import_timm()` declares the two missing op *schemas* (no kernels) before torchvision is imported,
which is all its import-time registration needs. Calling `torchvision.ops.nms` afterwards still raises
a clear "no kernel" error; vssl_ds never uses torchvision's detection ops. Where the compiled ops do
load (a CUDA torch with its matching torchvision) nothing is changed.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_keepalive: list = []  # torch.library.Library objects unregister their ops when collected


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def patch_torchvision() -> bool:
    """Declare torchvision's op schemas when its compiled library did not; returns True if it patched."""
    # torchvision's own __init__ is what fails, so its library is located without importing it
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for lib_path in Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib_path))
        except OSError:
            pass  # CUDA-built library on a CPU-only torch: declared below instead
    missing = [n for n in _MISSING_OP_SCHEMAS if not _op_exists(n)]
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_MISSING_OP_SCHEMAS[name])
    _keepalive.append(lib)
    return True


def import_timm():
    """`import timm`, working around a torchvision whose compiled ops do not match torch."""
    patch_torchvision()
    import timm

    return timm


def tv_functional():
    """torchvision's v2 functional transforms (colour ops on uint8 tensors), through the same workaround."""
    patch_torchvision()
    from torchvision.transforms.v2 import functional

    return functional
