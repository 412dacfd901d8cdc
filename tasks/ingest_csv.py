"""CSV ingest: a CSV file -> standardised float32 tensors, encoded labels and a schema.

Statistics (means, standard deviations, medians, vocabularies) come from the training
split only. Every refusal names the file, the column and, where there is one, the row.
Row numbers count data rows from 1; the file line is one more (the header is line 1).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import torch

from tasks.errors import DataError
from tasks.hashing import sha256_file
from tasks.prepared import Prepared, cache_key
from tasks.splits import split_indices

log = logging.getLogger("trainyard.ingest")
MISSING = "<missing>"
MAX_CLASSES_INFERRED = 20


def local_path(path_or_uri: str) -> Path:
    """A local path from a plain path or a file:// URI."""
    if path_or_uri.startswith("file://"):
        parsed = urlparse(path_or_uri)
        return Path(unquote(parsed.path))
    if "://" in path_or_uri:
        scheme = path_or_uri.split("://", 1)[0]
        raise DataError(f"data.path {path_or_uri!r}: scheme {scheme}:// is not supported; use a local path or file://")
    return Path(path_or_uri)


def _utf8_error(path: Path, detail: str = "") -> DataError:
    """Where the first byte that is not UTF-8 sits (offset and line), found by decoding the file in chunks."""
    offset, line, pending = 0, 1, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            data = pending + chunk
            if not data:
                break
            try:
                data.decode("utf-8")
                bad = None
            except UnicodeDecodeError as exc:
                bad = exc
            if bad is None or (chunk and bad.reason == "unexpected end of data"):  # a character cut by the chunk
                cut = len(data) if bad is None else bad.start
                line += data[:cut].count(b"\n")
                offset, pending = offset + cut, data[cut:]
                continue
            line += data[: bad.start].count(b"\n")
            return DataError(
                f"CSV file {path} is not valid UTF-8 text (byte 0x{data[bad.start]:02x} at byte offset "
                f"{offset + bad.start}, line {line}); save it as UTF-8"
            )
    return DataError(f"CSV file {path} is not valid UTF-8 text ({detail}); save it as UTF-8")


def _header(path: Path) -> list[str]:
    """The header's column names as written (pandas renames duplicates to `a.1`, so they are read here)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        names = next(csv.reader(f), [])
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    return names


def _ragged_line(path: Path, n_fields: int) -> tuple[int, int] | None:
    """(line, fields) of the first record whose field count differs from the header's."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for record in reader:
            if record and len(record) != n_fields:
                return reader.line_num, len(record)
    return None


