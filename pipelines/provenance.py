"""Where a run comes from: the code's commit, the package versions and a hash of the config.

They become the MLflow run's tags; the champion skip compares them with the champion's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from pipelines.config import TrainConfig
from tasks import keys

PACKAGES = ("trainyard", "torch", "torchvision", "torchmetrics", "mlflow", "prefect")


def _git(*args: str) -> str:
    """Output of a git command in this checkout; '' where git or the checkout is missing."""
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, check=True, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def git_sha() -> str:
    """The commit: TRAINYARD_GIT_SHA (set in images), else `git rev-parse HEAD`, else ''."""
    return os.environ.get("TRAINYARD_GIT_SHA") or _git("rev-parse", "HEAD")


def code_version() -> str:
    """The commit, marked `-dirty` when tracked files differ from it (then it proves nothing)."""
    sha = git_sha()
    if sha and not os.environ.get("TRAINYARD_GIT_SHA") and _git("status", "--porcelain", "--untracked-files=no"):
        return f"{sha}-dirty"
    return sha


def versions() -> dict[str, str]:
    """package -> installed version, for the packages a run's results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def config_hash(cfg: TrainConfig) -> str:
    """What the config asks for, minus names that do not change the model (run name)."""
    data = cfg.model_dump(mode="json")
    data["tracking"].pop("run_name", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_tags(cfg: TrainConfig, flow_run_id: str = "") -> dict[str, str]:
    """A new MLflow run's tags: source, model, config hash, Prefect flow run, commit and package versions."""
    tags = {keys.SOURCE: cfg.data.source, keys.MODEL: cfg.model.name, keys.CONFIG_HASH: config_hash(cfg)}
    if flow_run_id:
        tags[keys.FLOW_RUN_ID] = flow_run_id
    sha = git_sha()
    if sha:
        tags[keys.GIT_COMMIT] = sha
        tags[keys.CODE_VERSION] = code_version()
    tags.update({f"{keys.VERSION_PREFIX}{k}": v for k, v in versions().items()})
    return tags
