"""Gaussian prompt aggregation (GPA, from PromptSRC): the trained model is a Gaussian-weighted
average of the trainable weights at the end of every epoch.

Epoch e (1-based, e = 1..E) gets w_e proportional to the normal density N(e; mean, std), normalised
so that the weights sum to 1. After each epoch's last optimiser step the loop calls
`accumulate(model.state_dict(), epoch)`; training itself always continues from the raw weights.
After the last epoch `apply(model)` loads the aggregate: that model is saved and evaluated. Only
what trains is aggregated (the frozen backbone is unchanged by an average of itself); with DePT
that includes the CAT head.

The running sum and the number of epochs seen are the aggregator's state (`state_dict`): saved
with every checkpoint and restored on resume, a resumed run aggregates bit for bit as an
uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["check_gpa_settings", "gpa_weights", "GaussianPromptAggregation"]

STATE_FORMAT = "fastprompt-gpa-1"


def check_gpa_settings(mean: float, std: float) -> Tuple[float, float]:
    """(mean, std) as floats, or a ValueError that says what is wrong."""
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise ValueError(f"gpa_mean must be a finite float (a 1-based epoch), got {mean!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std > 0):
        raise ValueError(f"gpa_std must be a float > 0 (the width of the epoch weighting, in epochs), got {std!r}")
    return float(mean), float(std)


def gpa_weights(mean: float, std: float, epochs: int) -> List[float]:
    """The normalised weights [w_1, ..., w_epochs] of epochs 1..epochs (float64).

    Computed in log space: the density's constant cancels in the normalisation, and a mean far
    from 1..epochs cannot underflow every weight to zero (the nearest epoch then takes it all)."""
    mean, std = check_gpa_settings(mean, std)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    unnormalised = [math.exp(v - top) for v in logs]
    total = math.fsum(unnormalised)
    return [u / total for u in unnormalised]


class GaussianPromptAggregation:
    """Accumulates sum_e w_e * state_e over epochs; see the module docstring for the protocol.

    `for_model(model, epochs)` builds one from the model's `gpa_settings` (None when the method
    does not aggregate, e.g. IVLP or PromptSRC with gpa=False).
    """

    def __init__(self, mean: float, std: float, epochs: int):
        self.mean, self.std = check_gpa_settings(mean, std)
        self.epochs = epochs
        self.weights = gpa_weights(self.mean, self.std, epochs)
        self.epochs_done = 0
        self._sums: Dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: nn.Module, epochs: int) -> Optional["GaussianPromptAggregation"]:
        settings = getattr(model, "gpa_settings", None)
        return None if settings is None else cls(*settings, epochs)

    @property
    def complete(self) -> bool:
        return self.epochs_done == self.epochs

    def accumulate(self, state: Mapping[str, torch.Tensor], epoch: int) -> None:
        """Add w_epoch * state (the trainable state dict after 1-based `epoch`'s last step)."""
        if epoch != self.epochs_done + 1:
            raise ValueError(
                f"GPA expects epoch {self.epochs_done + 1} of {self.epochs} next, got epoch {epoch} (each epoch is "
                "added once, in order; on resume, restore the aggregator's state_dict from the checkpoint)"
            )
        if self._sums and set(state) != set(self._sums):
            raise ValueError(f"GPA state keys changed between epochs: {sorted(set(state) ^ set(self._sums))[:8]}")
        bad = [k for k, v in state.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"GPA averages float tensors only; not float: {bad[:8]}")
        w = self.weights[epoch - 1]
        sums = {}
        for name, tensor in state.items():
            t = tensor.detach()
            term = t.to(torch.promote_types(t.dtype, torch.float32)) * w
            previous = self._sums.get(name)
            sums[name] = term if previous is None else previous.to(term.device) + term
        self._sums = sums
        self.epochs_done = epoch

    def aggregate(self) -> Dict[str, torch.Tensor]:
        """The aggregated state (float32 or wider), once every epoch was added."""
        if not self.complete:
            raise ValueError(f"GPA has seen {self.epochs_done} of {self.epochs} epochs; aggregate after the last one")
        return dict(self._sums)

    def apply(self, model: nn.Module) -> None:
        """Load the aggregate into `model` (each tensor in the dtype and on the device it has there)."""
        current = model.state_dict()
        model.load_state_dict({k: v.to(device=current[k].device, dtype=current[k].dtype) if k in current else v
                               for k, v in self.aggregate().items()})

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"meta": JSON-able settings and progress, "tensors": {state name: running sum}}."""
        meta = {"format": STATE_FORMAT, "mean": self.mean, "std": self.std, "epochs": self.epochs,
                "epochs_done": self.epochs_done}
        return {"meta": meta, "tensors": dict(self._sums)}

    def load_state_dict(self, state: Mapping) -> None:
        meta, tensors = state["meta"], dict(state["tensors"])
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not a GPA state ({meta.get('format')!r}, expected {STATE_FORMAT!r})")
        saved = (meta["mean"], meta["std"], meta["epochs"])
        if saved != (self.mean, self.std, self.epochs):
            raise ValueError(
                f"the GPA state was saved with mean, std, epochs = {saved}, this run has "
                f"{(self.mean, self.std, self.epochs)}; resume with the same settings"
            )
        done = meta["epochs_done"]
        if not 0 <= done <= self.epochs or (done > 0) != bool(tensors):
            raise ValueError(f"damaged GPA state: {done} epochs done with {len(tensors)} tensors")
        self.epochs_done, self._sums = done, tensors
