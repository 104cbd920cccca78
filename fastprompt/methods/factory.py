"""One way to build any method: `build_model("dept+maple", clip, classnames, **options)`.

Options are checked against the method's published defaults (docs/methods.md): an unknown
name or a wrong type is an error that names it.
"""
from __future__ import annotations

import difflib
from typing import Dict, List, Sequence, Tuple

from fastprompt.clip import ClipBundle

from .base import PromptModel
from .cocoop import CoCoOp
from .coop import CoOp
from .dept import DePT
from .dpl import DPL
from .ivlp import IVLP
from .kgcoop import KgCoOp
from .maple import MaPLe
from .promptsrc import PromptSRC
from .zsclip import ZeroShotCLIP

BASE_METHODS = {
    "zsclip": ZeroShotCLIP,
    "coop": CoOp,
    "cocoop": CoCoOp,
    "kgcoop": KgCoOp,
    "maple": MaPLe,
    "dpl": DPL,
    "ivlp": IVLP,
    "promptsrc": PromptSRC,
}
COMMON_DEFAULTS = {"attention_backend": "auto"}
# DePT's own settings for its base methods (its paper): KgCoOp's term weighs 2.0, not 8.0.
DEPT_BASE_OVERRIDES = {"kgcoop": {"kg_weight": 2.0}}
METHOD_NAMES: List[str] = sorted(BASE_METHODS) + [f"dept+{m}" for m in sorted(BASE_METHODS)]
NULLABLE = {"ctx_init", "n_ctx"}  # options whose value may be None


def parse_method(method: str) -> Tuple[bool, str]:
    """"dept+coop" -> (True, "coop"); "coop" -> (False, "coop")."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a string such as 'dept+coop', got {method!r}")
    name = method.strip().lower()
    parts = name.split("+")
    with_dept = "dept" in parts
    rest = [p for p in parts if p != "dept"]
    if len(rest) != 1 or rest[0] not in BASE_METHODS or len(parts) > 2:
        close = difflib.get_close_matches(name, METHOD_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {method!r}.{hint} Methods: {', '.join(METHOD_NAMES)}")
    return with_dept, rest[0]


def method_defaults(method: str) -> Dict[str, object]:
    """The published defaults of every option of `method` (all overridable)."""
    with_dept, base = parse_method(method)
    defaults = dict(COMMON_DEFAULTS)
    defaults.update(BASE_METHODS[base].DEFAULTS)
    if with_dept:
        defaults.update(DEPT_BASE_OVERRIDES.get(base, {}))
        defaults.update(DePT.DEFAULTS)
    return defaults


def depths_within(method: str, num_layers: int) -> Dict[str, int]:
    """`method`'s prompt depths (text `depth`, IVLP's and PromptSRC's `vis_depth`) at their published
    values, clipped to `num_layers`: the options that run it on a model with towers that shallow."""
    defaults = method_defaults(method)
    return {key: min(defaults[key], num_layers) for key in ("depth", "vis_depth") if key in defaults}


def _check_type(method: str, key: str, value, default) -> object:
    if value is None and key in NULLABLE:
        return value
    expected = type(default) if default is not None else str
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(
            f"option {key}={value!r} of {method} must be {expected.__name__}"
            + (" or None" if key in NULLABLE else "") + f" (default {default!r})"
        )
    return value


def resolve_options(method: str, options: Dict[str, object]) -> Dict[str, object]:
    defaults = method_defaults(method)
    unknown = [k for k in options if k not in defaults]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown option {key!r} for method {method}.{hint} Options: {', '.join(sorted(defaults))}")
    resolved = dict(defaults)
    for key, value in options.items():
        resolved[key] = _check_type(method, key, value, defaults[key])
    unused = getattr(BASE_METHODS[parse_method(method)[1]], "UNUSED_OPTIONS", {}).get(resolved.get("modality"), ())
    given_unused = sorted(k for k in options if k in unused)
    if given_unused:
        raise ValueError(
            f"option(s) {', '.join(given_unused)} of {method} do nothing with modality={resolved['modality']!r}; "
            "remove them, or choose the modality that uses them"
        )
    # A context phrase sets the number of context tokens unless n_ctx is given too (CoOp's rule).
    if options.get("ctx_init") and "n_ctx" not in options:
        resolved["n_ctx"] = None
    return resolved


def build_model(method: str, clip: ClipBundle, classnames: Sequence[str], **options) -> PromptModel:
    """Build `method` ("coop", "dept+maple", ...) on the frozen `clip` for `classnames`."""
    if not isinstance(clip, ClipBundle):
        raise ValueError(f"clip must be a ClipBundle from fastprompt.clip.load_clip, got {type(clip).__name__}")
    with_dept, base = parse_method(method)
    resolved = resolve_options(method, options)
    base_options = {k: v for k, v in resolved.items() if k not in DePT.DEFAULTS}
    model: PromptModel = BASE_METHODS[base](clip, classnames, **base_options)
    if with_dept:
        model = DePT(model, **{k: resolved[k] for k in DePT.DEFAULTS})
    model.options = resolved
    return model.to(clip.device)
