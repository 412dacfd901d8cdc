"""The fast path: device-resident batches, per-batch preparation, fallback, the mnist-fast preset.

On CPU the resident path is forced with train.gpu_resident=on and device cpu. Tests named
test_gpu_* need CUDA and are skipped without it (benchmarks/gpu_check.sh runs this file on a GPU).
No timing assertions here.
"""

import math
import warnings

import pytest
import torch

from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainSection, load_config
from tasks.batching import BatchPrep, LoaderBatcher, ResidentBatcher, make_batches, plan_residency, random_shift
from tasks.errors import TrainingError
from tasks.optimisation import build_optimizer
from tasks.prepared import Prepared
from tasks.train import train_model
from tests.conftest import prepared_digits

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def digits(n=1200, seed=0) -> Prepared:
    """Synthetic uint8 'digits' (one bright band per class) shaped like a prepared MNIST dataset."""
    return prepared_digits(n, seed)


def cnn_cfg() -> ModelConfig:
    return ModelConfig(name="cnn", channels=[8, 16], kernel_sizes=[5, 3], hidden=[32])


def test_resident_batcher_covers_every_index_once_and_reshuffles_with_the_seed():
    n = 103
    x = torch.arange(n, dtype=torch.uint8).view(n, 1)
    y = torch.arange(n)

    def epochs(seed, k=3):
        b = ResidentBatcher(x, y, 10, device="cpu", shuffle=True, seed=seed)
        assert len(b) == 11
        out = []
        for _ in range(k):
            ys = [yb for _, yb in b]
            assert [t.shape[0] for t in ys] == [10] * 10 + [3]
            out.append(torch.cat(ys))
        return out

    first = epochs(seed=5)
    for order in first:
        assert torch.equal(order.sort().values, torch.arange(n))  # every index exactly once
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # reshuffled per epoch
    again = epochs(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # the seed decides the sequence
    other = epochs(seed=6)
    assert not torch.equal(first[0], other[0])
    # the inputs travel with their targets
    b = ResidentBatcher(x, y, 16, device="cpu", shuffle=True, seed=0)
    for xb, yb in b:
        assert torch.equal(xb.view(-1).long(), yb)


def test_unshuffled_resident_batches_keep_the_order():
    x, y = torch.zeros(25, 2), torch.arange(25)
    b = ResidentBatcher(x, y, 8, device="cpu", shuffle=False)
    assert torch.equal(torch.cat([yb for _, yb in b]), y)


def test_uint8_stays_uint8_on_the_device_until_the_batch():
    prepared = digits(200)
    cfg = TrainSection(gpu_resident="on", device="cpu", batch_size=32)
    batches = make_batches(prepared, cfg, torch.device("cpu"))
    assert batches.residency.resident and isinstance(batches.train, ResidentBatcher)
    assert batches.train.x.dtype == torch.uint8 and batches.val.x.dtype == torch.uint8
    xb, yb = next(iter(batches.train))
    assert xb.dtype == torch.float32 and xb.shape == (32, 1, 28, 28) and yb.dtype == torch.int64
    # normalised per batch exactly as the schema says
    raw = prepared.tensors["x_train"].float()
    expected = (raw / 255 - 0.1307) / 0.3081
    assert math.isclose(float(xb.min()), float(expected.min()), rel_tol=1e-5)
    val_x = torch.cat([x for x, _ in batches.val])
    assert torch.allclose(val_x, (prepared.tensors["x_val"].float() / 255 - 0.1307) / 0.3081, atol=1e-5)


def test_on_off_from_yaml_and_fallback_when_the_share_is_too_small():
    cfg = load_config("mnist", overrides=["train.gpu_resident=on"])
    assert cfg.train.gpu_resident == "on"
    assert load_config("mnist", overrides=["train.gpu_resident=off"]).train.gpu_resident == "off"
    cpu = torch.device("cpu")
    assert plan_residency("on", cpu, 1 << 20, 0.5).resident
    tiny = plan_residency("on", cpu, 1 << 30, 1e-9)
    assert not tiny.resident and "gpu_memory_share" in tiny.reason
    assert not plan_residency("auto", cpu, 10, 0.5).resident  # auto: resident on CUDA only
    assert not plan_residency("off", cpu, 10, 0.5).resident
    batches = make_batches(digits(200), TrainSection(gpu_resident="on", gpu_memory_share=1e-9, batch_size=32), cpu)
    assert not batches.residency.resident and isinstance(batches.train, LoaderBatcher)
    xb, yb = next(iter(batches.train))
    assert xb.dtype == torch.float32 and xb.shape == (32, 1, 28, 28)


def test_random_shift_moves_images_by_at_most_the_limit():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 13, 13] = 255
    g = torch.Generator().manual_seed(0)
    out = random_shift(x, 2, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    pos = [divmod(int(i), 28) for i in out.view(64, -1).argmax(1)]
    assert all(11 <= r <= 15 and 11 <= c <= 15 for r, c in pos)
    assert len(set(pos)) > 5  # different shifts per image
    assert (out.view(64, -1) == 255).sum(1).eq(1).all()  # the pixel moved, nothing duplicated
    prep = BatchPrep(None, torch.device("cpu"), shift=2, generator=g)
    assert torch.equal(prep(x, train=False), x.float())  # no augmentation outside training


def test_shift_on_a_table_is_refused():
    from tests.test_train import blobs

    with pytest.raises(TrainingError, match="train.augment=shift needs image inputs"):
        make_batches(blobs(), TrainSection(augment="shift"), torch.device("cpu"))


@pytest.mark.parametrize("resident", ["on", "off"])
def test_both_paths_learn(resident, tmp_path):
    from tasks.evaluate import evaluate_model

    prepared = digits(1200)
    result = train_model(
        prepared,
        cnn_cfg(),
        OptimConfig(name="adam", lr=3e-3),
        ScheduleConfig(),
        TrainSection(epochs=3, batch_size=64, device="cpu", gpu_resident=resident),
        tmp_path / "ckpt",
    )
    assert all(math.isfinite(h["train/loss"]) for h in result.history)
    ev = evaluate_model(prepared, cnn_cfg(), result.checkpoint, tmp_path / "ev", device="cpu")
    assert ev.metrics["test/accuracy"] > 0.95


def test_resident_path_stops_on_nan_once_per_epoch(tmp_path):
    from tests.test_train import blobs

    prepared = blobs()
    prepared.tensors["x_train"][0, 0] = float("nan")
    with pytest.raises(TrainingError, match="training loss became nan in epoch 1"):
        train_model(
            prepared,
            ModelConfig(name="mlp", hidden=[8]),
            OptimConfig(),
            ScheduleConfig(),
            TrainSection(epochs=2, batch_size=32, device="cpu", gpu_resident="on"),
            tmp_path,
        )


def test_keep_last_keeps_the_final_epoch(tmp_path):
    from tasks.checkpoint import load_weights
    from tests.test_train import blobs

    result = train_model(
        blobs(),
        ModelConfig(name="mlp", hidden=[8]),
        OptimConfig(lr=1e-2),
        ScheduleConfig(),
        TrainSection(epochs=3, batch_size=32, device="cpu", keep="last"),
        tmp_path,
    )
    assert result.best_epoch == 3 and load_weights(result.checkpoint)["epoch"] == 3
    assert result.best_metric == result.history[-1]["val/accuracy"]


def test_mnist_fast_preset_builds_and_runs_an_epoch_on_cpu(tmp_path):
    cfg = load_config("mnist-fast", overrides=["train.epochs=1", "train.device=cpu", "train.batch_size=128"])
    assert cfg.model.name == "cnn" and cfg.model.kernel_sizes == [5, 3] and cfg.model.channels == [24, 32]
    assert cfg.schedule.name == "onecycle" and cfg.train.augment == "shift" and cfg.train.label_smoothing > 0
    prepared = digits(600)
    for resident in ("on", "off"):
        cfg.train.gpu_resident = resident
        result = train_model(prepared, cfg.model, cfg.optim, cfg.schedule, cfg.train, tmp_path / resident)
        assert len(result.history) == 1 and math.isfinite(result.history[0]["train/loss"])


def test_examples_net_is_a_cnn_option():
    from models import build_model

    cfg = ModelConfig(
        name="cnn", channels=[32, 64], padding="valid", pool="last", conv_dropout=0.25, hidden=[128], dropout=0.5
    )
    model = build_model("cnn", {"input_shape": [1, 28, 28], "output_size": 10}, cfg)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Dropout",
        "Flatten",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
    ]
    assert model[7].in_features == 9216
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fused_only_on_cuda_and_not_over_explicit_kwargs():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert not build_optimizer(params, OptimConfig(name="adam"), torch.device("cpu")).defaults.get("fused")
    assert not build_optimizer(params, OptimConfig(name="adam")).defaults.get("fused")
    # for a CUDA device (the decision only; fused Adam also runs on CPU parameters): fused unless kwargs say otherwise
    cuda = torch.device("cuda")
    assert build_optimizer(params, OptimConfig(name="adam"), cuda).defaults["fused"] is True
    assert build_optimizer(params, OptimConfig(name="adam", kwargs={"fused": False}), cuda).defaults["fused"] is False
    assert not build_optimizer(params, OptimConfig(name="adam", kwargs={"foreach": True}), cuda).defaults.get("fused")
    assert not build_optimizer(params, OptimConfig(name="rmsprop"), cuda).defaults.get("fused")  # no fused kernel


