"""The task (a Hugging Face pipeline tag) of a local model folder, read from its config.

``config.json`` is read with ``transformers.AutoConfig`` (``local_files_only``: nothing is ever
downloaded), or as plain JSON when transformers does not know the model type. The task follows
from ``architectures`` (``LlamaForCausalLM`` -> ``text-generation``, ...) and, for the heads
that several tasks share, from the config itself (an encoder-decoder, a one-label classifier).
Folders without a ``config.json`` are recognised by their marker files: a diffusers pipeline
(``model_index.json``) or a sentence-transformers model.

Pure except for reading the folder; ``task_from_model_path`` is the entry point.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("wattproxy.model_info")

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


def _load_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` through AutoConfig, or as plain JSON for model types it does not know."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        doc: dict[str, Any] = config.to_dict()
        return doc
    except Exception as e:  # unknown model type, remote code, a broken file
        log.debug("AutoConfig cannot read %s: %s", folder, e)
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def task_from_model_path(path: str | Path) -> str | None:
    """The task of the model in a local folder, or None when it cannot be told."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    if (folder / "config_sentence_transformers.json").is_file() or (
        folder / "modules.json"
    ).is_file():
        return "feature-extraction"
    index = folder / "model_index.json"
    if index.is_file() and not (folder / "config.json").is_file():
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return _diffusers_task(doc) if isinstance(doc, dict) else None
    if not (folder / "config.json").is_file():
        return None
    cfg = _load_config(folder)
    return task_from_config(cfg) if cfg is not None else None
