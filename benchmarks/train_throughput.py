"""Training throughput: Trainyard's train_model against hand-written loops and Lightning, same model and data.

Contenders, all on the pytorch/examples MNIST net (conv 32 3x3, conv 64 3x3, max-pool,
dropout, fc 9216->128, fc 128->10; the registry's `cnn` with padding=valid, pool=last) and
the same synthetic uint8 28x28 images:

  trainyard   tasks.train.train_model with its defaults (resident batches on CUDA, bf16
              autocast, channels_last, fused Adam); its time includes the per-epoch
              validation (a small split) and checkpoint writes. On CUDA also with
              train.cuda_graph (the whole step replayed from one CUDA graph) and with
              torch.compile(mode="reduce-overhead")
  plain       a hand-written loop in the GPU-resident style: normalised tensors on the device,
              randperm + slicing, bf16 autocast on CUDA, channels_last
  tutorial    a per-item Dataset normalising in __getitem__, DataLoader batch 64, fp32
  lightning   Trainer.fit (when lightning or pytorch_lightning is importable)

Warm-up runs are excluded; timed regions are bracketed by torch.cuda.synchronize().
Prints JSON lines; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import GraphLog, Timer, digits_prepared, emit, note, sync

from models import build_model
from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainSection
from tasks.runtime import autocast_ctx, pick_device, pick_precision
from tasks.train import train_model

MEAN, STD = 0.1307, 0.3081
EXAMPLES_NET = {
    "name": "cnn",
    "channels": [32, 64],
    "kernel_size": 3,
    "padding": "valid",
    "pool": "last",
    "conv_dropout": 0.25,
    "hidden": [128],
    "dropout": 0.5,
}
LR = 1e-3


def model_cfg() -> ModelConfig:
    return ModelConfig(**EXAMPLES_NET)


def new_model(device, channels_last: bool):
    model = build_model("cnn", {"input_shape": [1, 28, 28], "output_size": 10}, model_cfg()).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ---- contenders -------------------------------------------------------------------------------------


def run_trainyard(
    prepared, args, device, *, compile_mode: str | None = None, cuda_graph: bool = False
) -> tuple[float, dict]:
    """images/s of train_model after a warm-up call; with compile, the steady-state epochs (2..E)."""
    train = {"batch_size": args.batch_size, "device": device.type, "progress": "log", "cuda_graph": cuda_graph}
    if compile_mode:
        train.update(compile=True, compile_mode=compile_mode)
    warm = digits_prepared(min(args.batch_size * 20, args.n), args.n_val, seed=1)
    optim = OptimConfig(name="adam", lr=LR)
    with tempfile.TemporaryDirectory() as tmp:
        train_model(warm, model_cfg(), optim, ScheduleConfig(), TrainSection(**train, epochs=1), tmp)
        sync(device)
        result = train_model(
            prepared, model_cfg(), optim, ScheduleConfig(), TrainSection(**train, epochs=args.epochs), tmp
        )
    n = prepared.tensors["y_train"].shape[0]
    if compile_mode and args.epochs >= 2:
        steady = sum(h["seconds"] for h in result.history[1:])
        return n * (args.epochs - 1) / steady, {"seconds": round(steady, 4), "epochs_timed": args.epochs - 1}
    info = {"seconds": round(result.seconds, 4), "epochs_timed": args.epochs, "precision": result.precision}
    return n * args.epochs / result.seconds, info


def run_plain(prepared, args, device) -> tuple[float, dict]:
    """The hand-written GPU-resident loop."""
    torch.manual_seed(0)
    cl = device.type == "cuda"
    precision = pick_precision("auto", device)
    x = (prepared.tensors["x_train"].to(device).float() / 255 - MEAN) / STD
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = prepared.tensors["y_train"].to(device)
    n, b = x.shape[0], args.batch_size
    model = new_model(device, cl)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def epoch(steps: int | None = None):
        model.train()
        perm = torch.randperm(n, device=device)
        for k, i in enumerate(range(0, n, b)):
            if steps is not None and k >= steps:
                break
            idx = perm[i : i + b]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            with autocast_ctx(device, precision):
                out = model(xb)
            loss = F.cross_entropy(out.float(), yb)
            loss.backward()
            opt.step()

    epoch(steps=20)  # warm-up
    with Timer(device) as t:
        for _ in range(args.epochs):
            epoch()
    return n * args.epochs / t.seconds, {"seconds": round(t.seconds, 4), "precision": precision}


class PerItemDataset(torch.utils.data.Dataset):
    """The tutorial style: one image at a time, converted and normalised in __getitem__."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        image = self.x[i].float() / 255
        return (image - MEAN) / STD, self.y[i]


