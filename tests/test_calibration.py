"""Online calibration: convergence on noisy synthetic requests, the LRU bound, the relative
error kept before each update, and the Estimator's use of fitted keys."""

from __future__ import annotations

import math
import random

import pytest

from estimators.calibration import Calibration, Features, RecursiveLeastSquares
from estimators.estimator import CALIBRATION, LLM, Estimator, RequestShape
from estimators.llm import ModelInfo

KEY = ("llm", "llama", "text-generation")
# The synthetic server: a fixed cost, prompt and completion tokens, and power over time.
INTERCEPT_J = 5.0
PREFILL_J_PER_TOKEN = 0.02
COMPLETION_J_PER_TOKEN = 0.3
POWER_W = 40.0
S_PER_TOKEN = 0.02


def synthetic(rng: random.Random, noise: float = 0.02) -> tuple[Features, float]:
    prompt = rng.randint(10, 4000)
    completion = rng.randint(1, 1000)
    duration_s = 0.05 + 0.0002 * prompt + S_PER_TOKEN * completion * rng.uniform(0.7, 1.3)
    energy_j = (
        INTERCEPT_J
        + PREFILL_J_PER_TOKEN * prompt
        + COMPLETION_J_PER_TOKEN * completion
        + POWER_W * duration_s
    )
    return Features(prompt, completion, duration_s), energy_j * rng.gauss(1.0, noise)


def test_converges_on_noisy_synthetic_data() -> None:
    rng = random.Random(7)
    cal = Calibration()
    errors: list[float] = []
    for _ in range(3000):
        features, energy_j = synthetic(rng)
        rel = cal.observe(KEY, features, energy_j)
        if rel is not None:
            errors.append(rel)
    fit = cal.fit(KEY)
    assert fit is not None
    assert fit.samples == 3000
    assert fit.prefill_j_per_token == pytest.approx(PREFILL_J_PER_TOKEN, rel=0.15)
    assert fit.completion_j_per_token == pytest.approx(COMPLETION_J_PER_TOKEN, rel=0.15)
    assert fit.power_w == pytest.approx(POWER_W, rel=0.15)
    assert fit.intercept_j == pytest.approx(INTERCEPT_J, abs=5.0)
    # the prediction error settles near the 2% noise
    recent = errors[-500:]
    assert sum(recent) / len(recent) < 0.03
    assert fit.relative_error is not None and fit.relative_error < 0.03
    # a fresh request is predicted within a few percent
    features, _ = synthetic(rng, noise=0.0)
    truth = (
        INTERCEPT_J
        + PREFILL_J_PER_TOKEN * (features.prompt_tokens or 0)
        + COMPLETION_J_PER_TOKEN * (features.completion_tokens or 0)
        + POWER_W * (features.duration_s or 0)
    )
    predicted = cal.predict_j(KEY, features)
    assert predicted == pytest.approx(truth, rel=0.03)


def test_decode_cost_includes_the_time_a_token_keeps_the_request_alive() -> None:
    rng = random.Random(1)
    cal = Calibration()
    for _ in range(2000):
        cal.observe(KEY, *synthetic(rng, noise=0.01))
    fit = cal.fit(KEY)
    assert fit is not None
    # d(energy)/d(completion) with duration growing ~S_PER_TOKEN per token (plus prefill time)
    assert fit.decode_j_per_token == pytest.approx(
        COMPLETION_J_PER_TOKEN + POWER_W * S_PER_TOKEN, rel=0.25
    )


def test_forgetting_follows_a_change() -> None:
    rng = random.Random(3)
    cal = Calibration(forgetting=0.98)
    for _ in range(500):
        p = rng.randint(10, 2000)
        cal.observe(KEY, Features(p, 0, 0.1), 1.0 + 0.01 * p)
    for _ in range(500):
        p = rng.randint(10, 2000)
        cal.observe(KEY, Features(p, 0, 0.1), 1.0 + 0.03 * p)  # the server got 3x costlier
    fit = cal.fit(KEY)
    assert fit is not None
    assert fit.prefill_j_per_token == pytest.approx(0.03, rel=0.05)


