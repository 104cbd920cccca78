"""Configs composed from layers: the published defaults, then a protocol, a method, a dataset, and
the user's `key=value` overrides, each changing only what it is about.

The layers ship inside the package (fastprompt/config/layers/), so composing works from a plain
`pip install`, without a checkout:

    protocols/<name>.yaml   what a protocol sets: protocol.name, its targets or shot counts, its
                            source dataset (ImageNet for cross-dataset and domain generalisation)
    methods/<base>.yaml     what a base method changes from the defaults (CoCoOp: batch 1, lr 0.002)
    methods/dept.yaml       what DePT adds to any base method

A layer file's leading `#` lines describe it (they head the published configs). A method whose
published settings differ by protocol, or by dataset within a protocol (PromptSRC: 50 epochs for
few-shot, GPA per dataset), says so in its layer:

    per_protocol:
      few_shot:                  # replaces the keys it names when composing for few_shot
        train: {epochs: 50}
        per_dataset:
          dtd: {method: {options: {gpa_mean: 45.0, gpa_std: 5.0}}}

The dataset these follow is the run's final `data.dataset` (an override `data.dataset=dtd` picks
dtd's settings, as `--dataset dtd` does). For every other method the dataset layer is
`data.dataset` itself.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Optional, Sequence


from ..errors import ConfigError
from .schema import Config, apply_overrides, config_from_dict, read_yaml

__all__ = ["LAYERS_DIR", "protocol_names", "method_names", "split_method", "layer_data", "layer_description",
           "method_layer", "dataset_settings", "composed_data", "compose_config"]

LAYERS_DIR = Path(__file__).parent / "layers"
DEPT = "dept"
PER_PROTOCOL, PER_DATASET = "per_protocol", "per_dataset"


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


def _sections(where: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"layer {where}: expected a mapping of names to mappings of sections")
    return value


def _per_protocol(name: str) -> dict:
    """The method layer's `per_protocol` table, its protocol names checked."""
    table = _sections(f"methods/{name}.yaml {PER_PROTOCOL}", layer_data("methods", name).get(PER_PROTOCOL))
    unknown = sorted(set(table) - set(protocol_names()))
    if unknown:
        raise ConfigError(f"layer methods/{name}.yaml: {PER_PROTOCOL} names unknown protocol(s) {unknown} "
                          f"(known: {', '.join(protocol_names())})")
    return table


def dataset_settings(name: str, protocol: str) -> dict:
    """What method layer `name` sets per dataset under `protocol`: {dataset: sections} ({} when
    its settings are the same for every dataset)."""
    table = _per_protocol(name).get(protocol, {})
    return _sections(f"methods/{name}.yaml {PER_PROTOCOL}.{protocol}.{PER_DATASET}", table.get(PER_DATASET))


def method_layer(name: str, protocol: str, dataset: Optional[str]) -> dict:
    """The settings of method layer `name` for `protocol` and `dataset`: its plain sections, then
    its `per_protocol` entry for the protocol, then that entry's `per_dataset` entry for the dataset."""
    data = {k: v for k, v in layer_data("methods", name).items() if k != PER_PROTOCOL}
    for_protocol = dict(_per_protocol(name).get(protocol, {}))
    for_dataset = dataset_settings(name, protocol).get(str(dataset), {})
    for_protocol.pop(PER_DATASET, None)
    return _merge(_merge(data, for_protocol), for_dataset)


def composed_data(protocol: str, method: str, dataset: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """The nested mapping the layers set, then `overrides`; keys the layers leave alone keep the
    defaults of fastprompt.config.Config. The method layers follow the final data.dataset: the one
    an override sets, else `dataset`, else the protocol's."""
    def compose(chosen: Optional[str]) -> dict:
        data = copy.deepcopy(layer_data("protocols", protocol))
        for name in split_method(method):
            _merge(data, method_layer(name, protocol, chosen))
        _merge(data, {"method": {"name": method}})
        if dataset is not None:
            _merge(data, {"data": {"dataset": dataset}})
        return apply_overrides(data, list(overrides))

    chosen = dataset if dataset is not None else layer_data("protocols", protocol).get("data", {}).get("dataset")
    data = compose(chosen)
    final = data.get("data", {}).get("dataset")
    if final is not None and str(final) != str(chosen):  # an override chose the dataset: its settings apply
        data = compose(str(final))
    return data


def compose_config(protocol: str = "base2new", method: str = "dept+coop", *, dataset: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> Config:
    """The config of `method` under `protocol` (on `dataset`, when given), then `overrides`
    (`key.sub=value`, as on the command line), checked like a config file."""
    return config_from_dict(composed_data(protocol, method, dataset, overrides))
