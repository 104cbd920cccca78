"""What every run of one command shares: the config, the frozen CLIP, the device, the run folder,
and the three things a protocol does per seed (build a model, train it, score it).

The official-style baseline (fastprompt.official) subclasses Session and replaces those three, so
that the protocols are written once for both styles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import distributed
from ..checkpoint import latest_checkpoint_dir
from ..backends import describe_backends
from ..clip import ClipBundle, load_clip
from ..config import Config, check_method_options, config_to_dict
from ..data import DatasetSplits, GpuAugment, TrainImageCache, few_shot_split, load_dataset, locate_dataset
from ..errors import ConfigError, DatasetError
from ..fast_paths import configure_text
from ..kernels.validation import check_triton_device
from ..methods import METHOD_NAMES, build_model, method_defaults
from ..methods.templates import template_for
from ..metrics import Evaluator
from ..run_folder import RESULT_FILE, RunFolder, checkpoints_dir, finished_result, load_trained
from ..training import RunLogger, fit, resolve_device, seed_everything

__all__ = ["Say", "silent", "Session", "require_test_images", "check_data_root"]

Say = Callable[[str], None]


def silent(message: str) -> None:
    """A `say` that prints nothing (ranks other than 0; quiet callers)."""


def require_test_images(splits: DatasetSplits, name: str, root: str, part: str = "") -> None:
    """Every protocol scores test images: none is an error before any training, not after it."""
    if splits.test:
        return
    where = f"{Path(root) / 'test'}/" if name == "imagefolder" else f"the {name} test split under {root}"
    what = f"the {part} classes of {name}" if part else name
    fix = ("add <class>/ folders of test images there, or use the flat layout <root>/<class>/*.png so "
           "fastprompt splits 20% off for testing") if name == "imagefolder" else \
        "check the dataset's files against its layout in docs/datasets.md"
    raise DatasetError(f"no test images for {what}: nothing found in {where}; {fix}")


def check_data_root(cfg: Config) -> None:
    """The datasets a run reads exist where data.root says (DatasetError otherwise): checked before
    anything slow or destructive (a weights download, clearing a folder for --overwrite)."""
    targets = cfg.protocol.targets if cfg.protocol.name in ("cross_dataset", "domain_generalisation") else []
    for name in dict.fromkeys([cfg.data.dataset, *targets]):
        locate_dataset(name, cfg.data.root)


def setting_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but almost certainly not what was meant."""
    out = []
    if cfg.protocol.targets and cfg.protocol.name not in ("cross_dataset", "domain_generalisation"):
        out.append(f"protocol.targets={cfg.protocol.targets} is ignored: only cross_dataset and domain_generalisation "
                   f"test target datasets, and this run's protocol is {cfg.protocol.name}")
    if cfg.optim.warmup_epochs >= cfg.train.epochs and cfg.method.name != "zsclip":
        out.append(f"optim.warmup_epochs={cfg.optim.warmup_epochs} >= train.epochs={cfg.train.epochs}: every epoch "
                   f"trains at the warm-up lr {cfg.optim.warmup_lr:g} and optim.lr={cfg.optim.lr:g} is never used; "
                   "train more epochs or set optim.warmup_epochs lower")
    return out


