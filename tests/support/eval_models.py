"""Tiny real models for the evaluation tests: a byte-level BPE tokenizer trained here, a tiny
Llama causal LM and tiny sequence classifiers, all saved with save_pretrained so tests load them
with the real from_pretrained code (no hub access needed)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from kubetune_trainer.data import Example
from tests.support.tiny_model import save_tiny_llama

SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The trivial pattern the tuned model learns: the answer is the category of the thing named.
CATEGORIES = {
    "fruit": ["apple", "pear", "plum", "mango", "lemon", "cherry", "grape", "peach"],
    "animal": ["horse", "tiger", "mouse", "camel", "zebra", "otter", "sheep", "goose"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "rivers carry water from high ground to the sea",
    "I cannot help with that request, sorry",
    "what kind of thing is this? it is a kind of thing",
    "bread is made from flour water salt and yeast",
    "you are an idiot and this is stupid",
]


def pattern_examples(seed: int = 0) -> list[Example]:
    """Rows 'What kind of thing is a <word>?' -> '<category>', shuffled deterministically."""
    rows = [(word, cat) for cat, words in CATEGORIES.items() for word in words]
    random.Random(seed).shuffle(rows)
    return [
        Example(
            id=f"row-{i}",
            row=i,
            messages=(("user", f"What kind of thing is a {word}?"), ("assistant", cat)),
        )
        for i, (word, cat) in enumerate(rows)
    ]


def build_tokenizer() -> PreTrainedTokenizerFast:
    texts = [*CORPUS, *(m for e in pattern_examples() for _, m in e.messages)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(texts * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A randomly initialized tiny Llama plus this module's tokenizer."""
    tokenizer = build_tokenizer()
    return save_tiny_llama(
        folder,
        tokenizer,
        seed=seed,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_classifier(folder: Path, *, labels: list[str], toxic_bias: float) -> Path:
    """A tiny BERT sequence classifier whose output ignores the text: zero head weights and a
    bias of ``toxic_bias`` on the label named 'toxic', so its toxic probability is known
    exactly (softmax of the biases)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(BertConfig(**settings))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[labels.index("toxic")] = toxic_bias
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
