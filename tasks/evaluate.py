"""Evaluate stage: the best checkpoint on the held-out test split.

Classification: torchmetrics accuracy, confusion matrix (CSV and a PNG heatmap with
class names), per-class precision/recall/F1 and their macro averages, and sklearn's
text report. Regression: MSE, MAE and R² in the target's own units. Returns a plain dict.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from models import build_model
from tasks.data import TensorSplit, make_loader
from tasks.prepared import Prepared
from tasks.train import evaluate_split, is_conv, load_weights, loss_for, pick_device, pick_precision, predictions

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
    import torchmetrics.functional as TMF  # here, not at the top: a train-only process (the GPU step) skips its 2 to 3 s

    k = len(label_names)
    preds, targets = preds.long(), targets.long()
    acc = TMF.accuracy(preds, targets, task="multiclass", num_classes=k, average="micro")
    cm = TMF.confusion_matrix(preds, targets, task="multiclass", num_classes=k)
    per = {
        name: fn(preds, targets, task="multiclass", num_classes=k, average="none")
        for name, fn in (("precision", TMF.precision), ("recall", TMF.recall), ("f1", TMF.f1_score))
    }
    metrics: dict[str, float] = {"test/accuracy": float(acc)}
    for name, values in per.items():
        metrics[f"test/{name}_macro"] = float(values.mean())
    per_class = {
        label: {name: float(values[i]) for name, values in per.items()} | {"support": int((targets == i).sum())}
        for i, label in enumerate(label_names)
    }
    for part, row in zip(metric_key_parts(label_names), per_class.values()):
        for name in ("precision", "recall", "f1"):
            metrics[f"test/{name}/{part}"] = row[name]
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
    if schema["task"] == "classification":
        keys = ["test/accuracy", *(f"test/{m}_macro" for m in ("precision", "recall", "f1"))]
        keys += [f"test/{m}/{part}" for part in metric_key_parts(schema["label_names"]) for m in ("precision", "recall", "f1")]
    else:
        keys = ["test/mse", "test/mae", "test/r2"]
    return [*keys, "test/loss"]


def write_confusion_csv(path: Path, cm: list[list[int]], labels: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *labels])
        for label, row in zip(labels, cm):
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
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i][j] > peak / 2 else "black")  # fmt: skip
    fig.tight_layout()
    return fig


def evaluate_model(
    prepared: Prepared,
    model_cfg,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on the test split; write the reports into `out_dir`; return the figures."""
    schema = prepared.schema
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    prec = pick_precision(precision, dev)
    model = build_model(model_cfg.name, schema, model_cfg)
    state = load_weights(checkpoint)
    model.load_state_dict(state["model_state"])
    model.to(dev)
    channels_last = dev.type == "cuda" and is_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(TensorSplit.from_prepared(prepared, "test"), batch_size, shuffle=False)
    ev = evaluate_split(model, loader, loss_for(schema), schema, dev, prec, channels_last)

    files: dict[str, str] = {}
    if schema["task"] == "classification":
        labels = list(schema["label_names"])
        result = classification_metrics(predictions(ev.outputs, schema), ev.targets, labels)
        cm_csv = out_dir / "confusion_matrix.csv"
        write_confusion_csv(cm_csv, result["confusion_matrix"], labels)
        fig = confusion_figure(result["confusion_matrix"], labels)
        cm_png = out_dir / "confusion_matrix.png"
        fig.savefig(cm_png, dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)
        from sklearn.metrics import classification_report

        report = classification_report(
            ev.targets.long().numpy(), predictions(ev.outputs, schema).numpy(),
            labels=list(range(len(labels))), target_names=labels, digits=4, zero_division=0,
        )  # fmt: skip
        report_path = out_dir / "classification_report.txt"
        report_path.write_text(report, encoding="utf-8")
        files.update(confusion_matrix_csv=str(cm_csv), confusion_matrix_png=str(cm_png), classification_report=str(report_path))
    else:
        std, mean = schema["target"]["std"], schema["target"]["mean"]
        result = regression_metrics(ev.outputs * std + mean, ev.targets * std + mean)
    result["metrics"]["test/loss"] = ev.loss
    result["task"] = schema["task"]
    result["checkpoint_epoch"] = int(state.get("epoch", 0))
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
    files["metrics_json"] = str(metrics_path)
    result["files"] = files
    return result
