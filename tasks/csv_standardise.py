"""Numeric features standardised with the training split's statistics, straight into the split tensors.

A few columns at a time are standardised side by side in a thread pool into column-major
buffers, then copied, transposed, into the row-major feature tensors. A missing value is
imputed with the training median. The numbers are exactly those of the plain float64
computation (values - mean) / std, reached with fewer passes over the data.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.csv_inferred import Features
from tasks.errors import DataError

GROUP = 16  # numeric feature columns standardised side by side, then copied into the tensors at once
COPY_ROWS = 1 << 16  # rows copied into a tensor per task


@dataclass
class SplitRows:
    """The rows of each split: as indices into the kept rows, and as rows of the file."""

    kept: np.ndarray  # the file's rows that are kept
    all: bool  # every row kept: the columns need no copy of the kept rows
    index: dict[str, np.ndarray]  # split -> indices into the kept rows
    file_rows: dict[str, np.ndarray]  # split -> rows of the file (the index of every column read)


def pool_array(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float32 array in memory from Arrow's pool, which still holds (and has already
    paged in) what the CSV parser used and gave back: fresh pages from the OS cost about as much to
    fault in as the standardisation costs to compute."""
    buffer = pa.allocate_buffer(shape[0] * shape[1] * 4)
    return np.frombuffer(buffer, dtype=np.float32).reshape(shape)


def thread_pool() -> ThreadPoolExecutor:
    """Threads for the column work: numpy lets go of the GIL while it gathers, converts and sums."""
    return ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="ingest-csv")


def too_large(path: Path, what: str, mean: float, std: float) -> DataError:
    """The refusal for values whose mean or spread overflows float64 (`what`: the column or the target)."""
    return DataError(
        f"CSV file {path}: {what} has values too large to standardise (mean {mean}, std {std}); "
        f"expected numbers whose spread fits in float64 (below about 1e154), rescale the column"
    )


class Standardiser:
    """Writes runs of up to GROUP numeric features into the x tensors (split -> array), a run at a time.

    Writing a column straight into a row-major tensor would touch every cache line of it once per
    column: each run goes through column-major buffers (a row per feature) first.
    """

    def __init__(self, pool: ThreadPoolExecutor, path: Path, split: SplitRows, x: dict[str, np.ndarray], n: int):
        self.pool, self.path, self.split, self.x = pool, path, split, x
        self.buffers = {s: pool_array((min(GROUP, n), idx.size)) for s, idx in split.index.items()}

    def group(self, names: list[str], col_i: int, features: Features) -> dict[str, dict[str, Any]]:
        """Numeric columns `names` (taken out of `features.numeric`) into tensor columns col_i..; their statistics."""
        jobs = [
            self.pool.submit(
                _standardise,
                self.path,
                name,
                features.numeric.pop(name),
                features.missing.get(name),
                self.split,
                {s: buffer[j] for s, buffer in self.buffers.items()},
            )
            for j, name in enumerate(names)
        ]
        schemas = {}
        for name, job in zip(names, jobs, strict=True):  # in feature order: the first refusal is the first column's
            schemas[name] = job.result()
        copies = [
            self.pool.submit(_copy_rows, self.x[s], r, col_i, buffer[: len(names)])
            for s, buffer in self.buffers.items()
            for r in range(0, buffer.shape[1], COPY_ROWS)
        ]
        for copy in copies:
            copy.result()
        return schemas

    def release(self) -> None:
        """Give the buffers' memory back to the system."""
        self.buffers = {}
        pa.default_memory_pool().release_unused()


def _copy_rows(out: np.ndarray, row: int, col_i: int, columns: np.ndarray) -> None:
    """Rows row.. of column-major `columns` into out[rows, col_i:], transposed."""
    rows = slice(row, row + COPY_ROWS)
    out[rows, col_i : col_i + columns.shape[0]] = columns[:, rows].T


