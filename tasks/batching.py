"""Batches for the train loop: device-resident when the data fits, the DataLoader otherwise.

Resident path: the prepared train/val tensors are moved to the device once, as stored
(uint8 images stay uint8), the order is a `torch.randperm` drawn on the device from a
seeded generator, and a batch is an `index_select` of the resident tensors. Only the batch
is converted to float32 and normalised, on the device; random shifts (augment=shift) are
applied there too.

Fallback: a DataLoader over the same stored tensors (pinned memory on CUDA, workers as
configured), copied with `non_blocking=True`, then the same per-batch preparation on the
device. Nothing here reads a value back to the host.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from tasks.data import Normalize, TensorSplit, make_loader, order_generator
from tasks.distributed import World, padded_order, rank_seed, stride_rows
from tasks.errors import TrainingError
from tasks.prepared import Prepared
from tasks.train_config import TrainSection

log = logging.getLogger("trainyard.train")

Batch = tuple[torch.Tensor, torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]  # a whole split's (inputs, targets), as stored


# ---- per-batch preparation on the device -------------------------------------------------------


class BatchPrep:
    """Stored batch -> model input on the device: optional random shifts, float32, normalisation, layout."""

    def __init__(
        self,
        normalize: Normalize | None,
        device: torch.device,
        *,
        channels_last: bool = False,
        shift: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.device = device
        self.channels_last = channels_last
        self.shift = shift
        self.generator = generator
        self.normalize = normalize

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.shift and x.dim() == 4:
            x = random_shift(x, self.shift, self.generator)
        x = x.to(torch.float32)
        if self.normalize is not None:
            x = self.normalize(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate every image of an NxCxHxW batch by its own random (dy, dx) in [-max_shift, max_shift].

    Pixels shifted in are zeros of the stored data (black for MNIST's uint8), applied before
    normalisation. One gather on the device; the result has channels_last strides.
    """
    n, _, h, w = x.shape
    p = max_shift
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: N,H,W,C -> N,C,H,W


# ---- the two paths --------------------------------------------------------------------------------


class ResidentBatcher:
    """Batches cut from tensors held on the device; reshuffled every epoch with a seeded device generator."""

    resident = True

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str,
        shuffle: bool = True,
        seed: int = 0,
        prep: BatchPrep | None = None,
        train: bool = True,
        world: World | None = None,
    ):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        self.world = world  # with several processes: this rank keeps its stride of each epoch's order
        self.device = torch.device(device)
        self.x = x.to(self.device)  # as stored: uint8 images stay uint8
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.prep = prep
        self.train = train
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _rows(self) -> int:
        n = self.x.shape[0]
        return n if self.world is None else math.ceil(n / self.world.size)

    def __len__(self) -> int:
        return math.ceil(self._rows() / self.batch_size)

    def epoch_order(self) -> torch.Tensor | None:
        """The rows of this epoch in order (None: all of them as stored). Every rank draws the same seeded
        permutation, so the ranks' strides of it are disjoint and together the whole split."""
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        elif self.world is not None:
            order = torch.arange(n, device=self.device)
        else:
            return None
        return order if self.world is None else padded_order(order, self.world)

    def __iter__(self) -> Iterator[Batch]:
        n, b = self._rows(), self.batch_size
        order = self.epoch_order()
        for start in range(0, n, b):
            if order is None:
                xb, yb = self.x[start : start + b], self.y[start : start + b]
            else:
                idx = order[start : start + b]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            yield (self.prep(xb, self.train) if self.prep is not None else xb), yb


class LoaderBatcher:
    """The fallback: a DataLoader over the stored tensors, copied to the device without blocking."""

    resident = False

    def __init__(self, loader, device: torch.device | str, prep: BatchPrep | None = None, train: bool = True):
        self.loader = loader
        self.device = torch.device(device)
        self.prep = prep
        self.train = train

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield (self.prep(x, self.train) if self.prep is not None else x), y


# ---- choosing -----------------------------------------------------------------------------------


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device's memory; the host's RAM for cpu (and mps, which shares it)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0
    return int(free), int(total)


@dataclass
class Residency:
    resident: bool
    reason: str
    needed: int = 0
    budget: int = 0


def plan_residency(mode: str, device: torch.device, needed: int, share: float) -> Residency:
    """Whether to keep the data on the device: `mode` is train.gpu_resident, `share` train.gpu_memory_share."""
    if mode == "off":
        return Residency(False, "train.gpu_resident is off", needed)
    if mode == "auto" and device.type != "cuda":
        return Residency(False, f"train.gpu_resident=auto keeps the data on the host for {device.type}", needed)
    free, total = device_memory(device)
    budget = int(min(share * total, free)) if total else 0
    mib = 1 << 20
    if needed > budget:
        return Residency(
            False,
            f"the data needs {needed / mib:.1f} MiB, more than train.gpu_memory_share={share} of the device's "
            f"{total / mib:.0f} MiB ({free / mib:.0f} MiB free)",
            needed,
            budget,
        )
    return Residency(True, f"the data ({needed / mib:.1f} MiB) fits {share} of the device's memory", needed, budget)


