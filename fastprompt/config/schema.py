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
import math
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
    "read_yaml",
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
    # On for every device: measured never much slower on a CPU, up to 2.6x faster (docs/training.md;
    # `fastprompt bench train --precompute` repeats the measurement on any device).
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
    if isinstance(value, float) and not math.isfinite(value):  # .nan, .inf: a number for no key
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
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
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                fail()
        if number is None:
            fail()
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
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


def _duplicate_keys(node: yaml.Node, path: str, source: Path) -> None:
    """ConfigError for the first mapping key written twice: YAML would let the second replace the first."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            full = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{source}: '{full}' is given twice (lines {seen[key]} and {line}); the second would "
                                  "silently replace the first: keep one")
            seen[key] = line
            _duplicate_keys(value_node, full, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", source)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The content of a YAML file, strictly: ConfigError when it is missing, not text, not YAML, or
    sets one key twice (naming the key and both lines)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): give a YAML {what}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _duplicate_keys(node, "", path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_where(exc)}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    """' at line L, column C: what' for a YAML error, on one line."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return ": " + " ".join(str(exc).split())
    hint = " (YAML indents with spaces, not tabs)" if "\\t" in problem or "\t" in problem else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{hint}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or start from the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        if data is None or data == {}:
            raise ConfigError(f"{path} holds no settings (an empty config would train every default, on "
                              "data.root=data with downloaded weights); write one with `fastprompt config --method "
                              "METHOD > FILE`, or pass --protocol/--method instead of a file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML; atomically, so a kill mid-write never leaves a truncated file."""
    atomic_write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


# Sane ranges, per key: (low, high, low included). A value outside is a typo or a unit mistake
# (train.batch_size=100000000000000000000000 would silently become the whole training set).
RANGES: dict[str, tuple[float, float, bool]] = {
    "data.shots": (1, 1_000_000, True),
    "data.short_side": (1, 16_384, True),
    "optim.lr": (0, 10, False),
    "optim.warmup_lr": (0, 10, True),
    "optim.momentum": (0, 1, True),
    "optim.weight_decay": (0, 10, True),
    "optim.head_lr_mult": (0, 10_000, True),
    "optim.warmup_epochs": (0, 100_000, True),
    "optim.grad_clip": (0, 1e9, False),
    "train.epochs": (1, 100_000, True),
    "train.batch_size": (1, 1 << 20, True),
    "train.eval_batch_size": (1, 1 << 20, True),
    "train.feature_batch_size": (1, 1 << 20, True),
    "train.log_every": (1, 1_000_000_000, True),
    "train.checkpoint_every": (1, 1_000_000_000, True),
    "train.num_workers": (0, 1024, True),
    "train.text_chunk_size": (1, 1_000_000, True),
}
SEED_RANGE = (0, 2**32 - 1)  # what every generator (numpy's too) takes


def _in_range(key: str, value, low: float, high: float, low_included: bool) -> None:
    if value is None:
        return  # an optional key left unset
    if not ((value >= low if low_included else value > low) and value <= high):
        bound = f"{low} {'<=' if low_included else '<'} {key.rsplit('.', 1)[-1]} <= {high}"
        raise ConfigError(f"{key}: {value} is out of range ({bound})")


def _check_values(cfg: Config) -> None:
    """Range checks that types alone do not express."""
    for key, (low, high, low_included) in RANGES.items():
        section, name = key.split(".")
        _in_range(key, getattr(getattr(cfg, section), name), low, high, low_included)
    for i, seed in enumerate(cfg.data.seeds):
        _in_range(f"data.seeds[{i}]", seed, *SEED_RANGE, True)
    for i, shots in enumerate(cfg.protocol.shots):
        _in_range(f"protocol.shots[{i}]", shots, *RANGES["data.shots"])
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir: empty; name the run folder, e.g. output_dir=runs/my_run (an empty one would "
                          "be the current folder)")
    if not cfg.data.seeds:
        raise ConfigError("data.seeds: give at least one seed, e.g. data.seeds=[1,2,3]")
    for key, values in {"data.seeds": cfg.data.seeds, "protocol.shots": cfg.protocol.shots}.items():
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # each would be trained again into the same folder and counted twice in the mean
            raise ConfigError(f"{key}: {twice} listed more than once in {values}; list each once, "
                              f"e.g. {key}=[{','.join(str(v) for v in dict.fromkeys(values))}]")
    if cfg.protocol.name == "few_shot" and not cfg.protocol.shots:
        raise ConfigError("protocol.shots: protocol 'few_shot' needs at least one shot count, "
                          "e.g. protocol.shots=[1,2,4,8,16]")
    if cfg.protocol.name in ("cross_dataset", "domain_generalisation") and not cfg.protocol.targets:
        raise ConfigError(f"protocol.targets: protocol '{cfg.protocol.name}' needs target datasets")
    lo_hi = cfg.data.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {lo_hi}")


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
