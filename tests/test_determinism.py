"""``make test`` runs the same examples every time: every hypothesis test is derandomized (its
examples seeded from the test itself) and keeps no example database between runs, so a run
neither finds new failures by chance nor replays ones an earlier run stored. Hunting for new
failures is a separate, explicit run: ``pytest --hypothesis-profile=explore``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

#: every test module that uses hypothesis, found in the tests folder (so none is forgotten)
MODULES = tuple(
    sorted(
        p.stem
        for p in Path(__file__).parent.glob("test_*.py")
        if p.stem != "test_determinism" and "from hypothesis import" in p.read_text()
    )
)


def hypothesis_tests() -> Iterator[tuple[str, Any]]:
    for name in MODULES:
        module = importlib.import_module(f"tests.{name}")
        for attr, fn in inspect.getmembers(module, inspect.isfunction):
            if attr.startswith("test_") and hasattr(fn, "hypothesis"):
                yield f"{name}::{attr}", fn


def test_every_module_using_hypothesis_is_checked() -> None:
    assert {"test_attribution", "test_fuzz", "test_usage_openai"} <= set(MODULES)
    assert {name.split("::")[0] for name in TESTS} == set(MODULES)


@pytest.fixture(autouse=True)
def _not_exploring(request: pytest.FixtureRequest) -> None:
    profile = request.config.getoption("--hypothesis-profile", default=None)
    if profile not in (None, "deterministic"):
        pytest.skip(f"an explicit --hypothesis-profile={profile} run")


def test_the_default_profile_is_deterministic() -> None:
    assert settings.default.derandomize is True
    assert settings.default.database is None


TESTS = dict(hypothesis_tests())


@pytest.mark.parametrize("name", sorted(TESTS))
def test_each_hypothesis_test_is_deterministic(name: str) -> None:
    used = getattr(TESTS[name], "_hypothesis_internal_use_settings", settings.default)
    assert used.derandomize is True
    assert used.database is None
