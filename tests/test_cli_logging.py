"""The console log of `trainyard train`: errors a user can act on show their message, not a traceback."""

from __future__ import annotations

import logging
import sys

import pytest

from pipelines import cli
from tasks.errors import DataError
from tasks.tracking import TrackingUnavailable


def record_of(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord(
        "prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception during execution: %r", (exc,), info
    )


@pytest.fixture
def formatter():
    return cli.ConsoleFormatter("%(levelname)s %(name)s: %(message)s", cli._actionable_errors())


@pytest.mark.parametrize(
    "exc", [DataError("data.csv: column 'label' missing"), TrackingUnavailable("MLflow server http://x is unreachable")]
)
def test_actionable_error_keeps_its_message_without_the_traceback(formatter, exc):
    record = record_of(exc)
    text = formatter.format(record)
    assert str(exc) in text and "Traceback" not in text
    # the record itself is untouched: Prefect's API handler (the run's log in the UI) keeps the traceback
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert "Traceback" in logging.Formatter().format(record)


def test_unexpected_error_keeps_its_traceback(formatter):
    text = formatter.format(record_of(KeyError("boom")))
    assert "Traceback" in text and "KeyError: 'boom'" in text


def test_configure_logging_puts_the_formatter_on_the_console(monkeypatch):
    root, ours = logging.getLogger(), logging.getLogger("trainyard")
    monkeypatch.setattr(root, "handlers", [])  # a fresh process: no handler yet
    monkeypatch.setattr(root, "level", root.level)  # put back afterwards, as the environment below
    monkeypatch.setattr(ours, "level", ours.level)
    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    cli.configure_logging()
    assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, cli.ConsoleFormatter)
