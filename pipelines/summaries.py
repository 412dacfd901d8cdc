"""What the commands print: a summary as two aligned columns (`trainyard train`, `predict`, `sweep`)."""

from __future__ import annotations

import sys
from typing import Any


def print_table(summary: dict[str, Any], out=None) -> None:
    """The run's summary as two aligned columns."""
    out = out or sys.stdout
    rows = [
        ("MLflow run", f"{summary['mlflow_run_id']} ({summary['run_name']})"),
        ("experiment", summary["experiment"]),
        ("tracking URI", summary["tracking_uri"]),
        ("task", summary["task"]),
        ("device", summary["device"]),
        ("best epoch", str(summary["best_epoch"])),
        ("train seconds", f"{summary['train_seconds']:.1f}"),
    ]
    rows += [(k, f"{v:.4f}") for k, v in summary["test_metrics"].items() if k.count("/") == 1]
    rows += [(f"artifact {k}", v) for k, v in summary["artifacts"].items()]
    rows.append(("TensorBoard", summary["tensorboard_dir"]))
    _print_rows(rows, out)


def _print_rows(rows: list[tuple[str, str]], out) -> None:
    """(key, value) rows as two aligned columns."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)


def print_predict_table(summary: dict[str, Any], out=None) -> None:
    """A prediction's summary as two aligned columns."""
    out = out or sys.stdout
    version = f" v{summary['version']}" if summary["version"] else ""
    rows = [
        ("prediction run", summary["run_id"]),
        ("model", f"{summary['model']}{version} ({summary['model_uri']})"),
        ("model's run", summary["model_run_id"] or "-"),
        ("input", summary["input"]),
        ("input sha256", summary["input_sha256"]),
        ("output", summary["output"]),
        ("rows", str(summary["rows"])),
        ("rows with missing values", str(summary["rows_missing"])),
        ("rows with unseen categories", str(summary["rows_unseen"])),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    _print_rows(rows, out)
