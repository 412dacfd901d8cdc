"""Four runs of one experiment at once, on one machine and one state folder, each started as a user
would (`trainyard train`, no Prefect server: each starts the embedded one on the same PREFECT_HOME):
nothing is clobbered and nobody races on a database's migrations."""

from __future__ import annotations

import contextlib
import json
import subprocess

from mlflow.tracking import MlflowClient

from tests.conftest import cli_env, train_argv


def test_four_runs_at_once_share_nothing_they_should_not(toy_csv, state_home, tmp_path):
    env = cli_env(state_home, PREFECT_HOME=str(tmp_path / "prefect-home"))
    argvs = [
        train_argv(f"data.path={toy_csv}", "data.target=label", "train.epochs=2", f"train.seed={i}", json=True)
        for i in range(4)
    ]
    with contextlib.ExitStack() as files:
        errs = [files.enter_context(open(tmp_path / f"err{i}", "w")) for i in range(4)]
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            for argv, err in zip(argvs, errs, strict=True)
        ]
        try:
            outs = [p.communicate(timeout=600)[0] for p in procs]
        finally:  # one that hangs must not leave the others running
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"err{i}").read_text()[-3000:]
    summaries = [json.loads(o) for o in outs]
    run_ids = {s["mlflow_run_id"] for s in summaries}
    assert len(run_ids) == 4
    # one prepared dataset, written once, no temporary leftovers anywhere
    assert len(list((state_home / "datasets").iterdir())) == 1
    leftovers = [p for p in state_home.rglob("*") if p.name.endswith((".tmp", ".partial", ".part"))]
    assert leftovers == []
    # four complete artifact units and four TensorBoard folders
    for s in summaries:
        unit = state_home / "artifacts" / "trainyard" / s["mlflow_run_id"]
        assert json.loads((unit / "manifest.json").read_text()).keys() >= {"model_state.pt", "metrics.json"}
    assert len({s["tensorboard_dir"] for s in summaries}) == 4
    client = MlflowClient(f"sqlite:///{state_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    assert {r.info.run_id for r in runs} == run_ids and all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name='trainyard'")
    assert len(versions) == 4
