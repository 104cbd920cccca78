"""Base-to-new generalisation: few-shot sample, split the classes in half, train on the base half,
test base (base names) and new (new names only); HM of the seed-averaged accuracies."""
from __future__ import annotations

from ..data import split_base_new
from ..metrics import harmonic_mean, mean, std
from .seeds import run_seeds, trained_model
from .session import Session, require_test_images

__all__ = ["run_base2new"]


def run_base2new(session: Session) -> dict:
    cfg = session.cfg
    full = session.load_splits()
    for part, half in zip(("base", "new"), split_base_new(full)):
        require_test_images(half, cfg.data.dataset, cfg.data.root, part)
        session.warn(half.warnings)  # a single new class

    def one_seed(seed: int, seed_dir) -> dict:
        base, new = split_base_new(session.few_shot(full, cfg.data.shots, seed))
        model, train_stats = trained_model(session, base.classnames, base, seed, seed_dir)
        base_acc, base_rate = session.accuracy(model, base.test, desc=f"seed {seed} base")
        model.set_classnames(new.classnames)  # new classes: the new names only (DePT: ITM head only)
        new_acc, new_rate = session.accuracy(model, new.test, desc=f"seed {seed} new")
        return {"seed": seed, "base": base_acc, "new": new_acc, "hm": harmonic_mean(base_acc, new_acc),
                "num_base_classes": base.num_classes, "num_new_classes": new.num_classes,
                "eval_images_per_s": round(mean([base_rate, new_rate]), 2), "train": train_stats}

    runs = run_seeds(session, ("base", "new", "hm"), one_seed,
                     lambda r: f"seed {r['seed']}: base {r['base']:.2f}  new {r['new']:.2f}  HM {r['hm']:.2f}")
    base_mean, new_mean = mean([r["base"] for r in runs]), mean([r["new"] for r in runs])
    return {**session.header("base2new"), "runs": runs,
            "mean": {"base": base_mean, "new": new_mean, "hm": harmonic_mean(base_mean, new_mean)},
            "std": {"base": std([r["base"] for r in runs]), "new": std([r["new"] for r in runs])}}