def read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"CSV file not found: {path}")
    if path.is_dir():
        raise DataError(f"CSV path {path} is a folder, expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"CSV file {path} is empty (0 bytes); expected a header line and data rows")
    try:
        df = pd.read_csv(path, engine="pyarrow")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, f"{exc.reason} at byte {exc.start}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"CSV file {path} has no columns; expected a header line and data rows") from None
    except Exception as exc:  # pyarrow reports ragged rows, bad quoting and encodings as ArrowInvalid
        text = str(exc)
        if "utf8" in text.lower() or "utf-8" in text.lower():
            raise _utf8_error(path, text) from None
        ragged = re.search(r"Expected (\d+) columns, got (\d+)", text)
        where = _ragged_line(path, int(ragged.group(1))) if ragged else None
        if where:
            raise DataError(
                f"CSV file {path} could not be parsed: line {where[0]} has {where[1]} fields, "
                f"expected {ragged.group(1)} like the header ({text})"
            ) from None
        raise DataError(f"CSV file {path} could not be parsed: {exc}") from None
    if len(df.columns) == 0:
        raise DataError(f"CSV file {path} has no columns; expected a header line and data rows")
    header = _header(path)
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(
            f"CSV file {path}: duplicate column names {dupes} in the header (line 1); each column needs a unique name"
        )
    if len(df) == 0:
        raise DataError(f"CSV file {path} has a header but no data rows (columns: {', '.join(map(str, df.columns))})")
    return df


def _row(i: int) -> str:
    return f"row {i + 1} (line {i + 2})"


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _numeric_or_error(path: Path, name: str, col: pd.Series) -> np.ndarray | None:
    """Numbers from a column: None when it is text; an error when it is numbers with a few bad values."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype("float64").to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype="float64", na_value=np.nan)
        bad = np.isinf(values)
        if bad.any():
            i = _first_true(bad)
            raise DataError(f"CSV file {path}: column {name!r} has an infinite value (or one beyond float64's range) at {_row(i)}; expected a finite number")
        if pd.api.types.is_float_dtype(col):
            _no_integers_beyond_int64(path, name, values)
        return values
    present = col.notna().to_numpy()
    coerced = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    bad = present & np.isnan(coerced)
    n_present = int(present.sum())
    if n_present and bad.sum() <= n_present // 2 and bad.any():
        i = _first_true(bad)
        raise DataError(
            f"CSV file {path}: column {name!r} holds numbers but {_row(i)} has {col.iloc[i]!r}; "
            f"expected a number (or list the column in data.categorical)"
        )
    return None if bad.any() else coerced


def _no_integers_beyond_int64(path: Path, name: str, values: np.ndarray) -> None:
    """pyarrow reads integers beyond 64 bits as doubles, silently rounding them (ids, labels); refuse those."""
    with np.errstate(invalid="ignore"):
        big = np.abs(values) >= 2.0**63
    if not big.any():
        return
    text = pd.read_csv(path, engine="pyarrow", usecols=[name], dtype={name: "string"})[name]
    integer = re.compile(r"\s*[+-]?\d+\s*")
    for i in np.flatnonzero(big):
        token = text.iloc[i]
        if isinstance(token, str) and integer.fullmatch(token):
            raise DataError(
                f"CSV file {path}: column {name!r} has the integer {token.strip()} at {_row(i)}, beyond the 64-bit "
                f"range; expected integers between -2**63 and 2**63-1 (drop the column with data.drop if it is an id)"
            )


def _missing_error(path: Path, name: str, mask: np.ndarray) -> DataError:
    i = _first_true(mask)
    return DataError(
        f"CSV file {path}: column {name!r} has a missing value at {_row(i)} and data.missing is 'error'; "
        f"fill it in, or set data.missing to impute or drop"
    )


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def ingest_csv(data_cfg, state_root: Path) -> tuple[str, dict[str, Any], Any]:
    """Return (cache key, params hashed into it, a builder that makes the Prepared dataset).

    The builder is only run when the key is not already in the cache.
    """
    path = local_path(data_cfg.path)
    if not path.exists():
        raise DataError(f"CSV file not found: {path}")
    if path.is_dir():
        raise DataError(f"CSV path {path} is a folder, expected a file")
    content_hash = sha256_file(path)
    params = data_cfg.model_dump(exclude={"path", "root", "download", "split", "n_train", "limit", "source"})
    params["source"] = "csv"
    key = cache_key(content_hash, params)
    return key, content_hash, lambda: build_csv(data_cfg, path, content_hash)


def build_csv(data_cfg, path: Path, content_hash: str) -> Prepared:
    df = read_csv(path)
    columns = [str(c) for c in df.columns]
    if columns and columns[0].startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the name
        columns[0] = columns[0][1:]
    df.columns = columns
    target = data_cfg.target
    if target not in columns:
        raise DataError(f"CSV file {path}: target column {target!r} not found; columns in the file: {', '.join(columns)}")
    for label, listed in (("data.features", data_cfg.features), ("data.drop", data_cfg.drop), ("data.categorical", data_cfg.categorical)):
        unknown = [c for c in listed if c not in columns]
        if unknown:
            raise DataError(f"CSV file {path}: {label} names columns not in the file: {unknown}; columns: {', '.join(columns)}")
    if target in data_cfg.features or target in data_cfg.drop:
        raise DataError(f"CSV file {path}: the target column {target!r} cannot also be a feature or dropped")
    features = list(data_cfg.features) or [c for c in columns if c != target and c not in data_cfg.drop]
    features = [c for c in features if c not in data_cfg.drop]
    if not features:
        raise DataError(f"CSV file {path}: no feature columns left after dropping {data_cfg.drop}")
    for name in [*features, target]:  # pyarrow keeps text that is not UTF-8 as raw bytes
        col = df[name]
        if pd.api.types.is_object_dtype(col) and col.map(lambda v: isinstance(v, bytes)).any():
            raise _utf8_error(path, f"column {name!r}")

    # ---- column kinds ----
    numeric: dict[str, np.ndarray] = {}
    categorical: dict[str, pd.Series] = {}
    for name in features:
        col = df[name]
        values = None if name in data_cfg.categorical else _numeric_or_error(path, name, col)
        if values is None:
            categorical[name] = col
        else:
            numeric[name] = values
        if col.isna().all():
            raise DataError(f"CSV file {path}: column {name!r} has no values at all (every row is missing); drop it")

    # ---- target and task type ----
    y_col = df[target]
    y_missing = y_col.isna().to_numpy()
    if y_missing.all():
        raise DataError(f"CSV file {path}: target column {target!r} has no values at all (every row is missing); expected the values to predict")
    y_numeric = None if pd.api.types.is_bool_dtype(y_col) else _numeric_or_error(path, target, y_col)
    task = data_cfg.task
    if task == "auto":
        if y_numeric is None:
            task, reason = "classification", "the target holds text or booleans"
        else:
            present = y_numeric[~np.isnan(y_numeric)]
            n_unique = len(np.unique(present))
            if present.size and np.all(present == np.round(present)) and n_unique <= MAX_CLASSES_INFERRED:
                task, reason = "classification", f"the target holds {n_unique} distinct integers"
            else:
                task, reason = "regression", "the target holds real numbers"
    else:
        reason = "set in data.task"
    if task == "regression" and y_numeric is None:
        bad = y_col.notna().to_numpy() & pd.to_numeric(y_col, errors="coerce").isna().to_numpy()
        i = _first_true(bad)
        raise DataError(f"CSV file {path}: target {target!r} has {y_col.iloc[i]!r} at {_row(i)}; regression needs numbers")
    log.info("task type: %s (%s)", task, reason)

    # ---- missing values ----
    feature_missing = {n: np.isnan(v) for n, v in numeric.items()}
    feature_missing.update({n: c.isna().to_numpy() for n, c in categorical.items()})
    n_rows_read = len(df)
    if data_cfg.missing == "error":
        for name in features:
            if feature_missing[name].any():
                raise _missing_error(path, name, feature_missing[name])
        if y_missing.any():
            raise _missing_error(path, target, y_missing)
        keep = np.ones(n_rows_read, dtype=bool)
    elif data_cfg.missing == "drop":
        keep = ~y_missing
        for name in features:
            keep &= ~feature_missing[name]
    else:
        keep = ~y_missing
    rows = np.flatnonzero(keep)
    dropped = n_rows_read - rows.size
    if dropped:
        log.info("dropped %d of %d rows with missing values (policy %s)", dropped, n_rows_read, data_cfg.missing)

    # ---- labels ----
    if task == "classification":
        raw_labels = (y_col if y_numeric is None else pd.Series(y_numeric)).iloc[rows]
        uniques = pd.unique(raw_labels)
        try:
            uniques = sorted(uniques)
        except TypeError:
            uniques = sorted(uniques, key=str)
        label_names = [_label_name(v) for v in uniques]
        if len(label_names) < 2:
            shown = label_names[0] if label_names else "none"
            raise DataError(
                f"CSV file {path}: target {target!r} has only one class ({shown!r}); classification needs at least 2"
            )
        y_all = pd.Index(uniques, dtype=object).get_indexer(raw_labels.astype(object)).astype(np.int64)
        if (y_all < 0).any():  # values the index could not match (e.g. equal but differently typed): map one by one
            index = {v: i for i, v in enumerate(uniques)}
            y_all = np.fromiter((index[v] for v in raw_labels), dtype=np.int64, count=rows.size)
    else:
        label_names = []
        y_all = y_numeric[rows].astype(np.float64)

    # ---- split ----
    train_idx, val_idx, test_idx = split_indices(
        rows.size,
        data_cfg.val_fraction,
        data_cfg.test_fraction,
        data_cfg.split_seed,
        stratify=y_all if task == "classification" else None,
        source=str(path),
    )

    # ---- features: statistics from the training split only ----
    train_rows = rows[train_idx]
    feature_schema: list[dict[str, Any]] = []
    width = len(numeric)
    vocabularies: dict[str, list[str]] = {}
    for name, col in categorical.items():
        values = col.astype("string").fillna(MISSING).to_numpy(dtype=object)
        vocab = sorted(set(values[train_rows].tolist()))
        if len(vocab) > data_cfg.max_categories:
            raise DataError(
                f"CSV file {path}: column {name!r} has {len(vocab)} distinct values in the training split, "
                f"more than data.max_categories={data_cfg.max_categories}; drop it or raise the limit"
            )
        vocabularies[name] = vocab
        width += len(vocab)
    X = np.empty((rows.size, width), dtype=np.float32)
    feature_names: list[str] = []
    col_i = 0
    all_rows = rows.size == n_rows_read  # nothing dropped: no need to copy every column
    for name in features:
        if name in numeric:
            values = numeric[name] if all_rows else numeric[name][rows]
            missing = feature_missing[name] if all_rows else feature_missing[name][rows]
            n_missing = int(missing.sum())
            train_values = values[train_idx]
            train_missing = n_missing and np.isnan(train_values)
            if n_missing and train_missing.all():
                raise DataError(f"CSV file {path}: column {name!r} has no values in the training split")
            # np.median equals np.nanmedian when nothing is missing, without nanmedian's copies
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the column
                median = float(np.nanmedian(train_values) if n_missing and train_missing.any() else np.median(train_values))
                if n_missing:
                    values = np.where(missing, median, values)
                    train_values = values[train_idx]
                mean = float(train_values.mean())
                std = float(train_values.std())
            if not np.isfinite(mean) or not np.isfinite(std):
                raise DataError(
                    f"CSV file {path}: column {name!r} has values too large to standardise (mean {mean}, std {std}); "
                    f"expected numbers whose spread fits in float64 (below about 1e154), rescale the column"
                )
            scale = std if std > 0 else 1.0
            X[:, col_i] = (values - mean) / scale
            feature_schema.append(
                {"name": name, "kind": "numeric", "mean": mean, "std": scale, "median": median, "missing": n_missing}
            )
            feature_names.append(name)
            col_i += 1
        else:
            vocab = vocabularies[name]
            values = categorical[name].astype("string").fillna(MISSING).to_numpy(dtype=object)[rows]
            n_missing = int((values == MISSING).sum())
            lookup = {v: i for i, v in enumerate(vocab)}
            codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=values.size)
            block = X[:, col_i : col_i + len(vocab)]
            block[:] = 0.0
            seen = codes >= 0
            block[np.flatnonzero(seen), codes[seen]] = 1.0
            feature_schema.append(
                {
                    "name": name,
                    "kind": "categorical",
                    "encoding": "onehot",
                    "vocabulary": vocab,
                    "missing": n_missing,
                    "unseen_outside_train": int((~seen).sum()),
                }
            )
            feature_names.extend(f"{name}={v}" for v in vocab)
            col_i += len(vocab)
    missing_counts = {f["name"]: f["missing"] for f in feature_schema if f["missing"]}
    if missing_counts and data_cfg.missing == "impute":
        log.info("imputed missing values: %s", missing_counts)

    # ---- target tensors ----
    target_schema: dict[str, Any] = {"name": target}
    if task == "classification":
        n_classes = len(label_names)
        y_tensor = torch.from_numpy(y_all)
        if n_classes == 2:
            y_tensor = y_tensor.to(torch.float32)
        output_size = 1 if n_classes == 2 else n_classes
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            y_mean = float(y_all[train_idx].mean())
            y_std = float(y_all[train_idx].std()) or 1.0
        if not np.isfinite(y_mean) or not np.isfinite(y_std):
            raise DataError(
                f"CSV file {path}: target {target!r} has values too large to standardise (mean {y_mean}, std {y_std}); "
                f"expected numbers whose spread fits in float64 (below about 1e154), rescale the column"
            )
        target_schema.update(mean=y_mean, std=y_std)
        y_tensor = torch.from_numpy(((y_all - y_mean) / y_std).astype(np.float32))
        output_size = 1
        n_classes = 0

    x_tensor = torch.from_numpy(X)
    tensors = {}
    for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        idx_t = torch.from_numpy(idx)
        tensors[f"x_{split}"] = x_tensor.index_select(0, idx_t)
        tensors[f"y_{split}"] = y_tensor.index_select(0, idx_t)

    schema = {
        "source": "csv",
        "file": str(path),
        "content_hash": content_hash,
        "task": task,
        "task_reason": reason,
        "binary": task == "classification" and n_classes == 2,
        "n_classes": n_classes,
        "label_names": label_names,
        "input_shape": [width],
        "output_size": output_size,
        "features": feature_schema,
        "feature_names": feature_names,
        "target": target_schema,
        "missing_policy": data_cfg.missing,
        "missing_counts": missing_counts,
        "rows_read": n_rows_read,
        "rows_dropped": dropped,
        "split_sizes": {"train": int(train_idx.size), "val": int(val_idx.size), "test": int(test_idx.size)},
        "normalize": None,
    }
    return Prepared(tensors=tensors, schema=schema)
