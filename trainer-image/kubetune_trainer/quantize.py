"""Quantized inference exports (``output.quantize``), each made from the merged model, loaded
back the way a user would load it, and scored on the test split with the same evaluation code
as base and tuned (:func:`kubetune_trainer.evaluate.evaluate_model`, and the latency loop of
:mod:`kubetune_trainer.safety`), against the unquantized merged model measured in the same run.

- ``int8``: a bitsandbytes LLM.int8 checkpoint (safetensors; ``from_pretrained(dir)`` with
  bitsandbytes installed);
- ``nf4``: a bitsandbytes 4-bit NF4 checkpoint. Linear layers whose shape bitsandbytes' kernel
  on this device refuses (found by running one such layer, not by a rule written here) stay in
  full precision, and the row says which; with none left to quantize the format is not
  produced;
- ``gguf-q8_0``, ``gguf-q4_0``, ``gguf-f16``: one .gguf file in llama.cpp's layout, tokenizer
  and chat template inside (Llama-architecture models with a byte-level BPE tokenizer). It is
  scored after transformers loads it (``from_pretrained(dir, gguf_file=...)``, tokenizer
  included), which dequantizes the weights to float32: quality is that of the quantized
  weights, latency that of float32 math, not of llama.cpp.

A format that cannot be produced for this model is a row with its reason (and a warning in the
log); the run goes on with the others. Each export is committed (storage manifest) only after
it loaded and was evaluated, under ``quantized/<format>/``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetune import api
from kubetune_trainer.data import Example, prompt_ids
from kubetune_trainer.evaluate import compare, evaluate_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .storage import Storage

Log = Callable[[str], None]
LATENCY_SAMPLES = 8  # timed generations per model (after one warm-up), test-split prompts
GGUF_TYPES = {"gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0", "gguf-f16": "F16"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


class CannotProduce(Exception):
    """This model cannot take this format; the message says why."""


@dataclass
class Measured:
    """One model's figures on the test split."""

    metrics: dict[str, float]
    latency: dict[str, float]
    size_bytes: int


@dataclass
class Outcome:
    """One output.quantize format: the export and its figures, or why there is none."""

    format: str
    uri: str | None = None
    measured: Measured | None = None
    reason: str | None = None  # not produced: why
    notes: list[str] = field(default_factory=list)  # produced, with a caveat


# --------------------------------------------------------------------------------------------
# pure: rows for the status and the report, the local table


def status_rows(
    reference: Measured | None, outcomes: Sequence[Outcome]
) -> list[api.QuantizedExport]:
    """One small row per format for the FineTuneJob status."""
    rows = []
    for o in outcomes:
        m = o.measured
        reason = o.reason or ("; ".join(o.notes) if o.notes else None)
        rows.append(
            api.QuantizedExport(
                format=o.format,
                uri=o.uri,
                sizeBytes=m.size_bytes if m else None,
                delta=compare(reference.metrics, m.metrics) if m and reference else {},
                latencyP50Ms=m.latency.get("latencyP50Ms") if m else None,
                latencyP95Ms=m.latency.get("latencyP95Ms") if m else None,
                tokensPerSecond=m.latency.get("generationTokensPerSecond") if m else None,
                reason=reason[:500] if reason else None,
            )
        )
    return rows


