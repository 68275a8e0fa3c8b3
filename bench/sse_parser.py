"""µs of Python per streamed SSE event: ``OpenAISSE`` with its chunk-level path against the same
parser held to the per-event path (``chunk_path=False``), side by side in one process.

The stream is vLLM 0.10's chat stream as the proxy asks for it (``include_usage`` added, so the
usage chunk is stripped again): a role chunk, ``EVENTS`` content events of a few words each, the
end-of-sequence chunk, the usage chunk and ``[DONE]``; cut two ways: one event per chunk (vLLM
writes each event on its own; a relay reading as fast as the server writes gets them so) and
eight events per chunk (a relay that fell behind, or a server that batches). Each round parses
the stream ``REPEATS`` times with each parser in turn, timed in process CPU time (neighbours on
a shared machine move it less than wall time); the figure is the minimum over rounds, and the
ratio of the two parsers is the number to trust.

``python -m bench.sse_parser`` prints the table; ``--profile`` adds a cProfile of both parsers
on the one-event-per-chunk shape.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.usage.openai import OpenAISSE

EVENTS = 300
ROUNDS = 15
REPEATS = 20
SHAPES = (1, 8)  # events per chunk

_HEAD = (
    b'data: {"id":"chatcmpl-9f1c2a7b3e4d45a1b0c6d8e2f3a4b5c6","object":"chat.completion.chunk",'
    b'"created":1733300000,"model":"meta-llama/Llama-3.1-8B-Instruct",'
)
_SENTENCE = "The quick brown fox jumps over the lazy dog, and then it rests in the warm sun"
_WORDS = _SENTENCE.split()


def vllm_stream(events: int = EVENTS) -> list[bytes]:
    """vLLM 0.10's events (``model_dump_json(exclude_unset=True)``, as replayed in
    tests/test_stream_options.py) for ``events`` content pieces of one to three words."""
    out = [
        _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":null}\n\n'
    ]
    for i in range(events):
        words = _WORDS[i % len(_WORDS) : i % len(_WORDS) + 1 + i % 3]
        piece = json.dumps({"content": " " + " ".join(words)}, separators=(",", ":"))[1:-1]
        out.append(
            _HEAD + b'"choices":[{"index":0,"delta":{' + piece.encode() + b'},"logprobs":null,'
            b'"finish_reason":null,"token_ids":null}]}\n\n'
        )
    out.append(
        _HEAD + b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,'
        b'"finish_reason":"stop","stop_reason":null,"token_ids":null}]}\n\n'
    )
    prompt, completion = 24, events + 1
    out.append(
        _HEAD + b'"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
        b'"completion_tokens":%d}}\n\n' % (prompt, prompt + completion, completion)
    )
    out.append(b"data: [DONE]\n\n")
    return out


def chunked(events: Sequence[bytes], per_chunk: int) -> list[bytes]:
    return [b"".join(events[i : i + per_chunk]) for i in range(0, len(events), per_chunk)]


def parse(chunks: Sequence[bytes], chunk_path: bool) -> tuple[bytes, int, tuple[int | None, ...]]:
    """One stream through a fresh parser as the proxy runs it: what the client gets, tokens,
    and the usage."""
    parser = OpenAISSE(strip_usage=True, chunk_path=chunk_path)
    out = [parser.feed(c) for c in chunks]
    out.append(parser.flush())
    usage = parser.finish()
    return b"".join(out), parser.tokens, (usage.prompt_tokens, usage.completion_tokens)


def _time_us_per_event(chunks: Sequence[bytes], events: int, chunk_path: bool) -> float:
    feed_all = _feeder(chunks, chunk_path)
    t0 = time.process_time()
    for _ in range(REPEATS):
        feed_all()
    return (time.process_time() - t0) / REPEATS / events * 1e6


def _feeder(chunks: Sequence[bytes], chunk_path: bool) -> Callable[[], None]:
    def feed_all() -> None:
        parser = OpenAISSE(strip_usage=True, chunk_path=chunk_path)
        feed = parser.feed
        for c in chunks:
            feed(c)
        parser.flush()
        parser.finish()

    return feed_all


@dataclass(frozen=True, slots=True)
class ParserCost:
    """µs of CPU per SSE event for one chunk shape: minimum (and median) over rounds."""

    per_chunk: int
    events: int
    event_path_us: float
    chunk_path_us: float
    event_path_median_us: float
    chunk_path_median_us: float

    @property
    def ratio(self) -> float:
        return self.chunk_path_us / self.event_path_us


def measure(rounds: int = ROUNDS, shapes: Sequence[int] = SHAPES) -> list[ParserCost]:
    events = vllm_stream()
    results = []
    for per_chunk in shapes:
        chunks = chunked(events, per_chunk)
        if parse(chunks, True) != parse(chunks, False):  # the benchmark times equal work
            raise AssertionError(f"chunk path differs from the per-event path ({per_chunk}/chunk)")
        slow: list[float] = []
        fast: list[float] = []
        for r in range(rounds):  # alternate, and alternate which goes first
            order = (False, True) if r % 2 == 0 else (True, False)
            for chunk_path in order:
                us = _time_us_per_event(chunks, len(events), chunk_path)
                (fast if chunk_path else slow).append(us)
        results.append(
            ParserCost(
                per_chunk,
                len(events),
                min(slow),
                min(fast),
                statistics.median(slow),
                statistics.median(fast),
            )
        )
    return results


def markdown(results: Sequence[ParserCost]) -> str:
    lines = [
        f"vLLM's chat stream ({results[0].events} events: {EVENTS} content events of one to "
        "three words, role, end-of-sequence, the injected usage chunk the proxy strips, "
        f"`[DONE]`) through `OpenAISSE`, {REPEATS} streams per round, {ROUNDS} rounds "
        "alternating the two parsers; process CPU time, minimum over rounds (median in "
        "brackets).",
        "",
        "| events per chunk | per-event path µs per SSE event | chunk path µs per SSE event "
        "| chunk / per-event | goal <= 50 % |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.per_chunk} | {r.event_path_us:.2f} ({r.event_path_median_us:.2f}) | "
            f"{r.chunk_path_us:.2f} ({r.chunk_path_median_us:.2f}) | {r.ratio * 100:.0f} % | "
            f"{'met' if r.ratio <= 0.5 else 'missed'} |"
        )
    return "\n".join(lines)


def profile(per_chunk: int = 1, streams: int = 300) -> str:
    """cProfile of both parsers on one shape: where the per-chunk time goes."""
    chunks = chunked(vllm_stream(), per_chunk)
    out = io.StringIO()
    for chunk_path in (False, True):
        feed_all = _feeder(chunks, chunk_path)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(streams):
            feed_all()
        prof.disable()
        out.write(f"\n== chunk_path={chunk_path}, {per_chunk} event(s) per chunk ==\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def main(argv: Sequence[str]) -> int:
    print(markdown(measure()))
    if "--profile" in argv:
        print(profile())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
