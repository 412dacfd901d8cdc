"""`trainyard sweep`: the config as `trainyard train` takes it, a search space file, and the sweep's
options; runs the sweep flow once and prints its summary.

    trainyard sweep --preset csv --set data.path=my.csv --set data.target=label \\
        --space space.yaml --trials 30 --parallel 2

space.yaml maps config keys to ranges or choices:

    optim.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    train.batch_size: {type: int, low: 32, high: 256, log: true}
    model.hidden: {type: categorical, choices: [[64], [128, 128]]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from pydantic import ValidationError

from pipelines.config import TrainConfig, _format_validation_error, read_yaml
from pipelines.summaries import _print_rows
from tasks.errors import ConfigError
from tasks.sweep_config import SweepConfig

FIELDS = SweepConfig.model_fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `trainyard sweep` besides --preset/--config/--set."""
    parser.add_argument("--space", required=True, metavar="FILE", help="YAML file: config key -> range or choices")
    parser.add_argument("--trials", type=int, default=FIELDS["trials"].default, help="trials the study should hold")
    parser.add_argument("--parallel", type=int, default=FIELDS["parallel"].default, help="trials trained at once")
    parser.add_argument("--name", default="", help="the sweep (study) name; default: derived from config and space")
    parser.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="Optuna sampler")
    parser.add_argument("--pruner", choices=["median", "none"], default="median", help="Optuna pruner")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    storage_help = "Optuna storage URL (default: $TRAINYARD_SWEEP_STORAGE, else <state>/optuna.db)"
    parser.add_argument("--storage", default="", help=storage_help)
    deployment_help = "train each trial as a run of this deployment (e.g. trainyard-train-step/gpu)"
    parser.add_argument("--train-deployment", default="", help=deployment_help)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The sweep's settings from the command line; a bad one is a ConfigError naming it."""
    names = ("name", "trials", "parallel", "sampler", "pruner", "seed", "storage", "train_deployment")
    values = {k: getattr(args, k) for k in names}
    try:
        space = read_yaml(args.space, "--space file", "a mapping of config keys to ranges or choices")
        return SweepConfig(space=space, **values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, f"--space {args.space} and the sweep options")) from None


def print_sweep(summary: dict, out=None) -> None:
    rows = [("sweep", summary["sweep"]), ("parent run", summary["parent_run_id"]), ("trials", str(summary["trials"]))]
    rows += [("best trial", f"{summary['best_trial']} (run {summary['best_run_id']})")]
    rows += [("best value", f"{summary['best_value']:.4f}")]
    rows += [(f"best {k}", json.dumps(v)) for k, v in summary["best_params"].items()]
    if summary.get("champion"):
        gate = summary["champion"]
        outcome = "promoted to champion" if gate["promoted"] else "stays challenger"
        rows.append(("champion gate", f"{gate['model_name']} v{gate['version']} {outcome} ({gate['reason']})"))
    _print_rows(rows, out or sys.stdout)


def command(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Run the sweep flow once; a bad space or option is one line and status 2, a failure one line and 1."""
    from pipelines import startup

    try:
        sweep = sweep_config(args)
        with startup.flow_ready(cfg), contextlib.redirect_stdout(sys.stderr):
            from pipelines.sweep import sweep_flow

            summary = sweep_flow(cfg, sweep)
    except ConfigError as exc:
        print(f"trainyard sweep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainyard sweep: stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"trainyard sweep: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print_sweep(summary)
    return 0
