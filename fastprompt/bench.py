"""`fastprompt bench train`: training throughput of every method, fastprompt's path against the
official-style path (fastprompt.official), measured in the same process on the same device.

Per configuration (method x batch x classes x style) it reports images/s over whole steps, a
step-time breakdown (data, image encoder, text encoder, head, backward, optimiser), peak device
memory, the model FLOPs a step needs and the MFU they give against the device's bf16 matmul rate
measured in the same run. `--run` adds whole base-to-new runs (train + evaluate base and new) of
both styles on a synthetic ImageFolder; `--max-batch` finds the largest batch that fits in memory.

Timing: CUDA events on a GPU (the breakdown records an event pair per phase, no syncs inside a
step), the host clock on the CPU. The breakdown is taken in its own eager pass, since wrapping
the phases would break a compiled graph; images/s comes from separate passes with the phase
wrappers switched off (or, with --compile, a fresh compiled model without them).
Backward is reported as one phase: autograd runs it as one graph.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

__all__ = ["GPU_GRID", "SMOKE_GRID", "Stepper", "PhaseClock", "measure_matmul_rate", "bench_step",
           "whole_run", "largest_batch", "main", "draw_bench_chart"]

BASE_METHODS = ("coop", "cocoop", "kgcoop", "maple", "dpl")
ALL_METHODS = tuple(m for base in BASE_METHODS for m in (base, f"dept+{base}"))
GPU_GRID = {"model": "ViT-B-16", "methods": ALL_METHODS, "batches": (4, 32, 128), "classes": (50, 500, 1000),
            "steps": 20, "warmup": 3, "feature_batch": 512, "text_chunk_size": 4096, "num_workers": 8, "repeats": 3}
SMOKE_GRID = {"model": "fastprompt-tiny", "methods": ("coop", "dept+coop"), "batches": (4,), "classes": (5,),
              "steps": 2, "warmup": 1, "feature_batch": 8, "text_chunk_size": None, "num_workers": 0, "repeats": 1}
STYLES = ("fast", "official")
PASS_SECONDS = 5.0  # rough cap on one measured pass of a configuration
SHORT_SIDE_RATIO = 8 / 7  # the decoded cache keeps images at 8/7 of the crop (256 for 224)


# ----------------------------------------------------------------------------- timing


class PhaseClock:
    """Named, possibly nested phases; `totals()` gives each name's self time in seconds (a nested
    phase's time is taken out of its parent's). With `enabled = False` phases and wrapped
    functions record nothing (no events, no host clock): the throughput pass runs so."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = True
        self._records: list[tuple[str, object, object, list]] = []
        self._stack: list[list] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        start = self._mark()
        children: list = []
        self._stack.append(children)
        try:
            yield
        finally:
            self._stack.pop()
            end = self._mark()
            self._records.append((name, start, end, children))
            if self._stack:
                self._stack[-1].append((start, end))

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end, children in self._records:
            inner = sum(self._seconds(s, e) for s, e in children)
            out[name] = out.get(name, 0.0) + self._seconds(start, end) - inner
        self._records.clear()
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, *, smoke: bool) -> dict:
    """The device's bf16 matmul rate (FLOP/s), measured: the MFU denominator."""
    # 8192^3 fills an H100 for about 1.5 ms per product; on a CPU the rate is indicative only (MFU
    # there compares fp32/bf16 kernels of very different efficiency).
    n = 512 if smoke or device.type != "cuda" else 8192
    reps = 3 if smoke else 20
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:  # the first calls pick kernels / warm caches
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"flops_per_s": 2 * n**3 / seconds, "n": n, "dtype": "bfloat16", "median_s": seconds,
            "meaningful": device.type == "cuda" and not smoke}


