"""OpenAI-compatible answers as real servers send them, byte for byte: vLLM's compact JSON
chunks (the client's view, and with the usage chunk it adds when asked), llama.cpp's usage and
``timings`` on the finish chunk, transformers' stream with no usage at all, ``transformers serve``
5.24's and 5.25's chat streams, and vLLM's non-streaming completion."""

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


def tf_chunk(choice: str, tail: str = "") -> bytes:
    """A chat chunk of ``transformers serve`` 5.24 and 5.25 in its field order (id and model
    path shortened): ``choice`` is the one choice, or empty for the usage chunk."""
    return (
        f'data: {{"id":"tf-1","choices":[{choice}],"created":1,"model":"m",'
        f'"object":"chat.completion.chunk","system_fingerprint":""{tail}}}\n\n'
    ).encode()


def tf_text(text: str) -> bytes:
    return tf_chunk(f'{{"delta":{{"content":{json.dumps(text)}}},"index":0}}')


TF_ROLE = tf_chunk('{"delta":{"role":"assistant"},"index":0}')
TF_FINISH = '{"delta":{},"index":0,"finish_reason":"length"}'
TF_USAGE = ',"usage":{"completion_tokens":6,"prompt_tokens":10,"total_tokens":16}'
#: transformers serve 5.24, six tokens: usage on the finish chunk, asked for or not (it ignores
#: ``stream_options``), one event per token.
TRANSFORMERS_5_24 = TF_ROLE + tf_text(":") + tf_text(" :") * 5 + tf_chunk(TF_FINISH, TF_USAGE)
#: transformers serve 5.25, the same six tokens: no usage unless asked, and the texts of the
#: tokens a stream fell behind on joined into one event (here three, so four text events).
TRANSFORMERS_5_25 = (
    TF_ROLE + tf_text(":") + tf_text(" : : :") + tf_text(" :") + tf_text(" :") + tf_chunk(TF_FINISH)
)
#: ... and with ``stream_options.include_usage``: a last usage chunk with no choices.
TRANSFORMERS_5_25_USAGE = TRANSFORMERS_5_25 + tf_chunk("", TF_USAGE)
