"""Online calibration: per (upstream, model, task), a linear fit of measured request energy
against prompt tokens, completion tokens and duration, updated by recursive least squares with
forgetting so it follows a server whose load, batch or model changes.

    energy_j ~ intercept_j + prefill_j_per_token * prompt_tokens
               + decode_j_per_token * completion_tokens + power_w * duration_s

The estimator uses a fit once it has seen ``min_samples`` requests: to estimate requests whose
measurement failed, and to set the work weighting's prefill and decode costs. Before each update
the current fit predicts the request, and the relative error of that prediction is kept (the
proxy exports it as ``wattproxy_estimator_relative_error``). No I/O, no clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

#: (upstream, model, task)
Key = tuple[str, str | None, str]

#: Keys kept; the least recently observed is dropped beyond this.
DEFAULT_MAX_KEYS = 1000
#: Weight kept by past samples at each update (memory of ~1 / (1 - 0.995) = 200 requests).
DEFAULT_FORGETTING = 0.995
#: Requests seen before a fit is used.
DEFAULT_MIN_SAMPLES = 20
#: Initial covariance: a nearly uninformative start (coefficients free to move anywhere).
DEFAULT_INITIAL_COVARIANCE = 1e6
#: Token features are in thousands, so that all coefficients are of similar magnitude.
TOKENS_PER_UNIT = 1000.0
N_FEATURES = 4  # 1, prompt kilotokens, completion kilotokens, duration seconds
#: Weight of the newest prediction in a key's running relative error.
RELATIVE_ERROR_ALPHA = 0.05


@dataclass(frozen=True, slots=True)
class Features:
    """What a request is fitted on; ``None`` where it is not known."""

    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    duration_s: float | None = None


def _vector(prompt_tokens: float, completion_tokens: float, duration_s: float) -> list[float]:
    return [1.0, prompt_tokens / TOKENS_PER_UNIT, completion_tokens / TOKENS_PER_UNIT, duration_s]


def _finite_nonneg(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return max(0.0, float(value))


class RecursiveLeastSquares:
    """Exponentially weighted recursive least squares over a small dense feature vector."""

    def __init__(
        self,
        n: int,
        forgetting: float = DEFAULT_FORGETTING,
        initial_covariance: float = DEFAULT_INITIAL_COVARIANCE,
    ) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        self.n = n
        self.forgetting = forgetting
        self.initial_covariance = initial_covariance
        self.theta = [0.0] * n
        self.p: list[list[float]] = []
        self._reset_covariance()
        self.samples = 0

    def _reset_covariance(self) -> None:
        c = self.initial_covariance
        self.p = [[c if i == j else 0.0 for j in range(self.n)] for i in range(self.n)]

    def predict(self, x: list[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def update(self, x: list[float], y: float) -> None:
        # Runs once per measured request in the accounting path: written with plain loops and
        # locals (a third faster than comprehensions over self.p[i][j]), the same operations in
        # the same order, so the same floats.
        lam = self.forgetting
        n = self.n
        rows = self.p
        px = []
        for row in rows:
            s: float = 0  # an int start, as sum() has: the same floats (-0.0 too)
            for j in range(n):
                s += row[j] * x[j]
            px.append(s)
        acc: float = 0
        for i in range(n):
            acc += x[i] * px[i]
        denom = lam + acc
        if denom <= 0.0 or not math.isfinite(denom):
            return
        gain = [v / denom for v in px]
        err = y - self.predict(x)
        self.theta = [t + g * err for t, g in zip(self.theta, gain, strict=True)]
        # P <- (P - k x'P) / lambda, kept symmetric; x'P = (Px)' because P is symmetric
        p = []
        for i in range(n):
            row, g = rows[i], gain[i]
            p.append([(row[j] - g * px[j]) / lam for j in range(n)])
        for i in range(n):
            pi = p[i]
            for j in range(i + 1, n):
                pi[j] = p[j][i] = 0.5 * (pi[j] + p[j][i])
        # Bound each variance at its initial value: a feature that never varies (completion
        # tokens of an embedding server) would otherwise wind up as lambda ** -n. Scaling row and
        # column i by the same factor (D P D) keeps P positive definite and leaves the others.
        diagonal = [p[i][i] for i in range(n)]
        if any(not (d > 0.0 and math.isfinite(d)) for d in diagonal):
            self._reset_covariance()  # rounding broke it: start the uncertainty afresh
        else:
            c = self.initial_covariance
            scale = [1.0 if d <= c else math.sqrt(c / d) for d in diagonal]
            if any(f < 1.0 for f in scale):
                p = [[p[i][j] * scale[i] * scale[j] for j in range(n)] for i in range(n)]
            self.p = p
        self.samples += 1


@dataclass(frozen=True, slots=True)
class Fit:
    """A key's fitted coefficients (joules, seconds) once it has enough samples.

    Args:
        samples: requests observed for the key.
        intercept_j: fixed energy per request.
        prefill_j_per_token: marginal joules per prompt token.
        completion_j_per_token: marginal joules per completion token at fixed duration.
        power_w: marginal joules per second of request duration.
        s_per_completion_token: mean duration per completion token (for ``decode_j_per_token``).
        relative_error: recent mean absolute relative error of the fit's predictions.
    """

    samples: int
    intercept_j: float
    prefill_j_per_token: float
    completion_j_per_token: float
    power_w: float
    s_per_completion_token: float
    relative_error: float | None

    @property
    def decode_j_per_token(self) -> float:
        """Joules per generated token, counting the time the token keeps the request alive."""
        return self.completion_j_per_token + self.power_w * self.s_per_completion_token


@dataclass(slots=True)
class _State:
    rls: RecursiveLeastSquares
    mean_prompt: float = 0.0
    mean_completion: float = 0.0
    mean_duration_s: float = 0.0
    relative_error: float | None = None
    #: ``Calibration.fit``'s answer until the next observation (asked twice per request)
    fit: Fit | None = None


class Calibration:
    """Per-key online fits, bounded to ``max_keys`` (least recently observed dropped first).

    Args:
        max_keys: keys kept.
        forgetting: RLS forgetting factor (1.0: never forget).
        min_samples: observations before a key's fit is used.
    """

    def __init__(
        self,
        max_keys: int = DEFAULT_MAX_KEYS,
        forgetting: float = DEFAULT_FORGETTING,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        initial_covariance: float = DEFAULT_INITIAL_COVARIANCE,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self.forgetting = forgetting
        self.min_samples = max(1, min_samples)
        self.initial_covariance = initial_covariance
        self._keys: OrderedDict[Key, _State] = OrderedDict()
        self._last_relative_error: float | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def keys(self) -> list[Key]:
        return list(self._keys)

    @property
    def last_relative_error(self) -> float | None:
        """|predicted - measured| / measured of the latest ``observe`` (None: not fitted yet)."""
        return self._last_relative_error

    def observe(self, key: Key, features: Features, measured_j: float) -> float | None:
        """Add a measured request. Returns the relative error of the prediction the key's fit
        made for it before this update, or ``None`` when the key was not fitted yet or the
        measurement is unusable (not finite or not positive)."""
        self._last_relative_error = None
        if not math.isfinite(measured_j) or measured_j <= 0.0:
            return None
        state = self._keys.get(key)
        if state is None:
            state = _State(
                RecursiveLeastSquares(N_FEATURES, self.forgetting, self.initial_covariance)
            )
            self._keys[key] = state
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        prompt = _finite_nonneg(features.prompt_tokens) or 0.0
        completion = _finite_nonneg(features.completion_tokens) or 0.0
        duration_s = _finite_nonneg(features.duration_s) or 0.0
        x = _vector(prompt, completion, duration_s)
        rel: float | None = None
        if state.rls.samples >= self.min_samples:
            predicted = max(0.0, state.rls.predict(x))
            rel = abs(predicted - measured_j) / measured_j
            prev = state.relative_error
            state.relative_error = (
                rel if prev is None else prev + RELATIVE_ERROR_ALPHA * (rel - prev)
            )
        state.rls.update(x, measured_j)
        alpha = max(1.0 / state.rls.samples, 1.0 - self.forgetting)
        state.mean_prompt += alpha * (prompt - state.mean_prompt)
        state.mean_completion += alpha * (completion - state.mean_completion)
        state.mean_duration_s += alpha * (duration_s - state.mean_duration_s)
        self._last_relative_error = rel
        state.fit = None
        return rel

    def fit(self, key: Key) -> Fit | None:
        """The key's coefficients, or ``None`` until it has ``min_samples`` observations."""
        state = self._keys.get(key)
        if state is None or state.rls.samples < self.min_samples:
            return None
        if state.fit is not None:
            return state.fit
        t = state.rls.theta
        s_per_token = (
            state.mean_duration_s / state.mean_completion if state.mean_completion > 0.0 else 0.0
        )
        state.fit = Fit(
            samples=state.rls.samples,
            intercept_j=t[0],
            prefill_j_per_token=t[1] / TOKENS_PER_UNIT,
            completion_j_per_token=t[2] / TOKENS_PER_UNIT,
            power_w=t[3],
            s_per_completion_token=s_per_token,
            relative_error=state.relative_error,
        )
        return state.fit

    def mean_completion_tokens(self, key: Key) -> float | None:
        """The key's recent mean completion length, once it is fitted (``None`` before)."""
        state = self._keys.get(key)
        if state is None or state.rls.samples < self.min_samples:
            return None
        return state.mean_completion

    def predict_j(self, key: Key, features: Features) -> float | None:
        """The fitted energy of a request, or ``None`` when the key is not fitted or the fit
        gives no positive energy. Unknown features take the key's recent means; an unknown
        duration with known completion tokens takes their recent seconds per token."""
        state = self._keys.get(key)
        if state is None or state.rls.samples < self.min_samples:
            return None
        prompt = _finite_nonneg(features.prompt_tokens)
        completion = _finite_nonneg(features.completion_tokens)
        duration_s = _finite_nonneg(features.duration_s)
        if duration_s is None:
            if completion is not None and state.mean_completion > 0.0:
                duration_s = completion * state.mean_duration_s / state.mean_completion
            else:
                duration_s = state.mean_duration_s
        x = _vector(
            state.mean_prompt if prompt is None else prompt,
            state.mean_completion if completion is None else completion,
            duration_s,
        )
        predicted = state.rls.predict(x)
        if not math.isfinite(predicted) or predicted <= 0.0:
            return None
        return predicted
