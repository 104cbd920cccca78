"""Training and testing on all classes of one dataset: the few-shot protocol (every shot count of
protocol.shots) and `train_eval` (data.shots per class; a user's own data)."""
from __future__ import annotations

from typing import Optional

from ..data import DatasetSplits
from ..metrics import mean, std
from .seeds import run_seeds, trained_model
from .session import Session

__all__ = ["run_few_shot", "run_train_eval"]


def _all_classes(session: Session, full: DatasetSplits, shots: int, *, shots_folder: Optional[int]) -> list[dict]:
    """Every seed trained on `shots` per class of all classes and tested on the whole test split."""
    label = f"{shots}-shot seed" if shots_folder is not None else "seed"

    def one_seed(seed: int, seed_dir) -> dict:
        model, train_stats = trained_model(session, full.classnames, session.few_shot(full, shots, seed), seed,
                                           seed_dir)
        acc, rate = session.accuracy(model, full.test, desc=f"{label} {seed}" if shots_folder is not None else f"seed {seed} test")
        return {"seed": seed, **({"shots": shots} if shots_folder is not None else {}), "accuracy": acc,
                "eval_images_per_s": round(rate, 2), "train": train_stats}

    return run_seeds(session, ("accuracy",), one_seed, lambda r: f"{label} {r['seed']}: accuracy {r['accuracy']:.2f}",
                     shots=shots_folder)


def run_few_shot(session: Session) -> dict:
    """Train and test on all classes for every shot count in protocol.shots, every seed."""
    full = session.load_splits()
    per_shots = {}
    for shots in session.cfg.protocol.shots:
        accs = [r["accuracy"] for r in _all_classes(session, full, shots, shots_folder=shots)]
        per_shots[str(shots)] = {"accuracy": accs, "mean": mean(accs), "std": std(accs)}
    return {**session.header("few_shot"), "shots_list": list(session.cfg.protocol.shots), "results": per_shots}


def run_train_eval(session: Session) -> dict:
    """Plain training on all classes (data.shots per class) and test accuracy: a user's own data."""
    full = session.load_splits()
    runs = _all_classes(session, full, session.cfg.data.shots, shots_folder=None)
    return {**session.header("train_eval"), "runs": runs, "mean": {"accuracy": mean([r["accuracy"] for r in runs])}}
