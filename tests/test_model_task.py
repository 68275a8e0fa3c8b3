"""A local model folder's card (task, architectures, parameters), from configs built here with
transformers' own config classes (nothing downloaded), and how its task enters the route's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import (
    BartConfig,
    BertConfig,
    LlamaConfig,
    LlavaConfig,
    MarianConfig,
    PretrainedConfig,
    T5Config,
    ViTConfig,
    WhisperConfig,
    YolosConfig,
)

from estimators.errors import EstimatorError
from estimators.llm import ModelInfo
from estimators.model_card import (
    count_params,
    read_model_card,
    task_from_config,
    task_from_model_path,
)
from proxy.tasks import OTHER, task_for

SMALL_BERT: dict[str, Any] = {
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "vocab_size": 50,
}


def with_attrs(config: PretrainedConfig, **attrs: Any) -> PretrainedConfig:
    """A config with attributes set after construction (labels, task parameters)."""
    for key, value in attrs.items():
        setattr(config, key, value)
    return config


def save(folder: Path, config: PretrainedConfig, architectures: list[str]) -> Path:
    config.architectures = architectures
    config.save_pretrained(str(folder))
    return folder


CASES: list[tuple[str, PretrainedConfig, list[str], str]] = [
    (
        "llama",
        LlamaConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            vocab_size=50,
        ),
        ["LlamaForCausalLM"],
        "text-generation",
    ),
    ("gpt2-style", LlamaConfig(), ["GPT2LMHeadModel"], "text-generation"),
    (
        "bert-cls",
        with_attrs(BertConfig(**SMALL_BERT), num_labels=3),
        ["BertForSequenceClassification"],
        "text-classification",
    ),
    (
        "cross-encoder",
        with_attrs(BertConfig(**SMALL_BERT), num_labels=1),
        ["BertForSequenceClassification"],
        "text-ranking",
    ),
    ("ner", BertConfig(**SMALL_BERT), ["BertForTokenClassification"], "token-classification"),
    ("qa", BertConfig(**SMALL_BERT), ["BertForQuestionAnswering"], "question-answering"),
    ("mlm", BertConfig(**SMALL_BERT), ["BertForMaskedLM"], "fill-mask"),
    ("encoder", BertConfig(**SMALL_BERT), ["BertModel"], "feature-extraction"),
    (
        "t5",
        with_attrs(
            T5Config(d_model=8, num_layers=1, num_heads=2, d_ff=16, vocab_size=50),
            task_specific_params={
                "summarization": {"prefix": "summarize: "},
                "translation_en_to_de": {},
            },
        ),
        ["T5ForConditionalGeneration"],
        "summarization",
    ),
    (
        "t5-translate",
        with_attrs(T5Config(), task_specific_params={"translation_en_to_fr": {}}),
        ["T5ForConditionalGeneration"],
        "translation",
    ),
    (
        "bart",
        BartConfig(d_model=8, encoder_layers=1, decoder_layers=1, vocab_size=50),
        ["BartForConditionalGeneration"],
        "summarization",
    ),
    (
        "marian",
        MarianConfig(d_model=8, encoder_layers=1, decoder_layers=1, vocab_size=50),
        ["MarianMTModel"],
        "translation",
    ),
    (
        "whisper",
        WhisperConfig(d_model=8, encoder_layers=1, decoder_layers=1),
        ["WhisperForConditionalGeneration"],
        "automatic-speech-recognition",
    ),
    (
        "whisper-cls",
        WhisperConfig(d_model=8),
        ["WhisperForAudioClassification"],
        "audio-classification",
    ),
    (
        "vit",
        ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2),
        ["ViTForImageClassification"],
        "image-classification",
    ),
    (
        "yolos",
        YolosConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2),
        ["YolosForObjectDetection"],
        "object-detection",
    ),
    ("llava", LlavaConfig(), ["LlavaForConditionalGeneration"], "image-text-to-text"),
]


@pytest.mark.parametrize(("name", "config", "archs", "task"), CASES, ids=[c[0] for c in CASES])
def test_task_from_saved_config(
    tmp_path: Path, name: str, config: PretrainedConfig, archs: list[str], task: str
) -> None:
    folder = save(tmp_path / name, config, archs)
    assert (folder / "config.json").is_file()
    assert task_from_model_path(folder) == task
    assert task_from_model_path(str(folder)) == task


def test_unknown_model_type_is_read_as_plain_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "made_up_arch", "architectures": ["MadeUpForCausalLM"]})
    )
    assert task_from_model_path(tmp_path) == "text-generation"


def test_marker_files(tmp_path: Path) -> None:
    sd = tmp_path / "sd"
    sd.mkdir()
    index = sd / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert task_from_model_path(sd) == "text-to-image"
    index.write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    assert task_from_model_path(sd) == "image-to-image"
    st = save(tmp_path / "st", BertConfig(**SMALL_BERT), ["BertForMaskedLM"])
    (st / "config_sentence_transformers.json").write_text("{}")
    assert task_from_model_path(st) == "feature-extraction"


def test_nothing_to_tell(tmp_path: Path) -> None:
    assert task_from_model_path(tmp_path / "missing") is None
    assert task_from_model_path(tmp_path) is None  # a folder with no config
    (tmp_path / "config.json").write_text("not json")
    assert task_from_model_path(tmp_path) is None
    assert task_from_config({"architectures": ["SomethingElse"]}) is None


def test_one_read_gives_task_architectures_and_parameters(tmp_path: Path) -> None:
    """The estimator's parameter count and the router's task come from the same reader."""
    config = LlamaConfig(**SMALL_BERT, tie_word_embeddings=False)
    folder = save(tmp_path / "llama", config, ["LlamaForCausalLM"])
    card = read_model_card(folder)
    assert card.task == "text-generation"
    assert card.architectures == ("LlamaForCausalLM",)
    assert card.params() == count_params(config)
    info = ModelInfo.from_path(folder)
    assert info.total_params_b == card.params().total_b


def test_a_card_without_a_readable_config_names_the_folder(tmp_path: Path) -> None:
    """A model type transformers does not know still has a task (plain JSON) but no count; a
    folder with no config.json has neither."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "made_up_arch", "architectures": ["MadeUpForCausalLM"]})
    )
    card = read_model_card(tmp_path)
    assert card.task == "text-generation"
    with pytest.raises(EstimatorError, match=re.escape(f"{tmp_path}: cannot read config.json")):
        card.params()
    missing = read_model_card(tmp_path / "missing")
    assert missing.task is None and missing.architectures == ()
    with pytest.raises(EstimatorError, match=r"no config\.json"):
        missing.params()


