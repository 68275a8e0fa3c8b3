"""The model-aware estimate: parameter counts from tiny configs built here (never downloaded),
the fit against the ML.ENERGY leaderboard v3, and its use by the Estimator."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import DeepseekV3Config, GPT2Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

from estimators import llm
from estimators.errors import EstimatorError
from estimators.estimator import LLM, PRIOR, Estimator, RequestShape
from estimators.llm import ModelInfo
from estimators.model_card import count_params

#: The tolerance the brief asks the fit to meet; the module holds itself to a tighter one.
BRIEF_TOLERANCE = 0.35


def llama_8b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )


def llama_70b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        vocab_size=128256,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )


@pytest.fixture
def llama_8b_dir(tmp_path: Path) -> Path:
    llama_8b().save_pretrained(tmp_path)
    return tmp_path


# -- parameter counts -----------------------------------------------------------------------


def test_llama_8b_from_a_saved_config(llama_8b_dir: Path) -> None:
    info = ModelInfo.from_path(llama_8b_dir)
    assert info.active_params_b == pytest.approx(8.03, rel=0.005)
    assert info.total_params_b == info.active_params_b
    assert "config.json" in info.source


def test_llama_70b() -> None:
    count = count_params(llama_70b())
    assert count.total_b == pytest.approx(70.55, rel=0.005)
    assert count.active == count.total


def test_leaderboard_points_use_the_counted_sizes() -> None:
    sizes = {
        "8B": count_params(llama_8b()).active_b,
        "70B": count_params(llama_70b()).active_b,
    }
    for point in llm.LEADERBOARD_V3_H100:
        counted = sizes["70B" if "70B" in point.model else "8B"]
        assert point.active_params_b == pytest.approx(counted, rel=0.001)


def test_mixtral_counts_only_routed_experts_as_active() -> None:
    count = count_params(MixtralConfig())  # 8 experts, 2 per token: Mixtral-8x7B dims
    assert count.total_b == pytest.approx(46.7, rel=0.01)
    assert count.active_b == pytest.approx(12.9, rel=0.01)


def test_qwen_moe_shared_expert_is_always_active() -> None:
    cfg = Qwen2MoeConfig(
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=1000,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    count = count_params(cfg)
    expert = 3 * 256 * 64
    assert count.total - count.active == 2 * (8 - 2) * expert


def test_deepseek_v3_latent_attention_and_experts() -> None:
    count = count_params(DeepseekV3Config())  # defaults are DeepSeek-V3's dims
    assert count.total_b == pytest.approx(671, rel=0.02)
    assert count.active_b == pytest.approx(37, rel=0.03)


def test_gpt2_ungated_mlp() -> None:
    assert count_params(GPT2Config()).total_b == pytest.approx(0.124, rel=0.01)


def test_a_folder_without_config_is_an_error_and_nothing_is_downloaded(tmp_path: Path) -> None:
    with pytest.raises(EstimatorError, match=r"no config\.json"):
        ModelInfo.from_path(tmp_path)
    with pytest.raises(EstimatorError):
        ModelInfo.from_path("meta-llama/Llama-3.1-8B")  # a hub id is not a local folder


def test_a_broken_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json", "utf-8")
    with pytest.raises(EstimatorError):
        ModelInfo.from_path(tmp_path)


# -- the fit --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", llm.LEADERBOARD_V3_H100, ids=lambda p: f"{p.model}@{p.batch}")
def test_fit_reproduces_each_leaderboard_point(point: llm.LeaderboardPoint) -> None:
    fitted = llm.decode_j_per_token(point.active_params_b, point.gpus, point.batch, "H100")
    rel = abs(fitted - point.j_per_token) / point.j_per_token
    assert rel <= llm.FIT_TOLERANCE <= BRIEF_TOLERANCE, (fitted, point)


def test_batching_lowers_energy_per_token() -> None:
    values = [llm.decode_j_per_token(8.03, 1, b) for b in (1, 8, 64, 512)]
    assert values == sorted(values, reverse=True)
    assert llm.decode_j_per_token(8.03, 1, 100_000) == llm.decode_j_per_token(8.03, 1, 1024)
    assert llm.decode_j_per_token(8.03, 1, 0) == llm.decode_j_per_token(8.03, 1, 1)


def test_bigger_models_cost_more() -> None:
    assert llm.decode_j_per_token(70, 1, 8) == pytest.approx(10 * llm.decode_j_per_token(7, 1, 8))


def test_prefill_is_cheaper_than_decode_per_token() -> None:
    assert llm.prefill_j_per_token(8.03) < llm.decode_j_per_token(8.03, 1, 512)
    assert llm.prefill_j_per_token(8.03) == pytest.approx(0.0227, rel=0.01)


def test_accelerator_factors() -> None:
    h100 = llm.decode_j_per_token(8.03, 1, 8, "H100")
    assert llm.decode_j_per_token(8.03, 1, 8, "A100") == pytest.approx(1.5 * h100)
    assert llm.decode_j_per_token(8.03, 1, 8, "h200") == pytest.approx(0.85 * h100)
    assert llm.accelerator_factor("H100-SXM5-80GB") == 1.0
    with pytest.raises(EstimatorError, match="unknown accelerator"):
        llm.accelerator_factor("TPUv5")


def test_request_estimate_adds_prefill_and_decode() -> None:
    info = ModelInfo.from_params_b(8.03)
    est = llm.estimate(info, prompt_tokens=1000, completion_tokens=200, batch=8)
    assert est.prefill_j == pytest.approx(1000 * llm.prefill_j_per_token(8.03))
    assert est.decode_j == pytest.approx(200 * llm.decode_j_per_token(8.03, 1, 8))
    assert est.energy_j == pytest.approx(est.prefill_j + est.decode_j)
    assert "ML.ENERGY" in est.basis


def test_model_info_validates() -> None:
    with pytest.raises(EstimatorError):
        ModelInfo.from_params_b(0)
    with pytest.raises(EstimatorError):
        ModelInfo.from_params_b(8, gpus=0)


# -- the Estimator --------------------------------------------------------------------------


def test_estimator_uses_the_registered_model(llama_8b_dir: Path) -> None:
    est = Estimator()
    est.register_model("llm", model_path=llama_8b_dir)
    shape = RequestShape("llm", "llama", "text-generation", 500, 200, concurrency=8)
    result = est.estimate(shape)
    assert result.method == LLM
    expected = 500 * llm.prefill_j_per_token(8.03) + 200 * llm.decode_j_per_token(8.03, 1, 8)
    assert result.energy_j == pytest.approx(expected, rel=0.005)


def test_live_concurrency_sets_the_batch() -> None:
    est = Estimator(models={"llm": ModelInfo.from_params_b(8.03)})
    low = est.estimate(RequestShape("llm", None, "text-generation", 0, 100, concurrency=8))
    high = est.estimate(RequestShape("llm", None, "text-generation", 0, 100, concurrency=64))
    assert high.energy_j / low.energy_j == pytest.approx(0.119 / 0.455, rel=0.2)


def test_per_model_registration_narrows_the_upstream() -> None:
    est = Estimator()
    est.register_model("llm", params_b=8)
    est.register_model("llm", params_b=70, model="big", gpus=4)
    small = est.estimate(RequestShape("llm", "small", "text-generation", 0, 100))
    big = est.estimate(RequestShape("llm", "big", "text-generation", 0, 100))
    assert big.energy_j > 5 * small.energy_j


def test_unknown_completion_length_is_assumed_and_said() -> None:
    est = Estimator(models={"llm": ModelInfo.from_params_b(8)}, assumed_completion_tokens=100)
    result = est.estimate(RequestShape("llm", None, "text-generation", prompt_tokens=10))
    assert "100 completion tokens assumed" in result.basis
    assert result.energy_j == pytest.approx(
        10 * llm.prefill_j_per_token(8) + 100 * llm.decode_j_per_token(8, 1, 1)
    )


def test_non_llm_tasks_and_unknown_upstreams_use_priors() -> None:
    est = Estimator(models={"llm": ModelInfo.from_params_b(8)})
    assert est.estimate(RequestShape("llm", None, "text-to-image", images=1)).method == PRIOR
    assert est.estimate(RequestShape("other", None, "text-generation", 1, 1)).method == PRIOR


def test_profile_uses_model_aware_costs() -> None:
    est = Estimator(models={"llm": ModelInfo.from_params_b(8.03)})
    shape = RequestShape("llm", None, "text-generation", prompt_tokens=300, concurrency=64)
    profile = est.profile(shape, token_stream=True)
    assert profile.decode_j_per_token == pytest.approx(llm.decode_j_per_token(8.03, 1, 64))
    assert profile.prefill_j_per_token == pytest.approx(llm.prefill_j_per_token(8.03))
    assert profile.prompt_tokens == 300
    assert profile.token_stream


def test_register_model_needs_something() -> None:
    with pytest.raises(EstimatorError):
        Estimator().register_model("llm")
