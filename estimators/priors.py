"""Energy per inference by task, from "Power Hungry Processing" (Luccioni, Jernite, Strubell,
FAccT 2024, arXiv 2311.16863), Table 2: mean kWh per 1,000 inferences on an A100 node, whole
node (GPU + CPU + RAM, CodeCarbon), unbatched. The last resort when nothing is measured and no
model-aware estimate applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimators.units import kwh_to_j

#: Mean kWh per 1,000 inferences, by Hugging Face pipeline tag.
KWH_PER_1000: dict[str, float] = {
    "text-classification": 0.002,
    "question-answering": 0.003,
    "fill-mask": 0.003,
    "token-classification": 0.004,
    "image-classification": 0.007,
    "object-detection": 0.038,
    "text-generation": 0.047,
    "summarization": 0.049,
    "image-to-text": 0.063,
    "text-to-image": 2.907,
}
SOURCE = "Luccioni, Jernite, Strubell 2024 (Power Hungry Processing), A100 node mean"

#: The paper generated 10 new tokens per text-generation input; summarization ~ the same.
PAPER_NEW_TOKENS = 10
#: Tasks with no figure in the paper borrow the closest one.
ALIASES: dict[str, str] = {
    "feature-extraction": "text-classification",
    "sentence-similarity": "text-classification",
    "text-ranking": "text-classification",
    "zero-shot-classification": "text-classification",
    "translation": "summarization",
    "text2text-generation": "summarization",
    "image-text-to-text": "image-to-text",
    "automatic-speech-recognition": "image-to-text",
    "text-to-speech": "text-generation",
    "image-to-image": "text-to-image",
}
DEFAULT_TASK = "text-generation"


def known_tasks() -> list[str]:
    """The tasks with a figure of their own or borrowed (``ALIASES``), sorted."""
    return sorted({*KWH_PER_1000, *ALIASES})


@dataclass(frozen=True, slots=True)
class PriorEstimate:
    energy_j: float
    task: str
    basis: str


def prior_task(task: str) -> str:
    if task in KWH_PER_1000:
        return task
    return ALIASES.get(task, DEFAULT_TASK)


def per_inference_j(task: str) -> float:
    """Mean joules of one inference of ``task`` (or its closest measured task)."""
    return kwh_to_j(KWH_PER_1000[prior_task(task)]) / 1000.0


def estimate(
    task: str, completion_tokens: int | None = None, images: int | None = None
) -> PriorEstimate:
    """Scale the paper's mean to the request: generated tokens for text generation (the paper
    made 10), images for image generation; other tasks are one inference each."""
    base_task = prior_task(task)
    energy_j = per_inference_j(base_task)
    basis = f"prior {base_task}: {KWH_PER_1000[base_task]} kWh/1000 ({SOURCE})"
    if base_task in ("text-generation", "summarization") and completion_tokens:
        energy_j *= max(completion_tokens, 1) / PAPER_NEW_TOKENS
        basis += f", scaled to {completion_tokens} tokens from {PAPER_NEW_TOKENS}"
    elif base_task == "text-to-image" and images:
        energy_j *= images
        basis += f", x{images} images"
    return PriorEstimate(energy_j=energy_j, task=base_task, basis=basis)