def report_section(reference: Measured | None, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """report.json's "quantization": the merged model's figures and every format's in full."""

    def figures(m: Measured) -> dict[str, Any]:
        return {"metrics": m.metrics, **m.latency, "sizeBytes": m.size_bytes}

    exports = []
    for o in outcomes:
        row: dict[str, Any] = {"format": o.format, "produced": o.uri is not None}
        if o.uri is not None:
            row |= {"uri": o.uri, "notes": o.notes}
        if o.measured is not None:
            row |= figures(o.measured)
            if reference is not None:
                row["delta"] = compare(reference.metrics, o.measured.metrics)
                row["sizeRatio"] = o.measured.size_bytes / reference.size_bytes
        if o.uri is None:
            row["reason"] = o.reason
        exports.append(row)
    return {"reference": figures(reference) if reference else None, "exports": exports}


def _cell(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def format_table(section: Mapping[str, Any]) -> str:
    """The local table from report.json's "quantization": the merged model, then one line per
    format (quality as exact match, else loss; delta against the merged model)."""
    reference = section.get("reference") or {}
    ref_metrics = reference.get("metrics") or {}
    metric = next((n for n in ("exactMatch", "loss") if n in ref_metrics), None)
    header = ["format", "size", metric or "quality", "delta", "p50 ms", "p95 ms", "tokens/s"]

    def figures(row: Mapping[str, Any]) -> list[str]:
        return [
            _size(row.get("sizeBytes")),
            _cell((row.get("metrics") or {}).get(metric) if metric else None),
            _cell((row.get("delta") or {}).get(metric) if metric else None, "+.4g")
            if "delta" in row
            else "",
            _cell(row.get("latencyP50Ms"), ".1f"),
            _cell(row.get("latencyP95Ms"), ".1f"),
            _cell(row.get("generationTokensPerSecond"), ".1f"),
        ]

    lines = [header]
    if reference:
        lines.append(["merged", *figures(reference)])
    notes = []
    for row in section.get("exports") or []:
        if row.get("produced"):
            lines.append([row["format"], *figures(row)])
            notes += [f"{row['format']}: {note}" for note in row.get("notes") or []]
        else:
            lines.append([row["format"], *["-"] * (len(header) - 1)])
            notes.append(f"{row['format']}: cannot be produced for this model: {row.get('reason')}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    return "\n".join(text + [f"  {note}" for note in notes])


# --------------------------------------------------------------------------------------------
# the stage


def quantize_exports(
    formats: Sequence[str],
    merged: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test: list[Example],
    spec: api.FineTuneJobSpec,
    storage: Storage,
    device: torch.device,
    scratch: Path | None,
    log: Log,
) -> tuple[Measured | None, list[Outcome]]:
    """Every requested format, made from ``merged`` (an unquantized model), committed and
    measured; the merged model's own figures come first (the reference)."""
    rows = test[: spec.evaluation.maxSamples] if spec.evaluation.maxSamples else test
    if not rows:
        log("  warning: the test split is empty: quantized exports are not evaluated")
    with tempfile.TemporaryDirectory(prefix="kubetune-quantize-", dir=scratch) as tmp:
        merged_dir = Path(tmp) / "merged"
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        reference = measure(merged, tokenizer, rows, spec, device, merged_dir)
        outcomes = []
        for name in formats:
            outcome = one_format(name, merged_dir, rows, spec, storage, device, Path(tmp), log)
            if outcome.reason:
                log(f"  warning: {name}: cannot be produced for this model: {outcome.reason}")
            else:
                log(f"  {name}: {outcome.uri}" + "".join(f" ({n})" for n in outcome.notes))
            outcomes.append(outcome)
    return reference, outcomes


def one_format(
    name: str,
    merged_dir: Path,
    rows: list[Example],
    spec: api.FineTuneJobSpec,
    storage: Storage,
    device: torch.device,
    tmp: Path,
    log: Log,
) -> Outcome:
    out = tmp / name
    out.mkdir()
    outcome = Outcome(format=name)
    try:
        if name in GGUF_TYPES:
            write_gguf(merged_dir, out / api.GGUF_FILE, GGUF_TYPES[name])
            model, tokenizer = load_gguf(out, api.GGUF_FILE, device)
        else:
            outcome.notes = write_bitsandbytes(name, merged_dir, out, device)
            model, tokenizer = load_bitsandbytes(out, device)
        outcome.measured = measure(model, tokenizer, rows, spec, device, out)
        del model
        outcome.uri = storage.commit_dir(out, f"quantized/{name}")
    except CannotProduce as exc:
        outcome.reason = str(exc)
    except Exception as exc:  # a library refusing this model is an outcome, not a crash
        outcome.reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    if outcome.reason:
        outcome.notes, outcome.measured = [], None
    return outcome


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Example],
    spec: api.FineTuneJobSpec,
    device: torch.device,
    folder: Path,
) -> Measured:
    """The evaluator's metrics, latency at batch size 1 on test-split prompts, weights' size
    (only the size without test rows)."""
    from .safety import timed_generations

    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not rows:
        return Measured({}, {}, size)
    with quiet():  # bitsandbytes warns on every int8 matmul
        metrics = evaluate_model(
            model,
            tokenizer,
            rows,
            spec.evaluation,
            max_seq_length=spec.dataset.maxSeqLength,
            device=device,
        )
        prompts = [
            prompt_ids(rows[i % len(rows)], tokenizer, spec.dataset.maxSeqLength)
            for i in range(LATENCY_SAMPLES + 1)
        ]
        model.eval()
        latency = timed_generations(
            model, tokenizer, prompts, max_new_tokens=spec.evaluation.maxNewTokens, device=device
        )
    return Measured(metrics, latency, size)


@contextmanager
def quiet() -> Iterator[None]:
    """Libraries' per-call warnings (bitsandbytes logs one per int8 matmul) kept out of the log."""
    library = logging.getLogger("bitsandbytes")
    level = library.level
    library.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        library.setLevel(level)


# --------------------------------------------------------------------------------------------
# bitsandbytes


def _bnb_config(name: str, skip: list[str]) -> Any:
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip or None,
    )


