"""Evaluation protocols: accuracy, base-to-new (one command, seeds averaged, HM of the averages),
cross-dataset transfer, domain generalisation and few-shot.

Each protocol trains what it needs through `fastprompt.train.fit` (or, with `train=False`, loads the
run's checkpoints), evaluates, and writes per-run `result.json` files plus the aggregate
`results.json` in the output folder. Folder layout of one command:

    <output_dir>/config.yaml                       the resolved config
    <output_dir>/results.json                      the aggregate (what `fastprompt report` reads)
    <output_dir>/splits/                           few-shot samples cached per (dataset, shots, seed)
    <output_dir>/[shots<k>/]seed<s>/               train.log, metrics.jsonl, checkpoints/, result.json
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import distributed
from .atomic_io import atomic_write_bytes
from .config import Config, ConfigError, check_method_options, config_to_dict, save_config
from .data.errors import DatasetError
from .features import (EvalFeatureCache, backbone_fingerprint, configure_text, encode_samples, features_accuracy,
                       uses_image_features)
from .methods.templates import template_for
from .report import harmonic_mean
from .train import RunLogger, autocast_context, fit, load_trained, resolve_device, seed_everything

__all__ = [
    "accuracy",
    "harmonic_mean",
    "Session",
    "run_protocol",
    "run_base2new",
    "run_transfer",
    "run_few_shot",
    "run_train_eval",
]

Say = Callable[[str], None]


@torch.inference_mode()
def accuracy(model: nn.Module, samples: list, *, session: "Session", desc: str = "eval") -> tuple[float, float]:
    """Top-1 accuracy in percent over `samples` with the model's current class names, and images/s."""
    from tqdm.auto import tqdm

    from .data import eval_loader

    cfg, clip, device = session.cfg, session.clip, session.device
    if cfg.train.feature_cache and uses_image_features(model) and not distributed.is_distributed():
        return _cached_accuracy(model, samples, session=session)
    # Under torchrun each rank tests every world_size-th image; the counts are summed below.
    loader = eval_loader(distributed.shard(samples), image_size=clip.image_size, mean=clip.mean, std=clip.std,
                         batch_size=cfg.train.eval_batch_size, num_workers=cfg.train.num_workers,
                         allow_corrupt=cfg.data.allow_corrupt, pin_memory=device.type == "cuda")
    model.eval()
    correct = seen = 0
    start = time.perf_counter()
    show = cfg.train.progress and sys.stderr.isatty() and distributed.is_main()
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not show, leave=False,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_context(device, cfg.train.precision):
                logits = model(images).logits
            correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += labels.numel()
            bar.update(labels.numel() * distributed.world_size())
    counts = distributed.all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64, device=device))
    correct, seen = int(counts[0]), int(counts[1])
    if seen == 0:
        raise _unreadable(desc, samples)
    rate = seen / max(time.perf_counter() - start, 1e-9)
    return 100.0 * correct / seen, rate


def _cached_accuracy(model: nn.Module, samples: list, *, session: "Session") -> tuple[float, float]:
    """accuracy() from test-image features cached per backbone (unprompted image encoders only):
    encoded once, then reused by every epoch, seed, method and class list (base and new)."""
    from .data import eval_loader

    cfg, clip, device = session.cfg, session.clip, session.device
    start = time.perf_counter()
    if session.feature_cache is None:
        root = Path(cfg.data.cache_dir or session.out) / "features"
        session.feature_cache = EvalFeatureCache(root, backbone_fingerprint(clip, cfg.train.precision))

    def loader(indexed):
        return eval_loader(indexed, image_size=clip.image_size, mean=clip.mean, std=clip.std,
                           batch_size=cfg.train.eval_batch_size, num_workers=cfg.train.num_workers,
                           allow_corrupt=cfg.data.allow_corrupt, pin_memory=device.type == "cuda")

    autocast = lambda: autocast_context(device, cfg.train.precision)  # noqa: E731
    encode = lambda missing: encode_samples(model.encode_images, missing, loader_factory=loader,  # noqa: E731
                                            device=device, autocast=autocast)
    features, labels = session.feature_cache.features(encode, samples)
    if labels.numel() == 0:
        raise _unreadable("test", samples)
    acc = features_accuracy(model, features, labels, device=device, autocast=autocast,
                            batch_size=cfg.train.eval_batch_size)
    return acc, labels.numel() / max(time.perf_counter() - start, 1e-9)