@dataclass
class Session:
    cfg: Config
    clip: ClipBundle
    device: torch.device
    folder: RunFolder
    method_options: dict
    evaluator: Evaluator
    resume: bool = False
    train: bool = True  # False: load each run's checkpoint instead of training (`fastprompt eval`)
    say: Say = print
    # What the data or settings make doubtful (no test images for a class, a single new class, ...):
    # said once, written to every seed's train.log and to results.json (and so to report.md).
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, cfg: Config, *, resume: bool = False, train: bool = True, say: Say = print) -> "Session":
        options = cls.method_options_of(cfg)
        device = resolve_device(cfg.train.device)
        if not distributed.is_main():
            say = silent  # rank 0 reports for everyone
        clip = cls.load_backbone(cfg, device, say)
        folder = RunFolder(cfg.output_dir)
        folder.open(cfg, keep_config=not (train and not resume))
        evaluator = Evaluator.from_config(cfg, clip, device, folder.features_dir(cfg.data.cache_dir))
        session = cls(cfg=cfg, clip=clip, device=device, folder=folder, method_options=options, evaluator=evaluator,
                      resume=resume, train=train, say=say)
        session.check_backends()  # before any data is read: a config that cannot run says so first
        say(f"  {session.backends_note}")
        if train:
            session.warn(setting_warnings(cfg))
        return session

    @property
    def backends_note(self) -> str:
        """What runs the attention (and DePT's CAT head) on this run's device, and why (`auto`)."""
        options = {**method_defaults(self.cfg.method.name), **self.method_options}
        return describe_backends(options["attention_backend"], options.get("head_backend"), self.device)

    @staticmethod
    def method_options_of(cfg: Config) -> dict:
        """cfg's method name and options, checked against the method's defaults (ConfigError)."""
        return check_method_options(cfg, METHOD_NAMES, method_defaults(cfg.method.name)
                                    if cfg.method.name in METHOD_NAMES else {})

    def warn(self, warnings: list[str], *, logged: bool = False) -> None:
        """Keep `warnings` (once each) for the seeds' train.log and results.json; say the new ones
        unless `logged` (load_dataset logs its own)."""
        for warning in warnings:
            if warning not in self.warnings:
                self.warnings.append(warning)
                if not logged:
                    self.say(f"warning: {warning}")

    @staticmethod
    def load_backbone(cfg: Config, device: torch.device, say: Say) -> ClipBundle:
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
        return clip

    # ------------------------------------------------------------------ data

    def load_splits(self, name: Optional[str] = None) -> DatasetSplits:
        """Dataset `name` (default: data.dataset); DatasetError when it has no test images."""
        name = name or self.cfg.data.dataset
        splits = load_dataset(name, self.cfg.data.root)
        require_test_images(splits, name, self.cfg.data.root)
        self.warn(splits.warnings, logged=True)
        return splits

    def few_shot(self, splits: DatasetSplits, shots: int, seed: int) -> DatasetSplits:
        return few_shot_split(splits, shots, seed, str(self.folder.splits_dir(self.cfg.data.cache_dir)))

    # ------------------------------------------------------------------ the three steps of a seed

    def build_model(self, classnames: list[str], seed: int) -> nn.Module:
        seed_everything(seed)  # the prompt/head initialisation depends on the seed, as in Dassl
        self.check_backends()
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

    def check_backends(self) -> None:
        """A Triton backend the config asks for must be able to run on this device: asked here, with
        the kernels' own rule, so that a config that cannot run is refused before any training (the
        kernels raise ValueErrors, which the command would show as a bug)."""
        chosen = [f"method.options.{key}=triton" for key in ("attention_backend", "head_backend")
                  if self.method_options.get(key) == "triton"]
        if chosen:
            try:
                check_triton_device(" and ".join(chosen), "method.options.attention_backend=auto and head_backend=auto "
                                    "(the fastest path this device runs)",
                                    probe=torch.empty(1, device=self.device))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

    def train_model(self, model: nn.Module, train_samples: list, seed_dir: Path, seed: int) -> dict:
        """Fit on `train_samples` (or load seed_dir's checkpoint when not training); train stats."""
        if not any(p.requires_grad for p in model.parameters()):
            return {}  # zero-shot CLIP: nothing to train or load
        if not self.train:
            meta = load_trained(model, seed_dir, config_to_dict(self.cfg), recorded=self.folder.recorded_config())
            return {"loaded_checkpoint_step": meta["step"]}
        if not self.resume and latest_checkpoint_dir(checkpoints_dir(seed_dir)) is not None:
            self.say(f"{seed_dir} holds an earlier checkpoint: training from scratch (--resume continues it)")
        cfg, clip = self.cfg, self.clip
        short_side = cfg.data.short_side or math.ceil(clip.image_size * 8 / 7)
        # Small few-shot caches live on the accelerator, so augmentation never leaves it; one larger
        # than a quarter of its free memory (ImageNet: ~4 GB) stays in pinned host memory.
        budget = torch.cuda.mem_get_info(self.device)[0] // 4 if self.device.type == "cuda" else None
        cache = TrainImageCache(train_samples, short_side=short_side, device=self.device, max_device_bytes=budget,
                                allow_corrupt=cfg.data.allow_corrupt, num_workers=cfg.train.num_workers)
        augment = GpuAugment(clip.image_size, clip.mean, clip.std, scale=tuple(cfg.data.crop_scale)).to(self.device)
        logger = RunLogger(seed_dir)
        logger.info(f"backbone {clip.name}: {clip.build_note}")
        logger.info(self.backends_note)
        for warning in self.warnings:
            logger.warning(warning)
        if cache.skipped:
            logger.info(f"skipped {len(cache.skipped)} unreadable training images (data.allow_corrupt=true)")
        try:
            result = fit(model, cache, augment, cfg, seed_dir, seed=seed, resume=self.resume, logger=logger)
        finally:
            logger.close()
        return {"steps": result.steps, "seconds": round(result.seconds, 3),
                "images_per_s": round(result.images_per_s, 2), "epoch_losses": result.epoch_losses,
                "resumed_from_step": result.resumed_from_step, "skipped_images": len(cache.skipped)}

    def accuracy(self, model: nn.Module, samples: list, *, desc: str = "eval") -> tuple[float, float]:
        """Top-1 accuracy (%) over `samples` with the model's current class names, and images/s."""
        return self.evaluator.accuracy(model, samples, desc=desc)

    # ------------------------------------------------------------------ templates

    @property
    def follows_dataset_template(self) -> bool:
        """Methods with a hand-written template use each dataset's own (CoOp's), unless the config sets one."""
        return "template" in method_defaults(self.cfg.method.name) and "template" not in self.cfg.method.options

    def use_dataset_template(self, model: nn.Module, dataset: str) -> None:
        """Before switching `model` to `dataset`'s classes: that dataset's template (cross-dataset)."""
        if self.follows_dataset_template:
            getattr(model, "base", model).template = template_for(self.cfg.method.name, dataset)

    # ------------------------------------------------------------------ the run folder

    def seed_dir(self, seed: int, *, shots: Optional[int] = None) -> Path:
        return self.folder.seed_dir(seed, shots=shots)

    def finished(self, seed_dir: Path, seed: int, keys: tuple[str, ...]) -> Optional[dict]:
        """With --resume, a seed whose result.json is complete is reused, not run again (sweeps)."""
        if not (self.resume and self.train):
            return None
        done = finished_result(seed_dir, seed, keys, self.cfg)
        if done is not None:
            self.say(f"seed {seed}: finished earlier ({seed_dir / RESULT_FILE}), not run again")
        return done

    def header(self, protocol: str) -> dict:
        """What every results.json starts with."""
        cfg = self.cfg
        return {"protocol": protocol, "dataset": cfg.data.dataset, "method": cfg.method.name,
                "model": cfg.model.name, "pretrained": cfg.model.pretrained, "shots": cfg.data.shots,
                "seeds": list(cfg.data.seeds), "config": config_to_dict(cfg), "warnings": list(self.warnings)}

    def device_name(self) -> str:
        return str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device)
