"""Typed run configuration: dataclasses, loaded from YAML plus `key.sub=value` overrides.

The dataclass defaults are the published settings (the DePT paper's, and its base methods'); the
shipped layers (fastprompt.config.layers) add what a protocol or a method changes.

Strict on purpose: a misspelt key silently falling back to a default is the classic way a
reproduction drifts by a point, so an unknown key is an error that names it and suggests the
closest valid one, and a value of the wrong type names the key, the expected type and the value.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ..atomic_io import atomic_write_bytes
from ..errors import ConfigError

__all__ = [
    "ModelConfig",
    "MethodConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ProtocolConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "save_config",
    "check_method_options",
]


Precision = Literal["fp32", "bf16", "fp16"]
ProtocolName = Literal["base2new", "cross_dataset", "domain_generalisation", "few_shot", "train_eval"]


@dataclass
class ModelConfig:
    # An open_clip model name (open_clip.list_models()) or a shipped config. OpenAI's weights need
    # QuickGELU: the `openai` tag and OpenAI's archives build it under any name (fastprompt.clip).
    name: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = "openai"  # open_clip tag, a local checkpoint (archive or state dict), or null = random
    dtype: Precision = "fp32"  # storage dtype of the frozen CLIP weights


@dataclass
class MethodConfig:
    name: str = "dept+coop"
    # Method hyper-parameters; keys and types are checked against method_defaults(name).
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "imagefolder"
    root: str = "data"
    shots: int = 16
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    cache_dir: Optional[str] = None  # few-shot split cache; null = <output_dir>/splits
    allow_corrupt: bool = False  # skip unreadable images (counted in the log) instead of failing
    short_side: Optional[int] = None  # decode cache resolution; null = 8/7 x the model image size
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" or any torch.optim class name (case-insensitive), e.g. adamw
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 6.5  # DePT's CAT head trains at this multiple of the prompt lr
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5  # constant lr of the warm-up epochs (Dassl's ConstantWarmupScheduler)
    scheduler: Literal["cosine", "constant"] = "cosine"
    grad_clip: Optional[float] = None  # max global grad norm; null = no clipping
    options: dict = field(default_factory=dict)  # extra optimiser kwargs, e.g. {betas: [0.9, 0.99]}


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 4
    precision: Precision = "bf16"
    compile: bool = False
    device: str = "auto"  # auto = cuda when available, else cpu
    log_every: int = 20  # steps between metric lines
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always saves)
    eval_batch_size: int = 100
    num_workers: int = 4
    progress: bool = True  # tqdm bars with images/s and ETA
    # Exact speed-ups (fastprompt.training.step_forward): methods with an unprompted image encoder
    # encode each epoch's augmented views in no-grad batches of about feature_batch_size images (and
    # cache test-image features on disk, <data.cache_dir or output_dir>/features, across epochs, seeds,
    # methods); PromptSRC encodes its frozen-branch image features of the views in such batches.
    precompute_features: bool = True
    feature_batch_size: int = 256
    feature_cache: bool = True
    text_chunk_size: Optional[int] = None  # encode at most this many class prompts at once (ImageNet-size)


@dataclass
class ProtocolConfig:
    name: ProtocolName = "base2new"
    # cross_dataset / domain_generalisation: datasets evaluated after training on data.dataset.
    targets: list[str] = field(default_factory=list)
    # few_shot: the shot counts swept (each trains on all classes).
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    output_dir: str = "runs/{protocol}/{method}/{dataset}"  # placeholders filled from the config


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming key, expected type and value."""

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # `data.seeds=1,2,3` from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `data.seeds=1` means [1]
        if not isinstance(value, (list, tuple)):
            fail()
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                fail()
        fail()
    if tp is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `data.dataset=101` stays a name
        fail()
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys.extend(_all_keys(f.default_factory, path + "."))
    return keys


