"""What a local model folder says about its model, read once from its ``config.json``: the
parameters (all, and those a token goes through) for the LLM estimate, the architectures, and
the task (a Hugging Face pipeline tag) for a POST that the route alone does not place.

``config.json`` is read with ``transformers.AutoConfig`` (``local_files_only``: nothing is ever
downloaded), or as plain JSON when transformers does not know the model type (the task can still
be told; parameters cannot). The task follows from ``architectures`` (``LlamaForCausalLM`` ->
``text-generation``, ...) and, for the heads that several tasks share, from the config itself
(an encoder-decoder, a one-label classifier). Folders without a ``config.json`` are recognised
by their marker files: a diffusers pipeline (``model_index.json``) or a sentence-transformers
model. Parameters are counted from the config's dimensions (no weights loaded); mixture-of-
experts models count only the experts a token is routed to.

Pure except for ``read_model_card``, which reads the folder once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimators.errors import EstimatorError

log = logging.getLogger("wattproxy.model_card")

#: Architecture name suffix -> task, tried in order (longer, more specific suffixes first).
ARCHITECTURE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForPreTraining", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("MTModel", "translation"),
    ("ForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
    ("ForTextToSpeech", "text-to-speech"),
    ("ForTextToWaveform", "text-to-speech"),
    ("ForImageClassification", "image-classification"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForInstanceSegmentation", "image-segmentation"),
    ("ForUniversalSegmentation", "image-segmentation"),
    ("ForDepthEstimation", "depth-estimation"),
    ("ForVision2Seq", "image-to-text"),
    ("ForImageTextToText", "image-text-to-text"),
    ("ForZeroShotImageClassification", "zero-shot-image-classification"),
)
#: model_type -> task, where the architecture name does not tell.
MODEL_TYPES: dict[str, str] = {
    "whisper": "automatic-speech-recognition",
    "speech_to_text": "automatic-speech-recognition",
    "speecht5": "text-to-speech",
    "vision-encoder-decoder": "image-to-text",
    "blip": "image-to-text",
    "clip": "zero-shot-image-classification",
    "siglip": "zero-shot-image-classification",
}
#: Encoder-decoder text models made for translation; the others summarize.
TRANSLATION_TYPES = frozenset(("marian", "m2m_100", "nllb-moe", "fsmt", "mbart", "madlad"))


def _seq2seq_task(cfg: Mapping[str, Any]) -> str:
    params = cfg.get("task_specific_params")
    keys = list(params) if isinstance(params, dict) else []
    if "summarization" in keys:
        return "summarization"
    if keys and all(k.startswith("translation") for k in keys):
        return "translation"
    return "translation" if cfg.get("model_type") in TRANSLATION_TYPES else "summarization"


def task_from_config(cfg: Mapping[str, Any]) -> str | None:
    """The task of a model from its config (as a dict: ``config.to_dict()`` or the JSON)."""
    model_type = str(cfg.get("model_type") or "")
    archs = [a for a in cfg.get("architectures") or () if isinstance(a, str)]
    if model_type in MODEL_TYPES and (
        not archs or any("ConditionalGeneration" in a or a.endswith("Model") for a in archs)
    ):
        return MODEL_TYPES[model_type]
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            labels = cfg.get("id2label")
            n = cfg.get("num_labels", len(labels) if isinstance(labels, dict) else None)
            # a one-score head is a cross-encoder: a reranker (TEI serves these on /rerank)
            return "text-ranking" if n == 1 else "text-classification"
        for suffix, task in ARCHITECTURE_SUFFIXES:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForConditionalGeneration"):
            if cfg.get("is_encoder_decoder"):
                return _seq2seq_task(cfg)
            if cfg.get("vision_config") is not None:
                return "image-text-to-text"
            return "text-generation"
        if arch.endswith("Model"):  # a bare encoder: embeddings
            return "feature-extraction"
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    return None


def _diffusers_task(index: Mapping[str, Any]) -> str:
    name = str(index.get("_class_name") or "")
    if "Img2Img" in name or "Inpaint" in name or "InstructPix2Pix" in name:
        return "image-to-image"
    if "Video" in name:
        return "text-to-video"
    if "Audio" in name:
        return "text-to-audio"
    return "text-to-image"


#: Model families whose MLP is gated (gate, up and down projections: three matrices).
GATED_MLP_MODEL_TYPES = frozenset(
    (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "olmoe",
        "granite",
        "granitemoe",
        "cohere",
        "cohere2",
        "deepseek_v2",
        "deepseek_v3",
        "internlm2",
        "yi",
        "exaone",
        "glm",
        "glm4",
        "smollm3",
        "ministral",
        "llama4_text",
        "dbrx",
        "minimax",
        "hunyuan_v1_dense",
    )
)
GATED_ACTIVATIONS = frozenset(("silu", "swish", "swiglu", "geglu"))


@dataclass(frozen=True, slots=True)
class ParamCount:
    """Parameters of a model: all of them, and those each token goes through (MoE: routed)."""

    total: int
    active: int

    @property
    def total_b(self) -> float:
        return self.total / 1e9

    @property
    def active_b(self) -> float:
        return self.active / 1e9


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _required_int(config: Any, *names: str) -> int:
    value = _first(config, *names)
    if value is None or isinstance(value, bool) or int(value) <= 0:
        raise EstimatorError(f"model config has no usable {' / '.join(names)}")
    return int(value)


def _optional_int(config: Any, *names: str) -> int | None:
    value = _first(config, *names)
    if value is None or isinstance(value, bool):
        return None
    return int(value)


def _is_gated(config: Any) -> bool:
    model_type = str(getattr(config, "model_type", "") or "")
    act = str(_first(config, "hidden_act", "hidden_activation", "activation_function") or "")
    return model_type in GATED_MLP_MODEL_TYPES or act in GATED_ACTIVATIONS


def _attention_params(config: Any, hidden: int, heads: int) -> int:
    kv_lora_rank = _optional_int(config, "kv_lora_rank")
    if kv_lora_rank:  # multi-head latent attention (DeepSeek-V2/V3)
        rope = _optional_int(config, "qk_rope_head_dim") or 0
        nope = _optional_int(config, "qk_nope_head_dim") or 0
        v_dim = _optional_int(config, "v_head_dim") or nope
        q_lora_rank = _optional_int(config, "q_lora_rank")
        q_dim = heads * (nope + rope)
        q = hidden * q_lora_rank + q_lora_rank * q_dim if q_lora_rank else hidden * q_dim
        kv = hidden * (kv_lora_rank + rope) + kv_lora_rank * heads * (nope + v_dim)
        return q + kv + heads * v_dim * hidden
    kv_heads = _optional_int(config, "num_key_value_heads", "num_kv_heads") or heads
    head_dim = _optional_int(config, "head_dim") or hidden // heads
    return hidden * head_dim * (2 * heads + 2 * kv_heads)


def count_params(config: Any) -> ParamCount:
    """Count a decoder's parameters from its config (a transformers ``PretrainedConfig`` or any
    object with the same attribute names): embeddings, attention, MLP or experts, norms.
    Biases and learned position tables are left out (well under 1% for LLMs)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = _required_int(config, "hidden_size", "n_embd", "d_model")
    layers = _required_int(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _required_int(config, "num_attention_heads", "n_head")
    vocab = _required_int(config, "vocab_size")
    intermediate = _optional_int(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    mlp_matrices = 3 if _is_gated(config) else 2

    attention = _attention_params(config, hidden, heads)
    norms = 2 * hidden
    dense_mlp = mlp_matrices * hidden * intermediate

    experts = _optional_int(config, "num_local_experts", "num_experts", "n_routed_experts")
    routed = _optional_int(config, "num_experts_per_tok", "moe_top_k")
    layers_total = 0
    layers_active = 0
    if experts and experts > 1 and routed:
        expert_size = _optional_int(config, "moe_intermediate_size") or intermediate
        expert = mlp_matrices * hidden * expert_size
        shared = 0
        shared_size = _optional_int(config, "shared_expert_intermediate_size")
        if shared_size:
            shared = mlp_matrices * hidden * shared_size
        n_shared = _optional_int(config, "n_shared_experts")
        if n_shared:
            shared += n_shared * expert
        router = hidden * experts
        dense_layers = set(range(_optional_int(config, "first_k_dense_replace") or 0))
        dense_layers |= set(getattr(config, "mlp_only_layers", None) or ())
        sparse_step = _optional_int(config, "decoder_sparse_step") or 1
        for layer in range(layers):
            sparse = layer not in dense_layers and (layer + 1) % sparse_step == 0
            if sparse:
                layers_total += attention + norms + router + shared + experts * expert
                layers_active += attention + norms + router + shared + min(routed, experts) * expert
            else:
                layers_total += attention + norms + dense_mlp
                layers_active += attention + norms + dense_mlp
    else:
        layers_total = layers_active = layers * (attention + norms + dense_mlp)

    embeddings = vocab * hidden
    if not getattr(config, "tie_word_embeddings", False):
        embeddings += vocab * hidden  # a separate output projection
    outer = embeddings + hidden  # + final norm
    return ParamCount(total=layers_total + outer, active=layers_active + outer)


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What ``read_model_card`` found in a model folder.

    Args:
        folder: the folder as given.
        config: its config through transformers; None where AutoConfig cannot read it.
        doc: the config as a dict (``config.to_dict()``, else the plain JSON); None without one.
        marker_task: the task a marker file tells (sentence-transformers, diffusers).
        problem: why ``config`` is None, naming the folder.
    """

    folder: Path
    config: Any = None
    doc: Mapping[str, Any] | None = None
    marker_task: str | None = None
    problem: str | None = None

    @property
    def architectures(self) -> tuple[str, ...]:
        archs = (self.doc or {}).get("architectures") or ()
        return tuple(a for a in archs if isinstance(a, str))

    @property
    def task(self) -> str | None:
        """The pipeline tag, or None when it cannot be told."""
        if self.marker_task is not None:
            return self.marker_task
        return task_from_config(self.doc) if self.doc is not None else None

    def params(self) -> ParamCount:
        """The parameter count. Raises ``EstimatorError`` when no config could be read."""
        if self.config is None:
            raise EstimatorError(self.problem or f"{self.folder}: no readable config.json")
        return count_params(self.config)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _marker_task(folder: Path) -> str | None:
    if (folder / "config_sentence_transformers.json").is_file() or (
        folder / "modules.json"
    ).is_file():
        return "feature-extraction"
    index = folder / "model_index.json"
    if index.is_file() and not (folder / "config.json").is_file():
        doc = _json(index)
        return _diffusers_task(doc) if doc is not None else None
    return None


def read_model_card(path: str | Path) -> ModelCard:
    """Read a local model folder once: ``config.json`` through AutoConfig, or as plain JSON for
    model types it does not know, and its marker files. Never raises for a missing or broken
    folder: the card says what could not be read (``problem``)."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return ModelCard(
            folder,
            marker_task=_marker_task(folder) if folder.is_dir() else None,
            problem=f"{folder}: no config.json (a local Hugging Face model folder)",
        )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        doc: dict[str, Any] = config.to_dict()
    except Exception as e:  # unknown model type, remote code, a broken file, no transformers
        log.debug("AutoConfig cannot read %s: %s", folder, e)
        return ModelCard(
            folder,
            doc=_json(folder / "config.json"),
            marker_task=_marker_task(folder),
            problem=f"{folder}: cannot read config.json: {e}",
        )
    return ModelCard(folder, config, doc, _marker_task(folder))


def task_from_model_path(path: str | Path) -> str | None:
    """The task of the model in a local folder, or None when it cannot be told."""
    return read_model_card(path).task