def refused_4bit_shapes(
    shapes: set[tuple[int, int]], device: torch.device
) -> dict[tuple[int, int], str]:
    """(out, in) shapes bitsandbytes' 4-bit kernel refuses on this device, with its error.

    Tried on one random layer per shape: kernels differ by device and version (the CPU one
    wants some widths a multiple of its block), so asking the library beats guessing its rules.
    """
    import bitsandbytes as bnb

    refused = {}
    for out_f, in_f in sorted(shapes):
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            torch.randn(out_f, in_f), requires_grad=False, quant_type="nf4"
        )
        probe: Any = layer.to(device).eval()
        try:
            with torch.no_grad():
                probe(torch.randn(1, 2, in_f, device=device))
        except (RuntimeError, ValueError, AssertionError) as exc:  # bitsandbytes asserts shapes
            refused[(out_f, in_f)] = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return refused


def _linear_layers(model: Any) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(out, in) of every linear layer bitsandbytes would quantize, and the output head's
    name (kept in full precision, as transformers does by default: it may share its weight
    with the input embedding)."""
    output = model.get_output_embeddings()
    layers, heads = {}, []
    for name, module in model.named_modules():
        if module is output:
            heads.append(name)
        elif isinstance(module, torch.nn.Linear):
            layers[name] = (module.out_features, module.in_features)
    return layers, heads


def write_bitsandbytes(name: str, merged_dir: Path, out: Path, device: torch.device) -> list[str]:
    """Quantize the merged model on load (transformers + bitsandbytes) and save it; returns
    caveats (layers kept in full precision)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise CannotProduce(f"bitsandbytes is not installed ({exc})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    skip: list[str] = []
    if name == "nf4":
        plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        layers, heads = _linear_layers(plain)
        del plain
        refused = refused_4bit_shapes(set(layers.values()), device)
        skip = sorted(n for n, shape in layers.items() if shape in refused)
        if layers and len(skip) == len(layers):
            shape, why = next(iter(refused.items()))
            raise CannotProduce(
                f"bitsandbytes' 4-bit kernel on {device.type} refuses every linear layer "
                f"(e.g. out x in = {shape[0]} x {shape[1]}: {why})"
            )
        if skip:
            shapes = sorted({f"{layers[n][0]}x{layers[n][1]}" for n in skip})
            notes.append(
                f"{len(skip)} of {len(layers)} linear layers kept in float32: bitsandbytes' "
                f"4-bit kernel on {device.type} refuses their shape (out x in {', '.join(shapes)})"
            )
            skip += heads  # an explicit list replaces transformers' default, which skips these
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(
            merged_dir,
            quantization_config=_bnb_config(name, skip),
            dtype=torch.float32,
            device_map={"": str(device)},
        )
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(out)
    return notes


def load_bitsandbytes(folder: Path, device: torch.device) -> tuple[Any, Any]:
    """As a user loads it: the quantization config travels in config.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": str(device)})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp's layout, written with the gguf package)

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def rotary_rows(weight: Any, heads: int) -> Any:
    # llama.cpp keeps q/k rows with each head's two rotary halves interleaved; transformers'
    # loader undoes exactly this on the way back.
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensor_name(name: str, config: dict[str, Any]) -> str | None:
    """A transformers Llama tensor's GGUF name; None: not stored (a tied lm_head)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return None if config.get("tie_word_embeddings") else "output.weight"
    parts = name.split(".")
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or module not in _GGUF_NAMES or parts[-1] != "weight":
        raise CannotProduce(f"tensor {name} has no place in llama.cpp's Llama layout")
    return f"blk.{parts[2]}.{_GGUF_NAMES[module]}.weight"


def _check_gguf_model(config: dict[str, Any], tokenizer: dict[str, Any]) -> None:
    if config.get("model_type") != "llama":
        raise CannotProduce(
            f"the GGUF export writes Llama-architecture models; this one is "
            f"{config.get('model_type')!r}"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CannotProduce("the GGUF export writes Llama models without bias tensors")
    tok_model = tokenizer.get("model", {})
    if tok_model.get("type") != "BPE" or "ByteLevel" not in json.dumps(
        tokenizer.get("pre_tokenizer")
    ):
        raise CannotProduce(
            "the GGUF export embeds byte-level BPE tokenizers (gpt2 style) only; this "
            f"tokenizer is {tok_model.get('type')!r}"
        )


def write_gguf(model_dir: Path, out: Path, tensor_type: str) -> Path:
    """The merged model (safetensors folder) as one GGUF file, 2-D weights as ``tensor_type``
    (Q8_0, Q4_0 or F16), norms as F32, tokenizer and chat template as metadata."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CannotProduce("the GGUF export needs a fast tokenizer (tokenizer.json)")
    tokenizer = json.loads(tokenizer_file.read_text())
    _check_gguf_model(config, tokenizer)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("kubetune merged model")  # never the folder's path: it is this machine's
    writer.add_file_type(
        {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}.get(
            tensor_type, gguf.LlamaFileType.MOSTLY_F16
        )
    )
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    tokens = [token for token, _ in vocab]
    for token_id, token in sorted(added.items()):
        if token_id >= len(tokens):
            tokens.append(token["content"])
    if len(tokens) != config["vocab_size"]:
        raise CannotProduce(
            f"the tokenizer has {len(tokens)} tokens, the model's vocab_size is "
            f"{config['vocab_size']} (GGUF needs one entry per embedding row)"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    # 3: control (special), 1: normal
    writer.add_token_types(
        [3 if i in added and added[i].get("special") else 1 for i in range(len(tokens))]
    )
    merges = tokenizer["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)  # the chat template writes BOS itself
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())

    weights: dict[str, Any] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    for name, tensor in weights.items():
        gguf_name = gguf_tensor_name(name, config)
        if gguf_name is None:
            continue
        data = np.ascontiguousarray(tensor, dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            data = rotary_rows(data, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = rotary_rows(data, kv_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if data.shape[-1] % block:
                raise CannotProduce(
                    f"{tensor_type} stores rows in blocks of {block} values; {name} has rows "
                    f"of {data.shape[-1]}"
                )
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                packed = gguf.quants.quantize(data, qtype)
                writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def load_gguf(folder: Path, file_name: str, device: torch.device) -> tuple[Any, Any]:
    """Model and tokenizer from the GGUF file alone, as transformers loads one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet():
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file_name, dtype=torch.float32
        )
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_stage(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: api.FineTuneJobSpec,
    model_dir: Path,
    test: list[Example],
    storage: Storage,
    device: torch.device,
    scratch: Path | None,
    log: Log,
) -> tuple[list[api.QuantizedExport], dict[str, Any]]:
    """The trainer's quantize stage: the merged model (made here when output.mergeAdapter is
    off), every format, and what goes into the status and report.json."""
    from .export import merged_model

    merged: Any
    if spec.method.type == "full":
        merged = model
    else:
        with tempfile.TemporaryDirectory(prefix="kubetune-adapter-", dir=scratch) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            merged = merged_model(model_dir, Path(tmp), spec)
    merged.to(device=device, dtype=torch.float32)  # the reference: unquantized float32
    reference, outcomes = quantize_exports(
        spec.output.quantize, merged, tokenizer, test, spec, storage, device, scratch, log
    )
    return status_rows(reference, outcomes), report_section(reference, outcomes)
