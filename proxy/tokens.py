"""Token counts with the model's own tokenizer, loaded from a local folder (never downloaded),
for servers that report no usage or report it wrongly."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("wattproxy.tokens")

#: bytes per token when no tokenizer is at hand (English text with BPE vocabularies)
BYTES_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return (len(text.encode("utf-8")) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


class TokenCounter:
    """Counts tokens with ``AutoTokenizer.from_pretrained(model_path, local_files_only=True)``."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self._tok: Any = None
        self._template_warned = False

    def load(self) -> TokenCounter:
        """Load now (slow: call at startup, off the event loop)."""
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        return self

    def count(self, text: str) -> int:
        tok = self.load()._tok
        return len(tok.encode(text, add_special_tokens=False))

    def count_prompt(self, messages: list[Any] | None, text: str) -> int:
        """Prompt tokens as the server sees them: the chat template applied when there is one,
        the tokenizer's special tokens added otherwise."""
        tok = self.load()._tok
        if messages and getattr(tok, "chat_template", None):
            try:
                ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                return len(ids)
            except Exception as e:  # jinja2 missing, a template that raises, odd messages
                self._warn_template(e)
        return len(tok.encode(text, add_special_tokens=True))

    def _warn_template(self, error: Exception) -> None:
        """Say once per tokenizer that prompts are counted without their chat template (fewer
        tokens than the server counts); every request would repeat the same words."""
        if self._template_warned:
            return
        self._template_warned = True
        log.warning(
            "the chat template of %s failed (%s: %s); prompt tokens are counted without it, "
            "fewer than the server counts (said once)",
            self.model_path,
            type(error).__name__,
            error,
        )
