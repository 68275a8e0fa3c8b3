"""Model-aware energy per token for LLM serving, from the model's size, the GPUs that serve it,
the accelerator and the live batch, fitted to the ML.ENERGY leaderboard v3 (vLLM on H100).

Decode (per generated token; batching amortises weight reads, so it falls with the batch):

    decode_j_per_token = active_params_b * gpus ** FIT_GPU_EXPONENT
                         * (FIT_A_J * batch ** -FIT_B + FIT_FLOOR_J) * accelerator factor

Prefill (per prompt token; compute-bound, about 2 FLOPs per parameter per token):

    prefill_j_per_token = active_params_b * PREFILL_J_PER_TOKEN_PER_B * accelerator factor

Parameters come from the model's card (``estimators.model_card``: its ``config.json`` through
transformers' config classes, no weights loaded, nothing downloaded); mixture-of-experts models
count only the experts a token is routed to. Pure functions over frozen dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from estimators.errors import EstimatorError
from estimators.model_card import read_model_card


@dataclass(frozen=True, slots=True)
class LeaderboardPoint:
    """One measured point of the ML.ENERGY leaderboard v3 (GPU energy per output token)."""

    model: str
    active_params_b: float
    gpus: int
    batch: int
    j_per_token: float


#: ML.ENERGY leaderboard v3, vLLM on NVIDIA H100 SXM, chat task, GPU energy per output token.
#: Parameter counts are what ``model_card.count_params`` gives for the models' configs.
LEADERBOARD_V3_H100: tuple[LeaderboardPoint, ...] = (
    LeaderboardPoint("meta-llama/Llama-3.1-8B-Instruct", 8.03, 1, 8, 0.455),
    LeaderboardPoint("meta-llama/Llama-3.1-8B-Instruct", 8.03, 1, 64, 0.119),
    LeaderboardPoint("meta-llama/Llama-3.1-8B-Instruct", 8.03, 1, 512, 0.070),
    LeaderboardPoint("meta-llama/Llama-3.1-70B-Instruct", 70.55, 4, 8, 3.76),
    LeaderboardPoint("meta-llama/Llama-3.1-70B-Instruct", 70.55, 4, 64, 0.797),
    LeaderboardPoint("meta-llama/Llama-3.1-70B-Instruct", 70.55, 4, 512, 0.421),
)

# Fitted offline by least squares on log(J/token) over LEADERBOARD_V3_H100 (Nelder-Mead over
# log a, b, log floor, g; sum of squared log residuals 0.026). Every point is reproduced within
# 10%; FIT_TOLERANCE is the bound the tests hold the fit to. With two models, one on 1 GPU and
# one on 4, the GPU exponent cannot be separated from model size: it absorbs the larger model's
# better efficiency per parameter, so treat other GPU counts as an extrapolation.
#: Joules per output token per billion active parameters at batch 1, before the floor.
FIT_A_J = 0.4018
#: How fast batching amortises the per-step cost: J/token ~ batch ** -FIT_B.
FIT_B = 0.9584
#: Joules per output token per billion active parameters that batching cannot remove.
FIT_FLOOR_J = 0.007103
#: Exponent of the GPU count (tensor parallelism).
FIT_GPU_EXPONENT = -0.1711
#: Largest relative error of the fit on any leaderboard point that the tests accept.
FIT_TOLERANCE = 0.15

#: Prefill: 2 FLOPs per parameter per token on an H100 SXM (700 W, 989 TFLOPS dense BF16) at 50%
#: model FLOPs utilisation: 2e9 * 700 / (989e12 * 0.5) J per token per billion parameters.
PREFILL_J_PER_TOKEN_PER_B = 2e9 * 700.0 / (989e12 * 0.5)

DEFAULT_ACCELERATOR = "H100"
#: Energy per token relative to an H100 SXM. Assumptions, not measurements: the A100 SXM (400 W,
#: 312 TFLOPS, 2.0 TB/s) spends ~1.8x the H100's energy per FLOP and about the same per byte
#: read, so 1.5x in between; the H200 has the H100's compute and power with 1.4x its memory
#: bandwidth (4.8 TB/s), so memory-bound decode steps finish sooner at similar power: 0.85x.
ACCELERATOR_FACTORS: Mapping[str, float] = {"H100": 1.0, "A100": 1.5, "H200": 0.85}

#: Batch sizes outside the range are clamped (the fit saw 8..512; batch 1 is an extrapolation).
MIN_BATCH = 1
MAX_BATCH = 1024


def accelerator_factor(accelerator: str) -> float:
    """Energy per token relative to an H100 (see ``ACCELERATOR_FACTORS``)."""
    key = accelerator.strip().upper()
    for name, factor in ACCELERATOR_FACTORS.items():
        if key == name or key.startswith(name):
            return factor
    known = ", ".join(ACCELERATOR_FACTORS)
    raise EstimatorError(f"unknown accelerator {accelerator!r} (known: {known})")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the estimator knows of the model behind an upstream.

    Args:
        name: a label for bases and logs (the model folder or id).
        active_params_b: billions of parameters a token goes through (MoE: routed experts only).
        total_params_b: billions of parameters in all.
        gpus: GPUs the server shards the model over (tensor parallelism).
        accelerator: ``H100`` (default), ``A100`` or ``H200``.
        source: where the count came from (``config.json`` of a folder, or given).
    """

    name: str
    active_params_b: float
    total_params_b: float
    gpus: int = 1
    accelerator: str = DEFAULT_ACCELERATOR
    source: str = "given"

    def __post_init__(self) -> None:
        if not (self.active_params_b > 0 and math.isfinite(self.active_params_b)):
            raise EstimatorError(f"active_params_b must be > 0, got {self.active_params_b}")
        if self.gpus < 1:
            raise EstimatorError(f"gpus must be >= 1, got {self.gpus}")
        accelerator_factor(self.accelerator)  # validates

    @classmethod
    def from_params_b(
        cls,
        params_b: float,
        active_params_b: float | None = None,
        gpus: int = 1,
        accelerator: str = DEFAULT_ACCELERATOR,
        name: str | None = None,
    ) -> ModelInfo:
        """A model known by its parameter count (billions); dense unless ``active_params_b``."""
        active = params_b if active_params_b is None else active_params_b
        return cls(name or f"{params_b:g}B", active, params_b, gpus, accelerator, "given")

    @classmethod
    def from_path(
        cls, model_path: str | Path, gpus: int = 1, accelerator: str = DEFAULT_ACCELERATOR
    ) -> ModelInfo:
        """Count parameters from a local model folder's ``config.json``."""
        count = read_model_card(model_path).params()
        name = Path(model_path).name or str(model_path)
        source = f"config.json in {model_path}"
        return cls(name, count.active_b, count.total_b, gpus, accelerator, source)


