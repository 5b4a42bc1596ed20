"""Seeded, stratified, leakage-free splits and nested low-data subsets (pure numpy).

Both helpers return sorted index arrays so callers can slice labels, paths and ids alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence | np.ndarray,
    fractions: dict[str, float],
    seed: int = 42,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Splits samples into named parts, stratified by label and seeded.

    Args:
        labels: One class label per sample (any sortable values).
        fractions: Split name -> fraction of the samples, e.g. ``{"train": 0.7, "val": 0.1,
            "test": 0.2}``; fractions must be >= 0 and sum to 1.
        seed: Seed of the random assignment; the same inputs and seed give the same split.
        groups: Optional group id per sample (patient, lesion...). A whole group goes to one
            split, and groups are stratified by their majority label.

    Returns:
        Split name -> sorted int64 indices; the parts are disjoint and cover all samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"stratified_split needs one label per sample (1-D), got shape {labels.shape}.")
    _check_fractions(fractions)
    n = len(labels)
    if groups is None:
        group_of = np.arange(n)
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(
                f"groups has {len(groups)} entries but labels has {n}; give one group id per sample."
            )
        # str() makes mixed / numeric ids sortable and comparable.
        _, group_of = np.unique(groups.astype(str), return_inverse=True)
    _, label_idx = np.unique(labels, return_inverse=True)
    n_groups = int(group_of.max()) + 1 if n else 0
    sizes = np.bincount(group_of, minlength=n_groups)
    # Majority label per group (ties -> smallest label) via a group x label count table.
    table = np.zeros((n_groups, int(label_idx.max()) + 1 if n else 1), dtype=np.int64)
    np.add.at(table, (group_of, label_idx), 1)
    group_label = table.argmax(axis=1)

    names = list(fractions)
    frac = np.array([fractions[k] for k in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    assigned = np.empty(n_groups, dtype=np.int64)
    counts = np.zeros(len(names))
    seen = 0
    for cls in range(table.shape[1]):
        for g in rng.permutation(np.flatnonzero(group_label == cls)):
            # Greedy "largest deficit" apportionment against cumulative targets: with unit groups this
            # is largest-remainder rounding per class, and carrying the counts across classes keeps
            # every split's total within about one group of its target.
            seen += sizes[g]
            k = int(np.argmax(frac * seen - counts))
            assigned[g] = k
            counts[k] += sizes[g]
    split_of = assigned[group_of]
    return {name: np.flatnonzero(split_of == k).astype(np.int64) for k, name in enumerate(names)}


def low_data_subset(
    labels: Sequence | np.ndarray,
    train_fraction: float = 1.0,
    shots_per_class: int | None = None,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Picks a stratified, seeded, nested subset of the training samples.

    One seeded permutation per class is drawn and a prefix is taken, so for one seed the 5 %
    subset lies inside the 10 % one and the 2-shot subset inside the 5-shot one.

    Args:
        labels: Class index per sample (1-D ints), or a multi-hot (N, K) matrix for multi-label.
        train_fraction: Fraction in (0, 1] kept per class (at least one sample per class).
        shots_per_class: Keep exactly this many samples per class (k-shot); single-label only.
        seed: Seed of the permutations.
        class_names: Names used in error messages and to count classes absent from ``labels``.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    check_low_data_args(train_fraction, shots_per_class)
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        if shots_per_class is not None:
            raise ValueError(
                f"shots_per_class={shots_per_class} is undefined for multi-label data; "
                "use train_fraction instead."
            )
        n_keep = max(1, _round_half_up(train_fraction * len(labels)))
        return np.sort(rng.permutation(len(labels))[:n_keep]).astype(np.int64)
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be 1-D class indices or a 2-D multi-hot matrix, got shape {labels.shape}."
        )
    labels = labels.astype(np.int64)
    n_classes = max(len(class_names) if class_names is not None else 0, int(labels.max(initial=-1)) + 1)
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    counts = np.bincount(labels, minlength=n_classes)
    if shots_per_class is not None:
        smallest = int(np.argmin(counts))
        if shots_per_class > counts[smallest]:
            raise ValueError(
                f"shots_per_class={shots_per_class} exceeds the {counts[smallest]} training samples of "
                f"class '{names[smallest]}'; choose shots_per_class <= {counts[smallest]}."
            )
    keep = []
    for cls in range(n_classes):
        # Always draw the permutation (even when keeping all) so other classes' draws do not
        # depend on the requested size: that is what makes subsets nested.
        perm = rng.permutation(np.flatnonzero(labels == cls))
        if shots_per_class is not None:
            n_keep = int(shots_per_class)
        else:
            n_keep = max(1, _round_half_up(train_fraction * len(perm))) if len(perm) else 0
        keep.append(perm[:n_keep])
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)


def check_low_data_args(train_fraction: float, shots_per_class: int | None) -> None:
    """Raises a ValueError for an invalid or contradictory low-data setting."""
    if not 0.0 < float(train_fraction) <= 1.0:
        raise ValueError(f"train_fraction={train_fraction} is outside (0, 1]; pass a fraction such as 0.1.")
    if shots_per_class is not None:
        if train_fraction != 1.0:
            raise ValueError(
                f"train_fraction={train_fraction} and shots_per_class={shots_per_class} are both set; "
                "set only one of them."
            )
        if int(shots_per_class) != shots_per_class or shots_per_class < 1:
            raise ValueError(f"shots_per_class={shots_per_class} must be a positive integer.")


def _round_half_up(x: float) -> int:
    # Monotone in x (unlike banker's rounding ties are no surprise); keeps subsets nested.
    return int(np.floor(x + 0.5 + 1e-9))


def _check_fractions(fractions: dict[str, float]) -> None:
    if not fractions:
        raise ValueError("fractions is empty; pass e.g. {'train': 0.7, 'val': 0.1, 'test': 0.2}.")
    bad = {k: v for k, v in fractions.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"split fractions {bad} are outside [0, 1]; use fractions that sum to 1.")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions {dict(fractions)} sum to {total:g}, not 1; adjust them to sum to 1."
        )
