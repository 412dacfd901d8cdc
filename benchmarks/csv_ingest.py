"""Tabular speed: CSV ingest to tensors, its peak memory, and the per-epoch cost of pandas-row Datasets.

A covtype-shaped CSV is generated (581,012 rows x 55 integer columns: 10 measurements,
4 + 40 one-hot area/soil flags, Cover_Type 1..7; --rows to change). Three result lines:

  csv_ingest.time        tasks.ingest_csv.build_csv (read, checks, encode, standardise, split
                         into float32 tensors) against pandas.read_csv(engine="pyarrow") alone
  csv_ingest.peak_memory peak RSS growth of the ingest in a fresh child process (the peak is
                         reset after imports via /proc/self/clear_refs; arrow's memory is
                         invisible to tracemalloc) against the size of the final tensors
  csv_ingest.parquet_time the same table written as Parquet: build_csv on it against
                         pyarrow.parquet.read_table alone on the same file
  csv_ingest.epoch_data  one epoch of batches from Trainyard's tensor Dataset/DataLoader
                         against the course's pandas-row Dataset (df.iloc[i] in __getitem__),
                         the latter timed on a sample of rows and extrapolated
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MEMORY_PROBES, REPO, emit, note

COVTYPE_ROWS = 581_012
MEASURES = [
    ("Elevation", 1859, 3858),
    ("Aspect", 0, 360),
    ("Slope", 0, 66),
    ("Horizontal_Distance_To_Hydrology", 0, 1397),
    ("Vertical_Distance_To_Hydrology", -173, 601),
    ("Horizontal_Distance_To_Roadways", 0, 7117),
    ("Hillshade_9am", 0, 254),
    ("Hillshade_Noon", 0, 254),
    ("Hillshade_3pm", 0, 254),
    ("Horizontal_Distance_To_Fire_Points", 0, 7173),
]
TARGET = "Cover_Type"


def write_covtype_like(path: Path, rows: int, seed: int = 0) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for name, lo, hi in MEASURES:
        cols[name] = rng.integers(lo, hi + 1, size=rows, dtype=np.int64)
    area = rng.integers(0, 4, size=rows)
    for i in range(4):
        cols[f"Wilderness_Area{i + 1}"] = (area == i).astype(np.int64)
    soil = rng.integers(0, 40, size=rows)
    for i in range(40):
        cols[f"Soil_Type{i + 1}"] = (soil == i).astype(np.int64)
    # a target that depends on the features, 7 classes
    score = cols["Elevation"] / 300 + area + soil / 10 + rng.normal(size=rows)
    cols[TARGET] = (np.digitize(score, np.quantile(score, np.linspace(0, 1, 8)[1:-1])) + 1).astype(np.int64)
    pacsv.write_csv(pa.table(cols), path)
    return path


# ---- child process: one measured operation ------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import numpy, pandas, torch, pyarrow.csv
from tasks.data_config import DataConfig
from tasks.ingest_csv import build_csv

{probes}
path, what = sys.argv[1], sys.argv[2]
cfg = DataConfig(source="csv", path=path, target={target!r})
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    reset = True
except OSError:
    reset = False
base = rss()
t = time.perf_counter()
if what == "ingest":
    prepared = build_csv(cfg, __import__("pathlib").Path(path), "benchmark")
    tensor_bytes = sum(v.numel() * v.element_size() for v in prepared.tensors.values())
else:
    df = pandas.read_csv(path, engine="pyarrow")
    tensor_bytes = 0
seconds = time.perf_counter() - t
peak = hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{
    "seconds": seconds, "base_rss": base, "peak_rss": peak, "tensor_bytes": tensor_bytes, "peak_reset": reset,
}}))
"""


