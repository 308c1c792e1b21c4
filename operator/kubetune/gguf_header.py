"""A GGUF file's header (metadata and tensor list) as the planner's config.json and tensors,
without its weights and without the gguf package (the operator does not ship it).

GGUF (llama.cpp's format, version 2 and 3, little-endian): the magic ``GGUF``, a version, the
tensor and metadata counts, the metadata (key, type, value), then per tensor its name, its
dimensions (innermost first), its ggml type and its offset in the data section, which starts
at the next multiple of ``general.alignment`` (32 by default) after the header.

The planner plans what the trainer trains: the file dequantized to float32 (kubetune_trainer
loads it with transformers, which dequantizes every tensor). So the tensors come back under
the transformers (Llama) module names, in their (out, in) shape, as F32; the file's own types
only decide where its data ends, which is how a truncated file is found.

``parse`` works on the file's first bytes: it raises ``NeedMore`` when they end inside the
header, so a reader can fetch more (a file read or an S3 range) and try again.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import plan

MAX_HEADER = 256 * 1024 * 1024  # a vocabulary of a few 100k tokens is a few MiB
FIRST_READ = 4 * 1024 * 1024

# ggml type id: (elements per block, bytes per block), as llama.cpp lays them out.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}

# metadata value type id: struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# llama.cpp tensor names -> transformers module names (the Llama family: llama, mistral,
# qwen2, qwen3, ... share these block names)
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_0-9]+)\.(weight|bias)$")


class NeedMore(Exception):
    """The bytes given end inside the header."""


@dataclass
class GGUFTensor:
    name: str  # as in the file
    dims: tuple[int, ...]  # innermost first, as in the file
    type_id: int
    offset: int  # in the data section

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]

    def nbytes(self) -> int | None:
        if self.type_id not in GGML_TYPES:
            return None
        _, block, size = GGML_TYPES[self.type_id]
        return self.numel // block * size


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # arrays as their length, except short ones
    tensors: list[GGUFTensor]
    data_start: int
    array_lengths: dict[str, int] = field(default_factory=dict)

    def data_end(self) -> int:
        """Where the last tensor's data ends: the file's size when it is complete."""
        ends = [t.offset + (t.nbytes() or 0) for t in self.tensors]
        return self.data_start + max(ends, default=0)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise NeedMore(self.at + n)
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, lengths: dict[str, int]) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"{key}: unknown GGUF metadata type {kind}")
        inner, count = self.unpack("<I"), self.unpack("<Q")
        lengths[key] = count
        if inner in _SCALARS:
            size = struct.calcsize(_SCALARS[inner])
            chunk = self.take(size * count)  # skipped in one step: token types, scores
            if count > 64:
                return count
            return list(struct.unpack(f"<{count}{_SCALARS[inner][1]}", chunk))
        if inner == STRING and count > 64:  # tokens, merges: walk past them undecoded
            for _ in range(count):
                self.take(self.unpack("<Q"))
            return count
        items = [self.value(inner, key, {}) for _ in range(count)]
        return count if count > 64 else items


def parse(data: bytes) -> GGUFHeader:
    """The header in the file's first bytes; NeedMore if they end inside it, ValueError if
    they are not a GGUF file."""
    cursor = _Cursor(data)
    if bytes(cursor.take(4)) != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reads 2 and 3)")
    n_tensors, n_keys = cursor.unpack("<Q"), cursor.unpack("<Q")
    if n_tensors > 1_000_000 or n_keys > 1_000_000:
        raise ValueError(f"implausible GGUF header ({n_tensors} tensors, {n_keys} keys)")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"), key, lengths)
    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"{name}: {n_dims} dimensions")
        dims = tuple(cursor.unpack("<Q") for _ in range(n_dims))
        tensors.append(GGUFTensor(name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", 32)) or 32
    start = (cursor.at + alignment - 1) // alignment * alignment
    return GGUFHeader(version, metadata, tensors, start, lengths)


def read(fetch: Callable[[int], bytes], size: int, where: str) -> GGUFHeader:
    """The header of a file of ``size`` bytes; ``fetch(n)`` returns its first n bytes (fewer
    at its end). ValueError names what is wrong: not a GGUF, truncated, an implausible header."""
    want = min(FIRST_READ, size)
    while True:
        data = fetch(want)
        try:
            header = parse(data)
            break
        except NeedMore as more:
            if len(data) >= size:
                raise ValueError(
                    f"{where}: truncated GGUF file (it ends inside its header)"
                ) from None
            if want >= MAX_HEADER:
                raise ValueError(f"{where}: GGUF header over {MAX_HEADER} bytes") from None
            want = min(size, MAX_HEADER, max(2 * want, int(more.args[0])))
    end = header.data_end()
    if end > size:
        raise ValueError(
            f"{where}: truncated GGUF file ({size} bytes, its tensors end at byte {end})"
        )
    return header


def hf_name(name: str) -> str:
    """The transformers (Llama) name of a llama.cpp tensor name; unknown names unchanged."""
    match = _NAME.match(name)
    if not match:
        return name
    block, module, kind = match.groups()
    if block is None and module in _TOP:
        return f"{_TOP[module]}.{kind}"
    if block is not None and module in _BLOCK:
        return f"model.layers.{block}.{_BLOCK[module]}.{kind}"
    return name


def as_model(header: GGUFHeader, where: str) -> tuple[dict[str, Any], list[plan.Tensor]]:
    """The planner's config.json (the keys it reads) and tensors of the dequantized model."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{where}: no general.architecture in the GGUF")

    def number(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)

    tensors = [plan.Tensor(hf_name(t.name), tuple(reversed(t.dims)), "F32") for t in header.tensors]
    embed = next((t for t in tensors if t.name == "model.embed_tokens.weight"), None)
    vocab = (
        number("vocab_size")
        or header.array_lengths.get("tokenizer.ggml.tokens")
        or (embed.shape[0] if embed else None)
    )
    config: dict[str, Any] = {
        "model_type": arch,
        "num_hidden_layers": number("block_count"),
        "hidden_size": number("embedding_length"),
        "intermediate_size": number("feed_forward_length"),
        "num_attention_heads": number("attention.head_count"),
        "num_key_value_heads": number("attention.head_count_kv"),
        "head_dim": number("attention.key_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": not any(t.name == "lm_head.weight" for t in tensors),
    }
    missing = [k for k in ("num_hidden_layers", "hidden_size", "vocab_size") if not config[k]]
    if missing:
        raise ValueError(f"{where}: the GGUF metadata has no {arch}.* value for {missing[0]}")
    if not tensors:
        raise ValueError(f"{where}: the GGUF file lists no tensors")
    return {k: v for k, v in config.items() if v is not None}, tensors


def file_types(header: GGUFHeader) -> str:
    """The file's tensor types by element share, e.g. 'Q4_1 76%, Q8_0 21%, F32 3%'."""
    counts: dict[str, int] = {}
    for t in header.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + t.numel
    total = sum(counts.values()) or 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(
        f"{name} {count / total:.0%}" if count >= total / 100 else f"{name} <1%"
        for name, count in ranked
    )


def read_local(path: Path) -> GGUFHeader:
    """The header of a local .gguf file (its first bytes only)."""
    size = path.stat().st_size
    with path.open("rb") as handle:

        def fetch(n: int) -> bytes:
            handle.seek(0)
            return handle.read(n)

        return read(fetch, size, path.name)
