"""Evaluate stage: the best checkpoint on the held-out test split.

Classification: torchmetrics accuracy, confusion matrix (CSV and a PNG heatmap with
class names), per-class precision/recall/F1 and their macro averages, and sklearn's
text report. Regression: MSE, MAE and R² in the target's own units. Returns an
`Evaluation` (tasks/results.py); metrics.json holds the same figures.

torchmetrics, matplotlib and sklearn are imported where they are used: a process that
only trains never loads them.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from tasks.checkpoint import load_weights
from tasks.data import TensorSplit, make_loader
from tasks.forward import EvalOutput, evaluate_split, predictions
from tasks.keys import PER_CLASS, per_class_key, test_metric_keys
from tasks.optimisation import loss_for
from tasks.prepared import Prepared
from tasks.results import Evaluation
from tasks.runtime import pick_device, pick_precision, place_model

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-. ]+")


def metric_key_part(name: str) -> str:
    """A class name made safe for a metric key (MLflow allows letters, digits, _ - . space and /)."""
    return _KEY_SAFE.sub("_", name)[:100] or "_"


def metric_key_parts(label_names: list[str]) -> list[str]:
    """Each class's part of its metric keys: the name made safe, and unique (`<=50K` and `>50K`
    both make `_50K`: such names get the class index too, `_50K.0` and `_50K.1`)."""
    parts = [metric_key_part(name) for name in label_names]
    seen: set[str] = set()
    out = []
    for i, part in enumerate(parts):
        if parts.count(part) > 1 or part in seen:
            part = f"{part[:90]}.{i}"
            while part in seen:  # a class literally named like that: one more suffix
                part += "_"
        seen.add(part)
        out.append(part)
    return out


def classification_metrics(preds: torch.Tensor, targets: torch.Tensor, label_names: list[str]) -> dict[str, Any]:
    # here, not at the top: a train-only process (the GPU step) skips its 2 to 3 s of imports
    import torchmetrics.functional as TMF

    k = len(label_names)
    preds, targets = preds.long(), targets.long()
    acc = TMF.accuracy(preds, targets, task="multiclass", num_classes=k, average="micro")
    cm = TMF.confusion_matrix(preds, targets, task="multiclass", num_classes=k)
    functions = {"precision": TMF.precision, "recall": TMF.recall, "f1": TMF.f1_score}
    per = {
        name: functions[name](preds, targets, task="multiclass", num_classes=k, average="none") for name in PER_CLASS
    }
    metrics: dict[str, float] = {"test/accuracy": float(acc)}
    for name, values in per.items():
        metrics[f"test/{name}_macro"] = float(values.mean())
    per_class = {
        label: {name: float(values[i]) for name, values in per.items()} | {"support": int((targets == i).sum())}
        for i, label in enumerate(label_names)
    }
    for part, row in zip(metric_key_parts(label_names), per_class.values(), strict=True):
        for name in PER_CLASS:
            metrics[per_class_key(name, part)] = row[name]
    return {"metrics": metrics, "confusion_matrix": cm.tolist(), "per_class": per_class}


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    import torchmetrics.functional as TMF

    return {
        "metrics": {
            "test/mse": float(TMF.mean_squared_error(preds, targets)),
            "test/mae": float(TMF.mean_absolute_error(preds, targets)),
            "test/r2": float(TMF.r2_score(preds, targets)) if targets.numel() > 1 else float("nan"),
        }
    }


def metric_keys(schema: dict[str, Any]) -> list[str]:
    """The test metrics evaluate_model reports for a prepared dataset of this schema."""
    classification = schema["task"] == "classification"
    return test_metric_keys(schema["task"], metric_key_parts(schema["label_names"]) if classification else [])


def write_confusion_csv(path: Path, cm: list[list[int]], labels: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *labels])
        for label, row in zip(labels, cm, strict=True):
            writer.writerow([label, *row])


def confusion_figure(cm: list[list[int]], labels: list[str], title: str = "Confusion matrix"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    size = max(4.0, min(0.5 * k + 2, 16.0))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=labels, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        peak = max((max(r) for r in cm), default=0)
        for i in range(k):
            for j in range(k):
                color = "white" if cm[i][j] > peak / 2 else "black"
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=8, color=color)
    fig.tight_layout()
    return fig


def _test_outputs(
    prepared: Prepared,
    model_cfg: ModelConfig,
    checkpoint: str | os.PathLike,
    device: str,
    precision: str,
    batch_size: int,
) -> tuple[EvalOutput, int]:
    """The checkpoint's outputs on the test split, and the epoch it was written after."""
    schema = prepared.schema
    dev = pick_device(device)
    model, channels_last = place_model(model_cfg, schema, dev)
    state = load_weights(checkpoint)
    model.load_state_dict(state["model_state"])
    loader = make_loader(TensorSplit.from_prepared(prepared, "test"), batch_size, shuffle=False)
    ev = evaluate_split(model, loader, loss_for(schema), schema, dev, pick_precision(precision, dev), channels_last)
    return ev, int(state.get("epoch", 0))


