"""The file limit at start-up (trio_ws/hosting/fdlimit.py) and the accept loop's error lines
(trio_ws/hosting/logs.py)."""

from __future__ import annotations

import errno
import logging
import resource

import pytest

from trio_ws.core.limits import Admission, LimitPolicy
from trio_ws.hosting import fdlimit
from trio_ws.hosting.logs import ACCEPT_LOGGER, AcceptErrorFilter
from trio_ws.shell import hypercorn_guard


@pytest.mark.parametrize(
    ("wanted", "limit", "cap"),
    [
        (10_000, 1_048_576, 10_000),
        (10_000, 10_100, 10_000),
        (10_000, 10_099, 9_999),
        (10_000, 1_024, 924),
        (10_000, 256, 156),
        (10_000, 100, 50),  # a tiny limit keeps half
        (10_000, 1, 1),
    ],
)
def test_fitting_max_connections(wanted: int, limit: int, cap: int) -> None:
    assert fdlimit.fitting_max_connections(wanted, limit) == cap


def test_apply_file_limit_lowers_the_cap_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(hypercorn_guard, "_waiting_limit", hypercorn_guard.WAITING_MAX)
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (256, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: calls.append(limits))
    admission = Admission(LimitPolicy(max_connections=10_000))
    with caplog.at_level(logging.INFO, "trio_ws.hosting.fdlimit"):
        fdlimit.apply_file_limit(admission)
    assert calls == [(512, 512)]
    assert admission.policy.max_connections == 412
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_connections lowered to 412" in warnings[0].getMessage()
    # Beside 412 WebSockets and 50 other files: 50 connections waiting for their request.
    assert hypercorn_guard.waiting_limit() == 50


@pytest.mark.parametrize(
    ("websockets", "limit", "waiting"),
    [
        (10_000, 1_048_576, 1000),  # at most WAITING_MAX
        (10_000, 10_600, 550),
        (156, 256, 50),  # what the fitted cap leaves under a limit of 256
        (50, 100, 1),  # a tiny limit: still one
    ],
)
def test_fitting_waiting(websockets: int, limit: int, waiting: int) -> None:
    assert fdlimit.fitting_waiting(websockets, limit) == waiting


def test_accept_errors_one_line_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    accept_filter = AcceptErrorFilter(interval_s=10)

    def record() -> logging.LogRecord:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            import sys

            exc_info = sys.exc_info()
        return logging.LogRecord(
            ACCEPT_LOGGER,
            logging.ERROR,
            __file__,
            1,
            "accept returned %s (%s); retrying in %s seconds",
            ("EMFILE", "Too many open files", 0.1),
            exc_info,
        )

    passed = []
    for _ in range(100):  # 10 s of errors, one every 0.1 s
        rec = record()
        if accept_filter.filter(rec):
            passed.append(rec)
        now[0] += 0.1
    assert len(passed) == 1
    rec = record()
    assert accept_filter.filter(rec)
    assert rec.exc_info is None
    assert rec.getMessage().startswith("accept() failed with EMFILE (Too many open files), 100 ")
    other = logging.LogRecord(ACCEPT_LOGGER, logging.ERROR, __file__, 1, "something else", (), None)
    assert accept_filter.filter(other)
