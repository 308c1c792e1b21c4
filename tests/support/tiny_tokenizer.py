"""A small real tokenizer for data tests: byte-level BPE trained here on a few sentences,
wrapped in transformers' PreTrainedTokenizerFast (no hub access needed)."""

from __future__ import annotations

import functools
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Route this support ticket to the billing team with normal priority.",
    "### User:\nWhat is the capital of France?\n\n### Assistant:\nParis.",
    "Translate to French: good morning. Bonjour.",
    "Summarize the following text in one sentence, please.",
    "team=billing priority=high team=shipping priority=normal",
] * 20

# A chat template in the style of Zephyr/TinyLlama: BOS once, role markers, EOS after answers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.cache
def _tokenizer_json(add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:  # Llama-style: the tokenizer itself puts BOS before every text
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return str(tokenizer.to_str())


def make_tokenizer(*, chat_template: bool, add_bos: bool = True) -> Any:
    """A fresh PreTrainedTokenizerFast: <s> BOS, </s> EOS, <pad> padding."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE if chat_template else None
    return tokenizer
