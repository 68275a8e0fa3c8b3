"""The estimate of a request's energy when it cannot be measured, and the relative costs
(``WorkProfile``) that the ``work`` weighting uses to split measured energy.

Order of preference: an online calibration fitted on measured requests of the same
(upstream, model, task); a model-aware LLM estimate from the model's config or parameter count;
the task prior from Power Hungry Processing, the last resort. Every estimate carries its basis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from estimators import llm, priors
from estimators.attribution import WorkProfile
from estimators.calibration import Calibration, Features, Key
from estimators.errors import EstimatorError
from estimators.llm import ModelInfo

#: Prefill costs about a tenth of decode per token on batched GPU servers (compute-bound prompt
#: processing vs memory-bound generation); calibration replaces it per model when measured.
DEFAULT_PREFILL_DECODE_RATIO = 0.1
GENERATIVE = frozenset(("text-generation", "summarization", "translation", "image-to-text"))
#: Tasks whose cost is a language model's prefill and decode: the LLM estimate applies to them.
LLM_TASKS = GENERATIVE | frozenset(("text2text-generation", "image-text-to-text"))
#: Completion length assumed by the LLM estimate when a request's is not known yet (at start).
ASSUMED_COMPLETION_TOKENS = 256

#: ``Estimate.method`` values, best first.
CALIBRATION = "calibration"
LLM = "llm"
PRIOR = "prior"


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What is known of a request when estimating it."""

    upstream: str
    model: str | None
    task: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_s: float | None = None
    images: int | None = None
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class Estimate:
    """An estimated energy, what it rests on (``basis``, for people) and which of the three
    estimators made it (``method``: ``calibration``, ``llm`` or ``prior``)."""

    energy_j: float
    basis: str
    method: str = PRIOR


