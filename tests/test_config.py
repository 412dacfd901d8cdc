import pytest

from pipelines.config import (
    ConfigError,
    TrainConfig,
    load_config,
    resolve_storage_uri,
    resolve_tracking_uri,
    state_dir,
)


def test_presets_load_and_differ():
    mnist = load_config("mnist")
    csv = load_config("csv", overrides=["data.path=x.csv", "data.target=y"])
    assert mnist.data.source == "mnist" and mnist.model.name == "cnn"
    assert csv.data.source == "csv" and csv.model.name == "mlp" and csv.schedule.name == "cosine"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 32\noptim:\n  name: sgd\n  lr: 0.1\n")
    cfg = load_config(
        "mnist", path, ["train.epochs=2", "model.hidden=[16, 8]", "optim.kwargs={nesterov: true, momentum: 0.9}"]
    )
    assert cfg.train.epochs == 2  # --set wins over the file
    assert cfg.train.batch_size == 32  # the file wins over the preset
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1
    assert cfg.model.hidden == [16, 8]
    assert cfg.optim.kwargs == {"nesterov": True, "momentum": 0.9}


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("mnist", overrides=["train.epoch=3"])
    msg = str(err.value)
    assert "train.epoch: unknown key" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_section_lists_sections(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_file=path)
    assert "trainer: unknown key" in str(err.value) and "optim" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.name=resnet", ["'linear'", "'mlp'", "'cnn'"]),
        ("optim.name=adamm", ["'adam'", "'sgd'", "'rmsprop'"]),
        ("schedule.name=warmup", ["'step'", "'onecycle'", "'plateau'"]),
        ("train.device=tpu", ["'cuda'", "'cpu'"]),
    ],
)
def test_bad_choice_lists_valid_choices(override, names):
    with pytest.raises(ConfigError) as err:
        load_config("mnist", overrides=[override])
    for name in names:
        assert name in str(err.value)


