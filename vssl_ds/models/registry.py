"""Name → model constructor, one registered function per variant (timm's pattern)."""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    return sorted(n for n in _MODELS if pattern in n)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        hint = difflib.get_close_matches(name, _MODELS, n=1)
        raise ValueError(f"unknown model '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                         + f" (registered: {', '.join(list_models())})")
    return _MODELS[name](**kwargs)