def child(path: Path, what: str) -> dict:
    code = CHILD.format(repo=str(REPO), target=TARGET, probes=MEMORY_PROBES)
    out = subprocess.run([sys.executable, "-c", code, str(path), what], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- in-process timings -----------------------------------------------------------------------


def time_ingest(path: Path, repeats: int) -> tuple[float, float, object]:
    import pandas as pd

    from tasks.data_config import DataConfig
    from tasks.ingest_csv import build_csv

    cfg = DataConfig(source="csv", path=str(path), target=TARGET)
    pd.read_csv(path, engine="pyarrow")  # file cache warm for both
    best_read = best_ingest = float("inf")
    prepared = None
    for _ in range(repeats):
        t = time.perf_counter()
        df = pd.read_csv(path, engine="pyarrow")
        best_read = min(best_read, time.perf_counter() - t)
        del df
        t = time.perf_counter()
        prepared = build_csv(cfg, path, "benchmark")
        best_ingest = min(best_ingest, time.perf_counter() - t)
    return best_read, best_ingest, prepared


class PandasRowDataset:
    """The course's CustomDataset: one DataFrame row per item, converted in __getitem__."""

    def __init__(self, df, target):
        self.df, self.target = df, target

    def __len__(self):
        return len(self.df)

    def __getitem__(self, i):
        import torch

        row = self.df.iloc[i]
        x = torch.tensor(row.drop(self.target).values, dtype=torch.float32)
        y = torch.tensor(row[self.target], dtype=torch.long)
        return x, y


def time_epoch_data(path: Path, prepared, batch_size: int, sample: int) -> tuple[float, float, int]:
    import pandas as pd
    import torch

    from tasks.data import TensorSplit, make_loader

    x, y = prepared.tensors["x_train"], prepared.tensors["y_train"]
    loader = make_loader(TensorSplit(x, y), batch_size, shuffle=True, seed=0)
    for _ in loader:  # warm-up
        break
    t = time.perf_counter()
    for _batch in loader:
        pass
    tensor_epoch = time.perf_counter() - t

    df = pd.read_csv(path, engine="pyarrow")
    rows = torch.randperm(len(df), generator=torch.Generator().manual_seed(0))[:sample].tolist()
    ds = torch.utils.data.Subset(PandasRowDataset(df, TARGET), rows)
    pandas_loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    t = time.perf_counter()
    for _batch in pandas_loader:
        pass
    per_row = (time.perf_counter() - t) / len(rows)
    return tensor_epoch, per_row * x.shape[0], len(rows)


def report_peak_memory(path: Path, rows: int) -> None:
    """The ingest's peak RSS growth in a fresh child process, against the final tensors and read_csv alone."""
    ing = child(path, "ingest")
    rd = child(path, "read")
    grown = ing["peak_rss"] - ing["base_rss"]
    emit(
        "csv_ingest.peak_memory",
        peak_rss_growth_mb=round(grown / 1e6, 1),
        tensors_mb=round(ing["tensor_bytes"] / 1e6, 1),
        rows=rows,
        peak_reset_after_imports=ing["peak_reset"],
        baseline={
            "name": "size of the final tensors",
            "mb": round(ing["tensor_bytes"] / 1e6, 1),
            "read_csv_alone_peak_growth_mb": round((rd["peak_rss"] - rd["base_rss"]) / 1e6, 1),
        },
        ratio=grown / ing["tensor_bytes"],
        target="<= 3x the final tensors",
        met=grown <= 3 * ing["tensor_bytes"],
    )


def report_parquet_ingest(csv_path: Path, folder: Path, rows: int, repeats: int) -> None:
    """The ingest of the same table written as Parquet, against pyarrow.parquet.read_table alone on that file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tasks.data_config import DataConfig
    from tasks.ingest_csv import build_csv

    path = folder / "covtype_like.parquet"
    pq.write_table(pacsv.read_csv(csv_path), path)
    cfg = DataConfig(source="csv", path=str(path), target=TARGET)
    pq.read_table(path)  # file cache warm for both
    best_read = best_ingest = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        table = pq.read_table(path)
        best_read = min(best_read, time.perf_counter() - t)
        del table
        t = time.perf_counter()
        build_csv(cfg, path, "benchmark")
        best_ingest = min(best_ingest, time.perf_counter() - t)
    emit(
        "csv_ingest.parquet_time",
        ingest_seconds=round(best_ingest, 4),
        rows=rows,
        parquet_mb=round(path.stat().st_size / 1e6, 1),
        baseline={"name": "pyarrow.parquet.read_table alone", "seconds": round(best_read, 4)},
        ratio=best_ingest / best_read,
        target="<= 1.2x",
        met=best_ingest / best_read <= 1.2,
    )


def report_s3_ingest(csv_path: Path, folder: Path, rows: int, repeats: int) -> None:
    """Ingest from s3:// on moto's S3 server (started here, on 127.0.0.1): the planner's HEAD, the streamed,
    hashed download into the source cache, then build_csv; against boto3's download_file of the same object
    plus build_csv of the local file. Each repeat starts with an empty state folder, so each downloads."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from tasks.data_config import DataConfig
    from tasks.ingest_csv import build_csv, ingest_csv
    from tasks.storage_config import StorageConfig

    for name, value in (("AWS_ACCESS_KEY_ID", "benchmark"), ("AWS_SECRET_ACCESS_KEY", "benchmark")):
        os.environ.setdefault(name, value)  # moto takes any key; a real one is never needed here
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="benchmark")
        client.upload_file(str(csv_path), "benchmark", "covtype_like.csv")
        storage = StorageConfig(endpoint_url=endpoint)
        remote = DataConfig(source="csv", path="s3://benchmark/covtype_like.csv", target=TARGET)
        local_cfg = DataConfig(source="csv", path=str(folder / "downloaded.csv"), target=TARGET)
        best_plain = best_ours = float("inf")
        for i in range(repeats):
            t = time.perf_counter()
            client.download_file("benchmark", "covtype_like.csv", str(folder / "downloaded.csv"))
            build_csv(local_cfg, folder / "downloaded.csv", "benchmark")
            best_plain = min(best_plain, time.perf_counter() - t)
            t = time.perf_counter()
            _key, _sha, build = ingest_csv(remote, folder / f"s3-state-{i}", storage)
            build()
            best_ours = min(best_ours, time.perf_counter() - t)
    finally:
        server.stop()
    emit(
        "csv_ingest.s3_time",
        ingest_seconds=round(best_ours, 4),
        rows=rows,
        csv_mb=round(csv_path.stat().st_size / 1e6, 1),
        baseline={"name": "boto3 download_file + build_csv of the local file", "seconds": round(best_plain, 4)},
        ratio=best_ours / best_plain,
        target="<= 1.3x",
        met=best_ours / best_plain <= 1.3,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=0, help=f"CSV rows (default {COVTYPE_ROWS}; 60000 with --quick)")
    parser.add_argument("--csv", default="", help="use this covtype-shaped CSV instead of generating one")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sample", type=int, default=0, help="rows timed for the pandas-row Dataset (default 4096)")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = args.rows or (60_000 if args.quick else COVTYPE_ROWS)
    sample = args.sample or (2048 if args.quick else 4096)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.csv) if args.csv else write_covtype_like(Path(tmp) / "covtype_like.csv", rows)
        size_mb = path.stat().st_size / 1e6
        note("csv_ingest.settings", rows=rows, columns=55, csv_mb=round(size_mb, 1), batch_size=args.batch_size)

        read_s, ingest_s, prepared = time_ingest(path, args.repeats)
        emit(
            "csv_ingest.time",
            ingest_seconds=round(ingest_s, 4),
            rows=rows,
            baseline={"name": 'pandas.read_csv(engine="pyarrow") alone', "seconds": round(read_s, 4)},
            ratio=ingest_s / read_s,
            target="<= 1.3x",
            met=ingest_s / read_s <= 1.3,
        )

        report_peak_memory(path, rows)
        report_parquet_ingest(path, Path(tmp), rows, args.repeats)
        report_s3_ingest(path, Path(tmp), rows, args.repeats)

        tensor_s, pandas_s, sampled = time_epoch_data(path, prepared, args.batch_size, sample)
        emit(
            "csv_ingest.epoch_data",
            tensor_loader_epoch_seconds=round(tensor_s, 4),
            train_rows=int(prepared.tensors["y_train"].shape[0]),
            batch_size=args.batch_size,
            baseline={
                "name": "pandas-row Dataset (df.iloc[i] in __getitem__)",
                "epoch_seconds": round(pandas_s, 2),
                "extrapolated": f"timed on {sampled} random rows, scaled to the training split",
            },
            ratio=pandas_s / tensor_s,
            target=">= 100x faster",
            met=pandas_s / tensor_s >= 100,
        )


if __name__ == "__main__":
    main()
