"""Reference accuracies for a task's base and new halves: what a table of methods is read against.

* chance: 1 / number of classes;
* colour only: a classifier that reads the object's colour perfectly and guesses among the classes
  of that colour (it knows nothing of shape);
* shape only: the same with shape.
All three are exact expectations over a balanced test set (every pair has as many test images).
"""
from __future__ import annotations

import copy
import math

from ..metrics import harmonic_mean
from .tasks import Task, WorldClass
from .vocabulary import NUM_SHAPES


def _oracle_accuracy(classes: tuple[WorldClass, ...], key) -> float:
    """Expected accuracy (%) of knowing `key(pair)` and guessing uniformly among classes that have it."""
    total = weight = 0.0
    for cls in classes:
        for pair in cls.pairs:
            candidates = sum(any(key(p) == key(pair) for p in other.pairs) for other in classes)
            total += 1.0 / candidates
            weight += 1.0
    return 100.0 * total / weight


def task_halves(task: Task) -> tuple[tuple[WorldClass, ...], tuple[WorldClass, ...]]:
    """(base, new) classes as the base-to-new protocol splits them: the first ceil(N/2) are base."""
    n_base = math.ceil(len(task.classes) / 2)
    return task.classes[:n_base], task.classes[n_base:]


def baselines(task: Task) -> dict[str, dict[str, float]]:
    """{"chance" | "colour only" | "shape only": {"base", "new", "hm"}} in percent."""
    out = {}
    for name, fn in (("chance", None), ("colour only", lambda p: p // NUM_SHAPES),
                     ("shape only", lambda p: p % NUM_SHAPES)):
        values = {}
        for part, classes in zip(("base", "new"), task_halves(task)):
            values[part] = 100.0 / len(classes) if fn is None else _oracle_accuracy(classes, fn)
        values["hm"] = harmonic_mean(values["base"], values["new"])
        out[name] = values
    return out


def baseline_results(task: Task, like: dict) -> list[dict]:
    """The baselines as base-to-new result rows beside `like`, a result of a run on `task`
    (`fastprompt.report` tables and charts take them with the runs): the same dataset, model and
    data settings, no seeds, nothing trained."""
    rows = []
    for name, values in baselines(task).items():
        config = copy.deepcopy(like.get("config") or {})
        config.setdefault("method", {})["name"] = name
        rows.append({"protocol": "base2new", "method": name, "dataset": like["dataset"], "model": like["model"],
                     "seeds": [], "config": config, "runs": [], "mean": values})
    return rows