def _standardise(
    path: Path, name: str, source: Any, missing: np.ndarray | None, split: SplitRows, out: dict[str, np.ndarray]
) -> dict[str, Any]:
    """One numeric feature: its training statistics, and its standardised values written into `out` (per split).

    The numbers are exactly those of (values - mean) / std computed in float64 over the kept rows
    with the training split's np.median, ndarray.mean and ndarray.std, but with fewer passes over
    the data: integers are summed as integers (exact, as numpy's float64 sum of them is), and the
    deviations from the mean are computed once for the standard deviation and the training values.
    """
    if missing is not None and not split.all:
        missing = missing[split.kept]
    n_missing = 0 if missing is None else int(missing.sum())
    if n_missing:  # impute with the training median: work on a float64 copy of the kept rows
        source, median = _imputed(path, name, source, missing, split)
        index = split.index
    else:
        if isinstance(source, list):
            source = np.concatenate(source)
        index = split.file_rows
    train_values = source[index["train"]]
    with np.errstate(over="ignore", invalid="ignore"):
        if n_missing:
            mean = float(train_values.mean())
        else:
            median, mean = _median_and_mean(train_values)
        deviations = np.subtract(train_values, mean, dtype=np.float64)  # as ndarray.std computes them
        std = float(np.sqrt(np.add.reduce(np.square(deviations)) / deviations.size))
    if not np.isfinite(mean) or not np.isfinite(std):
        raise too_large(path, f"column {name!r}", mean, std)
    scale = std if std > 0 else 1.0
    for s, column in out.items():
        if s != "train":
            deviations = np.subtract(source[index[s]], mean, dtype=np.float64)
        np.divide(deviations, scale, out=column, casting="same_kind")
    return {"mean": mean, "std": scale, "median": median, "missing": n_missing}


def _imputed(
    path: Path, name: str, source: np.ndarray, missing: np.ndarray, split: SplitRows
) -> tuple[np.ndarray, float]:
    """The kept rows' values as float64, a missing one replaced by the training median; and that median."""
    values = source.astype(np.float64) if split.all else source[split.kept].astype(np.float64)
    train_values = values[split.index["train"]]
    train_missing = np.isnan(train_values)
    if train_missing.all():
        raise DataError(f"CSV file {path}: column {name!r} has no values in the training split")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller, with the column
        median = float(np.nanmedian(train_values) if train_missing.any() else np.median(train_values))
        values = np.where(missing, median, values)
    return values, median


def _median_and_mean(values: np.ndarray) -> tuple[float, float]:
    """np.median and ndarray.mean of values as float64, without the median's sort when they are integers
    in a small range: the middle values and the sum are read off a count of each value (the sum is exact,
    as numpy's float64 sum of such integers is, whatever the order)."""
    if values.dtype.kind == "i" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if hi - lo <= max(1 << 16, 4 * values.size):
            shift, counts = _value_counts(values, lo, hi)
            below = np.cumsum(counts)
            m = values.size
            middle = [(m - 1) // 2, m // 2] if m % 2 == 0 else [m // 2]
            picked = np.searchsorted(below, middle, side="right") + shift
            median = float(np.mean(picked.astype(np.float64)))  # np.median averages the two middle values alike
            if max(-lo, hi) * m < 2**53:  # every partial sum exact in float64: the order of summation cannot matter
                total = int(np.dot(counts.astype(np.int64), np.arange(shift, shift + counts.size, dtype=np.int64)))
                return median, float(total) / m
            return median, float(values.astype(np.float64).mean())
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values)), float(values.mean())


def _value_counts(values: np.ndarray, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """(shift, counts): counts[k] is how many of the integer `values` (from lo to hi) equal shift + k."""
    if hi - lo < 4:  # flags and the like: count each value (bincount would first copy them to int64)
        if lo == 0 and hi == 1 and values.itemsize == 1:
            ones = np.count_nonzero(values.view(np.bool_))
            return lo, np.array([values.size - ones, ones])
        return lo, np.array([np.count_nonzero(values == v) for v in range(lo, hi + 1)])
    shift = lo if lo < 0 or hi - lo < lo else 0  # bincount needs values >= 0
    return shift, np.bincount(values if shift == 0 else values.astype(np.int64) - shift)