def _peak_memory(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # older torch: cuda's only
    return isinstance(err, oom_type) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------- synthetic data


def class_names(count: int) -> list[str]:
    """Distinct class names of realistic token length (ImageNet's names, repeated with a suffix)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return [names[i % len(names)] + (f" {i // len(names)}" if i >= len(names) else "") for i in range(count)]


def synthetic_images(count: int, image_size: int, *, seed: int) -> torch.Tensor:
    """Smooth random uint8 images [count, 3, H, W] at the decode cache's size (short side 8/7 S, 4:3)."""
    h = math.ceil(image_size * SHORT_SIDE_RATIO)
    w = round(h * 4 / 3)
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, h // 16), max(2, w // 16), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.rand(count, 3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def synthetic_jpegs(count: int, image_size: int, *, seed: int) -> list[bytes]:
    """The same kind of images as JPEG files' bytes (quality 90), for the per-step CPU decoding."""
    from PIL import Image

    out = []
    for img in synthetic_images(count, image_size, seed=seed):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _ImageSource:
    """In-memory uint8 images as fastprompt's TrainImageCache serves them (indices wrap around)."""

    def __init__(self, images: torch.Tensor, num_classes: int, seed: int):
        self.images = images
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (images.shape[0],), generator=g).to(images.device)

    def batch(self, indices: torch.Tensor):
        idx = indices.to(self.images.device) % self.images.shape[0]
        return self.images[idx], self.labels[idx]


# ----------------------------------------------------------------------------- one training step


def method_options(method: str, clip) -> dict:
    """Published defaults, with prompt depth clipped to the towers' layers (the tiny model has 3)."""
    from .methods import method_defaults

    defaults = method_defaults(method)
    if "depth" in defaults:
        layers = min(len(clip.model.visual.transformer.resblocks), len(clip.model.transformer.resblocks))
        return {"depth": min(defaults["depth"], layers)}
    return {}