@pytest.mark.parametrize("resident", ["on", "off"])
def test_conv_batches_come_in_channels_last_when_asked(resident):
    from models import build_model
    from tasks.runtime import is_conv

    prepared = digits(300)  # three channels: with one, both layouts have the same strides
    for k in ("x_train", "x_val", "x_test"):
        prepared.tensors[k] = prepared.tensors[k].repeat(1, 3, 1, 1)
    prepared.schema.update(input_shape=[3, 28, 28], normalize={"scale": 1 / 255, "mean": [0.1] * 3, "std": [0.3] * 3})
    for channels_last in (True, False):
        batches = make_batches(
            prepared,
            TrainSection(batch_size=32, gpu_resident=resident),
            torch.device("cpu"),
            channels_last=channels_last,
        )
        x, _ = next(iter(batches.train))
        assert x.shape == (32, 3, 28, 28)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert (x.stride(1) == 1) is channels_last, x.stride()
    assert is_conv(build_model("cnn", prepared.schema, cnn_cfg()))
    assert not is_conv(build_model("mlp", prepared.schema, ModelConfig(name="mlp", hidden=[8])))


def test_precision_is_decided_once_by_device(caplog):
    from tasks.runtime import autocast_ctx, pick_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed to decide
    assert pick_precision("auto", cuda) == "bf16" and pick_precision("auto", cpu) == "fp32"
    assert pick_precision("fp16", cuda) == "fp16" and pick_precision("fp32", cuda) == "fp32"
    with caplog.at_level("WARNING", logger="trainyard.train"):
        assert pick_precision("bf16", cpu) == "fp32" and pick_precision("fp16", cpu) == "fp32"
    assert "train.precision=bf16 needs CUDA; training in fp32 on cpu" in caplog.text
    assert "train.precision=fp16 needs CUDA" in caplog.text
    ctx = autocast_ctx(cpu, "fp32")
    assert not isinstance(ctx, torch.autocast)
    assert isinstance(autocast_ctx(cpu, "bf16"), torch.autocast)