@pytest.mark.parametrize(
    ("path", "api", "model_task", "method", "task"),
    [
        ("/v1/chat/completions", "openai", "summarization", "POST", "text-generation"),  # route
        ("/v1/custom", "openai", "summarization", "POST", "summarization"),  # route says other
        ("/v1/models", "openai", "summarization", "GET", OTHER),
        ("/tokenize", "openai", "summarization", "POST", OTHER),  # never inference
        ("/predict", "generic", "image-classification", "POST", "image-classification"),
        ("/predict", "tei", "text-ranking", "POST", "text-classification"),
    ],
)
def test_model_task_fills_what_the_route_does_not_fix(
    path: str, api: str, model_task: str, method: str, task: str
) -> None:
    assert task_for(path, {}, api, model_task=model_task, method=method) == task


def test_config_dict_directly() -> None:
    cfg: dict[str, Any] = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "id2label": {"0": "a", "1": "b"},
    }
    assert task_from_config(cfg) == "text-classification"


async def test_a_generic_upstream_gets_its_models_task_end_to_end(
    aiohttp_server: Any, make_proxy: Any, tmp_path: Path
) -> None:
    """A generic upstream serving a sequence classifier: its records say text-classification."""
    import aiohttp
    from aiohttp import web

    from tests.conftest import proxy_config, url_of

    folder = tmp_path / "classifier"
    config = BertConfig(**SMALL_BERT)
    config.architectures = ["BertForSequenceClassification"]
    config.save_pretrained(folder)

    async def score(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response([{"label": "POSITIVE", "score": 0.9}])

    app = web.Application()
    app.router.add_post("/score-this", score)
    up = await aiohttp_server(app)
    cfg = proxy_config(
        url_of(up),
        tmp_path,
        upstreams=[{"name": "clf", "url": url_of(up), "api": "generic", "model_path": str(folder)}],
    )
    proxy, _ = await make_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/score-this", json={"inputs": "great"}) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Wattproxy-Task"] == "text-classification"
        async with s.get(url_of(proxy) + "/v1/models") as r2:
            assert r2.headers["X-Wattproxy-Task"] == OTHER  # a GET runs no model


async def test_an_unmetered_upstream_with_a_model_config_gets_the_llm_estimate(
    upstream: Any, make_proxy: Any, tmp_path: Path
) -> None:
    """``model_path`` reaches the estimator: with no meter, records say the LLM estimate."""
    import aiohttp

    from tests.conftest import proxy_config, url_of
    from tests.helpers.through_proxy import final_record

    folder = tmp_path / "llama"
    config = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    cfg = proxy_config(
        url_of(upstream),
        tmp_path,
        upstreams=[{"name": "llm", "url": url_of(upstream), "model_path": str(folder)}],
        meter={"kind": "none"},
    )
    proxy, _ = await make_proxy(cfg)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url_of(proxy) + "/v1/chat/completions", json=body) as r,
    ):
        rid = r.headers["X-Request-Id"]
    rec = await final_record(url_of(proxy), rid)
    assert rec["source"] == "estimated"
    assert rec["estimate_method"] == "llm", rec["basis"]
    assert rec["energy_j"] > 0
