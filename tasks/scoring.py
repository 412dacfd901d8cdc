"""Batch scoring: a table's rows through a Trainyard table model, chunk by chunk, into an output table.

The model (Trainyard's python model, unwrapped from its MLflow pyfunc) names the raw columns it
needs and their types; only those and the kept columns are read (tasks/scoring_io.py), each chunk
goes to pandas and through `model.score`, and the kept columns and the model's output columns are
written (tasks/scoring_output.py), so the output appears whole or not at all. Every refusal is one
line naming the input (or the output), the column and, for a value, its data row counted from 1.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.csv_file import row_position
from tasks.errors import DataError, ModelError
from tasks.predict_config import PredictConfig
from tasks.scoring_io import Source, arrow_type, input_columns, input_size, open_input, read_chunks
from tasks.scoring_output import Output
from tasks.storage_config import StorageConfig
from tasks.uris import file_path, is_remote, scheme

log = logging.getLogger("trainyard.predict")
_ROW_PREFIX = re.compile(r"^column .+? row \d+: ")


@dataclass
class ScoreResult:
    """What one scoring pass did: rows, rows with missing values or unseen categories (and per column)."""

    rows: int = 0
    rows_missing: int = 0
    rows_unseen: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, int] = field(default_factory=dict)
    input_sha256: str = ""
    output: str = ""
    seconds: float = 0.0


def check_model(model: Any, where: str) -> None:
    """Refuse a model that does not score tables (an image model, or not Trainyard's)."""
    kind = getattr(model, "kind", None)
    if kind is None or not hasattr(model, "score"):
        raise ModelError(f"model {where} is not a Trainyard table model (it has no kind and score); train one first")
    if kind != "table":
        raise ModelError(
            f"model {where} scores {kind}s, not tables; trainyard predict scores tables with a table model"
        )


def score_table(
    model: Any, cfg: PredictConfig, state_root: Path, storage: StorageConfig | None = None, model_uri: str = ""
) -> tuple[ScoreResult, Output]:
    """Score cfg.input with `model` into cfg.output; the result and the committed output (for its removal
    should a later step fail). Nothing is left at the output when this raises."""
    check_model(model, model_uri or cfg.model)
    started = time.monotonic()
    _check_not_input(cfg)
    output = Output(cfg.output, cfg.output_format, storage)
    output.check()
    src = open_input(cfg.input, cfg.format, state_root, storage, cfg.delimiter, cfg.encoding)
    _check_not_input(cfg, src.path)
    types = _read_types(model, src, cfg.keep)
    result = ScoreResult(input_sha256=src.sha256)
    try:
        _score_chunks(model, src, types, cfg, output, result)
        if result.rows == 0:
            raise DataError(f"{src.where} has no data rows; expected a header line and data rows")
        result.output = output.commit()
    except BaseException:
        output.discard()
        raise
    result.seconds = time.monotonic() - started
    return result, output


def _check_not_input(cfg: PredictConfig, local_input: Path | None = None) -> None:
    """The output must not overwrite the table being read."""
    same = cfg.output == cfg.input
    if not same and scheme(cfg.output) != "s3" and not is_remote(cfg.input):
        same = file_path(cfg.output).resolve() == (local_input or file_path(cfg.input)).resolve()
    if same:
        raise DataError(f"output {cfg.output} is the input {cfg.input}; write the predictions to another file")


def _read_types(model: Any, src: Source, keep: list[str]) -> dict[str, pa.DataType | None]:
    """The columns to read and their types: the model's features as it reads them, then the kept columns
    (a CSV file's as text, so they are copied as written; a Parquet file's as they are)."""
    names = input_columns(src)
    features = list(model.columns)
    missing = [c for c in features if c not in names]
    if missing:
        raise DataError(
            f"{src.where} lacks the model's feature column(s) {', '.join(map(repr, missing))}; the model expects "
            f"the columns {', '.join(map(repr, features))}"
        )
    absent = [c for c in keep if c not in names]
    if absent:
        raise DataError(
            f"{src.where} has no column {', '.join(map(repr, absent))} to keep; its columns: {', '.join(names)}"
        )
    clash = [c for c in keep if c in model.output_columns]
    if clash:
        raise DataError(
            f"kept column(s) {', '.join(map(repr, clash))} of {src.where} would clash with the model's output "
            f"column(s) of that name; keep other columns"
        )
    extra = [c for c in names if c not in features and c not in keep]
    if extra:
        log.info("%s: columns not used by the model, ignored: %s", src.where, ", ".join(extra))
    column_types = getattr(model, "column_types", {}) or {}
    types: dict[str, pa.DataType | None] = {c: arrow_type(column_types.get(c)) for c in features}
    for c in keep:
        types.setdefault(c, pa.string() if src.format == "csv" else None)
    return types


def _score_chunks(
    model: Any, src: Source, types: dict[str, pa.DataType | None], cfg: PredictConfig, output: Output, result
) -> None:
    """Each chunk through the model and into the output, the counts added up, a progress bar on stderr.

    Reading the next chunk and writing the last one's predictions run in threads beside the scoring of this
    one: pyarrow reads, converts and writes without holding the GIL, so the three overlap.
    """
    from tqdm import tqdm

    total, unit = input_size(src)
    missing: Counter[str] = Counter()
    unseen: Counter[str] = Counter()
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc="predict", file=sys.stderr, disable=None)
    with bar, ThreadPoolExecutor(1, thread_name_prefix="predict-write") as writer:
        written = None
        for chunk in _read_ahead(read_chunks(src, types, cfg.chunk_rows, bar.update)):
            frame = chunk.select(list(model.columns)).to_pandas()
            out, report = _score(model, frame, src, result.rows)
            table = _output_table(chunk, cfg.keep, out, model.output_columns)
            if written is not None:
                written.result()  # in order, and at most one chunk of predictions held
            written = writer.submit(output.write, table)
            result.rows += chunk.num_rows
            result.rows_missing += int(report.get("rows_missing", 0))
            result.rows_unseen += int(report.get("rows_unseen", 0))
            missing.update({k: int(v) for k, v in report.get("missing", {}).items()})
            unseen.update({k: int(v) for k, v in report.get("unseen", {}).items()})
        if written is not None:
            written.result()
    result.missing, result.unseen = dict(missing), dict(unseen)