def run_tutorial(prepared, args, device) -> tuple[float, dict]:
    torch.manual_seed(0)
    ds = PerItemDataset(prepared.tensors["x_train"], prepared.tensors["y_train"])
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    model = new_model(device, False)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    epochs = args.tutorial_epochs

    def epoch(steps: int | None = None):
        model.train()
        for k, (xb, yb) in enumerate(loader):
            if steps is not None and k >= steps:
                break
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()

    epoch(steps=20)
    with Timer(device) as t:
        for _ in range(epochs):
            epoch()
    info = {"seconds": round(t.seconds, 4), "batch_size": 64, "precision": "fp32", "epochs_timed": epochs}
    return len(ds) * epochs / t.seconds, info


def import_lightning():
    try:
        import lightning.pytorch as pl

        return pl, "lightning"
    except ImportError:
        pass
    try:
        import pytorch_lightning as pl

        return pl, "pytorch_lightning"
    except ImportError:
        return None, None


# what Trainer.fit would write or print besides training, off so that it does not count in the time
QUIET_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def run_lightning(pl, prepared, args, device) -> tuple[float, dict]:
    """Trainer.fit in the usual style: a DataLoader over normalised host tensors, workers, pinned memory."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    cl = device.type == "cuda"

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = new_model("cpu", False)

        def training_step(self, batch, _):
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.seconds = []

        def on_train_epoch_start(self, trainer, module):
            sync(device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            sync(device)
            self.seconds.append(time.perf_counter() - self.start)

    x = (prepared.tensors["x_train"].float() / 255 - MEAN) / STD
    ds = torch.utils.data.TensorDataset(x, prepared.tensors["y_train"])
    workers = min(4, max((os.cpu_count() or 2) - 1, 1))

    def fit(data, epochs):
        loader = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, shuffle=True, num_workers=workers, pin_memory=cl, persistent_workers=True
        )
        timer = EpochTimer()
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if cl else "cpu",
            devices=1,
            precision="bf16-mixed" if cl else "32-true",
            callbacks=[timer],
            **QUIET_TRAINER,
        )
        with Timer(device) as t:
            trainer.fit(Module(), loader)
        return timer.seconds, t.seconds

    fit(torch.utils.data.Subset(ds, range(min(len(ds), args.batch_size * 20))), 1)  # warm-up
    epoch_seconds, fit_seconds = fit(ds, args.epochs)
    return len(ds) * args.epochs / sum(epoch_seconds), {
        "seconds": round(sum(epoch_seconds), 4),
        "fit_wall_seconds": round(fit_seconds, 4),
        "workers": workers,
        "timed": "train epochs (callback), excluding Trainer set-up",
    }


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=0, help="training images (default 60000 on CUDA, 2000 on CPU)")
    parser.add_argument("--epochs", type=int, default=0, help="timed epochs (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--tutorial-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (CUDA only)")
    return parser.parse_args(argv)


def compare_eager(prepared, args, device, common: dict) -> tuple[float, float, float | None]:
    """Trainyard's default step against the plain loop, the tutorial style and Lightning: the three
    result lines, and (trainyard, plain, lightning or None) images/s."""
    cuda = device.type == "cuda"
    ty, ty_info = run_trainyard(prepared, args, device)
    plain, plain_info = run_plain(prepared, args, device)
    gpu_note = "" if cuda else " (targets are for a GPU; CPU figure for reference)"
    emit(
        "train_throughput.trainyard_vs_plain",
        images_per_s=round(ty, 1),
        trainyard=ty_info,
        **common,
        baseline={"name": "plain GPU-resident loop", "images_per_s": round(plain, 1), **plain_info},
        ratio=ty / plain,
        target=">= 1.0x (stretch 1.5x) on a GPU" + gpu_note,
        met=ty / plain >= 1.0 if cuda else None,
    )

    tut, tut_info = run_tutorial(prepared, args, device)
    tutorial = {"name": "tutorial style (per-item Dataset, batch 64, fp32)", "images_per_s": round(tut, 1), **tut_info}
    emit(
        "train_throughput.trainyard_vs_tutorial",
        images_per_s=round(ty, 1),
        **common,
        baseline=tutorial,
        ratio=ty / tut,
        target="> 1.0x (no target in the issue; for reference)",
        met=ty / tut > 1.0,
    )

    pl, pl_name = import_lightning()
    if pl is None:
        note("train_throughput.trainyard_vs_lightning", skipped="neither lightning nor pytorch_lightning is importable")
        return ty, plain, None
    lt, lt_info = run_lightning(pl, prepared, args, device)
    lightning = {"name": f"{pl_name} Trainer.fit", "images_per_s": round(lt, 1), "version": pl.__version__, **lt_info}
    emit(
        "train_throughput.trainyard_vs_lightning",
        images_per_s=round(ty, 1),
        **common,
        baseline=lightning,
        ratio=ty / lt,
        target=">= 2.0x on a GPU" + gpu_note,
        met=ty / lt >= 2.0 if cuda else None,
    )
    return ty, plain, lt


def compare_graph(prepared, args, device, common: dict, ty: float, plain: float, lt: float | None) -> None:
    """train.cuda_graph (the whole step replayed from one CUDA graph) against the plain loop."""
    name = "train_throughput.trainyard_graph_vs_plain"
    try:
        with GraphLog() as graph_log:
            tg, tg_info = run_trainyard(prepared, args, device, cuda_graph=True)
        tg_info["graph_log"] = graph_log.lines  # replays and eager steps; a failed capture says so here
    except Exception as exc:  # report rather than stop: the other figures still count
        note(name, skipped=f"train.cuda_graph failed: {type(exc).__name__}: {exc}")
        return
    emit(
        name,
        images_per_s=round(tg, 1),
        trainyard=tg_info,
        **common,
        cuda_graph=True,
        baseline={"name": "plain GPU-resident loop", "images_per_s": round(plain, 1)},
        ratio=tg / plain,
        target=">= 1.0x (stretch 1.5x, with CUDA graphs)",
        met=tg / plain >= 1.0,
        stretch_met=tg / plain >= 1.5,
        eager_images_per_s=round(ty, 1),
        vs_lightning=round(tg / lt, 3) if lt is not None else None,
    )


def compare_compiled(prepared, args, device, common: dict, ty: float, plain: float) -> None:
    """torch.compile(mode="reduce-overhead") against the plain loop."""
    name = "train_throughput.trainyard_compiled_vs_plain"
    try:
        tc, tc_info = run_trainyard(prepared, args, device, compile_mode="reduce-overhead")
    except Exception as exc:  # compile needs a working toolchain; report rather than stop
        note(name, skipped=f"torch.compile failed: {type(exc).__name__}: {exc}")
        return
    emit(
        name,
        images_per_s=round(tc, 1),
        trainyard=tc_info,
        **common,
        compile_mode="reduce-overhead",
        baseline={"name": "plain GPU-resident loop", "images_per_s": round(plain, 1)},
        ratio=tc / plain,
        target=">= 1.0x; train.compile stays off unless this beats trainyard_vs_plain",
        met=tc / plain >= 1.0,
        uncompiled_images_per_s=round(ty, 1),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.n = args.n or (60_000 if cuda else 2_000) // (4 if args.quick else 1)
    args.epochs = args.epochs or (1 if args.quick or not cuda else 3)
    args.n_val = max(32, args.n // 60)  # a small validation split: train_model validates every epoch
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    prepared = digits_prepared(args.n, args.n_val)
    common = {"n_train": args.n, "epochs": args.epochs, "batch_size": args.batch_size, "device": str(device)}
    model = "examples net (cnn valid/pool-last)"
    note("train_throughput.settings", **common, n_val=args.n_val, model=model, torch=torch.__version__)
    ty, plain, lt = compare_eager(prepared, args, device, common)
    if cuda:
        compare_graph(prepared, args, device, common, ty, plain, lt)
    if cuda and not args.no_compile:
        compare_compiled(prepared, args, device, common, ty, plain)


if __name__ == "__main__":
    main()
