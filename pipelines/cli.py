"""`trainyard` command line: parse -> build the config -> run the flow -> print the summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

import yaml  # light, and pipelines.config reads YAML anyway

from pipelines.config import PRESETS, ConfigError, TrainConfig, load_config, resolve_tracking_uri
from pipelines.summaries import print_predict_table, print_table
from tasks.errors import TrainyardError

TRACKING_URI_HELP = "default: MLFLOW_TRACKING_URI, else the state folder's SQLite file"
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def _parser() -> argparse.ArgumentParser:
    """The command line: train, predict, runs, champion, promote, deploy, config, trainjob, sweep."""
    parser = argparse.ArgumentParser(prog="trainyard", description="Batch training pipelines for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    _train_arguments(sub.add_parser("train", help="run the training flow once", formatter_class=fmt))
    predict_help = "score a table with a registered model into a CSV or Parquet file"
    _predict_arguments(sub.add_parser("predict", help=predict_help, formatter_class=fmt))
    runs = sub.add_parser(
        "runs", help="table of the latest runs of an experiment, champion marked", formatter_class=fmt
    )
    runs.add_argument("--experiment", default="trainyard", help="MLflow experiment")
    runs.add_argument("-n", "--limit", type=_positive_int, default=10, help="how many runs")
    runs.add_argument("--tracking-uri", default="", help=TRACKING_URI_HELP)
    runs.add_argument("--sweep", default="", help="list this sweep's trials, best first")
    champ = sub.add_parser("champion", help="show the registered model's champion", formatter_class=fmt)
    champ.add_argument("--model", default="trainyard", help="registered model name")
    champ.add_argument("--tracking-uri", default="", help=TRACKING_URI_HELP)
    promote = sub.add_parser("promote", help="make a model version the champion by hand", formatter_class=fmt)
    promote.add_argument("version", help="model version to promote")
    promote.add_argument("--model", default="trainyard", help="registered model name")
    promote.add_argument("--tracking-uri", default="", help=TRACKING_URI_HELP)
    dep_help = "register the deployments and work pools with the Prefect server"
    _deploy_arguments(sub.add_parser("deploy", help=dep_help, formatter_class=fmt))
    show = sub.add_parser("config", help="print a preset or file's resolved config as YAML", formatter_class=fmt)
    _config_arguments(show)
    for name, (module, help_text) in _config_commands().items():  # a config, and options of their own
        command = sub.add_parser(name, help=help_text, formatter_class=fmt)
        _config_arguments(command)
        module.add_arguments(command)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --config and --set: the config of `train`, `config`, `trainjob` and `sweep`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named preset to start from")
    config_help = "YAML file with config sections (applied after the preset)"
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value, e.g. --set train.epochs=3 (repeatable)",
    )


def _config_commands() -> dict:
    """`trainyard trainjob` and `trainyard sweep`: a config (--preset/--config/--set) and their own options."""
    from pipelines import sweep_cli, trainjob

    job = "print the Kubeflow Trainer TrainJob of a run's training on several nodes, for kubectl apply -f"
    return {"trainjob": (trainjob, job), "sweep": (sweep_cli, "search the config space with Optuna trials")}


def _train_arguments(train: argparse.ArgumentParser) -> None:
    """The options of `trainyard train`."""
    _config_arguments(train)
    train.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    train.add_argument("--force", action="store_true", help="train even when nothing changed since the champion")
    resume_help = "continue this MLflow run from its last checkpoint"
    train.add_argument("--resume", default="", metavar="RUN_ID", help=resume_help)
    train.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")


def _predict_arguments(pred: argparse.ArgumentParser) -> None:
    """The options of `trainyard predict` (their defaults: PredictConfig's)."""
    from tasks.predict_config import PredictConfig

    fields = PredictConfig.model_fields
    pred.add_argument("--model", default=fields["model"].default, help="MLflow model URI (or a local model folder)")
    pred.add_argument("--input", required=True, help="table to score: a local path, s3://, gs://, az://, http(s)://")
    pred.add_argument("--output", required=True, help="where the predictions go: a local path or s3://bucket/key")
    pred.add_argument("--keep", nargs="+", action="extend", default=[], metavar="COL", help="input columns to copy")
    pred.add_argument("--chunk-rows", type=_positive_int, default=fields["chunk_rows"].default, help="rows per chunk")
    formats = ("auto", "csv", "parquet")
    pred.add_argument("--format", choices=formats, default="auto", help="the input's format (auto: by name, content)")
    pred.add_argument("--output-format", choices=formats, default="auto", help="the output's format (auto: by name)")
    pred.add_argument("--delimiter", default="auto", help="the input CSV's delimiter (auto: sniffed; tab for a tab)")
    pred.add_argument("--encoding", default="utf-8", help="the input CSV's text encoding")
    pred.add_argument("--tracking-uri", default="", help=TRACKING_URI_HELP)
    pred.add_argument("--experiment", default=fields["experiment"].default, help="MLflow experiment of the run")
    pred.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def _deploy_arguments(dep: argparse.ArgumentParser) -> None:
    """The options of `trainyard deploy`."""
    dep.add_argument(
        "--work-dir", default=".", help="folder holding this repository on the workers (/app in the images)"
    )
    slots_help = "flow runs the gpu pool runs at once (one per GPU)"
    dep.add_argument("--gpu-slots", type=_positive_int, default=1, help=slots_help)
    image_help = "container image of the flow runs (required by Kubernetes and Docker pools)"
    dep.add_argument("--image", default="", help=image_help)
    # The defaults of these three come from the environment: their help says so (SUPPRESS: no "(default: )").
    csv_help = "data.path of the csv-retrain deployment (default: $TRAINYARD_RETRAIN_CSV, else s3://trainyard/data/retrain.csv)"
    dep.add_argument("--csv-path", default=argparse.SUPPRESS, help=csv_help)
    dep.add_argument("--csv-target", default="label", help="data.target of the csv-retrain deployment")
    dep.add_argument("--timezone", default="Europe/Berlin", help="timezone of the cron schedules")
    input_help = (
        "table the batch-predict deployment scores (default: $TRAINYARD_PREDICT_INPUT, "
        "else s3://trainyard/data/score.csv)"
    )
    dep.add_argument("--predict-input", default=argparse.SUPPRESS, help=input_help)
    output_help = (
        "where batch-predict writes its predictions "
        "(default: $TRAINYARD_PREDICT_OUTPUT, else s3://trainyard/predictions/score.parquet)"
    )
    dep.add_argument("--predict-output", default=argparse.SUPPRESS, help=output_help)


def _predict_config(args):
    """The PredictConfig the arguments give; a refusal as one line (ConfigError)."""
    from pydantic import ValidationError

    from tasks.predict_config import PredictConfig

    values = {k: getattr(args, k) for k in ("model", "input", "output", "keep", "chunk_rows", "tracking_uri")}
    values |= {k: getattr(args, k) for k in ("experiment", "format", "output_format", "delimiter", "encoding")}
    try:
        return PredictConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def _predict_command(args) -> int:
    """Score the table and print the summary; an error ends in one line on stderr."""
    try:
        cfg = _predict_config(args)
    except ConfigError as exc:
        print(f"trainyard predict: {exc}", file=sys.stderr)
        return 2
    from pipelines.predict import predict
    from tasks import tracking

    tracking.configure_mlflow_client()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the summary
            summary = predict(cfg)
    except KeyboardInterrupt:  # the prediction run is marked KILLED, no output is left
        print("trainyard predict: stopped by Ctrl-C (SIGINT); no output written", file=sys.stderr)
        return INTERRUPTED
    except TrainyardError as exc:
        print(f"trainyard predict: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else, still one line
        print(f"trainyard predict: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary, args.json, print_predict_table)
    return 0


def _print_summary(summary: dict[str, Any], as_json: bool, table) -> None:
    """A command's summary on stdout: one JSON object (--json), or `table`'s aligned text."""
    if as_json:
        json.dump(summary, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        table(summary)


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _registry_command(args) -> int:
    """`trainyard runs`, `champion` and `promote`: read (or alias) in MLflow, never create a database."""
    from pipelines import inspect_runs as ir
    from tasks import tracking

    uri = resolve_tracking_uri(args.tracking_uri)
    tracking.configure_mlflow_client()  # an unreachable server fails in seconds, not after MLflow's minutes of retries
    db = tracking.sqlite_path(uri)
    if db and not os.path.isfile(db):  # reading must not create an empty tracking database
        print(
            f"trainyard {args.command}: no tracking database at {db} (no run has been tracked there yet)",
            file=sys.stderr,
        )
        return 1
    try:
        if args.command == "runs":
            print(ir.format_table(ir.latest_runs(uri, args.experiment, args.limit, args.sweep)))
        elif args.command == "champion":
            info = ir.describe_champion(uri, args.model)
            print(json.dumps(info, indent=2) if info else f"{args.model}: no champion yet")
        else:
            from tasks import champion

            champion.promote(uri, args.model, args.version)
            print(f"{args.model} v{args.version} is now the champion")
    except Exception as exc:
        print(f"trainyard {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _actionable_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix (the data, the config, a model, a service to start):
    every `TrainyardError`."""
    return (TrainyardError,)


class ConsoleFormatter(logging.Formatter):
    """The console's format: a record of an error the user can act on keeps its message and
    loses the traceback Prefect logs with it (dozens of lines of engine frames); the run's log in
    the Prefect UI, written by Prefect's own handler, keeps the traceback."""

    def __init__(self, fmt: str, actionable: tuple[type[BaseException], ...]):
        super().__init__(fmt)
        self.actionable = actionable

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.actionable):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def _deploy_command(args) -> int:
    """Register pools and deployments with the server in PREFECT_API_URL; there must be one (an
    embedded server would take them to its grave)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if not api:
        print(
            "trainyard deploy: PREFECT_API_URL is not set; point it at the Prefect server the workers use "
            "(e.g. http://prefect:4200/api)",
            file=sys.stderr,
        )
        return 2
    from pipelines.deployments import deploy

    try:
        ids = deploy(
            args.work_dir,
            args.gpu_slots,
            image=args.image,
            csv_path=getattr(args, "csv_path", ""),
            csv_target=args.csv_target,
            timezone=args.timezone,
            predict_input=getattr(args, "predict_input", ""),
            predict_output=getattr(args, "predict_output", ""),
        )
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.TransportError):
            why = f"the Prefect server at {api} is unreachable ({type(exc).__name__}: {exc})"
        else:
            why = f"{type(exc).__name__}: {exc}"
        print(f"trainyard deploy: {why}", file=sys.stderr)
        return 1
    for name, deployment_id in ids.items():
        print(f"{name}  {deployment_id}")
    return 0


def configure_logging() -> None:
    """Our INFO lines on stderr (stdout stays clean for --json); other libraries at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", _actionable_errors()))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("trainyard").setLevel(logging.INFO)


def _load(args) -> TrainConfig:
    """The config the arguments name: a preset and/or a file, then the overrides."""
    if not args.preset and not args.config:
        raise ConfigError("give --preset NAME or --config FILE (presets: " + ", ".join(sorted(PRESETS)) + ")")
    return load_config(args.preset, args.config, args.overrides)


def _train_command(args, cfg: TrainConfig) -> int:
    """Run the flow once and print its summary; an error ends in one line on stderr."""
    from pipelines import startup

    try:
        # Libraries print progress notes (model registration, downloads) on stdout; keep it for the summary.
        with startup.flow_ready(cfg) as train_flow, contextlib.redirect_stdout(sys.stderr):
            summary = train_flow(cfg, force=args.force, resume=args.resume)
    except KeyboardInterrupt:  # the flow has marked the MLflow run KILLED
        print("trainyard: training stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # a TrainyardError says what to fix; the log above has any other's traceback
        print(f"trainyard: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if summary.get("skipped"):
        print(json.dumps(summary) if args.json else f"skipped: nothing changed ({summary['reason']})")
    else:
        _print_summary(summary, args.json, print_table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; the exit status."""
    args = _parser().parse_args(argv)
    configure_logging()
    if args.command in ("runs", "champion", "promote"):
        return _registry_command(args)
    if args.command == "deploy":
        return _deploy_command(args)
    if args.command == "predict":
        return _predict_command(args)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"trainyard: {exc}", file=sys.stderr)
        return 2
    if args.command in _config_commands():
        return _config_commands()[args.command][0].command(args, cfg)
    if args.command == "config" or args.dry_run:
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
        return 0
    return _train_command(args, cfg)


def run() -> None:
    """The `trainyard` command: main(), then exit with its status."""
    from pipelines import startup

    code = main()
    startup.before_exit()
    sys.exit(code)


if __name__ == "__main__":
    run()