def test_relative_error_only_once_fitted() -> None:
    cal = Calibration(min_samples=5)
    results = [cal.observe(KEY, Features(100, 10, 1.0), 50.0) for _ in range(7)]
    assert results[:5] == [None] * 5
    assert results[5] is not None and results[6] is not None
    assert cal.last_relative_error == results[6]
    assert cal.fit(("llm", "other", "text-generation")) is None


def test_unusable_measurements_are_ignored() -> None:
    cal = Calibration(min_samples=1)
    for bad in (0.0, -3.0, math.nan, math.inf):
        assert cal.observe(KEY, Features(1, 1, 1.0), bad) is None
    assert KEY not in cal
    assert cal.last_relative_error is None


def test_keys_are_bounded_least_recent_first() -> None:
    cal = Calibration(max_keys=3)
    keys = [("u", f"m{i}", "text-generation") for i in range(4)]
    for key in keys[:3]:
        cal.observe(key, Features(1, 1, 1.0), 1.0)
    cal.observe(keys[0], Features(1, 1, 1.0), 1.0)  # touched: now the most recent
    cal.observe(keys[3], Features(1, 1, 1.0), 1.0)
    assert len(cal) == 3
    assert keys[1] not in cal
    assert keys[0] in cal and keys[3] in cal


def test_default_bound_is_a_thousand_keys() -> None:
    cal = Calibration()
    for i in range(1200):
        cal.observe(("u", str(i), "t"), Features(1, 1, 1.0), 1.0)
    assert len(cal) == 1000


def test_missing_features_take_recent_means() -> None:
    cal = Calibration(min_samples=10)
    for _ in range(50):
        cal.observe(KEY, Features(100, 50, 2.0), 100.0)
    assert cal.predict_j(KEY, Features()) == pytest.approx(100.0, rel=0.01)


def test_rls_solves_an_exact_linear_system() -> None:
    rls = RecursiveLeastSquares(2, forgetting=1.0)
    for x in range(1, 50):
        rls.update([1.0, float(x)], 3.0 + 2.0 * x)
    assert rls.theta == pytest.approx([3.0, 2.0], rel=1e-3)


def test_estimator_prefers_a_fitted_calibration() -> None:
    rng = random.Random(11)
    est = Estimator(models={"llm": ModelInfo.from_params_b(8)}, calibration=Calibration())
    shape = RequestShape("llm", "llama", "text-generation", 500, 100, duration_s=2.5)
    assert est.estimate(shape).method == LLM
    assert est.last_relative_error() is None
    for _ in range(200):
        features, energy_j = synthetic(rng)
        est.observe(
            RequestShape(
                "llm",
                "llama",
                "text-generation",
                int(features.prompt_tokens or 0),
                int(features.completion_tokens or 0),
                features.duration_s,
            ),
            energy_j,
        )
    assert est.last_relative_error() is not None
    result = est.estimate(shape)
    assert result.method == CALIBRATION
    assert result.basis.startswith("calibration llm/llama/text-generation")
    truth = INTERCEPT_J + PREFILL_J_PER_TOKEN * 500 + COMPLETION_J_PER_TOKEN * 100 + POWER_W * 2.5
    assert result.energy_j == pytest.approx(truth, rel=0.1)
    fit = est.calibration.fit(("llm", "llama", "text-generation"))
    assert fit is not None
    assert est.decode_j_per_token("llm", "llama", "text-generation") == fit.decode_j_per_token
    assert est.prefill_j_per_token("llm", "llama", "text-generation") == fit.prefill_j_per_token
    profile = est.profile(shape, token_stream=False)  # expected_j weighs non-streams only
    assert profile.expected_j == result.energy_j
    streamed = est.profile(shape, token_stream=True)
    assert streamed.decode_j_per_token == fit.decode_j_per_token
    assert streamed.prefill_j_per_token == fit.prefill_j_per_token
    # another model of the same upstream is not calibrated yet
    other = RequestShape("llm", "other", "text-generation", 500, 100)
    assert est.estimate(other).method == LLM
