"""Image HEALTHCHECK: probe what the entrypoint started.

worker (the entrypoint wrote "worker" to the role file): the Prefect worker's health
endpoint must answer 200. Any other role (a one-shot `train`, or a command run as given
such as `prefect flow-run execute`) serves nothing to probe, so it counts as healthy;
the long-running servers started from this image (Prefect server, MLflow) get their own
checks in deploy/compose.yaml.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    role_file = os.environ.get("TRAINYARD_ROLE_FILE", "/tmp/trainyard-role")
    try:
        with open(role_file, encoding="utf-8") as f:
            role = f.read().strip()
    except OSError:
        role = ""
    if role != "worker":
        return 0
    port = os.environ.get("PREFECT_WORKER_WEBSERVER_PORT", "8080")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                return 0
            print(f"worker health endpoint {url} answered {resp.status}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"worker health endpoint {url} unreachable: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