class Stepper:
    """One method's training steps in one style, on synthetic images; `step()` runs one.

    fast: bf16 autocast over fp32 master weights, text truncated (and chunked past
      text_chunk_size prompts), augmentation on the device from decoded uint8 images; methods
      with an unprompted image encoder encode feature_batch images per no-grad batch
      (`steps_per_cycle` steps at a time) and step on features; optional torch.compile of the
      encoder trunks (fastprompt.compiled), with CUDA graphs on a GPU.
    official: fastprompt.official (fp16 eager, 77 tokens, CPU PIL decode + torchvision per step).
    """

    def __init__(self, style: str, clip, method: str, batch: int, classes: int, *, device: torch.device,
                 feature_batch: int = 512, text_chunk_size: Optional[int] = None, compile: bool = False,
                 cuda_graphs: bool = False, num_workers: int = 0, seed: int = 0,
                 clock: Optional[PhaseClock] = None):
        from .config import OptimConfig
        from .features import configure_text, uses_image_features
        from .train import build_optimizer

        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        self.style, self.batch, self.device, self.clock = style, batch, device, clock
        self.image_size = clip.image_size
        torch.manual_seed(seed)
        names = class_names(classes)
        if style == "official":
            from .official import build_official_model

            self.model = build_official_model(method, clip, names, **method_options(method, clip))
        else:
            from .methods import build_model

            self.model = build_model(method, clip, names, **method_options(method, clip))
            configure_text(self.model, chunk_size=text_chunk_size)
        self.model.to(device).train()
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.precompute = style == "fast" and uses_image_features(self.model)
        self.steps_per_cycle = max(1, feature_batch // batch) if self.precompute else 1
        if clock is not None:
            self._wrap_phases(clock)
        if style == "official":
            from .official import CpuAugmentDataset, official_train_loader, train_transform

            n = max(batch * 4, 64)
            labels = torch.randint(0, classes, (n,)).tolist()
            jpegs = synthetic_jpegs(min(n, 256), clip.image_size, seed=seed)  # each access decodes anew
            dataset = CpuAugmentDataset([jpegs[i % len(jpegs)] for i in range(n)], labels, train_transform(clip))
            self.loader = official_train_loader(dataset, batch_size=batch, num_workers=num_workers, seed=seed)
            self._batches = self._official_batches()
        else:
            from .data import GpuAugment

            n = batch * self.steps_per_cycle
            images = synthetic_images(min(n, 1024), clip.image_size, seed=seed).to(device)
            self.source = _ImageSource(images, classes, seed)
            self.augment = GpuAugment(clip.image_size, clip.mean, clip.std).to(device)
            if clock is not None:
                self.source.batch = clock.wrap(self.source.batch, "data")
                self.augment = clock.wrap(self.augment, "data")
            if compile:
                from .compiled import compile_encoders

                compile_encoders(self.model, cuda_graphs=cuda_graphs)
            self.forward = self.model.forward_features if self.precompute else self.model
            self._batches = self._fast_batches()

    def _wrap_phases(self, clock: PhaseClock) -> None:
        inner = getattr(self.model, "base", self.model)  # DePT: the base method computes the features
        inner.encode_images = clock.wrap(inner.encode_images, "image_encoder")
        inner.text_features = clock.wrap(inner.text_features, "text_encoder")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _fast_batches(self) -> Iterator:
        from .features import EpochImageFeatures

        g = torch.Generator(device=self.device).manual_seed(1)
        n = self.source.images.shape[0]
        while True:
            order = torch.randperm(max(n, self.batch * self.steps_per_cycle))
            if self.precompute:
                yield from EpochImageFeatures(
                    self.model, self.source, self.augment, order, batch_size=self.batch, steps=self.steps_per_cycle,
                    steps_per_chunk=self.steps_per_cycle, device=self.device, generator=g, autocast=self._autocast,
                    to_device=lambda x, d: x.to(d, non_blocking=True))
            else:
                images, labels = self.source.batch(order[: self.batch])
                yield self.augment(images, generator=g), labels

    def _official_batches(self) -> Iterator:
        while True:
            yield from self.loader

    def _phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        if self.style == "official":
            with self._phase("data"):
                images, labels = next(self._batches)
                images = images.to(self.device, non_blocking=True).half()
                labels = labels.to(self.device, non_blocking=True)
            with self._phase("head"):
                loss = self.model(images, labels).loss
        else:
            inputs, labels = next(self._batches)
            with self._phase("head"), self._autocast():
                loss = self.forward(inputs, labels).loss
        with self._phase("backward"):
            loss.backward()
        with self._phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def model_flops_per_step(self) -> float:
        """FLOPs of one step's model work (image encoder, text encoder, head, backward), as the fast
        path runs it: what the step needs, whatever a style wastes. Augmentation is not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        size = self.image_size
        images = torch.randn(self.batch, 3, size, size, device=self.device)
        labels = torch.randint(0, self.model.num_classes, (self.batch,), device=self.device)
        counter = FlopCounterMode(display=False)
        with counter, self._autocast():
            if self.precompute:
                with torch.no_grad():
                    features = self.model.encode_images(images)
                loss = self.model.forward_features(features, labels).loss
            else:
                loss = self.model(images, labels).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- measurements


def _timed_steps(stepper: Stepper, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stepper.step()
    _sync(device)
    return time.perf_counter() - t0


def bench_step(clip, method: str, batch: int, classes: int, style: str, *, device: torch.device, steps: int,
               warmup: int, feature_batch: int, text_chunk_size: Optional[int], compile: bool, num_workers: int,
               cuda_graphs: bool = False, flops: Optional[float] = None, peak_rate: Optional[float] = None,
               repeats: int = 3) -> dict:
    """Throughput, breakdown, memory and MFU of one configuration; {'oom': True} if it does not fit.

    images/s and step_ms are the median over `repeats` passes of n steps (each pass's mean step)."""
    record = {"method": method, "batch": batch, "classes": classes, "style": style}
    stepper = None
    try:
        _reset_memory(device)
        clock = PhaseClock(device)
        stepper = Stepper(style, clip, method, batch, classes, device=device, feature_batch=feature_batch,
                          text_chunk_size=text_chunk_size, compile=False, num_workers=num_workers, clock=clock)
        cycle = stepper.steps_per_cycle
        warm = cycle * max(1, math.ceil(warmup / cycle))
        warm_s = _timed_steps(stepper, warm, device) / warm
        # Whole precompute cycles, so one large image batch is amortised over the steps using it;
        # slow configurations (CoCoOp at 1000 classes) measure fewer steps, about PASS_SECONDS a pass.
        n = cycle * max(1, min(math.ceil(steps / cycle), math.ceil(PASS_SECONDS / max(warm_s * cycle, 1e-9))))
        clock.totals()
        breakdown_s = _timed_steps(stepper, n, device)
        phases = {k: v / n for k, v in clock.totals().items()}
        # From here on whole steps only: the wrapped phases record nothing (no events, no records).
        stepper.clock = None
        clock.enabled = False
        if flops is None and style == "fast":
            flops = stepper.model_flops_per_step()
        if style == "fast" and compile:  # a second, compiled stepper for the throughput pass
            del stepper
            _reset_memory(device)
            torch._dynamo.reset()  # each configuration compiles afresh (and stays under dynamo's cache limit)
            stepper = Stepper(style, clip, method, batch, classes, device=device, feature_batch=feature_batch,
                              text_chunk_size=text_chunk_size, compile=True, cuda_graphs=cuda_graphs,
                              num_workers=num_workers)
            _timed_steps(stepper, cycle * max(1, math.ceil(warmup / cycle)), device)
        elif device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        passes = [_timed_steps(stepper, n, device) / n for _ in range(repeats)]
        step_s = statistics.median(passes)
        record.update({
            "steps": n, "steps_per_cycle": cycle, "step_ms": 1e3 * step_s, "images_per_s": batch / step_s,
            "step_ms_passes": [1e3 * p for p in passes],
            "breakdown_ms": {k: 1e3 * v for k, v in sorted(phases.items())},
            "breakdown_pass_step_ms": 1e3 * breakdown_s / n,
            "peak_memory_bytes": _peak_memory(device), "model_flops_per_step": flops,
            # Counted by torch.utils.flop_counter over one fast-path step; chunked text encoding
            # (more prompts than text_chunk_size) includes its recomputed forward.
            "text_recomputed": bool(text_chunk_size) and _text_rows(method, batch, classes) > text_chunk_size,
            "mfu": (flops / step_s / peak_rate) if flops and peak_rate else None,
            "precompute_image_features": stepper.precompute, "compile": bool(compile and style == "fast"),
            "cuda_graphs": bool(cuda_graphs and compile and style == "fast" and device.type == "cuda"),
            "oom": False,
        })
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        record.update({"oom": True, "error": str(err).splitlines()[0][:200]})
    finally:
        del stepper
        _reset_memory(device)
    return record


def _text_rows(method: str, batch: int, classes: int) -> int:
    return batch * classes if method.endswith("cocoop") else classes


def vision_mfu(clip, method: str, batch: int, *, device: torch.device, steps: int, peak_rate: float) -> dict:
    """The prompted image encoder alone (MaPLe, DPL): forward + backward into its prompts at `batch`,
    bf16 autocast; its FLOPs (flop counter) over its median time against the measured bf16 rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from .methods import build_model

    torch.manual_seed(0)
    model = build_model(method, clip, class_names(2), **method_options(method, clip)).to(device).train()
    if not getattr(model, "image_prompted", False):
        raise ValueError(f"{method} does not prompt the image encoder")
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
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
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
            _reset_memory(device)
            stepper = Stepper(style, clip, method, b, classes, device=device,
                              feature_batch=max(feature_batch, b), text_chunk_size=text_chunk_size,
                              num_workers=num_workers)
            _timed_steps(stepper, 2, device)
            return True
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            return False
        finally:
            del stepper
            _reset_memory(device)

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


def write_synthetic_tree(root: Path, classes: int, train_per_class: int, test_per_class: int, image_size: int,
                         *, distinct: int = 64) -> Path:
    """An ImageFolder tree (train/ and test/ per class) of JPEG files; `distinct` images hard-linked
    over and over, so writing 50k files takes seconds while every read still decodes a real JPEG."""
    pool = root / "_pool"
    pool.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, data in enumerate(synthetic_jpegs(distinct, image_size, seed=7)):
        path = pool / f"{i}.jpg"
        path.write_bytes(data)
        sources.append(path)
    k = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(class_names(classes)):
            folder = root / split / f"{c:04d}_{name.replace(' ', '_').replace('/', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                target = folder / f"{j}.jpg"
                if not target.exists():
                    try:
                        os.link(sources[k % distinct], target)
                    except OSError:  # no hard links on this file system: a copy is fine
                        target.write_bytes(sources[k % distinct].read_bytes())
                k += 1
    (root / "classes.txt").write_text("\n".join(sorted(p.name for p in (root / "train").iterdir())) + "\n")
    return root


def whole_run(style: str, method: str, *, data_root: Path, out: Path, model: str, device: torch.device,
              shots: int, epochs: int, batch: int, num_workers: int, compile: bool = False,
              text_chunk_size: Optional[int] = None, feature_cache_dir: Optional[Path] = None) -> dict:
    """One base-to-new run (one seed): few-shot sample, train on base, test base and new. Wall time."""
    from .config import load_config

    _reset_memory(device)
    t0 = time.perf_counter()
    if style == "fast":
        from .evaluate import run_protocol

        overrides = [f"output_dir={out}", f"model.name={model}", "model.pretrained=null", "data.dataset=imagefolder",
                     f"data.root={data_root}", "data.seeds=[1]", f"data.shots={shots}", f"train.epochs={epochs}",
                     f"train.batch_size={batch}", "train.precision=bf16", f"train.device={device}",
                     f"train.num_workers={num_workers}", "train.progress=false", f"train.compile={compile}",
                     "method.name=" + method, "protocol.name=base2new"]
        if text_chunk_size:
            overrides.append(f"train.text_chunk_size={text_chunk_size}")
        if feature_cache_dir is not None:
            overrides.append(f"data.cache_dir={feature_cache_dir}")
        for key, value in _depth_override(method, model).items():
            overrides.append(f"method.options.{key}={value}")
        results = run_protocol(load_config(None, overrides), say=lambda msg: None)
        run = results["runs"][0]
        accuracy = {"base": run["base"], "new": run["new"]}
    else:
        accuracy = _official_base2new(method, data_root=data_root, out=out, model=model, device=device, shots=shots,
                                      epochs=epochs, batch=batch, num_workers=num_workers)
    _sync(device)
    return {"style": style, "method": method, "seconds": time.perf_counter() - t0,
            "peak_memory_bytes": _peak_memory(device), "accuracy": accuracy}


def _depth_override(method: str, model: str) -> dict:
    from .clip import load_clip

    if "maple" not in method and "dpl" not in method:
        return {}
    return method_options(method, load_clip(model, None))


def _official_base2new(method: str, *, data_root: Path, out: Path, model: str, device: torch.device, shots: int,
                       epochs: int, batch: int, num_workers: int) -> dict:
    from .config import OptimConfig
    from .data import eval_loader, few_shot_split, load_dataset, split_base_new
    from .official import (CpuAugmentDataset, build_official_model, evaluate_official, official_clip,
                           official_step, official_train_loader, train_transform)
    from .train import build_optimizer, seed_everything, set_epoch_lr

    seed_everything(0)
    clip = official_clip(model, None, device)
    base, new = split_base_new(few_shot_split(load_dataset("imagefolder", data_root), shots, 1, out / "splits"))
    seed_everything(1)
    net = build_official_model(method, clip, base.classnames, **method_options(method, clip)).to(device)
    optimizer = build_optimizer(net, OptimConfig())
    data = CpuAugmentDataset([s.path for s in base.train], [s.label for s in base.train], train_transform(clip))
    loader = official_train_loader(data, batch_size=min(batch, len(data)), num_workers=num_workers, seed=1)
    cfg = OptimConfig()
    net.train()
    for epoch in range(epochs):
        set_epoch_lr(optimizer, epoch, epochs=epochs, cfg=cfg)
        for images, labels in loader:
            official_step(net, optimizer, images, labels, device)
    acc = {}
    for name, split in (("base", base), ("new", new)):
        net.set_classnames(split.classnames)
        loader = eval_loader(split.test, image_size=clip.image_size, mean=clip.mean, std=clip.std, batch_size=100,
                             num_workers=num_workers, pin_memory=device.type == "cuda")
        acc[name] = evaluate_official(net, loader, device)
    return acc


# ----------------------------------------------------------------------------- report


def _environment(device: torch.device, matmul: dict) -> dict:
    import open_clip

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": name, "device_type": device.type,
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "triton": triton_version, "open_clip": open_clip.__version__,
                         "python": sys.version.split()[0], "cuda": torch.version.cuda},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "bf16_matmul": matmul}


def speedups(records: list[dict]) -> list[dict]:
    """fast images/s over official images/s per (method, batch, classes) measured in both styles."""
    by = {(r["method"], r["batch"], r["classes"], r["style"]): r for r in records}
    out = []
    for (method, b, c, style), fast in by.items():
        off = by.get((method, b, c, "official"))
        if style != "fast" or off is None:
            continue
        row = {"method": method, "batch": b, "classes": c}
        if _failed(fast) or _failed(off):
            row.update(speedup=None, official_oom=bool(off.get("oom")), fast_oom=bool(fast.get("oom")))
        else:
            row.update(speedup=fast["images_per_s"] / off["images_per_s"], official_oom=False, fast_oom=False)
        out.append(row)
    return out


def draw_bench_chart(results: dict, path: str | Path) -> Path:
    """Images/s of both styles per method, one panel per (batch, classes); OOM marked; plus the
    whole-run wall times when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["steps"]
    combos = sorted({(r["batch"], r["classes"]) for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    runs = results.get("whole_runs") or []
    panels = len(combos) + (1 if runs else 0)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.2 * rows), squeeze=False)
    by = {(r["method"], r["batch"], r["classes"], r["style"]): r for r in records}
    for ax, (b, c) in zip(axes.flat, combos):
        for j, style in enumerate(STYLES):
            xs = [i + (j - 0.5) * 0.4 for i in range(len(methods))]
            ys, labels = [], []
            for m in methods:
                r = by.get((m, b, c, style))
                ys.append(0.0 if _failed(r) else r["images_per_s"])
                labels.append("OOM" if r and r.get("oom") else ("ERR" if r and "error" in r else ""))
            bars = ax.bar(xs, ys, 0.4, label=style)
            ax.bar_label(bars, labels=labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}, {c} classes", fontsize=9)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
        ax.set_ylabel("images/s", fontsize=8)
        ax.legend(fontsize=7)
    if runs:
        ax = axes.flat[len(combos)]
        names = list(dict.fromkeys(r["method"] for r in runs))
        for j, style in enumerate(STYLES):
            secs = {r["method"]: r["seconds"] for r in runs if r["style"] == style and "seconds" in r}
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], [secs.get(n, 0.0) for n in names], 0.4, label=style)
        ax.set_title("whole base-to-new run", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_ylabel("wall seconds", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(f"fastprompt bench train: {results['config']['model']} on {results['environment']['device']}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(results: dict) -> str:
    lines = [f"Device: {results['environment']['device']}; model {results['config']['model']}; "
             f"bf16 matmul {results['environment']['bf16_matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s measured",
             ""]
    if results["steps"]:
        lines += ["| method | batch | classes | style | images/s | step ms | peak MB | MFU |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in results["steps"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['classes']} | {r['style']} | error | | | |")
            continue
        if r.get("oom"):
            lines.append(f"| {r['method']} | {r['batch']} | {r['classes']} | {r['style']} | OOM | | | |")
            continue
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r.get("peak_memory_bytes") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['classes']} | {r['style']} | {r['images_per_s']:.1f} | "
                     f"{r['step_ms']:.2f} | {mem} | {mfu} |")
    for r in results.get("vision_mfu") or []:
        if "mfu" in r:
            lines.append(f"\nvision forward+backward {r['method']} batch {r['batch']}: {r['step_ms']:.2f} ms, "
                         f"MFU {100 * r['mfu']:.1f}%")
    for r in results.get("whole_runs") or []:
        if "seconds" not in r:
            lines.append(f"\nwhole run {r['method']} {r['style']}: {r.get('error')}")
            continue
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MB" if r.get("peak_memory_bytes") else "-"
        rate = f", {r['images_per_s']:.1f} images/s" if r.get("images_per_s") else ""
        lines.append(f"\nwhole run {r['method']} {r['style']}: {r['seconds']:.1f} s{rate}, peak {mem}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastprompt bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: fastprompt-tiny, 2 steps, coop and dept+coop")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the PNG chart")
    p.add_argument("--model", default=None, help="open_clip model (default ViT-B-16; smoke: fastprompt-tiny)")
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: all five, each with and without dept+)")
    p.add_argument("--batches", nargs="+", type=_positive_int, default=None, help="batch sizes (default 4 32 128)")
    p.add_argument("--classes", nargs="+", type=_positive_int, default=None, help="class counts (default 50 500 1000)")
    p.add_argument("--styles", nargs="+", choices=STYLES, default=list(STYLES),
                   help="what to measure (default both; `--style official` alone: the baseline only)")
    p.add_argument("--steps", type=_positive_int, default=None, help="measured steps per configuration")
    p.add_argument("--compile", action="store_true",
                   help="fast path: torch.compile the encoder trunks (dynamic class count) for the images/s pass")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile on a GPU: replay the compiled trunks as CUDA graphs (launch-bound steps)")
    p.add_argument("--text-chunk-size", type=_positive_int, default=None, help="fast path: prompts per text-encoder chunk")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-steps", action="store_true", help="skip the per-step grid (with --run / --max-batch)")
    p.add_argument("--run", nargs="*", default=None, metavar="METHOD",
                   help="also time whole base-to-new runs of these methods in both styles (default dept+coop dept+maple)")
    p.add_argument("--run-classes", type=_positive_int, default=None, help="base classes of the whole run (default 500; smoke 3)")
    p.add_argument("--run-shots", type=_positive_int, default=None, help="shots per class (default 16; smoke 2)")
    p.add_argument("--run-epochs", type=_positive_int, default=None, help="epochs (default 10; smoke 1)")
    p.add_argument("--run-test-per-class", type=_positive_int, default=None, help="test images per class (default 50; smoke 2)")
    p.add_argument("--max-batch", nargs="*", default=None, metavar="METHOD",
                   help="largest batch that fits, both styles, at the largest class count (GPU)")
    p.add_argument("--vision-mfu", nargs="*", default=None, metavar="METHOD",
                   help="MFU of the prompted image encoder's forward+backward alone at the largest batch "
                        "(default maple dpl)")
    return p


