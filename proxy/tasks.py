"""The task of a request, as a Hugging Face pipeline tag, from its path and its upstream's config.

Pure. An upstream's ``tasks`` map (path -> tag) wins over the built-in table below.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Requests that do no inference (model lists, health checks) carry this tag and no energy.
OTHER = "other"

PATH_TASKS: dict[str, str] = {
    # OpenAI-compatible (vLLM, llama.cpp server, transformers serve, TGI's /v1 routes)
    "/v1/chat/completions": "text-generation",
    "/v1/completions": "text-generation",
    "/v1/responses": "text-generation",
    "/v1/messages": "text-generation",
    "/v1/embeddings": "feature-extraction",
    "/v1/images/generations": "text-to-image",
    "/v1/images/edits": "image-to-image",
    "/v1/audio/transcriptions": "automatic-speech-recognition",
    "/v1/audio/translations": "automatic-speech-recognition",
    "/v1/audio/speech": "text-to-speech",
    "/v1/rerank": "text-ranking",
    "/v2/rerank": "text-ranking",
    "/rerank": "text-ranking",
    "/v1/score": "text-ranking",
    "/score": "text-ranking",
    "/classify": "text-classification",
    "/v1/classify": "text-classification",
    "/pooling": "feature-extraction",
    # llama.cpp server native
    "/completion": "text-generation",
    "/embedding": "feature-extraction",
    # TGI
    "/generate": "text-generation",
    "/generate_stream": "text-generation",
    "/": "text-generation",
    # TEI
    "/embed": "feature-extraction",
    "/embed_sparse": "feature-extraction",
    "/embed_all": "feature-extraction",
    "/predict": "text-classification",
    # Ollama
    "/api/generate": "text-generation",
    "/api/chat": "text-generation",
    "/api/embed": "feature-extraction",
    "/api/embeddings": "feature-extraction",
}


def task_for(path: str, overrides: Mapping[str, str] | None = None, api: str = "openai") -> str:
    """The pipeline tag for ``path``: the upstream's override, then the table, else ``other``."""
    if overrides:
        task = overrides.get(path) or overrides.get(path.rstrip("/"))
        if task:
            return task
    if path == "/" and api != "tgi":
        return OTHER
    return PATH_TASKS.get(path.rstrip("/") or "/", OTHER)
