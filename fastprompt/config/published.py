"""The published configs as readable YAML: what `fastprompt config` prints and what the repository's
configs/<protocol>/<method>.yaml hold (written from the layers by `python -m fastprompt.config.published
configs`; a test keeps the files equal to it).

A published file shows the settings a reader checks against a paper (backbone, shots, seeds,
optimiser, schedule, epochs, batch, precision) and whatever the layers or overrides set; every
other key keeps the default of fastprompt.config.Config.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from .compose import composed_data, dataset_settings, layer_data, layer_description, method_names, split_method
from .schema import Config, config_from_dict, config_to_dict

__all__ = ["PUBLISHED_PROTOCOLS", "published_path", "published_text", "write_published"]

PUBLISHED_PROTOCOLS = ("base2new", "cross_dataset", "domain_generalisation", "few_shot")
# Shown in every published file, in this order within each section.
PUBLISHED_KEYS = {
    "model": ("name", "pretrained", "dtype"),
    "method": ("name", "options"),
    "data": ("dataset", "root", "shots", "seeds"),
    "optim": ("name", "lr", "momentum", "weight_decay", "head_lr_mult", "warmup_epochs", "warmup_lr", "scheduler"),
    "train": ("epochs", "batch_size", "precision"),
    "protocol": ("name",),
}
KEY_NOTES = {
    "model.name": "OpenAI weights were trained with QuickGELU: this name builds it for any weights file",
    "model.pretrained": "or OpenAI's archive (~/.cache/clip/ViT-B-16.pt) or an open_clip state-dict file",
    "method.options": "the published defaults; override e.g. method.options.n_ctx=4",
    "train.precision": "fp32 master weights; fp16 uses a GradScaler",
}


def published_path(root: str | Path, protocol: str, method: str) -> Path:
    return Path(root) / protocol / f"{method.replace('+', '_')}.yaml"


def _flow(value) -> str:
    """One value in YAML flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _shown(data: dict) -> dict[str, list[str]]:
    """Per section, the keys to show: the published ones and any a layer or override sets."""
    shown = {section: list(keys) for section, keys in PUBLISHED_KEYS.items()}
    for section, values in data.items():
        if isinstance(values, dict):
            shown.setdefault(section, [])
            shown[section] += [k for k in values if k not in shown[section]]
    return shown


def _header(cfg: Config, protocol: str, method: str, dataset: Optional[str], overrides: Sequence[str],
            file: str) -> list[str]:
    described = [layer_description("methods", name).rstrip(".") for name in split_method(method)]
    opt, t, d = cfg.optim, cfg.train, cfg.data
    data_line = (f"{cfg.model.name} with {cfg.model.pretrained or 'random'} weights, {d.shots} shots, seeds "
                 f"{' '.join(map(str, d.seeds))}, {t.epochs} epochs, batch {t.batch_size},")
    optim_line = (f"{opt.name.upper()} lr {opt.lr:g} momentum {opt.momentum:g} wd {opt.weight_decay:g}, "
                  f"{opt.scheduler}, {opt.warmup_epochs} warm-up epoch(s) at {opt.warmup_lr:g}, {t.precision}.")
    given = {o.split("=", 1)[0].strip() for o in overrides}
    targets = layer_data("protocols", protocol).get("protocol", {}).get("targets")
    still = [a for a in ("data.root=/path/to/data", None if dataset or targets else "data.dataset=<name>")
             if a and a.split("=")[0] not in given]
    rest = "".join(f" {a}" for a in still)
    per_dataset = _per_dataset_lines(protocol, method)
    if per_dataset and not (dataset or "data.dataset" in given):
        # A file keeps the settings of the dataset it was written for: name it, and say what composing sets.
        file_rest = "".join(f" {a}" for a in still if not a.startswith("data.dataset="))
        file_line = f"#  or, for {cfg.data.dataset} only: fastprompt train {file}{file_rest}"
    else:
        file_line = f"#  or: fastprompt train {file}{rest}"
    return [
        f"# {method}, {layer_description('protocols', protocol)}",
        f"# {'; '.join(described)}.",
        "# Settings (the DePT paper, CVPR 2024, and the base methods' papers, unless overridden):",
        f"#   {data_line}",
        f"#   {optim_line}",
        f"# Run: fastprompt train --protocol {protocol} --method {method}"
        + (f" --dataset {dataset}" if dataset else "") + "".join(f" {o}" for o in overrides) + rest,
        file_line,
        *per_dataset,
    ]


def _dotted(sections: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"train": {"epochs": 50}} -> [("train.epochs", 50)]; `options` mappings stay whole."""
    out = []
    for key, value in sections.items():
        if isinstance(value, dict) and key != "options":
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _per_dataset_lines(protocol: str, method: str) -> list[str]:
    """What the method's layers set per dataset under `protocol` (datasets with the same settings on one line)."""
    groups: dict[str, list[str]] = {}
    for name in split_method(method):
        for dataset, sections in dataset_settings(name, protocol).items():
            settings = " ".join(f"{key}={_flow(value)}" for key, value in _dotted(sections))
            groups.setdefault(settings, []).append(dataset)
    if not groups:
        return []
    return ["# The settings depend on the dataset: composing (--dataset, or data.dataset= as above) sets for",
            *(f"#   {', '.join(datasets)}: {settings}" for settings, datasets in groups.items()),
            "# and the protocol's settings for every other dataset; a config file keeps the ones it holds."]


def published_text(protocol: str, method: str, *, dataset: Optional[str] = None, overrides: Sequence[str] = (),
                   file: str = "CONFIG.yaml") -> str:
    """The YAML of `method` under `protocol` (and `dataset`, `overrides`), with a header that says
    what it is and how to run it; loading it gives compose_config(protocol, method, ...)."""
    data = composed_data(protocol, method, dataset, overrides)
    cfg = config_from_dict(data)
    full = config_to_dict(cfg)
    lines = _header(cfg, protocol, method, dataset, overrides, file)
    for section, keys in _shown(data).items():
        if section == "output_dir":
            continue
        lines.append(f"{section}:")
        for key in keys:
            note = KEY_NOTES.get(f"{section}.{key}")
            lines.append(f"  {key}: {_flow(full[section][key])}" + (f"  # {note}" if note else ""))
    lines.append(f"output_dir: {_flow(data.get('output_dir', Config().output_dir))}")
    return "\n".join(lines) + "\n"


def write_published(root: str | Path) -> list[Path]:
    """Write configs/<protocol>/<method>.yaml for every published protocol and method under `root`."""
    written = []
    for protocol in PUBLISHED_PROTOCOLS:
        for method in method_names():
            path = published_path(root, protocol, method)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(published_text(protocol, method, file=str(path)))
            written.append(path)
    return written


if __name__ == "__main__":  # python -m fastprompt.config.published configs
    print(f"wrote {len(write_published(sys.argv[1] if len(sys.argv) > 1 else 'configs'))} files")
