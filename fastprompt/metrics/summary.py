"""Summaries over seeds and datasets, as the base-to-new papers report them."""
from __future__ import annotations

import statistics

__all__ = ["harmonic_mean", "mean", "std"]


def harmonic_mean(base: float, new: float) -> float:
    """HM of base and new accuracy (0 when both are 0); papers take it of the seed-averaged accuracies."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def std(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0
