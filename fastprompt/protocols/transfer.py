"""Cross-dataset transfer and domain generalisation: train on the source dataset (all classes),
then test the source and every target dataset with the target's own class names (and template)."""
from __future__ import annotations

import inspect

from torch import nn

from ..data import DatasetSplits
from ..metrics import mean
from .seeds import run_seeds, trained_model
from .session import Session

__all__ = ["run_transfer", "set_target_classes"]


def run_transfer(session: Session) -> dict:
    cfg = session.cfg
    source = session.load_splits()
    targets = {name: session.load_splits(name) for name in cfg.protocol.targets}  # fail early on layouts

    def one_seed(seed: int, seed_dir) -> dict:
        model, train_stats = trained_model(session, source.classnames,
                                           session.few_shot(source, cfg.data.shots, seed), seed, seed_dir)
        source_acc, _ = session.accuracy(model, source.test, desc=f"seed {seed} {cfg.data.dataset}")
        acc = {}
        for name, target in targets.items():
            session.use_dataset_template(model, name)
            set_target_classes(model, source, target)
            acc[name], _ = session.accuracy(model, target.test, desc=f"seed {seed} {name}")
        session.use_dataset_template(model, cfg.data.dataset)
        model.set_classnames(source.classnames)
        return {"seed": seed, "source": source_acc, "targets": acc, "target_mean": mean(list(acc.values())),
                "train": train_stats}

    def describe(r: dict) -> str:
        return (f"seed {r['seed']}: {cfg.data.dataset} {r['source']:.2f}  "
                + "  ".join(f"{k} {v:.2f}" for k, v in r["targets"].items()))

    runs = run_seeds(session, ("source", "targets"), one_seed, describe)
    mean_targets = {n: mean([r["targets"][n] for r in runs]) for n in targets}
    return {**session.header(cfg.protocol.name), "targets": list(targets), "runs": runs,
            "mean": {"source": mean([r["source"] for r in runs]), "targets": mean_targets},
            "target_mean": mean(list(mean_targets.values()))}


def set_target_classes(model: nn.Module, source: DatasetSplits, target: DatasetSplits) -> None:
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