class Estimator:
    """Estimates energy and sets work profiles: calibration > model-aware LLM > task prior.

    Args:
        models: per upstream name, the model it serves (for every model name it answers).
        calibration: the online fits; a fresh one by default.
        assumed_completion_tokens: completion length the LLM estimate assumes when unknown.
    """

    def __init__(
        self,
        models: Mapping[str, ModelInfo] | None = None,
        calibration: Calibration | None = None,
        assumed_completion_tokens: int = ASSUMED_COMPLETION_TOKENS,
    ) -> None:
        self._models: dict[tuple[str, str | None], ModelInfo] = {}
        for upstream, info in (models or {}).items():
            self._models[(upstream, None)] = info
        self.calibration = Calibration() if calibration is None else calibration
        self.assumed_completion_tokens = assumed_completion_tokens
        self._last_relative_error: float | None = None

    # -- models -----------------------------------------------------------------------------

    def register_model(
        self,
        upstream: str,
        info: ModelInfo | None = None,
        *,
        model_path: str | Path | None = None,
        params_b: float | None = None,
        active_params_b: float | None = None,
        model: str | None = None,
        gpus: int = 1,
        accelerator: str = llm.DEFAULT_ACCELERATOR,
    ) -> ModelInfo:
        """Tell the estimator what ``upstream`` serves: a ``ModelInfo``, a local model folder
        (its ``config.json`` is counted) or a parameter count in billions. ``model`` narrows it
        to requests for that model name; by default it covers every model of the upstream.
        Raises ``EstimatorError`` when the folder cannot be read or nothing is given."""
        if info is None:
            if model_path is not None:
                info = ModelInfo.from_path(model_path, gpus, accelerator)
            elif params_b is not None:
                info = ModelInfo.from_params_b(
                    params_b, active_params_b, gpus, accelerator, name=model
                )
            else:
                raise EstimatorError("register_model needs info, model_path or params_b")
        self._models[(upstream, model)] = info
        return info

    def model_info(self, upstream: str, model: str | None) -> ModelInfo | None:
        """The model registered for this upstream and model name, or for the whole upstream."""
        if model is not None:
            found = self._models.get((upstream, model))
            if found is not None:
                return found
        return self._models.get((upstream, None))

    # -- estimates --------------------------------------------------------------------------

    @staticmethod
    def _key(shape: RequestShape) -> Key:
        return (shape.upstream, shape.model, shape.task)

    @staticmethod
    def _features(shape: RequestShape) -> Features:
        return Features(shape.prompt_tokens, shape.completion_tokens, shape.duration_s)

    def _llm_model(self, upstream: str, model: str | None, task: str) -> ModelInfo | None:
        return self.model_info(upstream, model) if task in LLM_TASKS else None

    def estimate(self, shape: RequestShape) -> Estimate:
        """The energy of a request that could not be measured, and its basis."""
        key = self._key(shape)
        calibrated_j = self.calibration.predict_j(key, self._features(shape))
        if calibrated_j is not None:
            fit = self.calibration.fit(key)
            samples = fit.samples if fit else 0
            error = (
                f", recent relative error {fit.relative_error:.0%}"
                if fit and fit.relative_error is not None
                else ""
            )
            basis = (
                f"calibration {shape.upstream}/{shape.model or '-'}/{shape.task}: linear fit on "
                f"{samples} measured requests (prompt, completion tokens, duration){error}"
            )
            return Estimate(calibrated_j, basis, CALIBRATION)
        info = self._llm_model(shape.upstream, shape.model, shape.task)
        if info is not None:
            completion = shape.completion_tokens
            assumed = completion is None
            result = llm.estimate(
                info,
                prompt_tokens=shape.prompt_tokens or 0,
                completion_tokens=self.assumed_completion_tokens if assumed else completion or 0,
                batch=max(shape.concurrency, 1),
            )
            basis = result.basis
            if assumed:
                basis += f"; {self.assumed_completion_tokens} completion tokens assumed"
            return Estimate(result.energy_j, basis, LLM)
        prior = priors.estimate(shape.task, shape.completion_tokens, shape.images)
        return Estimate(prior.energy_j, prior.basis, PRIOR)

    def expected_completion_tokens(self, shape: RequestShape) -> float:
        """How many tokens a request is expected to generate: the key's recent mean when
        calibrated, else ``assumed_completion_tokens``; never more than the request's own limit
        (``shape.completion_tokens``: its ``max_tokens`` at the start)."""
        mean = self.calibration.mean_completion_tokens(self._key(shape))
        expected = float(self.assumed_completion_tokens if mean is None else mean)
        limit = shape.completion_tokens
        return expected if limit is None or limit > expected else float(limit)

    def decode_j_per_token(
        self, upstream: str, model: str | None, task: str, concurrency: int = 1
    ) -> float:
        """Joules per generated token (per inference for tasks that generate none)."""
        fit = self.calibration.fit((upstream, model, task))
        if fit is not None and fit.decode_j_per_token > 0.0:
            return fit.decode_j_per_token
        info = self._llm_model(upstream, model, task)
        if info is not None:
            return llm.decode_j_per_token(
                info.active_params_b, info.gpus, max(concurrency, 1), info.accelerator
            )
        if task in GENERATIVE:
            return priors.per_inference_j(task) / priors.PAPER_NEW_TOKENS
        return priors.per_inference_j(task)

    def prefill_j_per_token(
        self,
        upstream: str,
        model: str | None,
        task: str,
        concurrency: int = 1,
        decode_j_per_token: float | None = None,
    ) -> float:
        """Joules per prompt token: calibrated when fitted, else in the LLM estimate's
        proportion to ``decode_j_per_token`` (or ``DEFAULT_PREFILL_DECODE_RATIO`` of it).
        Pass ``decode_j_per_token`` when it is at hand, to skip deriving it again."""
        fit = self.calibration.fit((upstream, model, task))
        if fit is not None and fit.prefill_j_per_token > 0.0:
            return fit.prefill_j_per_token
        decode = (
            self.decode_j_per_token(upstream, model, task, concurrency)
            if decode_j_per_token is None
            else decode_j_per_token
        )
        info = self._llm_model(upstream, model, task)
        if info is None:
            return decode * DEFAULT_PREFILL_DECODE_RATIO
        batch = max(concurrency, 1)
        prefill = llm.prefill_j_per_token(info.active_params_b, info.accelerator)
        llm_decode = llm.decode_j_per_token(
            info.active_params_b, info.gpus, batch, info.accelerator
        )
        return decode * prefill / llm_decode

    def profile(
        self,
        shape: RequestShape,
        token_stream: bool,
    ) -> WorkProfile:
        """Relative costs for the ``work`` weighting of one request. ``expected_j`` weighs only
        requests without a token stream, so it is estimated only for them (every request pays
        for ``profile``)."""
        args = (shape.upstream, shape.model, shape.task, shape.concurrency)
        decode = self.decode_j_per_token(*args)
        return WorkProfile(
            prompt_tokens=float(shape.prompt_tokens or 0),
            prefill_j_per_token=self.prefill_j_per_token(*args, decode_j_per_token=decode),
            decode_j_per_token=decode,
            expected_j=0.0 if token_stream else self.estimate(shape).energy_j,
            token_stream=token_stream,
        )

    # -- calibration ------------------------------------------------------------------------

    def observe(self, shape: RequestShape, measured_j: float) -> None:
        """A measured request, for calibration."""
        self._last_relative_error = self.calibration.observe(
            self._key(shape), self._features(shape), measured_j
        )

    def last_relative_error(self) -> float | None:
        """|predicted - measured| / measured for the request last passed to ``observe``, by the
        fit as it was before that request; ``None`` when its key was not fitted yet."""
        return self._last_relative_error
