"""The one builder of tiny random Llama models for tests: saved with save_pretrained, so tests
load them with the real from_pretrained code (no hub access needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def save_tiny_llama(
    folder: Path, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **config: Any
) -> Path:
    """A randomly initialized Llama (2 layers, 4 heads / 2 KV heads, tied embeddings, hidden 32
    unless ``config`` says otherwise) and ``tokenizer``, saved like a hub model folder."""
    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        **config,
    }
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