def _unreadable(desc: str, samples: list) -> DatasetError:
    import os

    folder = os.path.commonpath([os.path.dirname(os.path.abspath(s.path)) for s in samples]) if samples else "?"
    return DatasetError(f"{desc}: none of the {len(samples)} test images under {folder} could be read "
                        "(data.allow_corrupt=true skipped them all); replace the unreadable files, or point "
                        "data.root at a copy that decodes")


def _require_test_images(splits, name: str, root: str, part: str = "") -> None:
    """Every protocol scores test images: none is an error before any training, not after it."""
    if splits.test:
        return
    where = f"{Path(root) / 'test'}/" if name == "imagefolder" else f"the {name} test split under {root}"
    what = f"the {part} classes of {name}" if part else name
    fix = ("add <class>/ folders of test images there, or use the flat layout <root>/<class>/*.png so "
           "fastprompt splits 20% off for testing") if name == "imagefolder" else \
        "check the dataset's files against the layout in PROTOCOLS.md"
    raise DatasetError(f"no test images for {what}: nothing found in {where}; {fix}")


# --------------------------------------------------------------------------- one command's session


@dataclass
class Session:
    """What every run of one command shares: the config, the frozen CLIP, the device, the output."""

    cfg: Config
    clip: object
    device: torch.device
    out: Path
    method_options: dict
    resume: bool = False
    train: bool = True  # False: load each run's checkpoint instead of training (`fastprompt eval`)
    say: Say = print
    feature_cache: Optional[EvalFeatureCache] = None  # test-image features, made on first use

    @classmethod
    def open(cls, cfg: Config, *, resume: bool = False, train: bool = True, say: Say = print) -> "Session":
        from .clip import load_clip
        from .methods import METHOD_NAMES, method_defaults

        options = check_method_options(cfg, METHOD_NAMES, method_defaults(cfg.method.name)
                                       if cfg.method.name in METHOD_NAMES else {})
        device = resolve_device(cfg.train.device)
        if not distributed.is_main():
            say = _silent  # rank 0 reports for everyone
        say(f"loading CLIP {cfg.model.name} (weights: {cfg.model.pretrained or 'random init'}) on {device}")
        # Random weights (pretrained=null) come from load_clip's fixed seed: the same backbone in every
        # process, so `fastprompt eval` and `--resume` load trained prompts into the same CLIP.
        # Under torchrun rank 0 loads first, so a pretrained tag is downloaded (and cached) once, not
        # by every rank into the same cache at the same time.
        if not distributed.is_main():
            distributed.barrier()
        clip = load_clip(cfg.model.name, cfg.model.pretrained, dtype=cfg.model.dtype, device=device)
        if distributed.is_main():
            distributed.barrier()
        say(f"  {clip.build_note}")
        out = Path(cfg.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir: {out} exists and is not a folder; choose another output_dir=...")
        out.mkdir(parents=True, exist_ok=True)
        # config.yaml records how the run was trained: `--resume` and `fastprompt eval` keep it as is.
        if distributed.is_main() and ((train and not resume) or not (out / "config.yaml").exists()):
            save_config(cfg, out / "config.yaml")
        return cls(cfg=cfg, clip=clip, device=device, out=out, method_options=options,
                   resume=resume, train=train, say=say)

    def load_splits(self, name: Optional[str] = None):
        """Dataset `name` (default: data.dataset); DatasetError when it has no test images."""
        from .data import load_dataset

        name = name or self.cfg.data.dataset
        splits = load_dataset(name, self.cfg.data.root)
        _require_test_images(splits, name, self.cfg.data.root)
        return splits

    def few_shot(self, splits, shots: int, seed: int):
        from .data import few_shot_split

        cache = self.cfg.data.cache_dir or str(self.out / "splits")
        return few_shot_split(splits, shots, seed, cache)

    def build_model(self, classnames: list[str], seed: int) -> nn.Module:
        from .methods import build_model

        seed_everything(seed)  # the prompt/head initialisation depends on the seed, as in Dassl
        options = dict(self.method_options)
        if self.follows_dataset_template:
            options["template"] = template_for(self.cfg.method.name, self.cfg.data.dataset)
        try:
            model = build_model(self.cfg.method.name, self.clip, list(classnames), **options)
        except ValueError as exc:
            # The model API refuses bad options with ValueErrors; here they came from the config.
            raise ConfigError(f"method {self.cfg.method.name}: {exc} (set in method.options)") from exc
        configure_text(model, chunk_size=self.cfg.train.text_chunk_size)
        return model.to(self.device)

    @property
    def follows_dataset_template(self) -> bool:
        """Methods with a hand-written template use each dataset's own (CoOp's), unless the config sets one."""
        from .methods import method_defaults

        return "template" in method_defaults(self.cfg.method.name) and "template" not in self.cfg.method.options

    def use_dataset_template(self, model: nn.Module, dataset: str) -> None:
        """Before switching `model` to `dataset`'s classes: that dataset's template (cross-dataset)."""
        if self.follows_dataset_template:
            getattr(model, "base", model).template = template_for(self.cfg.method.name, dataset)

    def train_model(self, model: nn.Module, train_samples: list, run_dir: Path, seed: int) -> dict:
        """Fit on `train_samples` (or load run_dir's checkpoint when not training); train stats."""
        if not any(p.requires_grad for p in model.parameters()):
            return {}  # zero-shot CLIP: nothing to train or load
        if not self.train:
            meta = load_trained(model, run_dir, config_to_dict(self.cfg))
            return {"loaded_checkpoint_step": meta["step"]}
        from .data import GpuAugment, TrainImageCache
        from .checkpoint import latest_checkpoint_dir

        if not self.resume and latest_checkpoint_dir(run_dir / "checkpoints") is not None:
            self.say(f"{run_dir} holds an earlier checkpoint: training from scratch (--resume continues it)")

        cfg, clip = self.cfg, self.clip
        short_side = cfg.data.short_side or math.ceil(clip.image_size * 8 / 7)
        # Small few-shot caches live on the accelerator, so augmentation never leaves it; one larger
        # than a quarter of its free memory (ImageNet: ~4 GB) stays in pinned host memory.
        budget = torch.cuda.mem_get_info(self.device)[0] // 4 if self.device.type == "cuda" else None
        cache = TrainImageCache(train_samples, short_side=short_side, device=self.device, max_device_bytes=budget,
                                allow_corrupt=cfg.data.allow_corrupt, num_workers=cfg.train.num_workers)
        augment = GpuAugment(clip.image_size, clip.mean, clip.std, scale=tuple(cfg.data.crop_scale)).to(self.device)
        logger = RunLogger(run_dir)
        logger.info(f"backbone {clip.name}: {clip.build_note}")
        if cache.skipped:
            logger.info(f"skipped {len(cache.skipped)} unreadable training images (data.allow_corrupt=true)")
        try:
            result = fit(model, cache, augment, cfg, run_dir, seed=seed, resume=self.resume, logger=logger)
        finally:
            logger.close()
        return {"steps": result.steps, "seconds": round(result.seconds, 3),
                "images_per_s": round(result.images_per_s, 2), "epoch_losses": result.epoch_losses,
                "resumed_from_step": result.resumed_from_step, "skipped_images": len(cache.skipped)}

    def seed_dir(self, seed: int, *parts: str) -> Path:
        path = self.out.joinpath(*parts, f"seed{seed}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def finished(self, run_dir: Path, seed: int, keys: tuple[str, ...]) -> Optional[dict]:
        """With --resume, a seed whose result.json is complete is reused, not run again (sweeps)."""
        if not (self.resume and self.train):
            return None
        from .sweep import finished_result

        done = finished_result(run_dir, seed, keys, self.cfg)
        if done is not None:
            self.say(f"seed {seed}: finished earlier ({run_dir / 'result.json'}), not run again")
        return done


def _silent(message: str) -> None:
    pass


def _write_json(path: Path, payload: dict) -> None:
    if not distributed.is_main():
        return
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _header(session: Session, protocol: str) -> dict:
    cfg = session.cfg
    return {"protocol": protocol, "dataset": cfg.data.dataset, "method": cfg.method.name,
            "model": cfg.model.name, "pretrained": cfg.model.pretrained, "shots": cfg.data.shots,
            "seeds": list(cfg.data.seeds), "config": config_to_dict(cfg)}


# --------------------------------------------------------------------------- protocols


def run_base2new(session: Session) -> dict:
    """Few-shot sample, split base/new, train on base, test base (base names) and new (new names)."""
    from .data import split_base_new

    cfg = session.cfg
    full = session.load_splits()
    for part, half in zip(("base", "new"), split_base_new(full)):
        _require_test_images(half, cfg.data.dataset, cfg.data.root, part)
    runs = []
    for seed in cfg.data.seeds:
        run_dir = session.seed_dir(seed)
        if (done := session.finished(run_dir, seed, ("base", "new", "hm"))) is not None:
            runs.append(done)
            continue
        base, new = split_base_new(session.few_shot(full, cfg.data.shots, seed))
        model = session.build_model(base.classnames, seed)
        train_stats = session.train_model(model, base.train, run_dir, seed)
        base_acc, base_rate = accuracy(model, base.test, session=session, desc=f"seed {seed} base")
        model.set_classnames(new.classnames)  # new classes: the new names only (DePT: ITM head only)
        new_acc, new_rate = accuracy(model, new.test, session=session, desc=f"seed {seed} new")
        run = {"seed": seed, "base": base_acc, "new": new_acc, "hm": harmonic_mean(base_acc, new_acc),
               "num_base_classes": base.num_classes, "num_new_classes": new.num_classes,
               "eval_images_per_s": round(_mean([base_rate, new_rate]), 2), "train": train_stats}
        _write_json(run_dir / "result.json", run)
        session.say(f"seed {seed}: base {base_acc:.2f}  new {new_acc:.2f}  HM {run['hm']:.2f}")
        runs.append(run)
    base_mean, new_mean = _mean([r["base"] for r in runs]), _mean([r["new"] for r in runs])
    return {**_header(session, "base2new"), "runs": runs,
            "mean": {"base": base_mean, "new": new_mean, "hm": harmonic_mean(base_mean, new_mean)},
            "std": {"base": _std([r["base"] for r in runs]), "new": _std([r["new"] for r in runs])}}


def run_transfer(session: Session) -> dict:
    """Cross-dataset and domain generalisation: train on the source (all classes), test targets.

    A target with `class_indices` (ImageNet-A/-R: 200 of ImageNet's 1000 classes) slices DePT's CAT
    head to those rows; a target with the source's class names uses the fused head; any other
    target is ITM only (set_classnames decides).
    """
    cfg = session.cfg
    source = session.load_splits()
    targets = {name: session.load_splits(name) for name in cfg.protocol.targets}  # fail early on layouts
    runs = []
    for seed in cfg.data.seeds:
        run_dir = session.seed_dir(seed)
        if (done := session.finished(run_dir, seed, ("source", "targets"))) is not None:
            runs.append(done)
            continue
        train_split = session.few_shot(source, cfg.data.shots, seed)
        model = session.build_model(source.classnames, seed)
        train_stats = session.train_model(model, train_split.train, run_dir, seed)
        source_acc, _ = accuracy(model, source.test, session=session, desc=f"seed {seed} {cfg.data.dataset}")
        acc = {}
        for name, target in targets.items():
            session.use_dataset_template(model, name)
            _set_target_classes(model, source, target)
            acc[name], _ = accuracy(model, target.test, session=session, desc=f"seed {seed} {name}")
        session.use_dataset_template(model, cfg.data.dataset)
        model.set_classnames(source.classnames)
        run = {"seed": seed, "source": source_acc, "targets": acc, "target_mean": _mean(list(acc.values())),
               "train": train_stats}
        _write_json(run_dir / "result.json", run)
        session.say(f"seed {seed}: {cfg.data.dataset} {source_acc:.2f}  " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        runs.append(run)
    mean_targets = {n: _mean([r["targets"][n] for r in runs]) for n in targets}
    return {**_header(session, cfg.protocol.name), "targets": list(targets), "runs": runs,
            "mean": {"source": _mean([r["source"] for r in runs]), "targets": mean_targets},
            "target_mean": _mean(list(mean_targets.values()))}


def _set_target_classes(model: nn.Module, source, target) -> None:
    """Switch to the target's classes. DePT keeps its CAT head on a target whose classes are a
    subset of the source's (ImageNet-A/-R in ImageNet: `class_indices` name the rows), checked by
    name; any other target (another source, or unrelated indices) gets the ITM head only."""
    rows = target.class_indices
    takes_rows = "cat_head_rows" in inspect.signature(model.set_classnames).parameters
    if rows is not None and takes_rows and all(0 <= i < len(source.classnames) for i in rows) \
            and [source.classnames[i] for i in rows] == list(target.classnames):
        model.set_classnames(target.classnames, cat_head_rows=rows)
    else:
        model.set_classnames(target.classnames)


def run_few_shot(session: Session) -> dict:
    """Train and test on all classes for every shot count in protocol.shots, every seed."""
    cfg = session.cfg
    full = session.load_splits()
    per_shots = {}
    for shots in cfg.protocol.shots:
        accs = []
        for seed in cfg.data.seeds:
            run_dir = session.seed_dir(seed, f"shots{shots}")
            if (done := session.finished(run_dir, seed, ("accuracy",))) is not None:
                accs.append(done["accuracy"])
                continue
            split = session.few_shot(full, shots, seed)
            model = session.build_model(full.classnames, seed)
            train_stats = session.train_model(model, split.train, run_dir, seed)
            acc, rate = accuracy(model, full.test, session=session, desc=f"{shots}-shot seed {seed}")
            _write_json(run_dir / "result.json", {"seed": seed, "shots": shots, "accuracy": acc,
                                                  "eval_images_per_s": round(rate, 2), "train": train_stats})
            session.say(f"{shots}-shot seed {seed}: accuracy {acc:.2f}")
            accs.append(acc)
        per_shots[str(shots)] = {"accuracy": accs, "mean": _mean(accs), "std": _std(accs)}
    return {**_header(session, "few_shot"), "shots_list": list(cfg.protocol.shots), "results": per_shots}


def run_train_eval(session: Session) -> dict:
    """Plain training on all classes (data.shots per class) and test accuracy: a user's own data."""
    cfg = session.cfg
    full = session.load_splits()
    runs = []
    for seed in cfg.data.seeds:
        run_dir = session.seed_dir(seed)
        if (done := session.finished(run_dir, seed, ("accuracy",))) is not None:
            runs.append(done)
            continue
        split = session.few_shot(full, cfg.data.shots, seed)
        model = session.build_model(full.classnames, seed)
        train_stats = session.train_model(model, split.train, run_dir, seed)
        acc, rate = accuracy(model, full.test, session=session, desc=f"seed {seed} test")
        run = {"seed": seed, "accuracy": acc, "eval_images_per_s": round(rate, 2), "train": train_stats}
        _write_json(run_dir / "result.json", run)
        session.say(f"seed {seed}: accuracy {acc:.2f}")
        runs.append(run)
    return {**_header(session, "train_eval"), "runs": runs, "mean": {"accuracy": _mean([r["accuracy"] for r in runs])}}


PROTOCOLS = {
    "base2new": run_base2new,
    "cross_dataset": run_transfer,
    "domain_generalisation": run_transfer,
    "few_shot": run_few_shot,
    "train_eval": run_train_eval,
}


def run_protocol(cfg: Config, *, resume: bool = False, train: bool = True, say: Say = print) -> dict:
    """Run cfg.protocol end to end; writes and returns the aggregate results."""
    session = Session.open(cfg, resume=resume, train=train, say=say)
    start = time.perf_counter()
    results = PROTOCOLS[cfg.protocol.name](session)
    results["wall_seconds"] = round(time.perf_counter() - start, 2)
    results["device"] = str(session.device) if session.device.type != "cuda" else torch.cuda.get_device_name()
    _write_json(session.out / "results.json", results)
    return results
