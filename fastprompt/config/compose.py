"""Configs composed from layers: the published defaults, then a protocol, a method, a dataset, and
the user's `key=value` overrides, each changing only what it is about.

The layers ship inside the package (fastprompt/config/layers/), so composing works from a plain
`pip install`, without a checkout:

    protocols/<name>.yaml   what a protocol sets: protocol.name, its targets or shot counts, its
                            source dataset (ImageNet for cross-dataset and domain generalisation)
    methods/<base>.yaml     what a base method changes from the defaults (CoCoOp: batch 1, lr 0.002)
    methods/dept.yaml       what DePT adds to any base method

A layer file's leading `#` lines describe it (they head the published configs). The dataset layer
is `data.dataset` itself: the published settings are the same for every dataset.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Optional, Sequence


from ..errors import ConfigError
from .schema import Config, apply_overrides, config_from_dict, read_yaml

__all__ = ["LAYERS_DIR", "protocol_names", "method_names", "split_method", "layer_data", "layer_description",
           "composed_data", "compose_config"]

LAYERS_DIR = Path(__file__).parent / "layers"
DEPT = "dept"


def _names(kind: str) -> list[str]:
    return sorted(p.stem for p in (LAYERS_DIR / kind).glob("*.yaml"))


def protocol_names() -> list[str]:
    return _names("protocols")


def method_names() -> list[str]:
    """Every method a layer exists for: each base method, alone and as dept+<base>."""
    bases = [m for m in _names("methods") if m != DEPT]
    return bases + [f"{DEPT}+{m}" for m in bases]


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {kind} '{name}'{hint} (known: {', '.join(known)})")


def split_method(method: str) -> list[str]:
    """The method layers of `method`, in the order they apply: "dept+coop" -> ["coop", "dept"]."""
    parts = [p.strip() for p in str(method).lower().split("+")]
    bases = [p for p in parts if p != DEPT]
    if len(bases) != 1 or len(parts) > 2 or not (LAYERS_DIR / "methods" / f"{bases[0]}.yaml").is_file():
        raise _unknown("method", str(method), method_names())
    return bases + ([DEPT] if DEPT in parts else [])


def _layer_path(kind: str, name: str) -> Path:
    path = LAYERS_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        raise _unknown(kind.rstrip("s"), name, _names(kind))
    return path


def layer_data(kind: str, name: str) -> dict:
    """The settings of one layer ("protocols" or "methods")."""
    data = read_yaml(_layer_path(kind, name), "layer") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"layer {kind}/{name}.yaml: the top level must be a mapping of sections")
    return data


def layer_description(kind: str, name: str) -> str:
    """The leading comment of one layer, as one line."""
    lines = []
    for line in _layer_path(kind, name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _merge(into: dict, layer: dict) -> dict:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "options":
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def composed_data(protocol: str, method: str, dataset: Optional[str] = None) -> dict:
    """The nested mapping the layers set (before overrides); keys the layers leave alone keep the
    defaults of fastprompt.config.Config."""
    data = copy.deepcopy(layer_data("protocols", protocol))
    for name in split_method(method):
        _merge(data, layer_data("methods", name))
    _merge(data, {"method": {"name": method}})
    if dataset is not None:
        _merge(data, {"data": {"dataset": dataset}})
    return data


def compose_config(protocol: str = "base2new", method: str = "dept+coop", *, dataset: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> Config:
    """The config of `method` under `protocol` (on `dataset`, when given), then `overrides`
    (`key.sub=value`, as on the command line), checked like a config file."""
    return config_from_dict(apply_overrides(composed_data(protocol, method, dataset), list(overrides)))
