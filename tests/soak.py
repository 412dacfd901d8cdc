"""Soak test (`make soak`): many short runs against the real services, with faults injected.

Starts on 127.0.0.1: an S3 endpoint (moto's standalone server), a PostgreSQL database of
its own, `mlflow server` on it with proxied S3 artifacts, and `prefect server` on another
database. Then runs `trainyard train` as separate processes:

  phase 1: N runs back to back; during one the S3 endpoint is restarted, and one run's
           process is killed with SIGKILL after its first checkpoint and started again
           with the same run name (it must resume);
  phase 2: 4 runs at once on one state folder, one of them killed and resumed, and the
           S3 endpoint restarted while they run.

Every finished run is verified: MLflow status FINISHED, the artifact unit's manifest in
S3, and each object's bytes against the sha256 in its metadata. Prints one JSON report:
runs started, completed, resumed, artifacts verified, and anything lost (the target: 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tests.conftest import cli_env, train_argv  # noqa: E402
from tests.services import (  # noqa: E402
    FAKE_KEYS,
    S3Endpoint,
    mlflow_server,
    postgres_database,
    prefect_server,
)

BUCKET, MLFLOW_BUCKET, EXPERIMENT = "soak", "soak-mlflow", "soak"


def make_csv(path: Path, n: int = 600) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    label = np.where(x[:, 0] - x[:, 1] + 0.5 * x[:, 2] > 0, "up", "down")
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": label}).to_csv(path, index=False)
    return path


class Soak:
    def __init__(self, root: Path, s3: S3Endpoint, mlflow_uri: str, prefect_api: str, csv: Path, epochs: int):
        self.root, self.s3, self.mlflow_uri, self.prefect_api, self.csv, self.epochs = (
            root,
            s3,
            mlflow_uri,
            prefect_api,
            csv,
            epochs,
        )
        self.home = root / "state"
        self.started = 0
        self.killed: list[str] = []
        self.events: list[str] = []

    def args(self, run_name: str, seed: int) -> list[str]:
        sets = [
            f"data.path={self.csv}",
            "data.target=label",
            f"train.epochs={self.epochs}",
            "train.batch_size=8",
            f"train.seed={seed}",
            f"tracking.uri={self.mlflow_uri}",
            f"tracking.experiment={EXPERIMENT}",
            f"tracking.run_name={run_name}",
            "tracking.log_model=true",
            f"storage.uri=s3://{BUCKET}/runs",
            f"storage.endpoint_url={self.s3.url}",
            "storage.max_attempts=3",
            "tracking.flush_timeout=120",
        ]
        return [*train_argv(*sets, json=True), "--force"]

    def env(self) -> dict[str, str]:
        return cli_env(self.home, PREFECT_API_URL=self.prefect_api, AWS_DEFAULT_REGION="us-east-1", **FAKE_KEYS)

    def start(self, run_name: str, seed: int) -> subprocess.Popen:
        self.started += 1
        log = open(self.root / f"{run_name}.log", "ab")  # noqa: SIM115 (the child writes it for as long as it runs)
        return subprocess.Popen(
            self.args(run_name, seed), env=self.env(), stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )

    def kill_after_first_checkpoint(self, proc: subprocess.Popen, run_name: str, timeout: float = 300) -> bool:
        """SIGKILL the run's process once a resume checkpoint of epoch >= 2 exists for it."""
        deadline = time.monotonic() + timeout
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow_uri)
        while time.monotonic() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name(EXPERIMENT)
            runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'") if exp else []
            for run in runs:
                last = self.home / "runs" / run.info.run_id / "checkpoints" / "last.pt"
                try:
                    if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 2:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        self.killed.append(run_name)
                        self.events.append(f"killed {run_name} after epoch >= 2")
                        return True
                except Exception:
                    pass
            time.sleep(0.2)
        return False

    def restart_s3_later(self, delay: float, down_for: float = 1.5) -> threading.Thread:
        def go():
            time.sleep(delay)
            self.s3.stop()
            self.events.append(f"S3 endpoint stopped for {down_for} s")
            time.sleep(down_for)
            self.s3.start()

        t = threading.Thread(target=go)
        t.start()
        return t

    def finish(self, proc: subprocess.Popen) -> dict | None:
        out, _ = proc.communicate(timeout=900)
        return json.loads(out) if proc.returncode == 0 and out.strip() else None