def _classification_reports(
    ev: EvalOutput, schema: dict[str, Any], out_dir: Path
) -> tuple[dict[str, Any], dict[str, str]]:
    """The figures, and the confusion matrix (CSV, PNG) and sklearn's text report written into `out_dir`."""
    labels = list(schema["label_names"])
    preds = predictions(ev.outputs, schema)
    result = classification_metrics(preds, ev.targets, labels)
    files = {name: out_dir / name for name in ("confusion_matrix.csv", "confusion_matrix.png")}
    write_confusion_csv(files["confusion_matrix.csv"], result["confusion_matrix"], labels)
    fig = confusion_figure(result["confusion_matrix"], labels)
    fig.savefig(files["confusion_matrix.png"], dpi=100)
    import matplotlib.pyplot as plt  # after confusion_figure, which chooses the backend

    plt.close(fig)
    from sklearn.metrics import classification_report

    report = classification_report(
        ev.targets.long().numpy(),
        preds.numpy(),
        labels=list(range(len(labels))),
        target_names=labels,
        digits=4,
        zero_division=0,
    )
    report_path = out_dir / "classification_report.txt"
    report_path.write_text(report, encoding="utf-8")
    return result, {
        "confusion_matrix_csv": str(files["confusion_matrix.csv"]),
        "confusion_matrix_png": str(files["confusion_matrix.png"]),
        "classification_report": str(report_path),
    }


def _regression_figures(ev: EvalOutput, schema: dict[str, Any]) -> dict[str, Any]:
    """MSE, MAE and R² in the target's own units (the model predicts the standardised target)."""
    std, mean = schema["target"]["std"], schema["target"]["mean"]
    return regression_metrics(ev.outputs * std + mean, ev.targets * std + mean)


def metrics_report(evaluation: Evaluation) -> dict[str, Any]:
    """What metrics.json holds: the metrics, the details (confusion matrix, per-class figures), the
    task and the checkpoint's epoch."""
    return {
        "metrics": evaluation.metrics,
        **evaluation.details,
        "task": evaluation.task,
        "checkpoint_epoch": evaluation.checkpoint_epoch,
    }


def evaluate_model(
    prepared: Prepared,
    model_cfg: ModelConfig,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1024,
) -> Evaluation:
    """Evaluate `checkpoint` on the test split; write the reports into `out_dir`; return the figures."""
    schema = prepared.schema
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev, epoch = _test_outputs(prepared, model_cfg, checkpoint, device, precision, batch_size)
    if schema["task"] == "classification":
        result, files = _classification_reports(ev, schema, out_dir)
    else:
        result, files = _regression_figures(ev, schema), {}
    metrics = {**result.pop("metrics"), "test/loss": ev.loss}
    metrics_path = out_dir / "metrics.json"
    files["metrics_json"] = str(metrics_path)
    evaluation = Evaluation(task=schema["task"], metrics=metrics, files=files, checkpoint_epoch=epoch, details=result)
    metrics_path.write_text(json.dumps(metrics_report(evaluation), indent=2, sort_keys=True), encoding="utf-8")
    return evaluation