def test_bad_values_fail_before_work():
    with pytest.raises(ConfigError, match="train.epochs: Input should be greater than or equal to 1"):
        load_config("mnist", overrides=["train.epochs=0"])
    with pytest.raises(ConfigError, match="optim.lr: Input should be greater than 0"):
        load_config("mnist", overrides=["optim.lr=-1"])
    with pytest.raises(ConfigError, match="schedule.lr_lambda"):
        load_config("mnist", overrides=["schedule.name=lambda", "schedule.lr_lambda=__import__('os')"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("mnist", overrides=["epochs"])
    with pytest.raises(ConfigError, match="unknown preset 'mnsit'; valid presets: csv, mnist"):
        load_config("mnsit")


def test_csv_needs_path_and_target():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config("csv")
    with pytest.raises(ConfigError, match="data.target is required"):
        load_config("csv", overrides=["data.path=a.csv"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(config_file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; expected a YAML file"):
        load_config(config_file=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=bad)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    cfg = load_config("mnist", env={})
    assert (
        resolve_tracking_uri(cfg.tracking.uri, env={"TRAINYARD_HOME": str(tmp_path / "home")})
        == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    )
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert load_config("mnist", env=env).tracking.uri == "http://mlflow:5000"  # env overrides the preset
    assert resolve_tracking_uri(TrainConfig().tracking.uri, env=env) == "http://mlflow:5000"
    # an explicit --set still wins over the environment
    assert load_config("mnist", overrides=["tracking.uri=sqlite:///x.db"], env=env).tracking.uri == "sqlite:///x.db"


def test_state_dir_and_storage_default(tmp_path):
    assert state_dir({"TRAINYARD_HOME": str(tmp_path / "h")}) == tmp_path / "h"
    assert state_dir({}).name == ".trainyard"
    assert (
        resolve_storage_uri(TrainConfig(), {"TRAINYARD_HOME": str(tmp_path / "h")})
        == (tmp_path / "h" / "artifacts").as_uri()
    )
    assert resolve_storage_uri(TrainConfig(), {"TRAINYARD_STORAGE_URI": "s3://b/p"}) == "s3://b/p"
    explicit = TrainConfig(storage={"uri": "file:///x"})
    assert resolve_storage_uri(explicit, {"TRAINYARD_STORAGE_URI": "s3://b/p"}) == "file:///x"


def test_flat_params_are_stable_keys():
    flat = TrainConfig().flat()
    keys = ("data.path", "data.target", "data.root", "model.name", "optim.name", "optim.lr", "schedule.name")
    keys += ("train.epochs", "train.batch_size", "train.device", "train.seed", "tracking.uri", "storage.uri")
    for key in keys:
        assert key in flat
    assert flat["model.hidden"] == "[128, 64]"


@pytest.mark.parametrize(
    "override",
    [
        "tracking.uri=http://bob:hunter2@mlflow:5000",
        "storage.endpoint_url=http://key:hunter2@minio:9000",
        "storage.uri=s3://key:hunter2@bucket/p",
    ],
)
def test_credentials_in_uris_are_refused_without_echoing_them(override):
    with pytest.raises(ConfigError) as err:
        load_config("mnist", overrides=[override])
    assert "must not hold credentials" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "storage.uri=file://artifacts",
            r"storage.uri 'file://artifacts': a file:// URI takes an absolute path "
            r".* 'artifacts' would be read as a host",
        ),
        ("storage.uri=file://srv/runs", r"'srv' would be read as a host name"),
        (
            "data.path=file://data/houses.csv",
            r"data.path 'file://data/houses.csv': a file:// URI takes an absolute path",
        ),
        (
            "storage.endpoint_url=localhost:9000",
            r"storage.endpoint_url: .*expected an http:// or https:// URL .*'localhost:9000'",
        ),
        ("data.features=[x1, x2, x1]", r"data.features names 'x1' more than once"),
        ("data.drop=[id, id]", r"data.drop names 'id' more than once"),
        ("data.target=yes", r"data.target: .*the boolean True .*quote a column named so"),
        (
            "tracking.champion_metric=test/acc",
            r"tracking.champion_metric: .*got 'test/acc'; expected auto, test/accuracy",
        ),
        (
            "schedule.milestones=[2, 2]",
            r"schedule.milestones must be strictly increasing positive epochs, got \[2, 2\]",
        ),
        ("optim.name=rprop", None),  # the preset's weight decay does not follow a change to an optimizer without one
        ("optim.momentum=0.9", r"optim.momentum=0.9 applies to sgd and rmsprop only; for adamw"),
        ("train.grad_clip=1.0", None),  # with the preset's adamw: applied, fine
    ],
)
def test_uris_endpoints_and_column_lists_are_checked(override, message):
    if message is None:
        load_config("csv", overrides=["data.path=/data/houses.csv", "data.target=price", override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config("csv", overrides=["data.path=/data/houses.csv", "data.target=price", override])


def test_lbfgs_takes_string_options_and_refuses_gradient_clipping():
    base = ["data.path=/d.csv", "data.target=y", "optim.name=lbfgs", "optim.weight_decay=0"]
    cfg = load_config("csv", overrides=[*base, "optim.kwargs={line_search_fn: strong_wolfe}"])
    assert cfg.optim.kwargs == {"line_search_fn": "strong_wolfe"}
    with pytest.raises(ConfigError, match=r"train.grad_clip=1.0 is not applied with optim.name=lbfgs"):
        load_config("csv", overrides=[*base, "train.grad_clip=1.0"])


def test_file_uris_and_numeric_column_names_that_are_fine():
    data = ["data.path=file:///data/houses.csv", "data.target=1", "data.features=[2019, x]"]
    storage = ["storage.uri=file://localhost/srv/runs", "storage.endpoint_url=http://minio:9000"]
    cfg = load_config("csv", overrides=[*data, *storage])
    assert cfg.data.target == "1" and cfg.data.features == ["2019", "x"]  # YAML numbers mean those column names
    assert cfg.storage.uri == "file://localhost/srv/runs"


def test_a_value_the_users_choice_does_not_read_is_refused_but_a_presets_is_dropped():
    base = ["data.path=/data/houses.csv", "data.target=price"]
    assert load_config("csv", overrides=[*base, "optim.name=rprop"]).optim.weight_decay == 0.0
    with pytest.raises(ConfigError, match=r"optim.weight_decay=0.001: rprop has no weight decay; set it to 0"):
        load_config("csv", overrides=[*base, "optim.name=rprop", "optim.weight_decay=1e-3"])
    # the keys of the mnist preset's step schedule do not follow to cosine; set for cosine, they are refused
    assert load_config("mnist", overrides=["schedule.name=cosine"]).schedule.gamma == 0.1
    with pytest.raises(ConfigError, match=r"schedule.gamma=0.5: not used by schedule.name=cosine"):
        load_config("mnist", overrides=["schedule.name=cosine", "schedule.gamma=0.5"])
    with pytest.raises(ConfigError, match=r"data.limit=5: not used by data.source=csv"):
        load_config("csv", overrides=[*base, "data.limit=5"])
    with pytest.raises(ConfigError, match=r"train.shift_pixels=3 applies with train.augment=shift only"):
        load_config("mnist", overrides=["train.shift_pixels=3"])
