"""``wattproxy estimate``: parsed arguments in, the estimate and its basis out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from estimators import llm
from estimators.carbon import table_intensity
from estimators.units import J_PER_WH, co2e_g
from proxy import estimate_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wattproxy")
    sub = parser.add_subparsers(dest="command", required=True)
    estimate_cli.add_parser(sub)
    return parser.parse_args(["estimate", *argv])


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert estimate_cli.run(parse(*argv, "--format", "json")) == 0
    record: dict[str, object] = json.loads(capsys.readouterr().out)
    return record


def test_params_given_directly(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_json(
        capsys,
        "--task", "text-generation", "--params-b", "8.03", "--prompt-tokens", "1000",
        "--completion-tokens", "200", "--batch", "64", "--zone", "FR",
    )  # fmt: skip
    energy_j = 1000 * llm.prefill_j_per_token(8.03) + 200 * llm.decode_j_per_token(8.03, 1, 64)
    assert record["energy_j"] == pytest.approx(energy_j)
    assert record["energy_wh"] == pytest.approx(energy_j / J_PER_WH)
    fr = table_intensity("FR").g_per_kwh
    assert record["co2e_g"] == pytest.approx(co2e_g(energy_j, fr))
    assert record["method"] == "llm"
    assert "ML.ENERGY" in str(record["basis"])
    assert record["zone"] == "FR" and record["intensity_g_per_kwh"] == fr


def test_model_path_is_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ).save_pretrained(tmp_path)  # fmt: skip
    record = run_json(
        capsys, "--model-path", str(tmp_path), "--completion-tokens", "100", "--gpus", "2",
        "--accelerator", "A100", "--pue", "1.2", "--zone", "US-CA",
    )  # fmt: skip
    assert record["active_params_b"] == pytest.approx(8.03, abs=0.01)
    expected = 100 * llm.decode_j_per_token(8.03, 2, 1, "A100")
    assert record["energy_j"] == pytest.approx(expected, rel=0.005)
    assert record["co2e_g"] == pytest.approx(co2e_g(float(str(record["energy_j"])), 263.0, 1.2))


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--params-b", "70", "--gpus", "4", "--completion-tokens", "50", "--batch", "8"]
    assert estimate_cli.run(parse(*argv)) == 0
    out = capsys.readouterr().out
    for label in ("energy", " J = ", " Wh", "g CO2e", "method", "llm", "basis", "4x H100"):
        assert label in out


def test_without_a_model_the_prior_answers(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_json(capsys, "--task", "image-classification")
    assert record["method"] == "prior"
    assert record["energy_j"] == pytest.approx(0.007 * 3600)
    assert str(record["basis"]).startswith("prior image-classification")
    assert record["zone"] == "WORLD"


def test_moe_active_params(capsys: pytest.CaptureFixture[str]) -> None:
    record = run_json(
        capsys, "--params-b", "46.7", "--active-params-b", "12.9", "--completion-tokens", "10"
    )
    assert record["energy_j"] == pytest.approx(10 * llm.decode_j_per_token(12.9, 1, 1))


def test_unknown_zone_uses_the_world_figure_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = run_json(capsys, "--zone", "atlantis")
    assert record["intensity_g_per_kwh"] == table_intensity("WORLD").g_per_kwh
    assert "not in the table" in str(record["intensity_source"])


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert estimate_cli.run(parse("--model-path", str(tmp_path))) == 2
    assert "no config.json" in capsys.readouterr().err
    assert estimate_cli.run(parse("--pue", "0.5")) == 2
    assert estimate_cli.run(parse("--active-params-b", "3")) == 2
    with pytest.raises(SystemExit):
        parse("--params-b", "8", "--model-path", str(tmp_path))
    with pytest.raises(SystemExit):
        parse("--gpus", "0")


def test_func_default_is_run() -> None:
    assert parse().func is estimate_cli.run
