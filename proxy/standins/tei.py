"""A text-embeddings-inference stand-in (router wire format, serde field order).

``/embed`` (and ``/embed_all``) -> arrays of vectors; ``/embed_sparse`` -> arrays of
``{"index","value"}``; ``/rerank`` -> ``[{"index", "text"?, "score"}]`` best first;
``/predict`` -> ``[{"score","label"}]`` (a list of those for a batch); ``/tokenize`` -> the
tokens; ``/v1/embeddings`` -> OpenAI with usage. Native answers carry TEI's timing headers and
``x-compute-tokens`` unless ``token_headers`` is off (a gateway in between that drops them).

Tokens: ``[CLS]`` + whitespace words + ``[SEP]`` per input (a rerank pair: ``[CLS] q [SEP] t
[SEP]``), unless a ``count`` function is given (the real model's tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.standins.recording import Recorder, compact, words


def special_count(text: str, pair: str | None = None) -> int:
    return len(words(text)) + 2 + (len(words(pair)) + 1 if pair is not None else 0)


@dataclass
class TEI(Recorder):
    token_headers: bool = True
    count: Callable[[str, str | None], int] = special_count

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/embed", "/embed_all"):
            app.router.add_post(path, self.embed)
        app.router.add_post("/embed_sparse", self.embed_sparse)
        app.router.add_post("/rerank", self.rerank)
        app.router.add_post("/predict", self.predict)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/embeddings", self.openai_embeddings)
        return app

    def _headers(self, chars: int, tokens: int) -> dict[str, str]:
        h = {
            "x-compute-type": "cpu",
            "x-compute-time": "3",
            "x-compute-characters": str(chars),
            "x-total-time": "3",
            "x-tokenization-time": "0",
            "x-queue-time": "0",
            "x-inference-time": "2",
        }
        if self.token_headers:
            h["x-compute-tokens"] = str(tokens)
        return h

    @staticmethod
    def _inputs(doc: dict[str, Any]) -> list[str]:
        inputs = doc.get("inputs", "")
        return [inputs] if isinstance(inputs, str) else [str(x) for x in inputs]

    async def embed(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        inputs = self._inputs(doc)
        body = compact([[0.0125, -0.25, 0.5] for _ in inputs])
        tokens = sum(self.count(t, None) for t in inputs)
        return self.reply(body, "application/json", self._headers(sum(map(len, inputs)), tokens))

    async def embed_sparse(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        inputs = self._inputs(doc)
        body = compact([[{"index": 7, "value": 0.5}, {"index": 42, "value": 1.25}] for _ in inputs])
        tokens = sum(self.count(t, None) for t in inputs)
        return self.reply(body, "application/json", self._headers(sum(map(len, inputs)), tokens))

    async def rerank(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        query = str(doc.get("query", ""))
        texts = [str(t) for t in doc.get("texts", [])]
        ranks = []
        for i, text in enumerate(texts):
            rank: dict[str, Any] = {"index": i}
            if doc.get("return_text"):
                rank["text"] = text
            rank["score"] = round(1.0 / (i + 2), 6)
            ranks.append(rank)
        ranks.sort(key=lambda r: -r["score"])
        tokens = sum(self.count(query, t) for t in texts)
        chars = len(query) * len(texts) + sum(map(len, texts))
        return self.reply(compact(ranks), "application/json", self._headers(chars, tokens))

    async def predict(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        inputs = doc.get("inputs", "")
        labels = [{"score": 0.875, "label": "POSITIVE"}, {"score": 0.125, "label": "NEGATIVE"}]
        if isinstance(inputs, str):
            body: Any = labels
            tokens = self.count(inputs, None)
        elif len(inputs) == 2 and all(isinstance(x, str) for x in inputs):  # one pair
            body = labels
            tokens = self.count(inputs[0], inputs[1])
        else:  # a batch of texts or pairs
            body = [labels for _ in inputs]
            tokens = sum(
                self.count(x, None) if isinstance(x, str) else self.count(x[0], x[1])
                for x in inputs
            )
        return self.reply(compact(body), "application/json", self._headers(10, tokens))

    async def tokenize(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        batch = []
        for text in self._inputs(doc):
            toks = [{"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}]
            at = 0
            for i, w in enumerate(words(text)):
                start = text.index(w, at)
                at = start + len(w)
                toks.append(
                    {"id": 2000 + i, "text": w, "special": False, "start": start, "stop": at}
                )
            toks.append({"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None})
            batch.append(toks)
        return self.reply(compact(batch), "application/json")

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        doc = await self.receive_json(request)
        inputs = doc.get("input", "")
        items = [inputs] if isinstance(inputs, str) else [str(x) for x in inputs]
        tokens = sum(self.count(t, None) for t in items)
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": [0.0125, -0.25], "index": i}
                for i in range(len(items))
            ],
            "model": str(doc.get("model", "tei")),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self.reply(compact(body), "application/json")