def _read_ahead(chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """`chunks`, the next one read in a thread while the caller works on this one (two chunks held at most)."""
    with ThreadPoolExecutor(1, thread_name_prefix="predict-read") as reader:
        upcoming = reader.submit(next, chunks, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = reader.submit(next, chunks, None)
            yield chunk


def _score(model: Any, frame, src: Source, offset: int):
    """model.score(frame); its refusal of a column or a value as one line with the data row in the file."""
    try:
        return model.score(frame)
    except ValueError as exc:
        if isinstance(exc, DataError) or type(exc).__name__ != "InputError":
            raise
        column, row = getattr(exc, "column", None), getattr(exc, "row", None)
        if row is None:
            raise DataError(f"{src.where}: {exc}") from None
        at = row_position(src.path, offset + int(row), src.dialect) if src.dialect else f"row {offset + int(row) + 1}"
        what = _ROW_PREFIX.sub("", str(exc))  # the codec's own "column 'x' row N" counts rows in the chunk
        named = f"column {column!r}, " if column else ""
        raise DataError(f"{src.where}: {named}{at}: {what}") from None


def _output_table(chunk: pa.Table, keep: list[str], out, output_columns: list[str]) -> pa.Table:
    """The kept columns, then the model's output columns (in its order), as one table."""
    scored = pa.Table.from_pandas(out.reset_index(drop=True), preserve_index=False)
    names = [c for c in output_columns if c in scored.column_names] or scored.column_names
    columns = [chunk.column(c) for c in keep] + [scored.column(c) for c in names]
    return pa.table(columns, names=[*keep, *names])
