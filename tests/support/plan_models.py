"""A larger Llama-style model than the demo one, random weights, saved with save_pretrained:
enough to check the planner where weights and optimizer state matter (~23M parameters)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def larger_model(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from tests.support.tiny_model import save_tiny_llama

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "demo-model")
    return save_tiny_llama(
        folder,
        tokenizer,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
