"""Data stage: Datasets and DataLoaders over a prepared dataset's tensors.

`Normalize` is the one place the schema's normalisation becomes arithmetic.
`TensorSplit.from_prepared` converts a split once with it (uint8 images scaled and
normalised to float32; evaluation uses it). Training goes through tasks/batching.py, which
keeps the stored tensors as they are (uint8 stays uint8) and normalises each batch on the
device with the same `Normalize`; its fallback path is `make_loader` over a `TensorSplit` of the stored tensors. Either
way a batch is cut by indexing tensors, never by building samples from pandas rows:
`__getitems__` lets the DataLoader fetch a whole batch with one index operation instead
of one `__getitem__` call and a collate per sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from tasks.prepared import Prepared


class Normalize:
    """The schema's `normalize` ({scale, mean, std}; mean and std per channel, or per feature of a
    table) as arithmetic: `(x * scale - mean) / std`, folded into one multiply-add `x * a + b` whose
    factors are worked out in float64. Training batches and evaluation inputs both go through it."""

    def __init__(self, norm: dict[str, Any], input_ndim: int, device: torch.device | str | None = None):
        shape = (1, -1) + (1,) * (input_ndim - 1)  # broadcast over the batch and any spatial dims
        mean = torch.tensor(norm["mean"], dtype=torch.float64)
        std = torch.tensor(norm["std"], dtype=torch.float64)
        self.a = (norm["scale"] / std).to(torch.float32).view(shape).to(device)
        self.b = (-mean / std).to(torch.float32).view(shape).to(device)

    @classmethod
    def of(cls, schema: dict[str, Any], input_ndim: int, device: torch.device | str | None = None) -> Normalize | None:
        """The schema's normalisation, or None when it has none."""
        norm = schema.get("normalize")
        return cls(norm, input_ndim, device) if norm else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.b, x.to(torch.float32), self.a)


def features(prepared: Prepared, split: str) -> torch.Tensor:
    """The split's inputs as float32, normalised as the schema says."""
    x = prepared.tensors[f"x_{split}"]
    normalize = Normalize.of(prepared.schema, x.dim() - 1)
    return normalize(x) if normalize is not None else x.to(torch.float32)


class TensorSplit(Dataset):
    """One split of a prepared dataset, held as tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs have {x.shape[0]} rows but targets {y.shape[0]}")
        self.x, self.y = x, y

    @classmethod
    def from_prepared(cls, prepared: Prepared, split: str) -> TensorSplit:
        return cls(features(prepared, split), prepared.tensors[f"y_{split}"])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [self.x.index_select(0, idx), self.y.index_select(0, idx)]


def _as_batch(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    # __getitems__ already returns [inputs, targets]; a dataset without it gives (x, y) samples.
    if isinstance(batch[0], tuple):
        xs, ys = zip(*batch, strict=True)
        return torch.stack(xs), torch.stack(ys)
    return batch[0], batch[1]


def make_loader(
    dataset: TensorSplit,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    # The epoch order has a generator of its own (the sampler's, saved in checkpoints). The loader's
    # generator only seeds its worker processes, which draw nothing random here: it is drawn once per
    # epoch without workers but once per run with persistent workers, and sharing one generator
    # would make a resumed run's order differ from an uninterrupted one's.
    order = torch.Generator()
    order.manual_seed(seed)
    workers = torch.Generator()
    workers.manual_seed(seed + 1)
    if sampler is None:  # a DistributedSampler (several processes) draws its own seeded order
        sampler = RandomSampler(dataset, generator=order) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_as_batch,
        generator=workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def order_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator behind a loader's epoch order (None when it does not shuffle)."""
    return loader.sampler.generator if isinstance(loader.sampler, RandomSampler) else None
