"""Shared bits of the benchmark scripts: JSON result lines, device helpers, synthetic images.

split_tensors and digits_schema are the tests' too (tests/conftest.py imports them as
benchmarks._common): they stay free of anything but the standard library."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"


def emit(
    name: str, *, baseline: Any, ratio: float | None, target: str, met: bool | None, **figures: Any
) -> dict[str, Any]:
    """One result line: name, figures, the baseline it was measured against in this run, ratio, target, met
    (None where the target does not apply to this run: a GPU target on the CPU, a size it is not meant for)."""
    met = None if met is None else bool(met)
    line = {"name": name, **figures, "baseline": baseline, "ratio": _round(ratio), "target": target, "met": met}
    line.setdefault("machine", machine())
    print(json.dumps(line, default=str), flush=True)
    return line


def note(name: str, **fields: Any) -> None:
    """An information line (a skip, a setting) that is not a result."""
    print(json.dumps({"name": name, **fields}, default=str), flush=True)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall time of a block, with the device synchronised on entry and exit."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def synthetic_digits(n: int, seed: int = 0):
    """uint8 28x28 images (N,1,28,28) and int64 labels: a bright band per class over noise; learnable."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    rows = torch.arange(28).view(1, 28, 1)
    cols = torch.arange(28).view(1, 1, 28)
    top = (2 + 2 * y).view(n, 1, 1)
    left = (2 + y).view(n, 1, 1)
    band = (rows >= top) & (rows < top + 2) & (cols >= left) & (cols < left + 16)
    x[:, 0][band] = 230
    return x, y


def split_tensors(x, y, a: int, b: int) -> dict:
    """x, y cut at a and b into a prepared dataset's six tensors: train [:a], val [a:b], test [b:]."""
    return {"x_train": x[:a], "y_train": y[:a], "x_val": x[a:b], "y_val": y[a:b], "x_test": x[b:], "y_test": y[b:]}


def digits_schema(key: str) -> dict:
    """The schema of a prepared MNIST-shaped dataset (uint8 1x28x28 images, ten classes, MNIST's normalisation)."""
    return {
        "task": "classification",
        "binary": False,
        "n_classes": 10,
        "label_names": [str(i) for i in range(10)],
        "input_shape": [1, 28, 28],
        "output_size": 10,
        "key": key,
        "normalize": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
    }


def digits_prepared(n_train: int, n_val: int, seed: int = 0):
    """A Prepared dataset shaped like MNIST's (uint8, normalisation in the schema)."""
    from tasks.prepared import Prepared

    x, y = synthetic_digits(n_train + 2 * n_val, seed)
    return Prepared(split_tensors(x, y, n_train, n_train + n_val), digits_schema("synthetic-digits"))


class GraphLog(logging.Handler):
    """Keeps train_model's train.cuda_graph lines (how many steps the graph replayed, or why it could not)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("train.cuda_graph:"):
            self.lines.append(message)
        if record.levelno >= logging.WARNING:  # warnings still reach the console
            logging.getLogger().handle(record)

    def __enter__(self) -> GraphLog:
        # train_model's INFO lines reach this handler only; the console keeps its WARNING level
        self.logger = logging.getLogger("trainyard.train")
        self.saved = self.logger.level, self.logger.propagate
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


# The memory probes of a benchmark's child process (Linux /proc): pasted into its code, before the measured part.
MEMORY_PROBES = r"""
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""
