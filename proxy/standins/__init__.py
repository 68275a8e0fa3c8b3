"""Stand-in inference servers, one module per API, each speaking its server's exact wire format:
the demo's upstream, the tests' upstreams and the benchmarks' upstream.

- ``openai``: vLLM, llama.cpp and transformers serve on the OpenAI routes (``StandIn``), and
  the benchmarks' zero-latency vLLM (``FastStandIn``);
- ``openai_extra``: vLLM's routes beyond chat (responses, messages, images, audio, rerank);
- ``tgi``: text-generation-inference; ``tei``: text-embeddings-inference; ``ollama``: Ollama;
- ``llamacpp``: byte-exact replays of llama-cpp-python's and llama.cpp's own chat streams;
- ``recording``: what they share, the record of each request received and each byte sent.
"""

from proxy.standins.llamacpp import LlamaCpp
from proxy.standins.ollama import Ollama
from proxy.standins.openai import FastStandIn, Latency, StandIn
from proxy.standins.openai_extra import OpenAIExtra
from proxy.standins.recording import Recorder, Seen, compact, words
from proxy.standins.tei import TEI
from proxy.standins.tgi import TGI

__all__ = [
    "TEI",
    "TGI",
    "FastStandIn",
    "Latency",
    "LlamaCpp",
    "Ollama",
    "OpenAIExtra",
    "Recorder",
    "Seen",
    "StandIn",
    "compact",
    "words",
]