@dataclass
class Batches:
    train: ResidentBatcher | LoaderBatcher
    val: ResidentBatcher | LoaderBatcher
    residency: Residency

    def _generators(self) -> dict[str, torch.Generator]:
        gens: dict[str, torch.Generator] = {}
        train = self.train
        if isinstance(train, ResidentBatcher):
            gens["order"] = train.generator
        elif (order := order_generator(train.loader)) is not None:
            gens["order"] = order
        if train.prep is not None and train.prep.generator is not None:
            gens["augment"] = train.prep.generator
        return gens

    def set_epoch(self, epoch: int) -> None:
        """Tell a DistributedSampler which epoch's order to draw (it seeds itself with seed + epoch)."""
        sampler = getattr(getattr(self.train, "loader", None), "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The states of the generators behind the epoch order and the augmentation (for checkpoints)."""
        return {name: g.get_state() for name, g in self._generators().items()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        gens = self._generators()
        if set(state) != set(gens):
            raise ValueError(f"checkpoint holds generator states {sorted(state)}, this run has {sorted(gens)}")
        for name, g in gens.items():
            g.set_state(state[name])


def _shift_pixels(train_cfg: TrainSection, x_train: torch.Tensor) -> int:
    """The largest random shift of train.augment=shift (0: no augmentation); images only."""
    if train_cfg.augment != "shift":
        return 0
    if x_train.dim() != 4:
        raise TrainingError(
            f"train.augment=shift needs image inputs shaped CxHxW; this dataset's inputs are shaped "
            f"{list(x_train.shape[1:])}; use train.augment=none"
        )
    return train_cfg.shift_pixels


def _resident(
    train_cfg: TrainSection, train: Split, val: Split, device: torch.device, prep: BatchPrep, world: World | None
) -> tuple[ResidentBatcher, ResidentBatcher]:
    size, seed, shuffle = train_cfg.batch_size, train_cfg.seed, train_cfg.shuffle
    train_batches = ResidentBatcher(*train, size, device=device, shuffle=shuffle, seed=seed, prep=prep, world=world)
    val_batches = ResidentBatcher(*val, train_cfg.eval_batch_size, device=device, shuffle=False, prep=prep, train=False)
    return train_batches, val_batches


def _loaders(
    train_cfg: TrainSection, train: Split, val: Split, device: torch.device, prep: BatchPrep, world: World | None
) -> tuple[LoaderBatcher, LoaderBatcher]:
    pin = device.type == "cuda"
    dataset = TensorSplit(*train)
    sampler = None
    if world is not None:  # padded like the resident path's strides: every rank takes as many steps
        sampler = DistributedSampler(dataset, world.size, world.rank, shuffle=train_cfg.shuffle, seed=train_cfg.seed)
    train_loader = make_loader(
        dataset,
        train_cfg.batch_size,
        shuffle=train_cfg.shuffle,
        num_workers=train_cfg.num_workers,
        seed=train_cfg.seed,
        pin_memory=pin,
        sampler=sampler,
    )
    val_loader = make_loader(TensorSplit(*val), train_cfg.eval_batch_size, shuffle=False, pin_memory=pin)
    return LoaderBatcher(train_loader, device, prep), LoaderBatcher(val_loader, device, prep, train=False)


def make_batches(
    prepared: Prepared,
    train_cfg: TrainSection,
    device: torch.device,
    *,
    channels_last: bool = False,
    world: World | None = None,
) -> Batches:
    """The train and val batch sources for `train_cfg` on `device`, resident when the data fits. With a
    `world`, `train_cfg.batch_size` is this process's share, and the validation rows are its stride."""
    train, val = prepared.split("train"), prepared.split("val")
    if world is not None:
        rows = stride_rows(val[1].shape[0], world)
        val = (val[0][rows].contiguous(), val[1][rows].contiguous())
    shift = _shift_pixels(train_cfg, train[0])
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(rank_seed(train_cfg.seed, world) + 1)
    normalize = Normalize.of(prepared.schema, train[0].dim() - 1, device)
    prep = BatchPrep(normalize, device, channels_last=channels_last, shift=shift, generator=aug_gen)
    needed = nbytes(*train, *val)
    plan = plan_residency(train_cfg.gpu_resident, device, needed, train_cfg.gpu_memory_share)
    log.info("batches: %s (%s)", "device-resident" if plan.resident else "DataLoader", plan.reason)
    build = _resident if plan.resident else _loaders
    return Batches(*build(train_cfg, train, val, device, prep, world), plan)
