"""Seeded train/val/test splits, stratified by class for classification."""

from __future__ import annotations

import numpy as np

from tasks.errors import DataError


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return n_val, n_test


def split_indices(
    n: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: np.ndarray | None = None,
    source: str = "data",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return sorted index arrays (train, val, test) covering range(n).

    With `stratify`, every class is split in the same proportions (a class too small
    to reach every split stays in train). Each split must end up with at least one row.
    """
    n_val, n_test = _counts(n, val_fraction, test_fraction)
    need = _min_rows(val_fraction, test_fraction)
    if n < need or n_val < 1 or n_test < 1 or n - n_val - n_test < 1:
        raise DataError(
            f"{source}: {n} usable rows, but the split (val {val_fraction}, test {test_fraction}) "
            f"needs at least {need} rows to put one in each of train, val and test"
        )
    rng = np.random.default_rng(seed)
    if stratify is None:
        perm = rng.permutation(n)
        val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    else:
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for cls in _classes(stratify):
            idx = rng.permutation(np.flatnonzero(stratify == cls))
            c_val, c_test = _counts(idx.size, val_fraction, test_fraction)
            if idx.size - c_val - c_test < 1:  # keep at least one example of each class in train
                c_val, c_test = 0, 0
            parts["val"].append(idx[:c_val])
            parts["test"].append(idx[c_val : c_val + c_test])
            parts["train"].append(idx[c_val + c_test :])
        train, val, test = (np.concatenate(parts[k]) for k in ("train", "val", "test"))
        # Tiny classes can leave val or test empty: refuse rather than evaluate on nothing.
        for part in (val, test):
            if part.size == 0:
                raise DataError(
                    f"{source}: {n} usable rows are too few for a stratified split with val {val_fraction} and "
                    f"test {test_fraction}: one of the splits would be empty; add rows or raise the fractions"
                )
    return _sorted(train, n), _sorted(val, n), _sorted(test, n)


def _sorted(idx: np.ndarray, n: int) -> np.ndarray:
    """np.sort(idx) for distinct indices below n, in linear time (a mark per row, read back in order)."""
    marked = np.zeros(n, dtype=bool)
    marked[idx] = True
    return np.flatnonzero(marked)


def distinct_integers(values: np.ndarray) -> np.ndarray:
    """np.unique(values) for integers in a small range, by counting instead of sorting."""
    lo = int(values.min())
    return (np.flatnonzero(np.bincount(values - lo)) + lo).astype(values.dtype)


def _classes(stratify: np.ndarray) -> np.ndarray:
    """np.unique(stratify); label codes (small integers from 0) are counted rather than sorted."""
    stratify = np.asarray(stratify)
    countable = stratify.dtype.kind in "iu" and np.can_cast(stratify.dtype, np.intp) and stratify.size
    if countable and stratify.min() >= 0 and stratify.max() < max(1 << 16, stratify.size):
        return distinct_integers(stratify)
    return np.unique(stratify)


def _min_rows(val_fraction: float, test_fraction: float) -> int:
    n = 3
    while True:
        n_val, n_test = _counts(n, val_fraction, test_fraction)
        if n_val >= 1 and n_test >= 1 and n - n_val - n_test >= 1:
            return n
        n += 1
