"""How far a device goes: the largest batch that fits, and the MFU of a prompted image encoder alone."""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from ..errors import ConfigError
from ..methods import build_model
from .stepper import Stepper, method_options, timed_steps
from .synthetic import class_names
from .timing import is_oom, reset_memory, sync

__all__ = ["vision_mfu", "largest_batch"]


def vision_mfu(clip, method: str, batch: int, *, device: torch.device, steps: int, peak_rate: float) -> dict:
    """The prompted image encoder alone (MaPLe, DPL): forward + backward into its prompts at `batch`,
    bf16 autocast; its FLOPs (flop counter) over its median time against the measured bf16 rate."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(method, clip, class_names(2), **method_options(method, clip)).to(device).train()
    if not getattr(model, "image_prompted", False):
        raise ConfigError(f"--vision-mfu {method}: {method} does not prompt the image encoder (maple, dpl and their "
                          "dept+ variants do)")
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = model.encode_images(images)
        features.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = float(counter.get_total_flops())
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"method": method, "batch": batch, "flops": flops, "step_ms": 1e3 * seconds,
            "images_per_s": batch / seconds, "mfu": flops / seconds / peak_rate, "steps": steps}


def largest_batch(clip, method: str, classes: int, style: str, *, device: torch.device, feature_batch: int,
                  text_chunk_size: Optional[int], limit: int = 4096, num_workers: int = 0) -> dict:
    """The largest batch (doubling, then bisection) for which two training steps fit in memory."""

    def fits(b: int) -> bool:
        stepper = None
        try:
            reset_memory(device)
            stepper = Stepper(style, clip, method, b, classes, device=device,
                              feature_batch=max(feature_batch, b), text_chunk_size=text_chunk_size,
                              num_workers=num_workers)
            timed_steps(stepper, 2, device)
            return True
        except RuntimeError as err:
            if not is_oom(err):
                raise
            return False
        finally:
            del stepper
            reset_memory(device)

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return {"method": method, "classes": classes, "style": style, "largest_batch": lo,
            "searched_up_to": limit, "device_memory_bytes": total}


# ----------------------------------------------------------------------------- whole base-to-new runs
