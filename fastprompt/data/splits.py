"""The data types every loader returns, and class-level slicing (subsets, base/new halves)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import DatasetError


@dataclass(frozen=True)
class Sample:
    """One labelled image. `path` is absolute; `label` indexes `DatasetSplits.classnames`."""

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's three splits over one label space.

    `classnames[i]` is the name of label `i`. `class_indices`, when set, gives for each label its
    index in a parent label space: ImageNet-A/-R carry the positions of their 200 classes among
    ImageNet's 1000 (to slice a 1000-way classifier), and the halves from `split_base_new` carry
    their positions in the full dataset.
    """

    name: str
    classnames: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    class_indices: list[int] | None = field(default=None)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __repr__(self) -> str:  # the default would print every sample
        return (
            f"DatasetSplits(name={self.name!r}, classes={self.num_classes}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)})"
        )


def subset_classes(splits: DatasetSplits, class_indices: Sequence[int]) -> DatasetSplits:
    """Keep only the classes `class_indices` (in that order), relabelled 0..k-1 in that order.

    Every split is filtered; sample order within a split is preserved. The result's
    `class_indices` maps back to the parent label space (composed with the input's own mapping,
    if it has one).
    """
    indices = [int(i) for i in class_indices]
    n = splits.num_classes
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"class indices {bad[:10]} out of range for {n} classes of {splits.name!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"class indices for {splits.name!r} contain duplicates: {indices}")
    new_label = {old: new for new, old in enumerate(indices)}
    classnames = [splits.classnames[i] for i in indices]

    def keep(samples: list[Sample]) -> list[Sample]:
        return [
            Sample(s.path, new_label[s.label], classnames[new_label[s.label]])
            for s in samples
            if s.label in new_label
        ]

    parent = splits.class_indices
    return DatasetSplits(
        name=splits.name,
        classnames=classnames,
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        class_indices=[parent[i] for i in indices] if parent is not None else indices,
        warnings=list(splits.warnings),
    )


def split_base_new(splits: DatasetSplits) -> tuple[DatasetSplits, DatasetSplits]:
    """Base-to-new protocol: base = the first ceil(N/2) labels, new = the rest; each relabelled from 0.

    Labels are already sorted integers 0..N-1, so "sort labels" is the identity. Apply this AFTER
    `few_shot_split`, as the protocol samples shots over all classes first.
    """
    n = splits.num_classes
    if n < 2:
        raise DatasetError(f"base-to-new needs at least 2 classes (4 to mean anything), and {splits.name!r} has {n}: "
                           "add classes, or train and test on all of them with protocol train_eval "
                           "(--protocol train_eval)")
    n_base = math.ceil(n / 2)
    base, new = subset_classes(splits, range(n_base)), subset_classes(splits, range(n_base, n))
    if new.num_classes == 1:
        new.warnings.append(
            f"{splits.name}: the new half holds a single class ({new.classnames[0]!r}), so new-class "
            "accuracy is 100% whatever the model does; base-to-new needs at least 4 classes to mean anything"
        )
    return base, new


def coverage_warnings(splits: DatasetSplits) -> list[str]:
    """Classes a split leaves out: without test images a class's accuracy is never measured, and
    without training images it is never learnt."""
    out = []
    for split, what in (("test", "its accuracy is not measured"), ("train", "it is never trained on")):
        samples = getattr(splits, split)
        if not samples and split == "test":
            continue  # an empty test split is refused by the protocols with its own message
        present = {s.label for s in samples}
        missing = [splits.classnames[i] for i in range(splits.num_classes) if i not in present]
        if missing and samples:
            shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            out.append(f"{splits.name}: {len(missing)} class(es) have no {split} images ({shown}): {what}")
    return out
