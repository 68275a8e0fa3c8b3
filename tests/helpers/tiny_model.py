"""Tiny local models built in a test, never downloaded: a word-level tokenizer with a chat
template (saved as a ``transformers`` fast tokenizer) and a random-weight Llama around it.

The tokenizer splits on whitespace and punctuation and knows every word it was trained on; its
``<s>`` is added in front of every encoded text (``add_special_tokens``), so a text's count is
its pieces plus one, and a chat prompt's count is the templated text's pieces plus one.
"""

from __future__ import annotations

import re
from pathlib import Path

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "hello world how are you today",
    "energy per token is measured in joules",
    "user assistant system : you are a helpful model",
)
SPECIALS = ("[UNK]", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
_PIECE = re.compile(r"\w+|[^\w\s]+")


def pieces(text: str) -> int:
    """How many tokens the tiny tokenizer makes of ``text`` (no specials)."""
    return len(_PIECE.findall(text))


def build_tokenizer(folder: Path, chat_template: str = CHAT_TEMPLATE) -> Path:
    """Train the tiny tokenizer and save it (with ``chat_template``) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [*SENTENCES, " ".join(f"w{i}" for i in range(64)), ": ? ! . ,"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=list(SPECIALS)))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def build_llama(folder: Path) -> Path:
    """A random-weight Llama (a few hundred kB) with the tiny tokenizer, saved into ``folder``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(str(folder))
    return folder
