"""Batch scoring and serving: `trainyard predict` on a covtype-shaped CSV against pandas reading the same file, and
`mlflow models serve` latency of 1-row and 1,000-row requests.

A covtype-shaped CSV (581,012 x 55, `--rows`; see csv_ingest.py) is written; a csv-preset model is trained on its
first 20,000 rows for one epoch (the network's size depends on the columns only, so it is the full table's
architecture) and registered as champion. Then, each in a fresh child process with its imports done before the
clock starts:
- `pandas.read_csv(engine="pyarrow")` of the file (the baseline), after a read of the small file;
- `pipelines.predict.predict` of the file to Parquet, after one call on the small file (one-time allocations and
  lazy imports out of the figures): the seconds of its scoring (the file read in chunks,
  encoded, scored and written), their ratio to the baseline, and the scoring's peak RSS growth against one
  chunk's tensors (the float32 inputs of `chunk_rows` rows) and against the whole file's; and the seconds of the
  whole call, with the model's loading and the MLflow prediction run; and the peak again at half the chunk and on
  the table written twice over;
- `mlflow models serve` of the champion: the median and p99 latency of 1-row and 1,000-row dataframe_split
  requests on loopback.

Target: predict <= 1.5x read_csv on the CPU; its peak memory bounded by the chunk size, not the file's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import MEMORY_PROBES, emit, machine, note
from csv_ingest import TARGET, write_covtype_like

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})

{probes}
what, path, out, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if what == "read_csv":
    import pandas
    pandas.read_csv(sys.argv[5], engine="pyarrow")  # warmed up on the small file, as predict is
    reset_hwm(); before = rss(); t = time.perf_counter()
    frame = pandas.read_csv(path, engine="pyarrow")
    seconds = time.perf_counter() - t
    print(json.dumps({{"seconds": seconds, "peak": hwm() - before, "rows": len(frame)}}))
else:
    import mlflow.pyfunc, pandas, pyarrow, torch
    from pipelines import predict as run
    from tasks.predict_config import PredictConfig
    cfg = PredictConfig(model="models:/trainyard@champion", input=path, output=out, chunk_rows=chunk)
    timed = {{}}
    score_table = run.score_table

    def scoring(*args, **kwargs):  # the file's rows read, encoded, scored and written: what read_csv is set against
        reset_hwm(); timed["before"] = rss(); start = time.perf_counter()
        try:
            return score_table(*args, **kwargs)
        finally:
            timed["seconds"], timed["peak"] = time.perf_counter() - start, hwm() - timed["before"]

    run.score_table = scoring
    warm = cfg.model_copy(update={{"input": sys.argv[5], "output": out + ".warm.parquet"}})
    run.predict(warm)  # one-time costs (first allocations, lazy imports) out of the measured call
    t = time.perf_counter()
    summary = run.predict(cfg)  # with the model's loading and the MLflow prediction run
    total = time.perf_counter() - t
    print(json.dumps({{"seconds": timed["seconds"], "peak": timed["peak"], "total": total, "rows": summary["rows"]}}))
"""


def child(what: str, path: Path, out: Path, chunk: int, env: dict[str, str], warm: Path) -> dict:
    code = CHILD.format(repo=str(REPO), probes=MEMORY_PROBES)
    proc = subprocess.run(
        [sys.executable, "-c", code, what, str(path), str(out), str(chunk), str(warm)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_champion(folder: Path, big: Path, env: dict[str, str]) -> Path:
    """A csv-preset model on the table's first 20,000 rows, one epoch, registered as the champion; that file."""
    import pandas as pd

    small = folder / "train.csv"
    pd.read_csv(big, engine="pyarrow").head(20_000).to_csv(small, index=False)
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--preset", "csv", "--json"]
    for item in (f"data.path={small}", f"data.target={TARGET}", "train.epochs=1"):
        cmd += ["--set", item]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=REPO)
    return small


def latency(url: str, payload: bytes, n: int) -> tuple[float, float]:
    """(median, p99) seconds of `n` POST /invocations of `payload`, after two warm-up requests."""
    times = []
    for i in range(n + 2):
        request = urllib.request.Request(
            url + "/invocations", data=payload, headers={"Content-Type": "application/json"}
        )
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as resp:
            resp.read()
        if i >= 2:
            times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]


def report_serving(folder: Path, big: Path, env: dict[str, str], n: int) -> None:
    import pandas as pd

    from tests.services import model_server

    rows = pd.read_csv(big, engine="pyarrow").drop(columns=[TARGET]).head(1000)
    tracking_uri = env["MLFLOW_TRACKING_URI"]
    with model_server("models:/trainyard@champion", tracking_uri, folder / "serve.log") as url:
        for size, repeats in ((1, n), (1000, max(10, n // 4))):
            body = json.dumps({"dataframe_split": json.loads(rows.head(size).to_json(orient="split", index=False))})
            median, p99 = latency(url, body.encode(), repeats)
            ms = {"median_ms": round(median * 1000, 2), "p99_ms": round(p99 * 1000, 2)}
            note(f"serve_latency_{size}_rows", **ms, requests=repeats, machine=machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=581_012)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--requests", type=int, default=200, help="1-row requests timed (a quarter as many of 1,000)")
    parser.add_argument("--quick", action="store_true", help="50,000 rows, 40 requests")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.requests = 50_000, 40
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp)
        env = dict(os.environ, TRAINYARD_HOME=str(folder / "state"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'state' / 'mlflow.db'}"
        big = write_covtype_like(folder / "covtype_like.csv", args.rows)
        small = train_champion(folder, big, env)
        base = child("read_csv", big, folder / "unused", args.chunk_rows, env, small)
        scored = child("predict", big, folder / "predictions.parquet", args.chunk_rows, env, small)
        half = child("predict", big, folder / "predictions.parquet", args.chunk_rows // 2, env, small)
        double = folder / "double.csv"  # the table twice: the peak must not grow with the rows
        with open(double, "wb") as out, open(big, "rb") as a, open(big, "rb") as b:
            out.write(a.read())
            b.readline()
            out.write(b.read())
        twice = child("predict", double, folder / "predictions.parquet", args.chunk_rows, env, small)
        double.unlink()
        width = 54  # the table's feature columns, all numeric: one float32 each
        chunk_bytes = args.chunk_rows * width * 4
        ratio = scored["seconds"] / base["seconds"]
        emit(
            "predict_vs_read_csv",
            seconds=round(scored["seconds"], 3),
            with_model_load_and_mlflow_run_seconds=round(scored["total"], 3),
            rows=scored["rows"],
            baseline={"read_csv_pyarrow_seconds": round(base["seconds"], 3)},
            ratio=ratio,
            target="<= 1.5x",
            met=ratio <= 1.5,
        )
        note(
            "predict_peak_memory",
            peak_mb=round(scored["peak"] / 2**20, 1),
            one_chunk_tensors_mb=round(chunk_bytes / 2**20, 1),
            peak_over_one_chunk=round(scored["peak"] / chunk_bytes, 2),
            whole_file_tensors_mb=round(args.rows * width * 4 / 2**20, 1),
            read_csv_peak_mb=round(base["peak"] / 2**20, 1),
            chunk_rows=args.chunk_rows,
            peak_mb_at_half_the_chunk=round(half["peak"] / 2**20, 1),
            peak_mb_with_twice_the_rows=round(twice["peak"] / 2**20, 1),
        )
        report_serving(folder, big, env, args.requests)


if __name__ == "__main__":
    main()
