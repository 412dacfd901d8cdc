"""A sweep's search space against the config: every point checked before any trial runs, a point
applied to the base config, and Optuna's suggestions for a trial.

Optuna's categorical choices must be plain scalars, so every choice travels as its JSON text (a
hidden-layer list such as [128, 128] is one choice) and is decoded when applied.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from pipelines.config import TrainConfig, _format_validation_error
from tasks.errors import ConfigError
from tasks.sweep_config import ParamSpec, SweepConfig


def with_params(cfg: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The base config with each `section.key` of `params` set; refused in one line naming the key."""
    data = cfg.model_dump()
    for key, value in params.items():
        node: Any = data
        *path, last = key.split(".")
        for part in path:
            if not isinstance(node, dict) or not isinstance(node.get(part), dict):
                raise ConfigError(f"sweep space key {key!r}: {part!r} is not a config section; expected section.key")
            node = node[part]
        node[last] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        point = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(_format_validation_error(exc, f"sweep point {point}")) from None


def _points(spec: ParamSpec) -> list[Any]:
    """The values of one parameter that stand for all of it: both ends of a range, every choice."""
    if spec.type == "categorical":
        return list(spec.choices or [])
    ends = [spec.low, spec.high]
    return [int(v) for v in ends] if spec.type == "int" else ends


def check_space(cfg: TrainConfig, sweep: SweepConfig) -> None:
    """Refuse, before any trial, a space whose key is not a config key or whose range end or choice the
    key does not accept (one key at a time, the others at the base config's values)."""
    if not sweep.space:
        raise ConfigError("the sweep's search space is empty: name at least one config key (e.g. optim.lr)")
    for key, spec in sweep.space.items():
        for value in _points(spec):
            with_params(cfg, {key: value})
    if not cfg.train.distributed.single:
        raise ConfigError(
            "a sweep trains its trials in one process each: set train.distributed.nproc_per_node=1 and nodes=1"
        )


def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The trial's point: Optuna's suggestion for every key of the space."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if spec.type == "categorical":
            params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in spec.choices or []]))
        elif spec.type == "int":
            step = int(spec.step or 1)
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=step, log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


def decoded(params: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Any]:
    """A finished trial's params as config values (its categorical choices back from their JSON text)."""
    out = {}
    for key, value in params.items():
        spec = space.get(key)
        out[key] = json.loads(value) if spec is not None and spec.type == "categorical" else value
    return out


def grid(space: dict[str, ParamSpec]) -> dict[str, list[str]]:
    """Optuna's GridSampler search space: every categorical key's choices, as the trials suggest them."""
    return {key: [json.dumps(c) for c in spec.choices or []] for key, spec in space.items()}