def main(argv: Optional[list[str]] = None, args: Optional[argparse.Namespace] = None) -> Path:
    args = args or build_parser().parse_args(argv)
    from .clip import load_clip
    from .official import official_clip
    from .train import resolve_device

    grid = dict(SMOKE_GRID if args.smoke else GPU_GRID)
    device = torch.device("cpu") if args.smoke and args.device == "auto" else resolve_device(args.device)
    model = args.model or grid["model"]
    methods = args.methods or list(grid["methods"])
    batches, classes = args.batches or list(grid["batches"]), args.classes or list(grid["classes"])
    steps = args.steps or grid["steps"]
    chunk = args.text_chunk_size if args.text_chunk_size is not None else grid["text_chunk_size"]
    from .methods import METHOD_NAMES

    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        from .errors import ConfigError

        raise ConfigError(f"unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    matmul = measure_matmul_rate(device, smoke=args.smoke)
    config = {"model": model, "pretrained": None, "mode": "smoke" if args.smoke else "full", "methods": methods,
              "batches": batches, "classes": classes, "styles": args.styles, "steps": steps, "warmup": grid["warmup"],
              "feature_batch": grid["feature_batch"], "text_chunk_size": chunk, "compile": args.compile,
              "cuda_graphs": args.cuda_graphs,
              "num_workers": grid["num_workers"], "image_size": None, "repeats": grid["repeats"],
              "statistic": "median over `repeats` passes of each pass's mean step time"}
    results = {"benchmark": "train", "environment": _environment(device, matmul), "config": config, "steps": []}
    torch.manual_seed(0)
    clips = {}

    def clip_for(style):
        if style not in clips:
            torch.manual_seed(0)
            clips[style] = (official_clip(model, None, device) if style == "official"
                            else load_clip(model, None, dtype=torch.float32, device=device))
        return clips[style]

    config["image_size"] = clip_for("fast").image_size
    if not args.no_steps:
        for method in methods:
            for b in batches:
                for c in classes:
                    flops = None
                    for style in args.styles:
                        rec = _guarded(args.smoke, {"method": method, "batch": b, "classes": c, "style": style},
                                       bench_step, clip_for(style), method, b, c, style, device=device, steps=steps,
                                       warmup=grid["warmup"], feature_batch=grid["feature_batch"],
                                       text_chunk_size=chunk, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                       num_workers=grid["num_workers"], flops=flops, peak_rate=matmul["flops_per_s"],
                                       repeats=grid["repeats"])
                        flops = rec.get("model_flops_per_step", flops)
                        results["steps"].append(rec)
                        print(_one_line(rec), flush=True)
        results["speedups"] = speedups(results["steps"])
    if args.run is not None:
        clips.clear()  # each run loads its own backbone; free the grid's before measuring peak memory
        results["whole_runs"] = _whole_runs(args, model, device, chunk, smoke=args.smoke)
    if args.vision_mfu is not None:
        batch = max(batches)
        results["vision_mfu"] = []
        for method in args.vision_mfu or ["maple", "dpl"]:
            rec = _guarded(args.smoke, {"method": method, "batch": batch}, vision_mfu, clip_for("fast"), method, batch,
                           device=device, steps=steps, peak_rate=matmul["flops_per_s"])
            results["vision_mfu"].append(rec)
            print(f"vision forward+backward {method} B={batch}: MFU {rec.get('mfu', rec.get('error'))}", flush=True)
    if args.max_batch is not None:
        results["largest_batch"] = []
        for method in args.max_batch or ["dept+coop", "dept+maple"]:
            for style in args.styles:
                rec = _guarded(args.smoke, {"method": method, "classes": max(classes), "style": style},
                               largest_batch, clip_for(style), method, max(classes), style, device=device,
                               feature_batch=grid["feature_batch"], text_chunk_size=chunk,
                               limit=8 if args.smoke else 4096, num_workers=grid["num_workers"])
                results["largest_batch"].append(rec)
                print(f"largest batch {method} {style} C={max(classes)}: {rec.get('largest_batch', rec.get('error'))}",
                      flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = "smoke" if args.smoke else results["environment"]["device"].replace(" ", "_")
    path = out / f"train_{tag}_{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    if results["steps"]:
        chart = draw_bench_chart(results, path.with_suffix(".png"))
        print(f"wrote {path} and {chart}")
    else:
        print(f"wrote {path}")
    print(markdown_table(results))
    return path


def _whole_runs(args, model: str, device: torch.device, chunk, *, smoke: bool) -> list[dict]:
    classes = args.run_classes or (3 if smoke else 500)
    shots = args.run_shots or (2 if smoke else 16)
    epochs = args.run_epochs or (1 if smoke else 10)
    tests = args.run_test_per_class or (2 if smoke else 50)
    workers = 0 if smoke else GPU_GRID["num_workers"]
    methods = args.run or ["dept+coop", "dept+maple"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastprompt-bench-") as tmp:
        tmp = Path(tmp)
        from .clip import load_clip

        size = load_clip(model, None).image_size
        # Base and new are the two halves of the class list (base-to-new), so 2x classes in the tree.
        root = write_synthetic_tree(tmp / "data", 2 * classes, shots, tests, size)
        for method in methods:
            for style in args.styles:
                rec = _guarded(smoke, {"style": style, "method": method}, whole_run, style, method, data_root=root,
                               out=tmp / f"{style}_{method.replace('+', '_')}", model=model, device=device,
                               shots=shots, epochs=epochs, batch=4, num_workers=workers, compile=args.compile,
                               text_chunk_size=chunk,
                               # one cache per (method, style): no run may find another's test features
                               feature_cache_dir=tmp / "cache" / f"{style}_{method.replace('+', '_')}")
                rec.update(base_classes=classes, shots=shots, epochs=epochs, test_per_class=tests, batch=4,
                           train_images=classes * shots, test_images=2 * classes * tests)
                if "seconds" in rec:
                    # Whole-run throughput: every image the run processed (training views, test images) per second.
                    rec["images_per_s"] = (epochs * rec["train_images"] + rec["test_images"]) / rec["seconds"]
                runs.append(rec)
                print(f"whole run {method} {style}: {rec.get('seconds', rec.get('error'))}", flush=True)
    return runs


def _guarded(smoke: bool, record: dict, fn: Callable, *args, **kwargs) -> dict:
    """fn's record; on a GPU run an unexpected error is recorded and the run goes on (one broken
    configuration must not lose an hour of measurements). The smoke mode (CI) raises it."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - recorded in the JSON, with its type
        if smoke:
            raise
        _reset_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        return {**record, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def _failed(r: Optional[dict]) -> bool:
    return r is None or bool(r.get("oom")) or "error" in r


def _one_line(r: dict) -> str:
    head = f"{r['method']:>12} B={r['batch']:<4} C={r['classes']:<5} {r['style']:>8}"
    if "error" in r:
        return head + "  ERROR " + r["error"]
    if r.get("oom"):
        return head + "  OOM"
    mfu = f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return head + f"  {r['images_per_s']:9.1f} img/s  {r['step_ms']:8.2f} ms/step{mfu}"


def report_main(result_json: str, out: Optional[str] = None) -> Path:
    """`fastprompt bench report RESULT.json`: redraw the chart and print the table."""
    results = json.loads(Path(result_json).read_text())
    if results.get("benchmark") != "train":
        raise ValueError(f"{result_json} is not a `fastprompt bench train` result")
    chart = draw_bench_chart(results, Path(out) if out else Path(result_json).with_suffix(".png"))
    print(markdown_table(results))
    print(f"wrote {chart}")
    return chart
