"""`trainyard runs`, `trainyard champion`, `trainyard promote`: look at runs and the registry."""

from __future__ import annotations

from typing import Any

from tasks import champion

KEY_PARAMS = ("data.source", "model.name", "optim.name", "optim.lr", "schedule.name", "train.epochs", "train.batch_size")
KEY_METRICS = ("test/accuracy", "test/f1_macro", "test/mse", "test/r2", "test/loss")


def latest_runs(tracking_uri: str, experiment: str, limit: int = 10) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    # Each run's model went to its own registered model (tracking.registered_model, tag registry.model;
    # the experiment's name by default): a run is marked when it is that model's champion.
    models = {run.data.tags.get("registry.model") or experiment for run in runs}
    champions = {name: champion.current_champion(tracking_uri, name) for name in sorted(models)}
    rows = []
    for run in runs:
        champ = champions[run.data.tags.get("registry.model") or experiment]
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "champion": bool(champ and champ.run_id == run.info.run_id),
        }
        row.update({k: run.data.params.get(k, "") for k in KEY_PARAMS})
        row.update({k: run.data.metrics[k] for k in KEY_METRICS if k in run.data.metrics})
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    columns = ["", "run_id", "name", "status", *KEY_PARAMS, *[m for m in KEY_METRICS if any(m in r for r in rows)]]
    cells = [
        ["*" if r["champion"] else "", r["run_id"][:12], r["name"], r["status"],
         *[str(r.get(k, "")) for k in KEY_PARAMS],
         *[f"{r[m]:.4f}" if m in r else "" for m in columns[4 + len(KEY_PARAMS):]]]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.append("* champion")
    return "\n".join(lines)


def describe_champion(tracking_uri: str, model_name: str) -> dict[str, Any] | None:
    from mlflow.tracking import MlflowClient

    champ = champion.current_champion(tracking_uri, model_name)
    if champ is None:
        return None
    run = MlflowClient(tracking_uri).get_run(champ.run_id)
    return {
        "model": model_name,
        "version": champ.version,
        "run_id": champ.run_id,
        "run_name": run.info.run_name,
        "metric": run.data.tags.get("champion.metric", ""),
        "value": run.data.metrics.get(run.data.tags.get("champion.metric", ""), None),
        "data_hash": run.data.tags.get("data.hash", ""),
        "data_key": run.data.tags.get("data.key", ""),
    }
