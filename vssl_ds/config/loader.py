"""Recipes (YAML, may inherit) + `--set a.b=value` overrides → a validated, typed `Config`.

Everything is checked before any work starts: an unknown key names the nearest valid one, a value of the
wrong type names the key and the expected type, a value outside its choices lists them.
"""
from __future__ import annotations

import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import CHOICES, Config
from .errors import ConfigError  # noqa: F401  (re-exported)
from .validate import check_values

INHERIT_KEY = "inherit"  # a recipe's parents: a recipe name / a path relative to the recipe, or a list of them


def recipe_dir() -> Path:
    return Path(str(resources.files("vssl_ds.config") / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _all_keys(f.default_factory, path + ".")
    return keys


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a right leaf name under the wrong section: match on the last component
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_keys(data: dict, source: str, prefix: str = "") -> None:
    """Reject keys the schema does not have, before OmegaConf sees them."""
    known = set(_all_keys())
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path not in known:
            raise ConfigError(f"{source}: unknown key '{path}'{_suggest(path, sorted(known))}")
        if isinstance(value, dict):
            _check_keys(value, source, path + ".")


def _resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file '{path}' does not exist")
        return path
    path = recipe_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        names = list_recipes()
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        raise ConfigError(
            f"unknown recipe '{name_or_path}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" (recipes: {', '.join(names)}; or pass a path to a .yaml file)"
        )
    return path


def _recipe_chain(name_or_path: str, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(path, data)] from the root parent down to the named recipe."""
    path = _resolve_recipe(name_or_path).resolve()
    if path in seen:
        raise ConfigError(f"recipe inheritance loops: {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop(INHERIT_KEY, None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"recipe '{path}': '{INHERIT_KEY}' must be a recipe name or a list of them, got {parents!r}")
    chain = []
    for parent in parents:  # merged in order: a later parent overrides an earlier one, the recipe overrides both
        local = path.parent / parent
        chain += _recipe_chain(str(local) if local.suffix in (".yaml", ".yml") else parent, seen + (path,))
    return chain + [(path, data)]


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _merge(cfg, data: dict, source: str):
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise ConfigError(f"{source}: bad value for '{key}': {_readable(e, key, cfg)}") from None


def _readable(e: OmegaConfBaseException, key: str, cfg) -> str:
    """OmegaConf's message without its internals (full_key / reference_type / object_type lines), plus the
    type the field wants and an example."""
    text = str(getattr(e, "msg", e)).splitlines()[0]
    if "AnyNode is not a ListConfig" in text:
        text = "a list is expected"
    try:
        current = OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001  (an unknown key is reported elsewhere)
        current = None
    if isinstance(current, bool):
        want = "true or false"
    elif isinstance(current, (int, float)):
        want = f"{'an integer' if isinstance(current, int) else 'a number'}, e.g. {current}"
    elif current is not None and OmegaConf.is_list(current):
        want = f"a list in brackets, e.g. {list(current)}"
    else:
        return text
    return f"{text}; give {want}"


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(map(repr, allowed))}")


def load_config(recipe: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """`recipe`: a recipe name, a .yaml path, or None for the schema defaults."""
    cfg = OmegaConf.structured(Config)
    for path, data in _recipe_chain(recipe) if recipe else []:
        _check_keys(data, f"recipe {path.name}")
        cfg = _merge(cfg, data, f"recipe {path.name}")
    for item in overrides:
        key, value = parse_override(item)
        _check_keys(_nest(key, value), f"--set {item}")
        cfg = _merge(cfg, _nest(key, value), f"--set {item}")
    obj: Config = OmegaConf.to_object(cfg)
    _check_choices(obj)
    check_values(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
