"""OpenAI-compatible answers as real servers send them, byte for byte: vLLM's compact JSON
chunks (the client's view, and with the usage chunk it adds when asked), llama.cpp's usage and
``timings`` on the finish chunk, transformers' stream with no usage at all, and vLLM's
non-streaming completion."""

from __future__ import annotations

import json

BASE = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m"'


def chunk(content: str | None, finish: str | None = None, extra: str = "") -> bytes:
    delta = "{}" if content is None else json.dumps({"content": content}, separators=(",", ":"))
    fin = "null" if finish is None else f'"{finish}"'
    choice = f'{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{fin}}}'
    return f'data: {{{BASE},"choices":[{choice}]{extra}}}\n\n'.encode()


ROLE = (
    f'data: {{{BASE},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
    '"logprobs":null,"finish_reason":null}]}\n\n'
).encode()
USAGE = (
    f'data: {{{BASE},"choices":[],"usage":{{"prompt_tokens":7,"total_tokens":10,'
    '"completion_tokens":3}}\n\n'
).encode()
DONE = b"data: [DONE]\n\n"
VLLM_CLIENT_VIEW = ROLE + chunk("a") + chunk(" b") + chunk(" c", "stop") + DONE
VLLM_WITH_USAGE = ROLE + chunk("a") + chunk(" b") + chunk(" c", "stop") + USAGE + DONE
LLAMACPP = (
    ROLE
    + chunk("a")
    + chunk(" b")
    + chunk(
        " c",
        "stop",
        ',"usage":{"completion_tokens":3,"prompt_tokens":7,"total_tokens":10},'
        '"timings":{"prompt_n":7,"predicted_n":3}',
    )
)
TRANSFORMERS = ROLE + chunk("a") + chunk(" b") + chunk(" c", "stop")
NON_STREAM = (
    b'{"id":"chatcmpl-9","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi there"},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":11,"total_tokens":13,"completion_tokens":2}}'
)
