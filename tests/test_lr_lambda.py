import math

import pytest

from tasks.lr_lambda import LambdaExpressionError, compile_lr_lambda


@pytest.mark.parametrize(
    "text, epoch, expected",
    [
        ("0.95 ** epoch", 3, 0.95**3),
        ("1 / (1 + epoch)", 4, 0.2),
        ("max(0.1, 1 - epoch / 10)", 20, 0.1),
        ("0.5 * (1 + cos(pi * epoch / 10))", 10, 0.0),
        ("floor(epoch / 2) + 1", 3, 2.0),
    ],
)
def test_allowed_expressions_evaluate(text, epoch, expected):
    assert math.isclose(compile_lr_lambda(text)(epoch), expected, abs_tol=1e-12)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("__import__('os').system('true')", "only these functions"),
        ("epoch.__class__", "Attribute is not allowed"),
        ("lr * epoch", "unknown name 'lr'"),
        ("[epoch]", "List is not allowed"),
        ("1 / (epoch - epoch)", "failed at epoch 0"),
        ("0.95 **", "not a valid expression"),
        ("", "empty"),
        ("'a' * 3", "only numbers"),
        ("-1 * epoch - 1", "expected a finite value >= 0"),
    ],
)
def test_unsafe_or_broken_expressions_are_refused(text, fragment):
    with pytest.raises(LambdaExpressionError) as err:
        compile_lr_lambda(text)
    assert fragment in str(err.value)


def test_every_epoch_of_the_run_is_tried_before_training():
    from pipelines.config import ConfigError, load_config

    settings = ["schedule.name=lambda", "schedule.lr_lambda=1/abs(epoch-3)"]
    with pytest.raises(ConfigError, match=r"train.epochs=5\): '1/abs\(epoch-3\)' failed at epoch 3: division by zero"):
        load_config("mnist", overrides=[*settings, "train.epochs=5"])
    assert load_config("mnist", overrides=[*settings, "train.epochs=2"]).train.epochs == 2  # epochs 0..2 are fine


def test_a_power_too_large_for_a_float_fails_at_once():
    with pytest.raises(LambdaExpressionError, match="failed at epoch 0"):
        compile_lr_lambda("(9999**9999)**9999")  # in integers this would compute for minutes
