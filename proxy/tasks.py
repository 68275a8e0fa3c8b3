"""The task of a request, as a Hugging Face pipeline tag, from its path and its upstream's config.

Pure. In order: the upstream's ``tasks`` map (path -> tag; ``"*"`` for every inference
request), then the built-in table below, then the task of the upstream's model (read from its
``config.json`` by ``estimators.model_card``) for a POST the table does not place. For the
``generic`` API the model's task comes before the table, which only guesses there. Requests
that do no inference (model lists, health, tokenization) are ``other`` whatever the model.
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
    "/v1/moderations": "text-classification",
    "/v1/images/variations": "image-to-image",
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
    "/similarity": "sentence-similarity",
    # Ollama
    "/api/generate": "text-generation",
    "/api/chat": "text-generation",
    "/api/embed": "feature-extraction",
    "/api/embeddings": "feature-extraction",
}


#: Paths that never run the model, whatever the upstream serves.
NON_INFERENCE: frozenset[str] = frozenset(
    (
        "/tokenize",
        "/detokenize",
        "/decode",
        "/v1/models",
        "/v1/messages/count_tokens",
        "/health",
        "/healthz",
        "/ready",
        "/info",
        "/metrics",
        "/version",
        "/ping",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/version",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
    )
)
#: Methods that may carry an inference request.
INFERENCE_METHODS = frozenset(("POST", "PUT"))


def task_for(
    path: str,
    overrides: Mapping[str, str] | None = None,
    api: str = "openai",
    model_task: str | None = None,
    method: str = "POST",
) -> str:
    """The pipeline tag for ``path``; see the module docstring for the order.

    Args:
        model_task: the task of the upstream's model (``estimators.model_card``), when known.
        method: the request's method; only POST and PUT fall back to the model's task.
    """
    key = path.rstrip("/") or "/"
    if overrides:
        task = overrides.get(path) or overrides.get(key)
        if task:
            return task
    inference = method in INFERENCE_METHODS and key not in NON_INFERENCE
    if overrides and inference and overrides.get("*"):
        return overrides["*"]
    if api == "generic" and inference and model_task:
        return model_task
    if path == "/" and api != "tgi":
        return OTHER
    task = PATH_TASKS.get(key, OTHER)
    if task == OTHER and inference and model_task:
        return model_task
    return task
