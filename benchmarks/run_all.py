"""Run every benchmark, one subprocess each, passing --quick through; JSON lines on stdout.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out FILE]

end_to_end and predict need prefect and mlflow; they are skipped (with a line saying so) where they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["train_throughput", "mnist_fast", "csv_ingest", "end_to_end", "predict", "ddp_scaling", "sweep"]
NEEDS_SERVICES = {"end_to_end", "predict", "sweep"}  # prefect and mlflow


def main(argv=None) -> int:
    """Parse the options and run the chosen benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.out, "a", encoding="utf-8")) if args.out else None
        return _run(args.only or BENCHMARKS, args.quick, out)


def _run(names: list[str], quick: bool, out) -> int:
    """Run the benchmarks one after another; their JSON lines to stdout (and `out`); 1 when one failed."""
    failed = 0
    for name in names:
        if name in NEEDS_SERVICES and not all(importlib.util.find_spec(m) for m in ("prefect", "mlflow")):
            lines = [json.dumps({"name": name, "skipped": "prefect or mlflow is not installed here"})]
        else:
            cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0:
                failed += 1
                lines.append(json.dumps({"name": name, "error": f"exit status {proc.returncode}"}))
        for line in lines:
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
