"""Quality of the `csv` preset's defaults on real public tables, against scikit-learn in the same run.

For every table of ../shared/data/tables (its README.md names each table's target and the columns to
drop), the csv preset is given only data.target and data.drop, plus the measurement's split: 15% test,
seeded, stratified for classification (the preset keeps its own validation share out of the other 85%).
On the same rows, in the same process, scikit-learn's logistic regression (ridge for regression), an
MLP (64, 64) and histogram gradient boosting fit the 85% (train and validation) and score the 15%. They
read the prepared tensors themselves: numbers imputed and standardised with the training split's
statistics, text one-hot, as the tables' README measured them. R^2 does not change when the target is
standardised, so the regression scores compare as they are.

Per table: our mean over the split seeds, each sklearn mean, the best of them, the gap (ours - best)
and `met`: within 1 point of accuracy, or 0.02 of R^2, of the best. Not part of `make test`: minutes
on a CPU. `--set` tries a variant of the preset (e.g. `--set train.epochs=40`).

    .venv/bin/python benchmarks/tabular_quality.py [--tables anes96,crabs] [--seeds 3] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import REPO, emit, machine, note

TABLES = REPO.parent / "shared" / "data" / "tables"
TOLERANCE = {"classification": 0.01, "regression": 0.02}
TEST_FRACTION = 0.15
SCORE = {"classification": "accuracy", "regression": "R^2"}


def read_tables(folder: Path) -> dict[str, dict[str, Any]]:
    """name -> {file, target, task, drop} from the README's table (the rows naming a .csv file)."""
    tables = {}
    for line in (folder / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].endswith(".csv"):
            continue
        drop = [] if cells[4] in ("-", "") else [c.strip() for c in cells[4].split(",")]
        tables[cells[0][:-4]] = {"file": folder / cells[0], "target": cells[2], "task": cells[3], "drop": drop}
    return tables


def preset_score(table: dict[str, Any], seed: int, extra: list[str], state: Path) -> tuple[float, Any, dict]:
    """Test score of the csv preset on one split seed; the prepared dataset (for sklearn) and run facts."""
    from pipelines.config import load_config
    from tasks.evaluate import evaluate_model
    from tasks.ingest import ingest
    from tasks.prepared import load_prepared
    from tasks.train import train_model

    overrides = [
        f"data.path={table['file']}",
        f"data.target={table['target']}",
        f"data.drop={table['drop']}",
        f"data.test_fraction={TEST_FRACTION}",
        f"data.split_seed={seed}",
        f"train.seed={seed}",
        "train.progress=log",
        *extra,
    ]
    cfg = load_config(preset="csv", overrides=overrides, env={})
    ref = ingest(cfg.data, state)
    prepared = load_prepared(ref.path)
    out = state / "runs" / f"{Path(table['file']).stem}-{seed}"
    start = time.perf_counter()
    result = train_model(prepared, cfg.model, cfg.optim, cfg.schedule, cfg.train, out)
    evaluation = evaluate_model(prepared, cfg.model, result.checkpoint, out, device=cfg.train.device)
    key = "test/accuracy" if prepared.schema["task"] == "classification" else "test/r2"
    facts = {"epochs": len(result.history), "best_epoch": result.best_epoch, "seconds": time.perf_counter() - start}
    return evaluation.metrics[key], prepared, facts


def sklearn_scores(prepared: Any, seed: int) -> dict[str, float]:
    """logreg/ridge, mlp (64, 64) and hgb fitted on train + val and scored on test, on the prepared tensors."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    t = prepared.tensors
    x_fit = np.concatenate([t["x_train"].numpy(), t["x_val"].numpy()]).astype(np.float64)
    y_fit = np.concatenate([t["y_train"].numpy(), t["y_val"].numpy()])
    x_test, y_test = t["x_test"].numpy().astype(np.float64), t["y_test"].numpy()
    if prepared.schema["task"] == "classification":
        y_fit, y_test = y_fit.astype(np.int64), y_test.astype(np.int64)
        models = {
            "logreg": LogisticRegression(max_iter=2000),
            "mlp": MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=500, random_state=seed),
            "hgb": HistGradientBoostingClassifier(random_state=seed),
        }
    else:
        models = {
            "ridge": Ridge(),
            "mlp": MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=500, random_state=seed),
            "hgb": HistGradientBoostingRegressor(random_state=seed),
        }
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, model in models.items():
            scores[name] = float(model.fit(x_fit, y_fit).score(x_test, y_test))  # accuracy or R^2
    return scores


def bench_table(name: str, table: dict[str, Any], seeds: list[int], extra: list[str], state: Path) -> dict:
    ours: list[float] = []
    theirs: dict[str, list[float]] = {}
    runs = []
    for seed in seeds:
        score, prepared, facts = preset_score(table, seed, extra, state)
        ours.append(score)
        runs.append({"seed": seed, "score": round(score, 4), **{k: round(v, 1) for k, v in facts.items()}})
        for model, value in sklearn_scores(prepared, seed).items():
            theirs.setdefault(model, []).append(value)
    means = {model: statistics.fmean(values) for model, values in theirs.items()}
    best_model = max(means, key=means.get)
    mine, best = statistics.fmean(ours), means[best_model]
    task = table["task"]
    return emit(
        f"tabular_quality:{name}",
        baseline={"best": best_model, **{k: round(v, 4) for k, v in means.items()}},
        ratio=None,
        target=f"within {TOLERANCE[task]} of the best sklearn model's {SCORE[task]}",
        met=mine >= best - TOLERANCE[task],
        task=task,
        rows=sum(int(prepared.tensors[f"y_{s}"].shape[0]) for s in ("train", "val", "test")),
        ours=round(mine, 4),
        best=round(best, 4),
        gap=round(mine - best, 4),
        seeds=seeds,
        runs=runs,
    )


def others_running() -> str:
    """The load on the machine and the other Python processes, read once at the start and at the end."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if re.search(r"python|pytest", cmd) and int(pid) not in (os.getpid(), os.getppid()):  # not this run
            procs.append(cmd[:80])
    return f"load average {load}; other python processes: {len(procs)}" + (
        f" ({'; '.join(procs[:6])})" if procs else ""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="", help="comma-separated table names (default: all in the README)")
    parser.add_argument("--seeds", type=int, default=3, help="split seeds 0..N-1 (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a preset override, k=v")
    parser.add_argument("--data", default=str(TABLES), help=f"the tables' folder (default {TABLES})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tables = read_tables(Path(args.data))
    chosen = [t for t in args.tables.split(",") if t] or list(tables)
    unknown = [t for t in chosen if t not in tables]
    if unknown:
        parser.error(f"unknown tables {unknown}; known: {', '.join(tables)}")
    from tasks.errors import TrainyardError

    note("tabular_quality:setup", machine=machine(), others=others_running(), overrides=args.overrides)
    met = []
    with tempfile.TemporaryDirectory(prefix="tabular-quality-") as tmp:
        for name in chosen:
            try:
                line = bench_table(name, tables[name], list(range(args.seeds)), args.overrides, Path(tmp))
            except TrainyardError as exc:  # a table the ingest refuses: its one line, then the next table
                note(f"tabular_quality:{name}", refused=str(exc), met=False)
                met.append(False)
                continue
            met.append(line["met"])
    note("tabular_quality:summary", met=f"{sum(met)}/{len(met)}", others=others_running())
    return 0


if __name__ == "__main__":
    sys.exit(main())
