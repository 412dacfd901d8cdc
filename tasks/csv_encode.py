"""Encoding a CSV file's inferred columns: the split, the feature and target tensors, and the schema.

Statistics (means, standard deviations, medians, vocabularies) come from the training
split only. Numeric features are standardised a few columns at a time straight into the
split tensors (see tasks/csv_standardise.py); categorical ones are one-hot encoded with the
training split's vocabulary, a value unseen there encoded as all zeros. The peak memory
stays a small multiple of the tensors' size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.csv_inferred import Features, Inferred, Rows
from tasks.csv_labels import Labels, encode_labels
from tasks.csv_standardise import GROUP, SplitRows, Standardiser, pool_array, thread_pool, too_large
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.prepared import Prepared
from tasks.rowcodec import MISSING  # a missing categorical value, as the vocabulary holds it
from tasks.splits import split_indices

log = logging.getLogger("trainyard.ingest")
EXAMPLE_ROWS = 5


@dataclass
class EncodedFeatures:
    """The feature tensors (x_<split>) and what each column of them is."""

    tensors: dict[str, torch.Tensor]
    schema: list[dict[str, Any]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # one per tensor column: a feature, or feature=value
    width: int = 0
    missing_counts: dict[str, int] = field(default_factory=dict)  # features with a missing value


@dataclass
class EncodedTarget:
    """The target tensors (y_<split>) and how the model's output reads them."""

    tensors: dict[str, torch.Tensor]
    schema: dict[str, Any]
    n_classes: int
    output_size: int
    label_names: list[str]  # by class code; empty for regression


def encode(path: Path, data_cfg: DataConfig, content_hash: str, inferred: Inferred) -> Prepared:
    """The prepared dataset: split, standardised and one-hot features, encoded targets, and the schema."""
    labels = encode_labels(path, inferred.target, inferred.rows)
    split = _split(path, data_cfg, inferred.rows, labels, inferred.target.task)
    x = _encode_features(path, data_cfg, inferred.features, split)
    y = _encode_target(path, inferred, labels, split)
    tensors = {**x.tensors, **y.tensors}
    tensors = {f"{xy}_{s}": tensors[f"{xy}_{s}"] for s in split.index for xy in ("x", "y")}
    return Prepared(tensors=tensors, schema=_schema(path, data_cfg, content_hash, inferred, split, x, y))


def _split(path: Path, data_cfg: DataConfig, rows: Rows, labels: Labels, task: str) -> SplitRows:
    """The seeded train/val/test split of the kept rows, stratified by class for classification."""
    train_idx, val_idx, test_idx = split_indices(
        rows.kept.size,
        data_cfg.val_fraction,
        data_cfg.test_fraction,
        data_cfg.split_seed,
        stratify=labels.values if task == "classification" else None,
        source=str(path),
    )
    index = {"train": train_idx, "val": val_idx, "test": test_idx}
    # the splits' rows in the file (the index of every column read)
    file_rows = index if rows.all else {s: rows.kept[idx] for s, idx in index.items()}
    return SplitRows(rows.kept, rows.all, index, file_rows)


# ---- features -------------------------------------------------------------------------------------


def _encode_features(path: Path, data_cfg: DataConfig, features: Features, split: SplitRows) -> EncodedFeatures:
    """The x tensors, numeric features standardised and categorical ones one-hot, in feature order."""
    vocabularies, texts = _vocabularies(path, data_cfg, features, split)
    width = len(features.numeric) + sum(len(vocab) for vocab in vocabularies.values())
    tensors = {f"x_{s}": torch.from_numpy(pool_array((idx.size, width))) for s, idx in split.index.items()}
    x = {s: tensors[f"x_{s}"].numpy() for s in split.index}
    encoded: dict[str, dict[str, Any]] = {}  # a numeric key's statistics, a categorical column's vocabulary
    with thread_pool() as pool:
        standardiser = Standardiser(pool, path, split, x, len(features.numeric))
        for names, col_i in _layout(features, vocabularies):
            if names[0] in features.numeric:
                encoded.update(standardiser.group(names, col_i, features))
            else:
                name = names[0]
                encoded[name] = _one_hot(vocabularies[name], texts.pop(name), col_i, split, x)
    standardiser.release()
    out = EncodedFeatures(tensors=tensors, width=width)
    for name in features.names:
        entry, columns = _feature_entry(name, features, encoded, vocabularies)
        out.schema.append(entry)
        out.names.extend(columns)
    out.missing_counts = {f["name"]: f["missing"] for f in out.schema if f["missing"]}
    if out.missing_counts and data_cfg.missing == "impute":
        log.info("imputed missing values: %s", out.missing_counts)
    return out


def _feature_entry(
    name: str, features: Features, encoded: dict[str, dict[str, Any]], vocabularies: dict[str, list[str]]
) -> tuple[dict[str, Any], list[str]]:
    """A column's schema entry (its kind, the rule that decided it, what redoes its encoding) and the names of
    its tensor columns."""
    info = dict(features.kinds[name])
    kind = info.pop("kind")
    entry = {"name": name, "kind": kind, **info}
    if kind == "categorical":
        return {**entry, **encoded[name]}, [f"{name}={v}" for v in vocabularies[name]]
    if kind == "date":
        keys = features.parts[name]
        entry["parts"] = [{"part": p, "name": k, **encoded[k]} for p, k in zip(info["parts"], keys, strict=True)]
        return {**entry, "missing": encoded[keys[0]]["missing"]}, keys
    return {**entry, **encoded[name]}, [name]


