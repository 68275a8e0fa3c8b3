"""Checks on what a test's code logged."""

from __future__ import annotations

import logging

import pytest


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    for rec in caplog.records:
        assert rec.exc_info is None, f"{rec.name}: {rec.getMessage()} logged a traceback"
        assert rec.levelno < logging.ERROR, f"{rec.name}: {rec.getMessage()}"
    assert "Traceback" not in caplog.text
