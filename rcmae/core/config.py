"""Configs: nested dicts of defaults, YAML files that override them, ``key.sub=value`` overrides.

A config file may only set keys that exist in the defaults of its tool; an unknown key is an error
that lists the valid ones. Values are type-checked against the default's type.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from rcmae.core.errors import ConfigError

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _check_type(key: str, default: Any, value: Any, source: str) -> Any:
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value):  # YAML 1.1 reads "3e-4" as a string
        value = float(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {type(default).__name__} "
                          f"(default {default!r}), got {value!r}")
    return value


def _set(cfg: dict, defaults: dict, key: str, value: Any, source: str) -> None:
    valid = flatten(defaults)
    if key not in valid:
        close = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]]
        close += [k for k in difflib.get_close_matches(key, valid, n=3, cutoff=0.75) if k not in close]
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"{source}: unknown key {key!r}.{hint} Valid keys:\n  "
                          + "\n  ".join(sorted(valid)))
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = _check_type(key, valid[key], value, source)


def merge(cfg: dict, defaults: dict, updates: dict, source: str) -> None:
    for key, value in flatten(updates).items():
        _set(cfg, defaults, key, value, source)


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def config_path(name: str | Path) -> Path:
    """A config file by path, or a shipped one by name: ``configs/pretrain/rcmae_vit_base.yaml`` (as
    the README writes it, from any directory), ``pretrain/rcmae_vit_base.yaml`` or
    ``pretrain/rcmae_vit_base``."""
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = shipped_file(path)
    for candidate in (shipped, *(shipped.with_name(shipped.name + ext) for ext in (".yaml", ".py"))):
        if parts and candidate.is_file():
            return candidate
    names = shipped_configs()
    close = difflib.get_close_matches(str(Path(*parts).with_suffix("")) if parts else str(name), names, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"config file {name} does not exist (neither a file nor a shipped config): {hint}"
                      f"shipped: {', '.join(names)}")


def shipped_file(name: str | Path) -> Path:
    """Where a file of ``configs/`` (``configs/subsets/imagenet_1percent.txt.gz`` as the docs write it, or
    ``subsets/...``) lies in the installed package, whether it exists or not."""
    from importlib.resources import files

    parts = Path(name).parts
    return Path(str(files("rcmae.configs"))).joinpath(*(parts[1:] if parts[:1] == ("configs",) else parts))


def shipped_configs() -> list[str]:
    """The names of the shipped configs, e.g. ``pretrain/rcmae_vit_base``, ``detection/demo_tiny`` (the
    YAML configs and detectron2's LazyConfig files)."""
    from importlib.resources import files

    root = Path(str(files("rcmae.configs")))
    return sorted(str(p.relative_to(root).with_suffix("")) for pattern in ("*/*.yaml", "*/*.py")
                  for p in root.glob(pattern) if not p.name.startswith("_"))


def read_sections(path: Path) -> dict:
    """A YAML file of sections (a mapping; empty: none), or a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(defaults: dict, config_file: str | Path | None = None,
                overrides: Iterable[str] = ()) -> dict:
    """Defaults <- YAML file (a path or a shipped config's name) <- command-line overrides, each key
    validated."""
    cfg = copy.deepcopy(defaults)
    if config_file is not None:
        path = config_path(config_file)
        merge(cfg, defaults, read_sections(path), str(path))
    for key, value in parse_overrides(overrides):
        _set(cfg, defaults, key, value, "command line")
    return cfg


def save_config(cfg: dict, path) -> None:
    """Write ``cfg`` as YAML to a file path or an open text stream."""
    text = yaml.safe_dump(cfg, sort_keys=False)
    if hasattr(path, "write"):
        path.write(text)
    else:
        Path(path).write_text(text)
