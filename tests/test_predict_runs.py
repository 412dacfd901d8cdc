"""`trainyard predict`: the prediction run recorded (tags, metrics, FINISHED, FAILED or KILLED) and kept out of
`trainyard runs` and the resume search; a model that does not resolve or scores images refused in one line;
the command's summary, its exit statuses and its light imports."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipelines import inspect_runs
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.predict import predict
from pipelines.resume import find_resumable
from tasks import keys, tracking
from tasks.errors import ConfigError
from tasks.predict_config import PredictConfig
from tests.conftest import REPO, cli_env, train_argv, write_mnist
from tests.test_predict import OUTPUTS, leftovers, read, scoring_frame, train_model, write
from tests.test_startup import loaded_by


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    return train_model(tmp_path_factory)


def test_predict_records_a_prediction_run_left_out_of_the_training_runs(trained, tmp_path, capsys):
    uri, _, train_run = trained
    source = write(scoring_frame(), tmp_path / "in.csv")
    summary = predict(PredictConfig(input=str(source), output=str(tmp_path / "p.csv"), tracking_uri=uri))
    assert (summary["model"], summary["version"], summary["model_run_id"]) == ("trainyard", "1", train_run)
    assert (summary["rows"], summary["rows_missing"], summary["rows_unseen"]) == (120, 4, 2)
    run = MlflowClient(uri).get_run(summary["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == keys.FINISHED and tags[keys.RUN_KIND] == keys.PREDICTION
    assert tags[keys.PREDICT_MODEL_RUN_ID] == train_run and tags[keys.PREDICT_MODEL_VERSION] == "1"
    assert tags[keys.PREDICT_INPUT] == str(source) and tags[keys.PREDICT_OUTPUT] == str(tmp_path / "p.csv")
    assert tags[keys.PREDICT_INPUT_SHA256] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert tags[keys.PREDICT_MODEL_URI] == "models:/trainyard@champion"
    counted = [metrics[k] for k in (keys.PREDICT_ROWS, keys.PREDICT_ROWS_MISSING, keys.PREDICT_ROWS_UNSEEN)]
    assert counted == [120, 4, 2]
    rows = inspect_runs.latest_runs(uri, "trainyard", 10)
    assert [r["run_id"] for r in rows] == [train_run]
    assert main(["runs", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert train_run[:12] in table and summary["run_id"][:12] not in table


def test_resume_never_continues_a_prediction_run(trained):
    uri, _, _ = trained
    run_id = tracking.start_run(uri, "trainyard", "nightly", {keys.RUN_KIND: keys.PREDICTION})
    tracking.end_run(uri, run_id, keys.FAILED)
    cfg = load_config("csv", None, ["data.path=x.csv", "data.target=label", "tracking.run_name=nightly"])
    assert find_resumable(cfg, uri) == ""
    with pytest.raises(ConfigError, match="prediction run"):
        find_resumable(cfg, uri, resume=run_id)


def test_an_alias_or_name_that_does_not_resolve_lists_what_exists(trained, tmp_path, capsys):
    uri, _, _ = trained
    source = str(write(scoring_frame(), tmp_path / "in.csv"))
    out = tmp_path / "p.csv"
    base = ["predict", "--input", source, "--output", str(out), "--tracking-uri", uri]
    assert main([*base, "--model", "models:/trainyard@staging"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainyard predict: model models:/trainyard@staging:") and "\n" not in err
    assert "no alias 'staging'; its aliases: challenger (v1), champion (v1)" in err
    assert main([*base, "--model", "models:/nobody@champion"]) == 1
    err = capsys.readouterr().err.strip()
    assert "'nobody'" in err and "registered models: trainyard" in err and "\n" not in err
    assert not out.exists()


def test_the_command_prints_json_and_keeps_columns(trained, tmp_path, capsys):
    uri, _, train_run = trained
    source = str(write(scoring_frame(), tmp_path / "in.parquet"))
    out = tmp_path / "p.csv"
    argv = ["predict", "--input", source, "--output", str(out), "--keep", "id", "--chunk-rows", "50"]
    assert main([*argv, "--tracking-uri", uri, "--experiment", "scoring", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out) and summary["rows"] == 120 and summary["model_run_id"] == train_run
    assert list(read(out).columns) == ["id", *OUTPUTS]
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "scoring"


def test_a_failed_prediction_is_one_line_with_the_run_failed_and_no_output(trained, tmp_path, capsys):
    uri, _, _ = trained
    frame = scoring_frame().astype({"x1": str})
    frame.loc[7, "x1"] = "seven"
    source = str(write(frame, tmp_path / "in.csv"))
    out = tmp_path / "p.parquet"
    argv = ["predict", "--input", source, "--output", str(out), "--tracking-uri", uri, "--experiment", "failing"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trainyard predict: CSV file {source}: column 'x1', row 8"), err
    assert not out.exists() and leftovers(tmp_path) == []
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("failing").experiment_id])
    assert run.info.status == keys.FAILED


def test_ctrl_c_marks_the_run_killed_and_leaves_no_output(trained, tmp_path, capsys, monkeypatch):
    import tasks.scoring as scoring

    uri, _, _ = trained
    real, calls = scoring._output_table, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scoring, "_output_table", interrupted)
    source = str(write(scoring_frame(), tmp_path / "in.csv"))
    out = tmp_path / "p.csv"
    argv = ["predict", "--input", source, "--output", str(out), "--tracking-uri", uri, "--experiment", "stopped"]
    assert main([*argv, "--chunk-rows", "10"]) == 130
    assert "Ctrl-C" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("stopped").experiment_id])
    assert run.info.status == keys.KILLED


def test_an_image_model_is_refused_in_one_line_before_any_run(tmp_path, capsys, prefect_harness):
    home = tmp_path / "digits"
    root = write_mnist(tmp_path / "mnist", n_train=200, n_test=50)
    settings = (f"data.root={root}", "train.epochs=1", "model.channels=[4, 8]", "model.hidden=[16]")
    argv = train_argv(*settings, "tracking.experiment=digits", preset="mnist")
    proc = subprocess.run(argv, env=cli_env(home, harness_api=True), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    source = str(write(scoring_frame(), tmp_path / "in.csv"))
    argv = ["predict", "--model", "models:/digits@champion", "--input", source, "--output", str(tmp_path / "p.csv")]
    assert main([*argv, "--tracking-uri", uri, "--experiment", "digits"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainyard predict: model models:/digits@champion scores images, not tables;"), err
    assert "\n" not in err
    assert not (tmp_path / "p.csv").exists()
    exp = MlflowClient(uri).get_experiment_by_name("digits")
    assert not [r for r in MlflowClient(uri).search_runs([exp.experiment_id]) if keys.is_prediction_run(r.data.tags)]


def test_bad_arguments_exit_2_in_one_line(capsys):
    assert main(["predict", "--input", "s3://bucket-only", "--output", "p.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainyard predict: input:") and "s3://<bucket>/<name of the file>" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--input", "a.csv", "--output", "p.csv", "--chunk-rows", "0"])
    assert exit_.value.code == 2


def test_predict_help_imports_neither_torch_nor_prefect():
    code, loaded = loaded_by(["predict", "--help"])
    assert code == 0 and loaded == []