# ---- on a CUDA device (benchmarks/gpu_check.sh runs these on a GPU) -------------------------------


@needs_cuda
def test_gpu_auto_is_resident_and_learns_in_bf16_with_fused_adam(tmp_path):
    prepared = digits(1200)
    cfg = TrainSection(epochs=3, batch_size=64, device="cuda")
    batches = make_batches(prepared, cfg, torch.device("cuda"))
    assert batches.residency.resident and batches.train.x.is_cuda and batches.train.x.dtype == torch.uint8
    params = [torch.nn.Parameter(torch.zeros(2, device="cuda"))]
    assert build_optimizer(params, OptimConfig(name="adamw"), torch.device("cuda")).defaults.get("fused")
    result = train_model(prepared, cnn_cfg(), OptimConfig(name="adam", lr=3e-3), ScheduleConfig(), cfg, tmp_path / "c")
    assert result.precision == "bf16" and result.device.startswith("cuda")
    # 2 epochs on 1,200 synthetic digits: well above chance (0.1); an H200 gave 0.81
    assert result.history[-1]["val/accuracy"] > 0.55  # (evaluate_model draws with matplotlib: not needed here)


@needs_cuda
@pytest.mark.parametrize(
    "resident, graph, sizes", [("on", False, (256, 16)), ("off", False, (256, 16)), ("on", True, (32, 16))]
)
def test_gpu_step_loop_does_not_sync_per_step(resident, graph, sizes, tmp_path):
    """Host syncs per run must not grow with the number of steps (they are per epoch). With
    cuda_graph both sizes make enough steps to capture the graph (the capture synchronises, once)."""
    prepared = digits(1024)

    def syncs(batch_size):
        cfg = TrainSection(
            epochs=1, batch_size=batch_size, device="cuda", gpu_resident=resident, shuffle=True, cuda_graph=graph
        )
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_model(
                    prepared, cnn_cfg(), OptimConfig(name="adam"), ScheduleConfig(), cfg, tmp_path / str(batch_size)
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(sizes[0])  # warm-up: first-use initialisation may sync
    few, many = syncs(sizes[0]), syncs(sizes[1])  # 3 (23 with the graph) vs 45 steps
    assert few > 0, "no sync warning caught at all: the once-per-epoch reads (.item()) should show"
    assert many <= few, (few, many)


@needs_cuda
def test_gpu_fp16_trains_with_a_grad_scaler(tmp_path):
    prepared = digits(1200)
    cfg = TrainSection(epochs=3, batch_size=64, device="cuda", precision="fp16")
    result = train_model(prepared, cnn_cfg(), OptimConfig(name="adam", lr=3e-3), ScheduleConfig(), cfg, tmp_path / "c")
    assert result.precision == "fp16"
    assert result.history[-1]["val/accuracy"] > 0.55  # as the bf16 test asks
    ck = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert ck["scaler_state"]["scale"] > 0  # the GradScaler ran and is saved for a resume


@needs_cuda
def test_gpu_compile_reduce_overhead_learns(tmp_path):
    prepared = digits(1200)
    cfg = TrainSection(epochs=3, batch_size=64, device="cuda", compile=True, compile_mode="reduce-overhead")
    result = train_model(prepared, cnn_cfg(), OptimConfig(name="adam", lr=3e-3), ScheduleConfig(), cfg, tmp_path / "c")
    # 2 epochs on 1,200 synthetic digits: well above chance (0.1); an H200 gave 0.81
    assert result.history[-1]["val/accuracy"] > 0.55
    from tasks.checkpoint import load_weights

    assert not any(k.startswith("_orig_mod") for k in load_weights(result.checkpoint)["model_state"])


@needs_cuda
def test_gpu_mnist_fast_preset_runs(tmp_path):
    cfg = load_config("mnist-fast", overrides=["train.epochs=2"])
    result = train_model(digits(1200), cfg.model, cfg.optim, cfg.schedule, cfg.train, tmp_path)
    # 2 epochs on 1,200 synthetic digits: well above chance (0.1); an H200 gave 0.81
    assert result.history[-1]["val/accuracy"] > 0.5
