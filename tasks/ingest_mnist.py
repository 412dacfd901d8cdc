"""MNIST ingest: IDX files -> uint8 image tensors, int64 labels and a schema.

Files are looked for in `<root>/MNIST/raw/` (where torchvision downloads them) and in
`<root>/` itself, plain or gzipped. When they are missing and downloading is allowed,
`torchvision.datasets.MNIST(download=True)` fetches them. The IDX files are then read
by a small validating reader, so a corrupt or truncated file gives a message that names
the file and what was expected instead of an error from deep inside numpy.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tasks.data_config import DataConfig
from tasks.errors import DataError, MnistUnavailableError
from tasks.prepared import Prepared, cache_key

log = logging.getLogger("trainyard.ingest")

TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.1307, 0.3081
LABELS = [str(i) for i in range(10)]


def _candidates(root: Path, name: str) -> list[Path]:
    return [root / "MNIST" / "raw" / name, root / "MNIST" / "raw" / f"{name}.gz", root / name, root / f"{name}.gz"]


def find_file(root: Path, name: str) -> Path | None:
    return next((p for p in _candidates(root, name) if p.is_file()), None)


def _needed(split: str) -> tuple[str, ...]:
    return TEST_FILES if split == "t10k" else TRAIN_FILES + TEST_FILES


def _missing_message(root: Path, names: tuple[str, ...], why: str) -> str:
    return (
        f"MNIST files missing in {root}: {', '.join(names)} ({why}). "
        f"Put these files (plain or .gz) in {root}/ or {root}/MNIST/raw/: "
        f"{', '.join(n + '.gz' for n in names)}; "
        f"they are published at https://ossci-datasets.s3.amazonaws.com/mnist/"
    )


def download(root: Path) -> None:
    """Fetch MNIST with torchvision; an offline machine gets a message that says what to put where."""
    from torchvision.datasets import MNIST

    log.info("downloading MNIST into %s", root / "MNIST" / "raw")
    try:
        # torchvision prints its progress on stdout; keep stdout clean for --json.
        with contextlib.redirect_stdout(sys.stderr):
            MNIST(str(root), train=True, download=True)
    except Exception as exc:  # URLError, socket timeouts, HTTP errors, checksum failures
        missing = tuple(n for n in TRAIN_FILES + TEST_FILES if find_file(root, n) is None)
        # torchvision's reason spans lines (one per mirror tried): one line here, as every error of ours
        reason = " ".join(str(exc).split())
        raise MnistUnavailableError(
            _missing_message(
                root, missing or TRAIN_FILES + TEST_FILES, f"download failed: {type(exc).__name__}: {reason}"
            )
        ) from None


def ensure_files(root: Path, split: str, allow_download: bool) -> dict[str, Path]:
    names = _needed(split)
    missing = tuple(n for n in names if find_file(root, n) is None)
    if missing:
        if not allow_download or split == "t10k":
            why = "data.download is off" if not allow_download else "split t10k never downloads"
            raise MnistUnavailableError(_missing_message(root, missing, why))
        download(root)
        missing = tuple(n for n in names if find_file(root, n) is None)
        if missing:
            raise MnistUnavailableError(_missing_message(root, missing, "not present after download"))
    return {n: find_file(root, n) for n in names}  # type: ignore[misc]


def read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes, checking its magic number, dimensions and size."""
    data = _decoded_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(
            f"MNIST file {path} is not an IDX file: bad magic number {data[:4].hex() or 'empty file'}; "
            f"expected 0000080{expect_ndim} (unsigned bytes, {expect_ndim} dimensions)"
        )
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"MNIST file {path}: IDX data type 0x{dtype_code:02x}, expected 0x08 (unsigned bytes)")
    if ndim != expect_ndim:
        raise DataError(f"MNIST file {path}: {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"MNIST file {path} is truncated inside its header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    found = len(data) - header
    if found != expected:
        raise DataError(
            f"MNIST file {path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, found {found}"
            + (" (truncated)" if found < expected else " (trailing bytes)")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"MNIST files {images} and {labels} disagree: {x.shape[0]} images but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise DataError(f"MNIST file {images} holds no images (its header says 0); expected at least one")
    if x.shape[1:] != (28, 28):
        raise DataError(f"MNIST file {images}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
    if y.size and y.max() > 9:
        raise DataError(f"MNIST file {labels}: label {int(y.max())} at index {int(y.argmax())}, expected 0 to 9")
    return x, y


def ingest_mnist(data_cfg: DataConfig, state_root: Path) -> tuple[str, str, Callable[[], Prepared]]:
    """Return (cache key, content hash, a builder that makes the Prepared dataset)."""
    root = Path(data_cfg.root).expanduser().resolve()
    files = ensure_files(root, data_cfg.split, data_cfg.download)
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(hashlib.sha256(_decoded_bytes(files[name])).digest())
    content_hash = h.hexdigest()
    params = data_cfg.model_dump(include={"split", "n_train", "limit", "val_fraction", "split_seed"})
    params["source"] = "mnist"
    key = cache_key(content_hash, params)
    return key, content_hash, lambda: build_mnist(data_cfg, files, content_hash)


def _decoded_bytes(path: Path) -> bytes:
    """The file's bytes, a .gz file decompressed."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"MNIST file {path} is corrupt or truncated (gzip: {exc}); download it again") from None


def build_mnist(data_cfg: DataConfig, files: dict[str, Path], content_hash: str) -> Prepared:
    if data_cfg.split == "t10k":
        x, y = read_pair(files[TEST_FILES[0]], files[TEST_FILES[1]])
        if data_cfg.n_train >= x.shape[0]:
            raise DataError(
                f"data.n_train={data_cfg.n_train} leaves no test images: the t10k files hold {x.shape[0]} images"
            )
        pool_x, pool_y = x[: data_cfg.n_train], y[: data_cfg.n_train]
        test_x, test_y = x[data_cfg.n_train :], y[data_cfg.n_train :]
    else:
        pool_x, pool_y = read_pair(files[TRAIN_FILES[0]], files[TRAIN_FILES[1]])
        test_x, test_y = read_pair(files[TEST_FILES[0]], files[TEST_FILES[1]])
    if data_cfg.limit:
        pool_x, pool_y = pool_x[: data_cfg.limit], pool_y[: data_cfg.limit]
    # Validation comes out of the training pool, stratified by digit; the test files stay untouched.
    train_idx, val_idx = _val_split(pool_y, data_cfg.val_fraction, data_cfg.split_seed)

    def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    tensors: dict[str, torch.Tensor] = {}
    for split, (images, labels) in {
        "train": (pool_x[train_idx], pool_y[train_idx]),
        "val": (pool_x[val_idx], pool_y[val_idx]),
        "test": (test_x, test_y),
    }.items():
        tensors[f"x_{split}"], tensors[f"y_{split}"] = as_tensors(images, labels)
    schema = {
        "source": "mnist",
        "split": data_cfg.split,
        "files": {name: str(path) for name, path in files.items()},
        "content_hash": content_hash,
        "task": "classification",
        "task_reason": "MNIST digits",
        "binary": False,
        "n_classes": 10,
        "label_names": LABELS,
        "input_shape": [1, 28, 28],
        "output_size": 10,
        "features": [],
        "feature_names": [],
        "target": {"name": "digit"},
        # Images are stored as uint8 and scaled once when loaded: (x / 255 - mean) / std.
        "normalize": {"scale": 1 / 255, "mean": [MEAN], "std": [STD]},
        "split_sizes": {"train": int(train_idx.size), "val": int(val_idx.size), "test": int(test_x.shape[0])},
    }
    return Prepared(tensors=tensors, schema=schema)


def _val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = labels.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"MNIST: {n} training images are too few for a validation share of {val_fraction}")
    rng = np.random.default_rng(seed)
    val_parts, train_parts = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        c_val = int(round(idx.size * val_fraction))
        val_parts.append(idx[:c_val])
        train_parts.append(idx[c_val:])
    val = np.concatenate(val_parts)
    if val.size == 0:
        val = rng.permutation(n)[:n_val]
    train = np.setdiff1d(np.arange(n), val)
    return np.sort(train), np.sort(val)
