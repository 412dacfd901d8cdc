import numpy as np
import pytest
import torch

from pipelines.config import DataConfig
from tasks import ingest_mnist
from tasks.errors import DataError
from tasks.ingest import ingest
from tasks.ingest_mnist import MnistUnavailableError
from tasks.prepared import load_prepared
from tests.conftest import make_digits, write_idx, write_mnist


def test_official_split_reads_gz_files(mnist_root, state_home):
    ref = ingest(DataConfig(root=str(mnist_root), val_fraction=0.2), state_home)
    prepared = load_prepared(ref.path)
    assert prepared.schema["input_shape"] == [1, 28, 28] and prepared.schema["output_size"] == 10
    assert prepared.schema["split_sizes"] == {"train": 240, "val": 60, "test": 100}
    assert prepared.tensors["x_train"].dtype == torch.uint8 and prepared.tensors["x_train"].shape[1:] == (1, 28, 28)
    x_test, y_test = make_digits(100, 2)
    assert torch.equal(prepared.tensors["y_test"], torch.from_numpy(y_test.astype(np.int64)))


def test_torchvision_layout_and_plain_files(tmp_path, state_home):
    root = write_mnist(tmp_path / "tv", gz=False, raw_layout=True)
    ref = ingest(DataConfig(root=str(root)), state_home)
    assert ref.split_sizes["test"] == 100


def test_t10k_split_uses_first_rows_for_training(tmp_path, state_home):
    folder = tmp_path / "t10k"
    x, y = make_digits(50, 5)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x, gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y, gz=True)
    prepared = load_prepared(ingest(DataConfig(root=str(folder), split="t10k", n_train=40), state_home).path)
    assert torch.equal(prepared.tensors["y_test"], torch.from_numpy(y[40:].astype(np.int64)))
    assert prepared.schema["split_sizes"]["train"] + prepared.schema["split_sizes"]["val"] == 40


def test_same_files_reuse_the_prepared_dataset(mnist_root, state_home):
    first = ingest(DataConfig(root=str(mnist_root)), state_home)
    assert ingest(DataConfig(root=str(mnist_root)), state_home).reused
    assert ingest(DataConfig(root=str(mnist_root), limit=100), state_home).key != first.key


def test_offline_without_download_says_what_to_put_where(tmp_path, state_home):
    with pytest.raises(MnistUnavailableError) as err:
        ingest(DataConfig(root=str(tmp_path / "empty"), download=False), state_home)
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg


def test_failed_download_is_a_clear_error(tmp_path, state_home, monkeypatch):
    import torchvision.datasets

    class Offline:  # as torchvision reports it: a line per mirror tried
        def __init__(self, *a, **kw):
            raise RuntimeError(
                "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws.com/mnist/, "
                "got:\n<urlopen error [Errno -3] Temporary failure in name resolution>\n"
            )

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(MnistUnavailableError) as err:
        ingest(DataConfig(root=str(tmp_path / "dl")), state_home)
    msg = str(err.value)
    assert "download failed" in msg and "name resolution" in msg and "MNIST/raw" in msg
    assert "\n" not in msg and "got: <urlopen error" in msg  # one line, however many torchvision wrote


def test_download_is_only_tried_when_files_are_missing(mnist_root, state_home, monkeypatch):
    calls = []
    monkeypatch.setattr(ingest_mnist, "download", lambda root: calls.append(root))
    ingest(DataConfig(root=str(mnist_root)), state_home)
    assert calls == []


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: b"\x08\x00" + d[2:], "bad magic number"),
        (lambda d: d[: len(d) - 100], "found"),
        (lambda d: d + b"\x00\x00", "trailing bytes"),
        (lambda d: d[:2] + b"\x0d" + d[3:], "expected 0x08"),
        (lambda d: d[:6], "truncated inside its header"),
    ],
)
def test_corrupt_idx_files(tmp_path, state_home, damage, fragment):
    root = write_mnist(tmp_path / "bad", gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as err:
        ingest(DataConfig(root=str(root)), state_home)
    assert "train-images-idx3-ubyte" in str(err.value) and fragment in str(err.value)


def test_truncated_gzip(tmp_path, state_home):
    root = write_mnist(tmp_path / "gz")
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is corrupt or truncated"):
        ingest(DataConfig(root=str(root)), state_home)


def test_test_files_with_no_images_are_refused(tmp_path, state_home):
    root = write_mnist(tmp_path / "empty")
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8), gz=True)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(0, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz holds no images \(its header says 0\)"):
        ingest(DataConfig(root=str(root)), state_home)


def test_images_and_labels_disagree(tmp_path, state_home):
    root = write_mnist(tmp_path / "n")
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="100 images but 7 labels"):
        ingest(DataConfig(root=str(root)), state_home)
