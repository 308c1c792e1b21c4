"""Write a small model folder (config.json, tokenizer.json, safetensors) as a GGUF file, the
way llama.cpp's converter lays out a Llama: F32 tensors under GGUF names, q/k rows permuted
for its rotary layout, a gpt2-style BPE tokenizer with its chat template. Used to test
GGUF model sources without a download (the demo model is Llama-architecture). Tensor names
and the q/k layout are the trainer's GGUF export's (kubetune_trainer.quantize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kubetune_trainer.quantize import gguf_tensor_name, rotary_rows


def write_llama_gguf(model_dir: Path, out: Path, *, architecture: str = "llama") -> Path:
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_name("kubetune demo model")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control, 1: normal
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
    weights = load_file(str(next(model_dir.glob("*.safetensors"))))
    for name, tensor in weights.items():
        gguf_name = gguf_tensor_name(name, config)
        if gguf_name is None:
            continue
        if name.endswith("self_attn.q_proj.weight"):
            tensor = rotary_rows(tensor, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = rotary_rows(tensor, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