def clamp_batch(batch: float) -> float:
    return min(float(MAX_BATCH), max(float(MIN_BATCH), float(batch)))


def decode_j_per_token(
    active_params_b: float,
    gpus: int = 1,
    batch: float = 1,
    accelerator: str = DEFAULT_ACCELERATOR,
) -> float:
    """GPU joules per generated token with ``batch`` sequences decoding together."""
    b = clamp_batch(batch)
    per_b = FIT_A_J * b**-FIT_B + FIT_FLOOR_J
    return (
        active_params_b * max(gpus, 1) ** FIT_GPU_EXPONENT * per_b * accelerator_factor(accelerator)
    )


def prefill_j_per_token(active_params_b: float, accelerator: str = DEFAULT_ACCELERATOR) -> float:
    """GPU joules per prompt token (compute-bound prefill)."""
    return active_params_b * PREFILL_J_PER_TOKEN_PER_B * accelerator_factor(accelerator)


@dataclass(frozen=True, slots=True)
class LLMEstimate:
    """A request's model-aware estimate and how it was made."""

    energy_j: float
    prefill_j: float
    decode_j: float
    prefill_j_per_token: float
    decode_j_per_token: float
    batch: float
    basis: str


def estimate(
    model: ModelInfo,
    prompt_tokens: int,
    completion_tokens: int,
    batch: float = 1,
) -> LLMEstimate:
    """Energy of one request: its prompt at the prefill rate, its output at the decode rate for
    the batch it shared the GPUs with (the upstream's live concurrency)."""
    b = clamp_batch(batch)
    prefill = prefill_j_per_token(model.active_params_b, model.accelerator)
    decode = decode_j_per_token(model.active_params_b, model.gpus, b, model.accelerator)
    prefill_j = max(prompt_tokens, 0) * prefill
    decode_j = max(completion_tokens, 0) * decode
    basis = (
        f"llm {model.name}: {model.active_params_b:.2f}B active params on {model.gpus}x "
        f"{model.accelerator}, batch {b:g}: {decode:.4g} J/output token, {prefill:.4g} J/prompt "
        f"token (fit to ML.ENERGY leaderboard v3, H100)"
    )
    return LLMEstimate(prefill_j + decode_j, prefill_j, decode_j, prefill, decode, b, basis)
