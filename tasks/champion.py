"""The model registry: register each run's model, mark it `challenger`, promote it to
`champion` when it beats the current champion on the same data.

Promotion rule: the new version becomes `champion` when there is no champion yet, or
when its test metric beats the champion's and both were measured on the same prepared
dataset: the same data (content hash) shaped by the same data config (target, features,
split), i.e. the same dataset key, so both were scored on the same test rows. A champion
measured on other data, or predicting another column, is not compared automatically (the
figures would not mean the same thing): promote by hand with `trainyard promote`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

HIGHER_IS_BETTER = ("accuracy", "f1", "precision", "recall", "r2")
CHAMPION, CHALLENGER = "champion", "challenger"


def champion_metric(task: str, configured: str) -> tuple[str, bool]:
    """(metric key, higher is better) for the task; `auto` picks accuracy or MSE.

    Keys are `test/<metric>` or, per class, `test/<metric>/<class>`: the metric is the part
    after `test/` (a class may be named anything, `mse` included)."""
    name = configured if configured != "auto" else ("test/accuracy" if task == "classification" else "test/mse")
    parts = name.split("/")
    metric = parts[1] if len(parts) > 1 else parts[0]
    return name, any(metric.startswith(h) for h in HIGHER_IS_BETTER)


@dataclass
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    new_value: float
    champion_version: str = ""
    champion_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def current_champion(tracking_uri: str, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def decide(
    tracking_uri: str, model_name: str, version: str, run_id: str, metric: str, higher: bool, new_value: float, data_key: str
) -> Decision:
    client = _client(tracking_uri)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    champ = current_champion(tracking_uri, model_name)
    decision = Decision(model_name, str(version), False, "", metric, float(new_value))
    if champ is None:
        decision.promoted, decision.reason = True, "no champion yet"
    else:
        champ_run = client.get_run(champ.run_id)
        decision.champion_version = str(champ.version)
        decision.champion_value = champ_run.data.metrics.get(metric)
        champ_key = champ_run.data.tags.get("data.key", "")
        if champ_key != data_key:
            decision.reason = (
                f"champion v{champ.version} was measured on another dataset (other data or data config: target, "
                f"features, split; key {champ_key[:12] or 'unknown'} vs {data_key[:12]}); not compared, promote by hand if wanted"
            )
        elif decision.champion_value is None:
            decision.reason = f"champion v{champ.version} has no {metric}; not compared"
        else:
            better = new_value > decision.champion_value if higher else new_value < decision.champion_value
            decision.promoted = better
            op = ">" if higher else "<"
            decision.reason = (
                f"{metric} {new_value:.6g} {op} champion v{champ.version}'s {decision.champion_value:.6g}"
                if better
                else f"{metric} {new_value:.6g} does not beat champion v{champ.version}'s {decision.champion_value:.6g}"
            )
    if decision.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    tags = {
        "champion.decision": "promoted" if decision.promoted else "kept",
        "champion.reason": decision.reason,
        "champion.metric": metric,
        "registry.model": model_name,
        "registry.version": str(version),
    }
    if decision.champion_version:
        tags["champion.previous_version"] = decision.champion_version
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_metric(run_id, "champion/new_value", float(new_value))
    if decision.champion_value is not None:
        client.log_metric(run_id, "champion/previous_value", float(decision.champion_value))
    return decision


def promote(tracking_uri: str, model_name: str, version: str) -> None:
    client = _client(tracking_uri)
    client.get_model_version(model_name, str(version))  # a clear MLflow error when it does not exist
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