def _unknown_key(key: str, candidates: list[str], all_keys: list[str]) -> ConfigError:
    depth = key.count(".")
    same_depth = [k for k in all_keys if k.count(".") == depth]
    leaf = key.rsplit(".", 1)[-1]
    # A right name in the wrong section first (`train.lr` -> optim.lr), then the closest spelling.
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.8)
    close = close or [k for k in same_depth if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(key, same_depth, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(candidates)}"
    return ConfigError(f"unknown config key '{key}'{hint} (every key: docs/configs.md)")


def _build(cls: type, data: Any, prefix: str, all_keys: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names, all_keys)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", all_keys)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- public API


def config_from_dict(data: dict) -> Config:
    """Build and check a Config from a plain nested mapping (e.g. parsed YAML)."""
    cfg = _build(Config, data, "", _all_keys(Config))
    _check_values(cfg)
    cfg.output_dir = _expand_output_dir(cfg)
    return cfg


def _expand_output_dir(cfg: Config) -> str:
    """Fill {protocol}, {method}, {dataset}, {shots}, {model} in output_dir, so one config file
    serves every dataset of a sweep without runs overwriting each other."""
    fields = {"protocol": cfg.protocol.name, "method": cfg.method.name.replace("+", "_"),
              "dataset": cfg.data.dataset, "shots": cfg.data.shots, "model": cfg.model.name}
    try:
        return cfg.output_dir.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"output_dir: cannot fill {cfg.output_dir!r} ({exc!r}); placeholders are "
            + ", ".join("{" + k + "}" for k in fields)
        ) from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. optim.lr=0.002)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` entries into the nested mapping `data` (values parsed as YAML)."""
    all_keys = _all_keys(Config)
    for text in overrides:
        key, value = _parse_override(text)
        parts = key.split(".")
        node, cls = data, Config
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if cls is not None:
                hints = typing.get_type_hints(cls)
                if part not in hints:  # name the whole key the user typed, e.g. 'modle.name'
                    raise _unknown_key(key, list(hints), all_keys)
                nxt = hints[part]
                cls = nxt if dataclasses.is_dataclass(nxt) else None
                if cls is None and not (nxt is dict or typing.get_origin(nxt) is dict):
                    raise ConfigError(f"'{path}' is a {_type_name(nxt)}, it has no sub-key '{parts[depth + 1]}'")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"'{path}' is not a mapping in the config file; cannot set '{key}'")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or start from the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML; atomically, so a kill mid-write never leaves a truncated file."""
    atomic_write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


def _check_values(cfg: Config) -> None:
    """Range checks that types alone do not express."""
    positive = {
        "data.shots": cfg.data.shots,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.feature_batch_size": cfg.train.feature_batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, value in {"optim.lr": cfg.optim.lr, "optim.warmup_lr": cfg.optim.warmup_lr,
                       "optim.weight_decay": cfg.optim.weight_decay, "optim.head_lr_mult": cfg.optim.head_lr_mult,
                       "optim.warmup_epochs": cfg.optim.warmup_epochs, "train.num_workers": cfg.train.num_workers}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip: must be > 0 or null, got {cfg.optim.grad_clip}")
    if not cfg.data.seeds:
        raise ConfigError("data.seeds: give at least one seed, e.g. data.seeds=[1,2,3]")
    for key, values in {"data.seeds": cfg.data.seeds, "protocol.shots": cfg.protocol.shots}.items():
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # each would be trained again into the same folder and counted twice in the mean
            raise ConfigError(f"{key}: {twice} listed more than once in {values}; list each once, "
                              f"e.g. {key}=[{','.join(str(v) for v in dict.fromkeys(values))}]")
    if any(s < 1 for s in cfg.protocol.shots):
        raise ConfigError(f"protocol.shots: every shot count must be >= 1, got {cfg.protocol.shots}")
    if cfg.protocol.name == "few_shot" and not cfg.protocol.shots:
        raise ConfigError("protocol.shots: protocol 'few_shot' needs at least one shot count, "
                          "e.g. protocol.shots=[1,2,4,8,16]")
    if cfg.protocol.name in ("cross_dataset", "domain_generalisation") and not cfg.protocol.targets:
        raise ConfigError(f"protocol.targets: protocol '{cfg.protocol.name}' needs target datasets")
    lo_hi = cfg.data.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {lo_hi}")
    if cfg.train.text_chunk_size is not None and cfg.train.text_chunk_size < 1:
        raise ConfigError(f"train.text_chunk_size: must be >= 1 or null, got {cfg.train.text_chunk_size}")
    if cfg.data.short_side is not None and cfg.data.short_side < 1:
        raise ConfigError(f"data.short_side: must be >= 1 or null, got {cfg.data.short_side}")


def check_method_options(cfg: Config, method_names: typing.Sequence[str], defaults: dict) -> dict:
    """Validate `method.name` and `method.options` against the method registry's defaults.

    Returns the options the config sets, checked and coerced to the type of their published default
    (None defaults accept anything). The defaults themselves, and the rules between options (a
    `ctx_init` phrase sets `n_ctx`), are applied once, by `fastprompt.methods.build_model`.
    """
    name = cfg.method.name
    if name not in method_names:
        close = difflib.get_close_matches(name, list(method_names), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}'{hint} (known: {', '.join(method_names)})")
    resolved = {}
    for key, value in cfg.method.options.items():
        full = f"method.options.{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.5)
            hint = f"; did you mean 'method.options.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}' for method '{name}'{hint} (options: {', '.join(defaults) or 'none'})"
            )
        default = defaults[key]
        if default is None or value is None:
            resolved[key] = value
        elif isinstance(default, (list, tuple)):
            resolved[key] = _coerce(value, list[Any], full)
        else:
            resolved[key] = _coerce(value, type(default), full)
    return resolved