def verify(soak: Soak, names: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(soak.mlflow_uri)
    s3 = boto3.client("s3", endpoint_url=soak.s3.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    report = {"runs_completed": 0, "runs_resumed": 0, "artifacts_verified": 0, "artifacts_bad": 0, "lost": []}
    for name in names:
        finished = [r for r in by_name.get(name, []) if r.info.status == "FINISHED"]
        if len(finished) != 1 or len(by_name.get(name, [])) != 1:
            report["lost"].append(f"{name}: runs {[r.info.status for r in by_name.get(name, [])]}")
            continue
        run = finished[0]
        report["runs_completed"] += 1
        if "train.resumed_from_epoch" in run.data.tags:
            report["runs_resumed"] += 1
        prefix = f"runs/{EXPERIMENT}/{run.info.run_id}/"
        try:
            manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "manifest.json")["Body"].read())
        except Exception as exc:
            report["lost"].append(f"{name}: no manifest ({type(exc).__name__})")
            continue
        for key in manifest:
            obj = s3.get_object(Bucket=BUCKET, Key=prefix + key)
            good = (
                obj["Metadata"].get("sha256")
                == hashlib.sha256(obj["Body"].read()).hexdigest()
                == manifest[key]["sha256"]
            )
            report["artifacts_verified" if good else "artifacts_bad"] += 1
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs back to back in phase 1")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    os.environ.update(FAKE_KEYS, AWS_DEFAULT_REGION="us-east-1")
    root = Path(tempfile.mkdtemp(prefix="trainyard-soak-"))
    t0 = time.monotonic()
    s3 = S3Endpoint()
    s3.start()
    client = boto3.client("s3", endpoint_url=s3.url)
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket=MLFLOW_BUCKET)
    try:
        with (
            postgres_database("trainyard_soak_mlflow") as (ml_db, _),
            postgres_database("trainyard_soak_prefect") as (pf_db, _),
            mlflow_server(ml_db, f"s3://{MLFLOW_BUCKET}/mlflow", s3.url, root / "mlflow.log") as (ml_uri, _),
            prefect_server(
                pf_db.replace("postgresql://", "postgresql+asyncpg://"), root / "prefect-home", root / "prefect.log"
            ) as api,
        ):
            soak = Soak(root, s3, ml_uri, api, make_csv(root / "data.csv"), args.epochs)
            names: list[str] = []
            # phase 1: back to back
            for i in range(args.runs):
                name = f"seq-{i:02d}"
                names.append(name)
                proc = soak.start(name, seed=i)
                restarter = soak.restart_s3_later(delay=8.0) if i == args.runs // 4 else None
                if i == args.runs // 2 and soak.kill_after_first_checkpoint(proc, name):
                    proc = soak.start(name, seed=i)  # same run name: resumes
                soak.finish(proc)
                if restarter:
                    restarter.join()
            # phase 2: four at once, one killed and resumed, S3 restarted meanwhile
            procs = {f"par-{i}": soak.start(f"par-{i}", seed=100 + i) for i in range(4)}
            names += list(procs)
            restarter = soak.restart_s3_later(delay=10.0)
            if soak.kill_after_first_checkpoint(procs["par-1"], "par-1"):
                procs["par-1"] = soak.start("par-1", seed=101)
            for proc in procs.values():
                soak.finish(proc)
            restarter.join()
            report = verify(soak, names)
            report.update(
                name="soak",
                runs_started=soak.started,
                runs_planned=len(names),
                killed_and_restarted=soak.killed,
                faults=soak.events,
                epochs_per_run=args.epochs,
                wall_seconds=round(time.monotonic() - t0, 1),
                # the faults must have happened too: both kills (one per phase), each killed run resumed
                met=not report["lost"]
                and report["artifacts_bad"] == 0
                and report["runs_completed"] == len(names)
                and len(soak.killed) == 2
                and report["runs_resumed"] >= len(soak.killed),
            )
            print(json.dumps(report, indent=2))
            return 0 if report["met"] else 1
    finally:
        s3.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
