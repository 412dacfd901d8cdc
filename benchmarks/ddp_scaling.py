"""DDP scaling: training images per second at one and at two processes, same global batch.

    .venv/bin/python benchmarks/ddp_scaling.py [--quick] [--n N] [--epochs E] [--batch B]

On the CPU each process is held to one thread (torch.set_num_threads(1)) and the two processes
train with gloo through the elastic launcher (tasks/launch.py), so the figure is what a second
core buys: target at least 1.8x. On CUDA (one GPU here) the launcher's path at world size 1 (DDP
with NCCL) is measured against the plain path: target at least 0.97x, the launcher costing nothing
in the steady state. The model is the mnist preset's CNN on synthetic uint8 28x28 images; a figure
is the training rows over the median wall time of the epochs after the first (steps, validation
and checkpoint), read from the run's history, so the processes' start-up does not count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import digits_prepared, emit, note

from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainSection
from tasks.launch import LaunchPlan, launch
from tasks.prepared import save_prepared
from tasks.results import TrainResult
from tasks.train import train_model
from tasks.train_rank import RankJob, train_rank

MODEL = ModelConfig(name="cnn", channels=[32, 64], hidden=[128], dropout=0.25)  # the mnist preset's
OPTIM = OptimConfig(name="adam", lr=2e-3)


def one_thread(job: RankJob) -> TrainResult | None:
    """A training process held to one thread (picklable: the launcher starts it in a new process)."""
    torch.set_num_threads(1)
    return train_rank(job)


def images_per_second(result: TrainResult, rows: int) -> float:
    seconds = [h["seconds"] for h in result.history[1:]] or [result.history[0]["seconds"]]
    return rows / statistics.median(seconds)


def section(args, device: str, **distributed) -> TrainSection:
    return TrainSection(
        epochs=args.epochs, batch_size=args.batch, device=device, checkpoint_every=0, distributed=distributed
    )


def launched(folder: Path, args, device: str, nproc: int, work: Path) -> TrainResult:
    train = section(args, device, nproc_per_node=nproc)
    job = RankJob(str(folder), MODEL, OPTIM, ScheduleConfig(), train, str(work / f"ddp{nproc}"))
    plan = LaunchPlan(nproc, 1, f"bench-{nproc}-{work.name}", log_dir=str(work / f"launch{nproc}"))
    return launch(plan, one_thread if device == "cpu" else train_rank, job)


def cpu_scaling(prepared, folder: Path, args, work: Path) -> None:
    """World size 1 (the plain path) against 2, alternating, `args.repeats` times: the machine is shared
    and noisy, so each figure is the median of its repeats."""
    torch.set_num_threads(1)
    ones, twos, accuracy = [], [], {}
    for repeat in range(args.repeats):
        plain = train_model(prepared, MODEL, OPTIM, ScheduleConfig(), section(args, "cpu"), work / f"plain{repeat}")
        two = launched(folder, args, "cpu", 2, work / f"r{repeat}")
        ones.append(images_per_second(plain, args.n))
        twos.append(images_per_second(two, args.n))
        accuracy = {"ws1": round(plain.best_metric, 4), "ws2": round(two.best_metric, 4)}
    base, fig = statistics.median(ones), statistics.median(twos)
    emit(
        "ddp_scaling.cpu_ws2",
        baseline={"ws1_images_per_s": round(base), "runs": [round(x) for x in ones]},
        ratio=fig / base,
        target=">= 1.8x at two processes, one thread each",
        met=fig / base >= 1.8,
        ws2_images_per_s=round(fig),
        runs=[round(x) for x in twos],
        global_batch=args.batch,
        images=args.n,
        val_accuracy=accuracy,
    )


def gpu_launcher(prepared, folder: Path, args, work: Path) -> None:
    """World size 1 through the launcher (DDP, NCCL) against the plain path, on one GPU."""
    plain = train_model(prepared, MODEL, OPTIM, ScheduleConfig(), section(args, "cuda"), work / "plain")
    one = launched(folder, args, "cuda", 1, work)
    base, fig = images_per_second(plain, args.n), images_per_second(one, args.n)
    emit(
        "ddp_scaling.gpu_launcher_ws1",
        baseline={"plain_images_per_s": round(base)},
        ratio=fig / base,
        target=">= 0.97x the plain path",
        met=fig / base >= 0.97,
        launcher_images_per_s=round(fig),
        global_batch=args.batch,
        images=args.n,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (4,096 images, 3 epochs, 1 repeat)")
    parser.add_argument("--n", type=int, default=8_192, help="training images")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (the first is not timed)")
    parser.add_argument("--batch", type=int, default=512, help="the global batch, the same at both world sizes")
    parser.add_argument("--repeats", type=int, default=2, help="CPU: times each world size runs, alternating")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.repeats = 4_096, 3, 1
    prepared = digits_prepared(args.n, max(args.n // 16, args.batch))
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        work = Path(tmp)
        folder = save_prepared(work / "data", prepared)
        if torch.cuda.is_available():
            note("ddp_scaling.cpu_ws2", skipped="measured on CPU machines; this one measures the launcher on its GPU")
            gpu_launcher(prepared, folder, args, work)
        else:
            cpu_scaling(prepared, folder, args, work)


if __name__ == "__main__":
    main()
