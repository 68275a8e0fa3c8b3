"""The task priors against the figures published in Power Hungry Processing (Table 2)."""

from __future__ import annotations

import pytest

from estimators import priors
from estimators.estimator import PRIOR, Estimator, RequestShape

#: Luccioni, Jernite, Strubell, FAccT 2024 (arXiv 2311.16863): mean kWh per 1,000 inferences.
PUBLISHED_KWH_PER_1000 = {
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


def test_table_is_the_published_one() -> None:
    assert priors.KWH_PER_1000 == PUBLISHED_KWH_PER_1000


@pytest.mark.parametrize(("task", "kwh_per_1000"), sorted(PUBLISHED_KWH_PER_1000.items()))
def test_per_inference_joules(task: str, kwh_per_1000: float) -> None:
    # kWh per 1,000 inferences -> J per inference: x 3.6e6 J/kWh / 1000
    assert priors.per_inference_j(task) == pytest.approx(kwh_per_1000 * 3600.0)


def test_text_generation_is_169_joules_per_request() -> None:
    assert priors.per_inference_j("text-generation") == pytest.approx(169.2)
    assert priors.per_inference_j("text-to-image") == pytest.approx(10465.2)


@pytest.mark.parametrize(
    ("task", "base"),
    [
        ("feature-extraction", "text-classification"),
        ("sentence-similarity", "text-classification"),
        ("translation", "summarization"),
        ("image-text-to-text", "image-to-text"),
        ("image-to-image", "text-to-image"),
        ("something-new", "text-generation"),
    ],
)
def test_tasks_without_a_figure_borrow_the_closest(task: str, base: str) -> None:
    assert priors.prior_task(task) == base
    assert priors.per_inference_j(task) == priors.per_inference_j(base)


def test_generation_scales_with_tokens_from_the_papers_ten() -> None:
    one = priors.estimate("text-generation")
    assert one.energy_j == pytest.approx(169.2)
    hundred = priors.estimate("text-generation", completion_tokens=100)
    assert hundred.energy_j == pytest.approx(169.2 * 10)
    assert "scaled to 100 tokens" in hundred.basis


def test_images_scale_text_to_image() -> None:
    assert priors.estimate("text-to-image", images=3).energy_j == pytest.approx(3 * 10465.2)


def test_other_tasks_are_one_inference() -> None:
    est = priors.estimate("text-classification", completion_tokens=500)
    assert est.energy_j == pytest.approx(7.2)


def test_basis_names_the_source() -> None:
    basis = priors.estimate("summarization").basis
    assert basis.startswith("prior summarization")
    assert "Power Hungry Processing" in basis


def test_estimator_falls_back_to_priors_when_nothing_else_is_known() -> None:
    est = Estimator().estimate(RequestShape("llm", "m", "text-generation", 10, 20))
    assert est.method == PRIOR
    assert est.energy_j == pytest.approx(169.2 * 2)
    assert est.basis.startswith("prior")
