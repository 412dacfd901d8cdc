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

from tasks import keys

CHAMPION, CHALLENGER = "champion", "challenger"


def champion_metric(task: str, configured: str) -> tuple[str, bool]:
    """(metric key, higher is better) for the task: `auto` is the task's default in the catalogue
    of test metrics (tasks/keys.py), which also says the direction (of a per-class key too)."""
    name = keys.DEFAULT_CHAMPION_METRIC[task] if configured == "auto" else configured
    return name, keys.higher_is_better(name)


@dataclass
class Decision:
    """The outcome of the champion gate for one new model version, and why."""

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
    """A client of both the tracking store and the registry at `tracking_uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def current_champion(tracking_uri: str, model_name: str):
    """The model version aliased `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def decide(
    tracking_uri: str,
    model_name: str,
    version: str,
    run_id: str,
    metric: str,
    higher: bool,
    new_value: float,
    data_key: str,
) -> Decision:
    """Mark the new version `challenger`, promote it when it wins, and record the decision on its run."""
    client = _client(tracking_uri)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    champ = current_champion(tracking_uri, model_name)
    decision = Decision(model_name, str(version), False, "", metric, float(new_value))
    if champ is None:
        decision.promoted, decision.reason = True, "no champion yet"
    else:
        _compare(decision, client.get_run(champ.run_id), str(champ.version), higher, data_key)
    if decision.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    _record(client, run_id, decision)
    return decision


def _compare(decision: Decision, champ_run, champ_version: str, higher: bool, data_key: str) -> None:
    """Fill in the comparison with the champion's run: only a run on the same prepared dataset competes."""
    metric, new_value = decision.metric, decision.new_value
    decision.champion_version = champ_version
    decision.champion_value = champ_run.data.metrics.get(metric)
    champ_key = champ_run.data.tags.get(keys.DATA_KEY, "")
    if champ_key != data_key:
        decision.reason = (
            f"champion v{champ_version} was measured on another dataset (other data or data config: target, "
            f"features, split; key {champ_key[:12] or 'unknown'} vs {data_key[:12]}); not compared, "
            "promote by hand if wanted"
        )
    elif decision.champion_value is None:
        decision.reason = f"champion v{champ_version} has no {metric}; not compared"
    else:
        old = decision.champion_value
        decision.promoted = new_value > old if higher else new_value < old
        op = ">" if higher else "<"
        decision.reason = (
            f"{metric} {new_value:.6g} {op} champion v{champ_version}'s {old:.6g}"
            if decision.promoted
            else f"{metric} {new_value:.6g} does not beat champion v{champ_version}'s {old:.6g}"
        )


def _record(client, run_id: str, decision: Decision) -> None:
    """The decision as tags and metrics of the new version's run."""
    tags = {
        keys.CHAMPION_DECISION: keys.PROMOTED if decision.promoted else keys.KEPT,
        keys.CHAMPION_REASON: decision.reason,
        keys.CHAMPION_METRIC: decision.metric,
        keys.REGISTRY_MODEL: decision.model_name,
        keys.REGISTRY_VERSION: decision.version,
    }
    if decision.champion_version:
        tags[keys.CHAMPION_PREVIOUS_VERSION] = decision.champion_version
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.log_metric(run_id, keys.CHAMPION_NEW_VALUE, decision.new_value)
    if decision.champion_value is not None:
        client.log_metric(run_id, keys.CHAMPION_PREVIOUS_VALUE, float(decision.champion_value))


def promote(tracking_uri: str, model_name: str, version: str) -> None:
    """Make `version` the champion by hand (`trainyard promote`)."""
    client = _client(tracking_uri)
    client.get_model_version(model_name, str(version))  # a clear MLflow error when it does not exist
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
