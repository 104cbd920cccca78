"""Argument checks shared by the reference ops and the Triton kernels.

Both implementations of an op call the same check, so a user gets the same message whichever
backend runs. Every error names the argument and says what was expected.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional

import torch

MIX_RULES = ("exact", "fixed", "learned", "detached")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; expected one of {allowed}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_mix(role: str, mix: str, weight, num_heads: int) -> None:
    """Validate one query type's mixing rule and its weight.

    role is "instance" or "prompt" (the argument names are `{role}_mix` / `{role}_weight`).
    """
    arg, warg = f"{role}_mix", f"{role}_weight"
    if mix not in MIX_RULES:
        raise ValueError(f"{arg}={mix!r} is not a mixing rule; choose one of {', '.join(MIX_RULES)}")
    if mix == "fixed":
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"{arg}='fixed' needs {warg} = a float c in [0, 1], got {weight!r}")
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"{warg}={weight} is outside [0, 1] (it is the prompts' share of the row)")
    elif mix == "learned":
        if not isinstance(weight, torch.Tensor):
            raise ValueError(
                f"{arg}='learned' needs {warg} = a tensor of logits theta of shape [{num_heads}] "
                f"(one per head), got {type(weight).__name__}"
            )
        if weight.shape != (num_heads,):
            raise ValueError(
                f"{warg} must have shape [{num_heads}] (one logit per head), got {tuple(weight.shape)}"
            )
        check_tensor(warg, weight)
    elif weight is not None:
        raise ValueError(f"{arg}={mix!r} takes no weight; pass {warg}=None (got {weight!r})")


def check_decoupled_attention_args(
    q, k, v, *, prompt_start, num_prompts, instance_mix, prompt_mix, instance_weight, prompt_weight, scale
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_device(q=q, k=k, v=v)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must all have shape [B, H, N, D]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    n = q.shape[2]
    for name, val in (("prompt_start", prompt_start), ("num_prompts", num_prompts)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {val!r}")
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    if prompt_start < 0 or prompt_start + num_prompts > n:
        raise ValueError(
            f"prompt range [prompt_start, prompt_start + num_prompts) = [{prompt_start}, "
            f"{prompt_start + num_prompts}) is out of bounds for a sequence of N={n} tokens"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or scale <= 0):
        raise ValueError(f"scale must be a positive float or None (1/sqrt(D)), got {scale!r}")
    check_mix("instance", instance_mix, instance_weight, q.shape[1])
    check_mix("prompt", prompt_mix, prompt_weight, q.shape[1])
    for warg, w in (("instance_weight", instance_weight), ("prompt_weight", prompt_weight)):
        if isinstance(w, torch.Tensor):
            check_same_device(q=q, **{warg: w})


def check_cat_head_args(
    image_features,
    text_features,
    labels=None,
    *,
    gamma_img,
    beta_img,
    gamma_txt=None,
    beta_txt=None,
    weight,
    bias,
    logit_scale,
    lam,
    check_finite: bool = True,
    check_values: bool = True,
) -> None:
    """Validate the CAT head's arguments (shapes, dtypes, devices, ranges).

    check_values=False skips the checks that read tensor data (label range, NaN/inf features, the
    value of a tensor logit_scale): they need a device sync and break torch.compile graphs, so a
    compiled op runs them later, in its eager implementation, through `check_cat_head_values`.
    """
    check_tensor("image_features", image_features, ndim=2)
    b, d = image_features.shape
    check_tensor("text_features", text_features)
    if text_features.ndim == 2:
        c = text_features.shape[0]
        expected = f"[C, {d}] or [{b}, C, {d}]"
        ok = text_features.shape[1] == d
    elif text_features.ndim == 3:
        c = text_features.shape[1]
        expected = f"[C, {d}] or [{b}, C, {d}]"
        ok = text_features.shape[0] == b and text_features.shape[2] == d
    else:
        ok, c, expected = False, 0, f"[C, {d}] or [{b}, C, {d}]"
    if not ok:
        raise ValueError(
            f"text_features must have shape {expected} to match image_features {tuple(image_features.shape)}; "
            f"got {tuple(text_features.shape)}"
        )
    if c < 1:
        raise ValueError("text_features holds no class (C = 0)")
    vectors = {"gamma_img": gamma_img, "beta_img": beta_img}
    if gamma_txt is not None or beta_txt is not None:
        vectors.update(gamma_txt=gamma_txt, beta_txt=beta_txt)
    for name, t in vectors.items():
        check_tensor(name, t, ndim=1)
        if t.shape[0] != d:
            raise ValueError(f"{name} must have shape [{d}] (the feature dim), got {tuple(t.shape)}")
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape [C, {d}], got {tuple(weight.shape)}")
    if weight.shape[0] != c:
        raise ValueError(
            f"weight has {weight.shape[0]} classifier rows but text_features hold C={c} classes; "
            "slice the classifier to the evaluated classes (see DePT cross-dataset inference)"
        )
    check_tensor("bias", bias, ndim=1)
    if bias.shape[0] != c:
        raise ValueError(f"bias must have shape [{c}], got {tuple(bias.shape)}")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    elif isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        _check_logit_scale_value(float(logit_scale))
    else:
        raise ValueError(f"logit_scale must be a float or a scalar tensor, got {logit_scale!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be a float in [0, 1] (the CAT head's share), got {lam!r}")
    tensors = dict(image_features=image_features, text_features=text_features, weight=weight, bias=bias, **vectors)
    check_same_device(**tensors)
    if labels is not None:
        check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
        check_same_device(image_features=image_features, labels=labels)
        if labels.shape[0] != b:
            raise ValueError(f"labels must have shape [{b}] (one per image), got {tuple(labels.shape)}")
    if check_values:
        check_cat_head_values(
            image_features, text_features, labels, num_classes=c, logit_scale=logit_scale, check_finite=check_finite
        )


def _check_logit_scale_value(s: float) -> None:
    if not s > 0:
        raise ValueError(
            f"logit_scale must be the positive multiplier s = exp(CLIP's logit_scale) (about 100), got {s}"
        )


def check_cat_head_values(
    image_features, text_features, labels=None, *, num_classes: int, logit_scale, check_finite: bool = True
) -> None:
    """The data-dependent CAT head checks: tensor logit_scale > 0, labels in [0, C), finite features.

    One device sync on the happy path (all conditions gathered into one flag); the detailed checks,
    which say what is wrong, run only when that flag is raised.
    """
    c = num_classes
    scale_is_tensor = isinstance(logit_scale, torch.Tensor)
    has_labels = labels is not None and labels.numel() > 0
    flags = []
    if scale_is_tensor:
        flags.append(~(logit_scale.detach().reshape(()) > 0))
    if has_labels:
        flags.append(((labels < 0) | (labels >= c)).any())
    if check_finite:
        flags.append(~torch.isfinite(image_features).all())
        flags.append(~torch.isfinite(text_features).all())
    if not flags or not bool(torch.stack([f.to(image_features.device) for f in flags]).any()):
        return
    if scale_is_tensor:
        _check_logit_scale_value(float(logit_scale.detach().reshape(()).item()))
    if has_labels and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(
            f"labels must lie in [0, {c}) for C={c} classes; got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )
    if check_finite:
        for name, t in (("image_features", image_features), ("text_features", text_features)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf; check the encoder outputs (mixed-precision overflow?)")


def _read_interpreter_setting() -> bool:
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)  # Triton >= 3.4: its own setting
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


# Fixed when Triton is imported (TRITON_INTERPRET must be set before), so read once: a plain bool
# is also what torch.compile can trace through in the ops' checks.
_TRITON_INTERPRETED = _read_interpreter_setting()


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, set before triton is imported).
    The one test both fused ops use."""
    return _TRITON_INTERPRETED