def _vocabularies(
    path: Path, data_cfg: DataConfig, features: Features, split: SplitRows
) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Each categorical feature's training vocabulary (missing values as MISSING), and its values as text."""
    vocabularies: dict[str, list[str]] = {}
    texts: dict[str, np.ndarray] = {}
    for name, col in features.categorical.items():
        values = col.astype("string").fillna(MISSING).to_numpy(dtype=object)
        vocab = sorted(set(values[split.file_rows["train"]].tolist()))
        if len(vocab) > data_cfg.max_categories:
            raise DataError(
                f"CSV file {path}: column {name!r} has {len(vocab)} distinct values in the training split, "
                f"more than data.max_categories={data_cfg.max_categories}; drop it or raise the limit"
            )
        vocabularies[name] = vocab
        texts[name] = values
    return vocabularies, texts


def _layout(features: Features, vocabularies: dict[str, list[str]]) -> list[tuple[list[str], int]]:
    """Runs of numeric tensor columns (GROUP at most; a date's parts are some) or a categorical feature, each
    with its first tensor column."""
    numeric = features.numeric
    layout: list[tuple[list[str], int]] = []
    col_i = 0
    for name in features.names:
        if name in features.categorical:
            layout.append(([name], col_i))
            col_i += len(vocabularies[name])
            continue
        for key in features.parts.get(name, [name]):
            if layout and layout[-1][0][-1] in numeric and len(layout[-1][0]) < GROUP:
                layout[-1][0].append(key)
            else:
                layout.append(([key], col_i))
            col_i += 1
    return layout


def _one_hot(vocab: list[str], values: np.ndarray, col_i: int, split: SplitRows, x: dict[str, np.ndarray]) -> dict:
    """A categorical feature one-hot into tensor columns col_i.., a value outside `vocab` as all zeros."""
    values = values if split.all else values[split.kept]
    n_missing = int((values == MISSING).sum())
    lookup = {v: k for k, v in enumerate(vocab)}
    codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=values.size)
    for s, idx in split.index.items():
        block = x[s][:, col_i : col_i + len(vocab)]
        block[:] = 0.0
        split_codes = codes[idx]
        seen = split_codes >= 0
        block[np.flatnonzero(seen), split_codes[seen]] = 1.0
    return {
        "encoding": "onehot",
        "vocabulary": vocab,
        "missing": n_missing,
        "unseen_outside_train": int((codes < 0).sum()),
    }


# ---- the target and the schema --------------------------------------------------------------------


def _encode_target(path: Path, inferred: Inferred, labels: Labels, split: SplitRows) -> EncodedTarget:
    """The y tensors: class codes (float32 0/1 for two classes), or the standardised numbers for regression."""
    y_all, target = labels.values, inferred.target.name
    schema: dict[str, Any] = {"name": target, "dtype": str(inferred.target.column.dtype)}  # the labels' type
    if inferred.target.task == "classification":
        n_classes = len(labels.names)
        y_tensor = torch.from_numpy(y_all)
        if n_classes == 2:
            y_tensor = y_tensor.to(torch.float32)
        output_size = 1 if n_classes == 2 else n_classes
    else:
        train = y_all[split.index["train"]]
        with np.errstate(over="ignore", invalid="ignore"):
            y_mean = float(train.mean())
            y_std = float(train.std()) or 1.0
        if not np.isfinite(y_mean) or not np.isfinite(y_std):
            raise too_large(path, f"target {target!r}", y_mean, y_std)
        schema.update(mean=y_mean, std=y_std)
        y_tensor = torch.from_numpy(((y_all - y_mean) / y_std).astype(np.float32))
        output_size, n_classes = 1, 0
    tensors = {f"y_{s}": y_tensor.index_select(0, torch.from_numpy(idx)) for s, idx in split.index.items()}
    return EncodedTarget(tensors, schema, n_classes, output_size, labels.names)


def _first_rows(rows: np.ndarray) -> list[int]:
    """The file's first EXAMPLE_ROWS rows in the training split: the registered model's input example,
    read from the top of the file (pipelines/model_logging.py)."""
    k = min(EXAMPLE_ROWS, rows.size)
    return sorted(int(i) for i in (np.partition(rows, k - 1)[:k] if k else rows))


def _schema(
    path: Path,
    data_cfg: DataConfig,
    content_hash: str,
    inferred: Inferred,
    split: SplitRows,
    x: EncodedFeatures,
    y: EncodedTarget,
) -> dict[str, Any]:
    """What the prepared dataset holds and how it was made (schema.json)."""
    task, rows = inferred.target.task, inferred.rows
    return {
        "source": "csv",
        "file": str(path),
        "content_hash": content_hash,
        "task": task,
        "task_reason": inferred.target.reason,
        "binary": task == "classification" and y.n_classes == 2,
        "n_classes": y.n_classes,
        "label_names": y.label_names,
        "input_shape": [x.width],
        "output_size": y.output_size,
        "features": x.schema,
        "feature_names": x.names,
        "left_out": inferred.features.left_out,
        "target": y.schema,
        "missing_policy": data_cfg.missing,
        "missing_counts": x.missing_counts,
        "rows_read": rows.n_read,
        "rows_dropped": rows.dropped,
        "split_sizes": {s: int(idx.size) for s, idx in split.index.items()},
        "example_rows": _first_rows(split.file_rows["train"]),
        "normalize": None,
    }
