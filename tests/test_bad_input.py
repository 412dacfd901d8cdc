"""Bad input wherever it enters: one test (or one parametrized case) per row of docs/reliability.md.

Each refusal names its source (file, key or URI), the field or column (and the row where
there is one) and what was expected; and nothing prepared or published earlier is lost.
Rows that older tests already cover point at them in the doc instead of being repeated here.
No flows and no servers: the config loader, the ingest and the stores are called directly.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.config import ConfigError, DataConfig, TrainConfig, load_config
from tasks import csv_read
from tasks.errors import DataError
from tasks.ingest import ingest
from tasks.prepared import load_prepared
from tasks.s3store import S3Store, parse_s3_uri
from tasks.storage import LocalStore, StorageError, check_key, open_store
from tasks.tracking import safe_name
from tests.conftest import write_idx, write_mnist

# ---- helpers: a dataset prepared earlier must survive every refusal ---------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_untouched(state_home: Path, earlier: tuple[Path, dict[str, str]]) -> None:
    folder, before = earlier
    # no partial or temporary folder beside the earlier dataset, and that one is byte for byte the same
    assert [p.name for p in (state_home / "datasets").iterdir()] == [folder.name]
    assert snapshot(folder) == before
    assert load_prepared(folder).tensors["x_train"].shape[0] > 0


def csv_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(path), target=kw.pop("target", "label"), **kw)


def good_rows(n: int = 60) -> str:
    return "".join(f"{i},{i % 7},{'ab'[i % 2]}\n" for i in range(n))


@pytest.fixture
def earlier(tmp_path, state_home) -> tuple[Path, dict[str, str]]:
    """A CSV dataset prepared before the bad input arrives."""
    path = tmp_path / "earlier.csv"
    path.write_text("x,y,label\n" + good_rows())
    folder = Path(ingest(csv_cfg(path), state_home).path)
    return folder, snapshot(folder)


def put(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(state_home, earlier, data_cfg, *fragments) -> str:
    with pytest.raises(DataError) as err:
        ingest(data_cfg, state_home)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, msg
    assert_untouched(state_home, earlier)
    return msg


def config_refused(*fragments, preset="mnist", config_file=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, config_file, list(overrides), env={})
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---- config files and --set overrides ---------------------------------------------------------


def test_config_file_that_is_not_a_mapping(tmp_path):
    path = put(tmp_path, "list.yaml", "- train\n- epochs\n")
    config_refused(str(path), "expected a mapping of sections, got list", preset=None, config_file=path)


def test_config_file_that_is_not_utf8(tmp_path):
    data = "train:\n  epochs: 3  # caf\xe9\n".encode("latin-1")
    path = put(tmp_path, "latin.yaml", data)
    offset = data.index(0xE9)
    config_refused(str(path), "is not UTF-8 text", f"byte 0xe9 in position {offset}", preset=None, config_file=path)


def test_config_section_given_a_scalar(tmp_path):
    path = put(tmp_path, "scalar.yaml", "train: 5\n")
    config_refused(str(path), "train: Input should be a valid dictionary", preset=None, config_file=path)


def test_override_of_the_wrong_type():
    config_refused("preset mnist + --set", "train.epochs", "valid integer", overrides=["train.epochs=three"])
    config_refused(
        "data.features", "valid list", preset="csv", overrides=["data.path=a.csv", "data.target=y", "data.features=x"]
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.kwargs={eps: .inf}", "optim.kwargs"),
        ("train.grad_clip=.inf", "train.grad_clip"),
    ],
    ids=["weight_decay", "kwargs", "grad_clip"],
)
def test_infinite_number_is_refused(override, field):
    config_refused(field, "expected a finite number, got inf", overrides=[override])


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("optim.lr=.nan", "optim.lr", "less than or equal to 100"),
        ("train.grad_clip=.nan", "train.grad_clip", "greater than or equal to 0"),
    ],
    ids=["lr", "grad_clip"],
)
def test_nan_is_refused(override, field, words):
    config_refused(field, words, overrides=[override])


def test_milestones_out_of_order():
    config_refused(
        "schedule.milestones must be strictly increasing positive epochs, got [5, 3]",
        overrides=["schedule.milestones=[5, 3]"],
    )


def test_data_path_with_an_unsupported_scheme():
    config_refused(
        "data.path",
        "scheme ftp:// is not supported",
        "expected a local path, file://, s3://, gs://, az://, abfs://, http:// or https://",
        preset="csv",
        overrides=["data.path=ftp://host/x.csv", "data.target=y"],
    )


def test_storage_uri_with_an_unsupported_scheme():
    config_refused(
        "storage.uri",
        "expected file:///path, a local folder or s3://bucket/prefix, got 'gs://b/x'",
        overrides=["storage.uri=gs://b/x"],
    )


# ---- parameters posted by the Prefect UI: the same TrainConfig, validated from a dict ------------


@pytest.mark.parametrize(
    "params, loc, words",
    [
        ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
        ({"optim": {"name": "adamm"}}, "optim.name", "'adam'"),
        (
            {"schedule": {"name": "lambda", "lr_lambda": "__import__('os')"}},
            "schedule",
            "only these functions may be called",
        ),
        ({"storage": {"uri": "s3://Bad_Bucket/x"}}, "storage.uri", "not a valid bucket name"),
        ({"data": None}, "data", "valid dictionary"),
    ],
    ids=["out-of-range", "unknown-choice", "bad-lambda", "bad-bucket", "null-section"],
)
def test_ui_parameters_with_bad_values(params, loc, words):
    with pytest.raises(ValidationError) as err:
        TrainConfig.model_validate(params)
    assert loc in str(err.value) and words in str(err.value), str(err.value)


def test_ui_parameters_with_an_unknown_key():
    with pytest.raises(ValidationError) as err:
        TrainConfig.model_validate({"train": {"epoch": 3}})
    assert "train.epoch" in str(err.value) and "Extra inputs are not permitted" in str(err.value)


# ---- CSV files ----------------------------------------------------------------------------------


def test_csv_path_is_a_folder(tmp_path, state_home, earlier):
    (tmp_path / "folder.csv").mkdir()
    refused(state_home, earlier, csv_cfg(tmp_path / "folder.csv"), "folder.csv is a folder, expected a file")


def test_csv_with_a_utf8_bom_is_accepted(tmp_path, state_home):
    path = put(tmp_path, "bom.csv", "\ufefflabel,x,y\n" + "".join(f"{'ab'[i % 2]},{i},{i % 7}\n" for i in range(60)))
    schema = load_prepared(ingest(csv_cfg(path), state_home).path).schema
    assert schema["target"]["name"] == "label" and [f["name"] for f in schema["features"]] == ["y"]
    assert [c["name"] for c in schema["left_out"]] == ["x"]  # x counts the rows: an identifier, left out
    assert not any("\ufeff" in name for name in schema["feature_names"])


def test_csv_in_latin1_names_the_byte_offset_and_line(tmp_path, state_home, earlier):
    text = "x,name,label\n" + "".join(f"{i},{'café' if i == 30 else 'plain'},{'ab'[i % 2]}\n" for i in range(60))
    path = put(tmp_path, "latin1.csv", text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    refused(
        state_home,
        earlier,
        csv_cfg(path),
        "latin1.csv is not valid UTF-8 text",
        f"byte 0xe9 at byte offset {offset}",
        "line 32",
        "save it as UTF-8",
    )


def test_csv_header_not_utf8(tmp_path, state_home, earlier):
    path = put(tmp_path, "header.csv", ("x,caf\xe9,label\n" + good_rows()).encode("latin-1"))
    refused(state_home, earlier, csv_cfg(path), "header.csv is not valid UTF-8 text", "byte offset 5, line 1")


@pytest.mark.parametrize("bad_line, fields", [("3,4,b,5", 4), ("3,4", 2)], ids=["too-many", "too-few"])
def test_ragged_row_names_the_line(tmp_path, state_home, earlier, bad_line, fields):
    lines = good_rows(40).splitlines()
    lines[10] = bad_line
    path = put(tmp_path, "ragged.csv", "x,y,label\n" + "\n".join(lines) + "\n")
    refused(
        state_home, earlier, csv_cfg(path), "ragged.csv could not be parsed", f"line 12 has {fields} fields, expected 3"
    )


def test_duplicate_column_names(tmp_path, state_home, earlier):
    path = put(tmp_path, "dupes.csv", "x,y,x,label\n" + "".join(f"{i},{i},{i},{'ab'[i % 2]}\n" for i in range(60)))
    refused(
        state_home,
        earlier,
        csv_cfg(path),
        "dupes.csv",
        "duplicate column names ['x']",
        "each column needs a unique name",
    )


def test_huge_numbers_that_overflow_standardisation(tmp_path, state_home, earlier):
    path = put(
        tmp_path,
        "huge.csv",
        "x,big,label\n" + "".join(f"{i},{'-' if i % 2 else ''}1e308,{'ab'[i % 2]}\n" for i in range(60)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warnings stay inside; the message says it
        refused(
            state_home,
            earlier,
            csv_cfg(path),
            "huge.csv",
            "column 'big' has values too large to standardise",
            "expected numbers whose spread fits in float64",
        )


def test_huge_regression_target(tmp_path, state_home, earlier):
    path = put(
        tmp_path,
        "target.csv",
        "x,price\n" + "".join(f"{i % 7},{1.5e308 if i % 2 else -1.5e308 + i}\n" for i in range(60)),
    )
    refused(
        state_home,
        earlier,
        csv_cfg(path, target="price", task="regression"),
        "target.csv",
        "target 'price' has values too large to standardise",
    )


def test_integer_beyond_int64(tmp_path, state_home, earlier):
    rows = "".join(f"{2**64 + 5 if i == 8 else i},{'ab'[i % 2]}\n" for i in range(60))
    path = put(tmp_path, "ids.csv", "id,label\n" + rows)
    refused(
        state_home,
        earlier,
        csv_cfg(path),
        "ids.csv",
        "column 'id' has the integer 18446744073709551621",
        "row 9 (line 10)",
        "beyond the 64-bit range",
        "expected integers between -2**63 and 2**63-1",
    )


def test_large_real_numbers_written_as_floats_are_accepted(tmp_path, state_home):
    path = put(
        tmp_path, "avogadro.csv", "n,label\n" + "".join(f"{6.02e23 * (1 + i / 100)},{'ab'[i % 2]}\n" for i in range(60))
    )
    assert ingest(csv_cfg(path), state_home).task == "classification"


def test_number_beyond_float64(tmp_path, state_home, earlier):
    path = put(
        tmp_path, "inf.csv", "x,label\n" + "".join(f"{'9' * 400 if i == 4 else i},{'ab'[i % 2]}\n" for i in range(60))
    )
    refused(
        state_home,
        earlier,
        csv_cfg(path),
        "inf.csv",
        "column 'x' has an infinite value (or one beyond float64's range)",
        "row 5 (line 6)",
        "expected a finite number",
    )


def test_all_missing_target(tmp_path, state_home, earlier):
    path = put(tmp_path, "nolabel.csv", "x,label\n" + "".join(f"{i % 7},\n" for i in range(60)))
    refused(
        state_home,
        earlier,
        csv_cfg(path),
        "nolabel.csv",
        "target column 'label' has no values at all",
        "expected the values to predict",
    )


def test_every_class_reaches_the_training_split(tmp_path, state_home):
    """No label is seen first at test time: a class too small to reach every split stays in train."""
    labels = ["a"] * 40 + ["b"] * 40 + ["single"] + ["pair"] * 2 + ["trio"] * 3
    rng = np.random.default_rng(0)
    path = tmp_path / "rare.csv"
    pd.DataFrame({"x": rng.normal(size=len(labels)), "label": rng.permutation(labels)}).to_csv(path, index=False)
    prepared = load_prepared(ingest(csv_cfg(path), state_home).path)
    names = prepared.schema["label_names"]
    assert names == ["a", "b", "pair", "single", "trio"]
    train = set(prepared.tensors["y_train"].tolist())
    assert train == set(range(len(names)))
    for split in ("val", "test"):
        assert set(prepared.tensors[f"y_{split}"].tolist()) <= train
    single = names.index("single")
    assert single not in prepared.tensors["y_val"].tolist() and single not in prepared.tensors["y_test"].tolist()


def test_bad_file_in_place_of_a_good_one_keeps_the_earlier_dataset(tmp_path, state_home):
    """The same path, first good, then replaced by three kinds of bad file, then good again: nothing is lost."""
    path = put(tmp_path, "data.csv", "x,y,label\n" + good_rows())
    good = ingest(csv_cfg(path), state_home)
    earlier = (Path(good.path), snapshot(Path(good.path)))
    for bad in (
        ("x,y,label\n" + good_rows()).replace("3,3,b", "caf\xe9,3,b").encode("latin-1"),
        "x,y,label\n" + good_rows().replace("5,5,b\n", "5,5,b,9\n"),
        "x,x,label\n" + good_rows(),
    ):
        path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        refused(state_home, earlier, csv_cfg(path), "data.csv")
    path.write_text("x,y,label\n" + good_rows())
    again = ingest(csv_cfg(path), state_home)
    assert again.reused and again.key == good.key


@pytest.mark.parametrize(
    "bad_line, fragments",
    [
        ("3,4,b,5", ["could not be parsed", "line 152 has 4 fields, expected 3"]),
        ("caf\xe9,4,b", ["is not valid UTF-8 text", "line 152", "save it as UTF-8"]),
        ("abc,4,b", ["column 'x' holds numbers but row 151 (line 152) has 'abc'"]),
        ("18446744073709551621,4,b", ["column 'x' has the integer 18446744073709551621 at row 151 (line 152)"]),
        ("9" * 400 + ",4,b", ["column 'x' has an infinite value", "row 151 (line 152)"]),
    ],
    ids=["ragged", "latin-1", "text-in-numbers", "beyond-int64", "beyond-float64"],
)
def test_bad_row_late_in_a_file_read_in_pieces(tmp_path, state_home, earlier, monkeypatch, bad_line, fragments):
    """A large file is read in pieces (here a few hundred bytes each): a bad row in a later piece is refused
    with the same words as in a small file read at once."""
    monkeypatch.setattr(csv_read, "PIECE_BYTES", 256)
    lines = good_rows(200).splitlines()
    lines[150] = bad_line
    path = put(tmp_path, "late.csv", ("x,y,label\n" + "\n".join(lines) + "\n").encode("latin-1"))
    refused(state_home, earlier, csv_cfg(path), "late.csv", *fragments)


# ---- IDX (MNIST) files --------------------------------------------------------------------------


@pytest.fixture
def mnist_earlier(tmp_path, state_home):
    root = write_mnist(tmp_path / "mnist", n_train=60, n_test=20, gz=False)
    folder = Path(ingest(DataConfig(root=str(root), download=False), state_home).path)
    return root, (folder, snapshot(folder))


def mnist_refused(state_home, mnist_earlier, *fragments) -> None:
    root, earlier = mnist_earlier
    with pytest.raises(DataError) as err:
        ingest(DataConfig(root=str(root), download=False), state_home)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert_untouched(state_home, earlier)


def test_idx_labels_file_with_a_wrong_magic_number(state_home, mnist_earlier):
    path = mnist_earlier[0] / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    mnist_refused(
        state_home,
        mnist_earlier,
        "t10k-labels-idx1-ubyte is not an IDX file",
        "bad magic number 504b0304",
        "expected 00000801",
    )


def test_idx_empty_file(state_home, mnist_earlier):
    (mnist_earlier[0] / "train-labels-idx1-ubyte").write_bytes(b"")
    mnist_refused(
        state_home, mnist_earlier, "train-labels-idx1-ubyte is not an IDX file", "empty file", "expected 00000801"
    )


def test_idx_wrong_number_of_dimensions(state_home, mnist_earlier):
    write_idx(mnist_earlier[0] / "train-images-idx3-ubyte", np.zeros((60, 784)))
    mnist_refused(state_home, mnist_earlier, "train-images-idx3-ubyte: 2 dimensions, expected 3")


def test_idx_images_of_the_wrong_size(state_home, mnist_earlier):
    write_idx(mnist_earlier[0] / "t10k-images-idx3-ubyte", np.zeros((20, 32, 32)))
    mnist_refused(state_home, mnist_earlier, "t10k-images-idx3-ubyte: images are 32x32, expected 28x28")


def test_idx_label_out_of_range(state_home, mnist_earlier):
    labels = np.zeros(60, dtype=np.uint8)
    labels[17] = 12
    write_idx(mnist_earlier[0] / "train-labels-idx1-ubyte", labels)
    mnist_refused(state_home, mnist_earlier, "train-labels-idx1-ubyte: label 12 at index 17, expected 0 to 9")


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda gz: b"not gzip at all", "Not a gzipped file"),
        (lambda gz: gz[:40] + bytes(60) + gz[100:], "Error -3 while decompressing"),
    ],
    ids=["not-gzip", "corrupt-stream"],
)
def test_idx_gz_that_is_not_gzip_or_corrupt_inside(state_home, mnist_earlier, damage, words):
    root = mnist_earlier[0]
    plain = root / "train-images-idx3-ubyte"
    packed = gzip.compress(plain.read_bytes())
    plain.unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(damage(packed))
    mnist_refused(
        state_home, mnist_earlier, "train-images-idx3-ubyte.gz is corrupt or truncated", words, "download it again"
    )


# ---- S3 URIs, keys and names used in paths --------------------------------------------------------


@pytest.mark.parametrize(
    "uri, words",
    [
        ("s3://", ["names no bucket", "expected s3://bucket/prefix"]),
        ("s3://Bad_Bucket/x", ["'Bad_Bucket' is not a valid bucket name", "3-63 lowercase letters"]),
        ("s3://b/../x", ["'b' is not a valid bucket name", "prefix '../x' is not allowed", "without '..'"]),
        ("s3://b/a//b", ["'b' is not a valid bucket name", "prefix 'a//b' is not allowed", "empty parts"]),
        ("s3://my-bucket/../x", ["prefix '../x' is not allowed"]),
        ("s3://my-bucket/runs/../../x", ["prefix 'runs/../../x' is not allowed"]),
        ("s3://my-bucket/a/./b", ["prefix 'a/./b' is not allowed"]),
        ("s3://my-bucket/a\\b", ["is not allowed"]),
    ],
    ids=[
        "no-bucket",
        "bad-bucket",
        "short-bucket-and-dotdot",
        "short-bucket-and-empty-part",
        "dotdot",
        "dotdot-deeper",
        "dot",
        "backslash",
    ],
)
def test_malformed_s3_uri_fails_at_config_time(uri, words):
    msg = config_refused("storage.uri", f"storage.uri {uri!r}", *words, overrides=[f"storage.uri={uri}"])
    with pytest.raises(StorageError) as err:  # the same words when the URI comes from TRAINYARD_STORAGE_URI
        parse_s3_uri(uri)
    assert str(err.value) in msg


def test_s3_uri_with_a_single_slash():
    config_refused(
        "storage.uri",
        "starts with 's3:' but not 's3://'; expected s3://bucket/prefix",
        overrides=["storage.uri=s3:/bucket/x"],
    )


def test_malformed_s3_uri_from_the_environment_fails_before_any_client(monkeypatch):
    import tasks.s3store

    monkeypatch.setattr(tasks.s3store.S3Store, "__init__", lambda *a, **k: pytest.fail("no client for a bad URI"))
    with pytest.raises(StorageError, match=r"storage.uri 's3://my-bucket/\.\./x': prefix '\.\./x' is not allowed"):
        open_store("s3://my-bucket/../x")


def test_s3_store_refuses_keys_that_escape_its_prefix():
    store = S3Store.__new__(S3Store)  # no client needed to compute keys
    store.bucket, store.prefix = "my-bucket", "runs"
    assert store.key("exp/run/model.pt") == "runs/exp/run/model.pt"
    for name in ("../other/model.pt", "exp/../../x", "/abs", "exp//x"):
        with pytest.raises(StorageError, match="is not allowed: expected relative names"):
            store.key(name)


def test_unit_file_name_with_traversal_publishes_nothing(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    store = LocalStore(tmp_path / "store")
    store.publish("exp/run1", {"model.pt": str(src)})
    before = snapshot(tmp_path / "store/exp/run1")
    for prefix, files in (
        ("exp/run2", {"model.pt": str(src), "../../evil.pt": str(src)}),
        ("exp/../../evil", {"m.pt": str(src)}),
    ):
        with pytest.raises(StorageError, match="is not allowed"):
            store.publish(prefix, files)
    assert sorted(p.name for p in (tmp_path / "store/exp").iterdir()) == ["run1"]  # no run2, no staging folder
    assert not (tmp_path / "evil.pt").exists() and not (tmp_path / "evil").exists()
    assert snapshot(tmp_path / "store/exp/run1") == before
    assert store.fetch("exp/run1/model.pt", tmp_path / "back.bin").read_bytes() == b"weights"


NASTY_NAMES = ["../../etc", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\x", "", "\x00", "é", "x" * 300]


@pytest.mark.parametrize(
    "name",
    NASTY_NAMES,
    ids=[
        "dotdot-etc",
        "dotdot",
        "dot",
        "absolute",
        "inner-dotdot",
        "backslashes",
        "empty",
        "nul",
        "non-ascii",
        "too-long",
    ],
)
def test_experiment_and_run_names_stay_one_path_component(tmp_path, name):
    part = safe_name(name)
    assert part and "/" not in part and "\\" not in part and "\x00" not in part and part not in (".", "..")
    assert len(part) <= 80
    state, store_root = tmp_path / "state", tmp_path / "store"
    # the TensorBoard folder <state>/tensorboard/<experiment>/<run>-<id> and the unit <experiment>/<run-id>
    tb = (state / "tensorboard" / part / f"{part}-abcdef12").resolve()
    assert tb.parent.parent == (state / "tensorboard").resolve()
    store = LocalStore(store_root)
    src = tmp_path / "m.bin"
    src.write_bytes(b"m")
    manifest = store.publish(check_key(f"{part}/run-0123"), {"m.bin": str(src)})
    assert Path(manifest["m.bin"]["uri"][len("file://") :]).resolve().is_relative_to(store_root.resolve())


def test_experiment_named_like_a_traversal_is_accepted_and_made_safe():
    cfg = load_config("mnist", overrides=["tracking.experiment=../../etc"], env={})
    assert cfg.tracking.experiment == "../../etc"  # MLflow keeps the name; only paths use safe_name
    assert safe_name(cfg.tracking.experiment) == "etc"


def test_run_name_with_separators_is_refused():
    with pytest.raises(ValidationError) as err:
        TrainConfig.model_validate({"tracking": {"run_name": "../x/y"}})
    assert "tracking.run_name" in str(err.value) and "pattern" in str(err.value)


# ---- importing the URI checks stays cheap ---------------------------------------------------------


def test_validating_a_storage_uri_imports_neither_boto3_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys; from pipelines.config import TrainConfig; TrainConfig(storage={'uri': 's3://my-bucket/p'}); "
        "print(sorted(m for m in ('boto3', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert out.stdout.strip() == "[]"
