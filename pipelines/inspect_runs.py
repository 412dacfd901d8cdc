"""`trainyard runs`, `trainyard champion`, `trainyard promote`: look at runs and the registry.

The table's columns come from the catalogue in tasks/keys.py (RUNS_TABLE_PARAMS, and the test
metrics marked for it), so a new test metric shows up here without a change to this module.
"""

from __future__ import annotations

from typing import Any

from tasks import champion, keys

_FIXED_COLUMNS = ("", "run_id", "name", "status")


def latest_runs(tracking_uri: str, experiment: str, limit: int = 10, sweep: str = "") -> list[dict[str, Any]]:
    """The experiment's newest runs, newest first (with `sweep`: that sweep's trials, best first): status (a
    trial's: COMPLETE, PRUNED or FAIL), the table's params and metrics, champion or not."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = (
        sweep_trials(client, exp.experiment_id, sweep)[:limit]
        if sweep
        else training_runs(client, exp.experiment_id, limit)
    )
    # Each run's model went to its own registered model (tracking.registered_model, tag registry.model;
    # the experiment's name by default): a run is marked when it is that model's champion.
    models = {run.data.tags.get(keys.REGISTRY_MODEL) or experiment for run in runs}
    champions = {name: champion.current_champion(tracking_uri, name) for name in sorted(models)}
    rows = []
    for run in runs:
        champ = champions[run.data.tags.get(keys.REGISTRY_MODEL) or experiment]
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.data.tags.get(keys.SWEEP_TRIAL_STATE, run.info.status) if sweep else run.info.status,
            "champion": bool(champ and champ.run_id == run.info.run_id),
        }
        row.update({k: run.data.params.get(k, "") for k in keys.RUNS_TABLE_PARAMS})
        row.update(
            {k: run.data.metrics[k] for k in (*keys.RUNS_TABLE_METRICS, keys.SWEEP_OBJECTIVE) if k in run.data.metrics}
        )
        rows.append(row)
    return rows


def training_runs(client, experiment_id: str, limit: int, page: int = 100) -> list:
    """The experiment's newest `limit` training runs, newest first: prediction runs (keys.RUN_KIND) are
    passed over, page by page (a filter on a tag would also drop the runs that lack it)."""
    runs: list = []
    token = None
    while len(runs) < limit:
        found = client.search_runs(
            [experiment_id], order_by=["attributes.start_time DESC"], max_results=max(page, limit), page_token=token
        )
        runs += [run for run in found if keys.is_training_run(run.data.tags)]
        token = found.token
        if not token:
            break
    return runs[:limit]


def sweep_trials(client, experiment_id: str, sweep: str) -> list:
    """A sweep's trial runs, best first: finished ones by their objective (the sweep's direction; a tie goes
    to the earlier trial, as Optuna's best trial does), then the pruned and the failed."""
    query = f"tags.`{keys.SWEEP_NAME}` = '{sweep}'"
    found = [
        r for r in client.search_runs([experiment_id], query, max_results=10_000) if keys.is_training_run(r.data.tags)
    ]
    if not found:
        raise LookupError(f"no trials of a sweep named {sweep!r} in this experiment")

    def rank(run) -> tuple:
        value = run.data.metrics.get(keys.SWEEP_OBJECTIVE)
        sign = -1.0 if run.data.tags.get(keys.SWEEP_DIRECTION) == "maximize" else 1.0
        number = int(run.data.tags.get(keys.SWEEP_TRIAL, "0"))
        return (value is None, sign * value if value is not None else 0.0, number)

    return sorted(found, key=rank)


def _cells(row: dict[str, Any], metrics: list[str]) -> list[str]:
    """One run's cells, in the table's column order."""
    return [
        "*" if row["champion"] else "",
        row["run_id"][:12],
        row["name"],
        row["status"],
        *[str(row.get(k, "")) for k in keys.RUNS_TABLE_PARAMS],
        *[f"{row[m]:.4f}" if m in row else "" for m in metrics],
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned text; a metric column only when some run has that metric."""
    if not rows:
        return "no runs"
    metrics = [m for m in (*keys.RUNS_TABLE_METRICS, keys.SWEEP_OBJECTIVE) if any(m in r for r in rows)]
    columns = [*_FIXED_COLUMNS, *keys.RUNS_TABLE_PARAMS, *metrics]
    cells = [_cells(r, metrics) for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.append("* champion")
    return "\n".join(lines)


def describe_champion(tracking_uri: str, model_name: str) -> dict[str, Any] | None:
    """The champion version of `model_name` and its run's figures, or None when there is none."""
    from mlflow.tracking import MlflowClient

    champ = champion.current_champion(tracking_uri, model_name)
    if champ is None:
        return None
    run = MlflowClient(tracking_uri).get_run(champ.run_id)
    metric = run.data.tags.get(keys.CHAMPION_METRIC, "")
    return {
        "model": model_name,
        "version": champ.version,
        "run_id": champ.run_id,
        "run_name": run.info.run_name,
        "metric": metric,
        "value": run.data.metrics.get(metric, None),
        "data_hash": run.data.tags.get(keys.DATA_HASH, ""),
        "data_key": run.data.tags.get(keys.DATA_KEY, ""),
    }
