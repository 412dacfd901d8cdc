"""Batch scoring: a table scored with the registered model trained here once, chunk by chunk, from a local file
or S3 into CSV or Parquet; every bad input one line naming the input, with no output and no temporary file
left. The prediction run and the command: tests/test_predict_runs.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess

import boto3
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.predict import load_model, resolve_model
from tasks.errors import DataError, StorageError
from tasks.predict_config import PredictConfig
from tasks.scoring import score_table
from tasks.scoring_io import MIN_BLOCK
from tests.conftest import REPO, cli_env, separable_frame, train_argv
from tests.services import s3_endpoint

BUCKET = "trainyard-predict"
OUTPUTS = ["prediction", "probability_no", "probability_yes"]


def train_model(tmp_path_factory) -> tuple[str, object, str]:
    """One model trained by `trainyard train` on the toy table and registered as trainyard's champion:
    (tracking URI, Trainyard's python model as predict loads it, the training run id)."""
    home = tmp_path_factory.mktemp("trained")
    table = home / "toy.csv"
    with_days(separable_frame()).to_csv(table, index=False)
    argv = train_argv(f"data.path={table}", "data.target=label", "data.drop=[id]", "train.epochs=2", json=True)
    proc = subprocess.run(argv, env=cli_env(home, harness_api=True), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    model, run_id = load_model(uri, resolve_model(uri, "models:/trainyard@champion"))
    assert run_id == json.loads(proc.stdout)["mlflow_run_id"]
    return uri, model, run_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    return train_model(tmp_path_factory)


@pytest.fixture(scope="module")
def model(trained):
    return trained[1]


@pytest.fixture(scope="module")
def s3():
    """A client of the test S3 endpoint, with AWS_ENDPOINT_URL pointing at it meanwhile."""
    with s3_endpoint(BUCKET) as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint.url
        yield boto3.client("s3", endpoint_url=endpoint.url)


def with_days(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a date column, `day` (ISO dates through 2024), and a yes/no column, `member`."""
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(frame["id"] % 366, unit="D")
    return frame.assign(day=days.dt.strftime("%Y-%m-%d"), member=np.where(frame["id"] % 3 == 0, "yes", "no"))


def scoring_frame(n: int = 120, seed: int = 5) -> pd.DataFrame:
    """Rows to score: the training table's columns but the label; four rows with a missing value (rows 5 and 7
    of separable_frame, 10 and 90 here) and two with a colour the model never saw."""
    frame = with_days(separable_frame(n, seed).drop(columns="label"))
    frame.loc[[3, 70], "colour"] = "purple"
    frame.loc[10, "x2"] = np.nan
    frame.loc[90, "colour"] = None
    return frame


def write(frame: pd.DataFrame, path):
    (frame.to_parquet if str(path).endswith(".parquet") else frame.to_csv)(path, index=False)
    return path


def read(path) -> pd.DataFrame:
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)


def kind(path) -> str:
    return "Parquet file" if str(path).endswith(".parquet") else "CSV file"


def leftovers(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def score(model, tmp_path, source: str, output: str = "out.csv", **settings):
    cfg = PredictConfig(input=source, output=str(tmp_path / output), **settings)
    return score_table(model, cfg, tmp_path / "state")[0]


# ---- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("out_name", ["out.csv", "out.parquet"])
@pytest.mark.parametrize("in_name", ["in.csv", "in.parquet"])
def test_csv_and_parquet_in_and_out_give_the_models_predictions(model, tmp_path, in_name, out_name):
    frame = scoring_frame()
    source = write(frame, tmp_path / in_name)
    result = score(model, tmp_path, str(source), out_name, keep=["id"])
    got = read(tmp_path / out_name)
    expected, _ = model.score(frame)
    assert list(got.columns) == ["id", *OUTPUTS]
    assert got["id"].astype(int).tolist() == frame["id"].tolist()
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(got[OUTPUTS[1:]].to_numpy(), expected[OUTPUTS[1:]].to_numpy(), rtol=1e-6)
    assert result.rows == len(frame) and result.input_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("in_name", ["in.csv", "in.parquet"])
def test_small_chunks_give_the_same_predictions_and_counts_as_one_chunk(model, tmp_path, in_name):
    source = str(write(scoring_frame(), tmp_path / in_name))
    whole = score(model, tmp_path, source, "whole.parquet", keep=["id"])
    chunked = score(model, tmp_path, source, "chunked.parquet", keep=["id"], chunk_rows=7)
    pd.testing.assert_frame_equal(read(tmp_path / "chunked.parquet"), read(tmp_path / "whole.parquet"))
    assert (chunked.rows, chunked.rows_missing, chunked.rows_unseen) == (whole.rows, 4, 2)


def test_a_file_of_many_blocks_keeps_its_column_types_from_chunk_to_chunk(model, tmp_path):
    """Whole numbers for the first 30,000 rows (more than pyarrow's first block), then fractions and a gap: read
    with the model's types (not the first block's), every chunk scores as the whole table read by pandas does."""
    frame = scoring_frame(40_000, seed=9)
    frame["x1"] = frame["x1"].astype(object)
    frame.loc[:29_999, "x1"] = frame.loc[:29_999, "x1"].fillna(0).round().astype(int)
    frame.loc[35_000, "x1"] = np.nan
    source = write(frame, tmp_path / "big.csv")
    assert source.read_text().splitlines()[1].split(",")[0].lstrip("-").isdigit()
    assert source.stat().st_size > MIN_BLOCK  # more than one of pyarrow's blocks
    result = score(model, tmp_path, str(source), "big.parquet", keep=["id"], chunk_rows=4096)
    expected, report = model.score(pd.read_csv(source))
    got = read(tmp_path / "big.parquet")
    assert got["prediction"].tolist() == expected["prediction"].tolist() and result.rows == 40_000
    np.testing.assert_allclose(got[OUTPUTS[1:]].to_numpy(), expected[OUTPUTS[1:]].to_numpy(), rtol=1e-6)
    assert (result.rows_missing, result.rows_unseen) == (report["rows_missing"], report["rows_unseen"])


def test_missing_values_and_unseen_categories_are_counted_over_the_chunks(model, tmp_path):
    result = score(model, tmp_path, str(write(scoring_frame(), tmp_path / "in.csv")), chunk_rows=25)
    assert (result.rows, result.rows_missing, result.rows_unseen) == (120, 4, 2)
    assert result.missing == {"x1": 1, "x2": 1, "colour": 2} and result.unseen == {"colour": 2}


def test_extra_input_columns_are_ignored_and_named_once(model, tmp_path, caplog):
    frame = scoring_frame().assign(note="x", label="yes")
    with caplog.at_level(logging.INFO, logger="trainyard.predict"):
        score(model, tmp_path, str(write(frame, tmp_path / "in.csv")), chunk_rows=10)
    named = [r.getMessage() for r in caplog.records if "not used by the model" in r.getMessage()]
    assert len(named) == 1 and "note" in named[0] and "label" in named[0] and "x1" not in named[0]


# ---- bad input: one line naming the input, nothing left at the output -------------------------


def refused(model, tmp_path, source, error=DataError, **settings) -> str:
    """The refusal's message; no output and no temporary file were left."""
    with pytest.raises(error) as err:
        score(model, tmp_path, str(source), **settings)
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_missing_feature_column_is_named_with_the_expected_ones(model, tmp_path):
    source = write(scoring_frame().drop(columns="x2"), tmp_path / "in.csv")
    message = refused(model, tmp_path, source)
    assert str(source) in message and "'x2'" in message and "'x1', 'x2', 'colour'" in message


def test_a_kept_column_absent_from_the_input_is_refused(model, tmp_path):
    source = write(scoring_frame(), tmp_path / "in.parquet")
    message = refused(model, tmp_path, source, keep=["customer"])
    assert str(source) in message and "'customer'" in message


@pytest.mark.parametrize("column,value", [("x1", "abc"), ("day", "someday")])
@pytest.mark.parametrize("in_name", ["in.csv", "in.parquet"])
def test_a_value_of_the_wrong_type_names_its_column_and_data_row(model, tmp_path, in_name, column, value):
    frame = scoring_frame().astype({column: str})
    frame.loc[99, column] = value
    source = write(frame, tmp_path / in_name)
    message = refused(model, tmp_path, source, chunk_rows=30)
    at = "row 100 (line 101)" if in_name.endswith(".csv") else "row 100"
    assert message.startswith(f"{kind(source)} {source}: column {column!r}, {at}: ") and repr(value) in message


@pytest.mark.parametrize("in_name", ["in.csv", "in.parquet"])
def test_a_value_the_models_encoding_refuses_names_its_row_in_the_file(model, tmp_path, in_name):
    """`member` is read as text and its yes/no decoded by the model: its refusal's row, counted in the chunk
    scored, is counted in the file."""
    frame = scoring_frame()
    frame.loc[99, "member"] = "maybe"
    source = write(frame, tmp_path / in_name)
    message = refused(model, tmp_path, source, chunk_rows=30)
    at = "row 100 (line 101)" if in_name.endswith(".csv") else "row 100"
    assert message.startswith(f"{kind(source)} {source}: column 'member', {at}: ")
    assert "'maybe'" in message and "yes/no" in message and "row 10" not in message.replace("row 100", "")


def test_a_parquet_column_of_another_kind_is_refused_by_name(model, tmp_path):
    source = write(scoring_frame().assign(x2=lambda f: f["x2"] > 0), tmp_path / "in.parquet")
    message = refused(model, tmp_path, source)
    assert str(source) in message and "'x2' has type bool" in message and "a number" in message


def test_an_input_without_data_rows_is_refused(model, tmp_path):
    (tmp_path / "header.csv").write_text("x1,x2,colour,id,day,member\n")
    assert "no data rows" in refused(model, tmp_path, tmp_path / "header.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "empty (0 bytes)" in refused(model, tmp_path, tmp_path / "empty.csv")
    no_rows = write(scoring_frame().iloc[:0], tmp_path / "none.parquet")
    assert str(no_rows) in refused(model, tmp_path, no_rows)


def test_an_output_that_cannot_be_written_is_refused_before_scoring(model, tmp_path):
    source = str(write(scoring_frame(), tmp_path / "in.csv"))
    with pytest.raises(StorageError, match="does not exist"):
        score(model, tmp_path, source, "no/such/folder/out.csv")
    (tmp_path / "taken.csv").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        score(model, tmp_path, source, "taken.csv")
    assert leftovers(tmp_path) == [] and not (tmp_path / "no").exists()


def test_an_output_naming_the_input_is_refused(model, tmp_path):
    source = write(scoring_frame(), tmp_path / "in.csv")
    before = source.read_bytes()
    with pytest.raises(ValidationError, match="is the input"):
        PredictConfig(input=str(source), output=str(source))
    cfg = PredictConfig(input=source.as_uri(), output=str(source))
    with pytest.raises(DataError, match="is the input"):
        score_table(model, cfg, tmp_path / "state")
    assert source.read_bytes() == before


# ---- S3 -----------------------------------------------------------------------------------------


def test_s3_input_to_s3_output_appears_whole(model, s3, tmp_path):
    body = scoring_frame().to_csv(index=False).encode()
    s3.put_object(Bucket=BUCKET, Key="in/score.csv", Body=body)
    cfg = PredictConfig(input=f"s3://{BUCKET}/in/score.csv", output=f"s3://{BUCKET}/out/pred.parquet", keep=["id"])
    result, _ = score_table(model, cfg, tmp_path / "state")
    assert result.input_sha256 == hashlib.sha256(body).hexdigest() and result.output == cfg.output
    local = write(scoring_frame(), tmp_path / "in.csv")
    score(model, tmp_path, str(local), "local.parquet", keep=["id"])
    s3.download_file(BUCKET, "out/pred.parquet", str(tmp_path / "back.parquet"))
    pd.testing.assert_frame_equal(read(tmp_path / "back.parquet"), read(tmp_path / "local.parquet"))


def test_s3_bad_input_leaves_no_object_and_a_missing_bucket_is_named(model, s3, tmp_path):
    frame = scoring_frame().astype({"x2": str})
    frame.loc[50, "x2"] = "n/a?"
    s3.put_object(Bucket=BUCKET, Key="in/bad.csv", Body=frame.to_csv(index=False).encode())
    cfg = PredictConfig(input=f"s3://{BUCKET}/in/bad.csv", output=f"s3://{BUCKET}/out/bad.csv", chunk_rows=16)
    with pytest.raises(DataError) as err:
        score_table(model, cfg, tmp_path / "state")
    assert str(err.value).startswith(f"CSV file s3://{BUCKET}/in/bad.csv: column 'x2', row 51")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/bad")
    local = str(write(scoring_frame(), tmp_path / "in.csv"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        score_table(model, PredictConfig(input=local, output="s3://no-such-bucket/p.csv"), tmp_path / "state")


# ---- HTTP ---------------------------------------------------------------------------------------


def test_an_http_input_is_downloaded_once_and_scored_as_the_local_file(model, tmp_path):
    """A table on a web server (http.server on 127.0.0.1) goes through the training data's source cache."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "www"
    folder.mkdir()
    frame = scoring_frame()
    write(frame, folder / "score.csv")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/score.csv"
        result = score(model, tmp_path, url, "web.parquet", keep=["id"])
        local = score(model, tmp_path, str(folder / "score.csv"), "local.parquet", keep=["id"])
        with pytest.raises(DataError, match="404"):
            score(model, tmp_path, url.replace("score.csv", "absent.csv"), "none.parquet")
    finally:
        server.shutdown()
        server.server_close()
    pd.testing.assert_frame_equal(read(tmp_path / "web.parquet"), read(tmp_path / "local.parquet"))
    assert result.rows == local.rows == len(frame) and result.input_sha256 == local.input_sha256
    assert list((tmp_path / "state" / "sources").iterdir())  # the copy in the source cache
    assert not (tmp_path / "none.parquet").exists() and leftovers(tmp_path) == []