def check_triton_device(op: str, fallback: str, **tensors: torch.Tensor) -> None:
    """Raise a ValueError where a Triton kernel cannot run on these tensors.

    Triton runs natively on CUDA tensors, and on CPU tensors only under its interpreter. `fallback`
    names what to use instead (the plain-PyTorch reference path).
    """
    device = next(t.device for t in tensors.values() if isinstance(t, torch.Tensor))
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{op} needs Triton, which is not installed ({exc}); use {fallback} instead") from exc
    if device.type == "cuda":
        return
    if device.type == "cpu" and triton_interpreter_enabled():
        return
    raise ValueError(
        f"{op} runs Triton kernels, which need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported); got tensors on {device}. Use {fallback} instead (plain PyTorch, any device)."
    )


def device_arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90: H100/H200, 80: A100): the kernels' tile choice
    depends on it. 90 off CUDA (the interpreter runs its own small tiles anyway)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_triton_runnable(q, *, interpreted: bool, max_head_dim: int) -> None:
    """Can the Triton kernels run on q ([B, H, N, D])? Raises a ValueError saying what to use instead.

    `interpreted`: whether Triton was imported with TRITON_INTERPRET=1 (CPU tensors run then).
    """
    fallback = (
        "use fastprompt.kernels.reference.decoupled_attention instead "
        "(attention_backend='reference' or 'sdpa')"
    )
    if q.dtype not in TRITON_DTYPES:
        allowed = ", ".join(str(d) for d in TRITON_DTYPES)
        raise ValueError(f"q has dtype {q.dtype}, which the Triton kernel does not support (expected {allowed}); {fallback}")
    if q.device.type == "cpu" and not interpreted:
        raise ValueError(
            "q is on the CPU and Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before "
            f"triton is first imported, which runs them slowly on the CPU); {fallback}"
        )
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # The interpreter's bf16 dot products are wrong (docs/kernels.md): refuse rather than return garbage.
        raise ValueError(
            "q is bfloat16 on the CPU: Triton's interpreter computes bf16 wrongly; use float32 or float16 "
            f"there, or {fallback}"
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on device {q.device}, which the Triton kernel does not support; {fallback}")
    if q.shape[3] > max_head_dim:
        raise ValueError(f"q has head dim D={q.shape[3]}; the Triton kernel supports D <= {max_head_dim}; {fallback}")
