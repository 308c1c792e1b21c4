"""Deployment artifacts, each committed as its own folder with a manifest (written last):

- ``adapter/``: the LoRA adapter alone (``PeftModel.from_pretrained(base, <adapter>)``,
  ``vllm serve <base> --enable-lora --lora-modules name=<adapter>``): its config names the base
  model by the spec's source URI and revision (not the training machine's local copy) and its
  target modules by name, and it passes vLLM's adapter rules (servable.py) before it is
  committed;
- ``tokenizer/``: the tokenizer (with its chat template);
- ``merged/``: base + adapter merged (``output.mergeAdapter``), loadable with
  ``AutoModelForCausalLM.from_pretrained`` and ``vllm serve``: safetensors, generation_config,
  tokenizer and chat template;
- ``model/``: the fully fine-tuned model (method ``full``), tokenizer included;
- ``base/``: with a GGUF ``spec.model.source``, the dequantized base as safetensors (tokenizer
  and ``kubetune-source.json`` naming the .gguf included): the weights the adapter was trained
  on, and the base its config names. A server cannot load a LoRA on the .gguf itself (vLLM
  applies adapters to safetensors weights; ``AutoPeftModelForCausalLM`` cannot open a .gguf
  path), and the .gguf's quantized weights are not what the adapter was trained against.

Each folder is written locally first and committed only when complete, so a failure leaves no
half-written artifact (an earlier, complete one may stay until overwritten).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kubetune import api

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .storage import Storage


def _commit(
    storage: Storage, rel: str, write: Callable[[Path], object], scratch: Path | None
) -> str:
    # Staged in the run's scratch folder, which the next run removes if this one is killed.
    with tempfile.TemporaryDirectory(prefix=f"kubetune-{rel}-", dir=scratch) as tmp:
        folder = Path(tmp)
        write(folder)
        uri: str = storage.commit_dir(folder, rel)
    return uri


def serving_config(
    config: dict[str, Any],
    model: api.ModelSpec,
    linear: set[str] | None = None,
    base: str | None = None,
) -> dict[str, Any]:
    """adapter_config.json as a server or ``AutoPeftModel`` reads it: the base model by the URI
    the spec names (peft writes the local folder the trainer loaded it from) and its revision,
    or ``base`` (the exported base/ of a GGUF source, which has no revision of its own);
    target modules as a sorted list of names. peft writes all-linear out as full module paths:
    those become layer names (q_proj, ...) where the names select exactly the same layers of
    ``linear`` (the base model's linear layers)."""
    out = dict(config)
    out["base_model_name_or_path"] = base or model.source
    out["revision"] = None if base else model.revision
    targets = out.get("target_modules")
    if isinstance(targets, list | set | tuple):
        names = sorted(targets)
        if linear is not None and any("." in t for t in names):
            leaves = sorted({t.rsplit(".", 1)[-1] for t in names})
            if {m for m in linear if m.rsplit(".", 1)[-1] in leaves} == set(names):
                names = leaves
        out["target_modules"] = names
    return out


def linear_modules(model: Any) -> set[str]:
    """Full names of the base model's linear layers as a saved adapter names them, heads
    excluded (a peft-wrapped layer counts under its own name, not its base_layer's)."""
    from .model import _HEADS

    names = set()
    for name, module in model.named_modules():
        if ".lora_" in name or name.rsplit(".", 1)[-1] in _HEADS:
            continue
        name = name.removesuffix(".base_layer")
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            names.add(name.removeprefix("base_model.model."))
    return names


def save_adapter(
    model: PeftModel, folder: Path, spec: api.FineTuneJobSpec, base: str | None = None
) -> None:
    """The adapter as vLLM and peft load it; refused (UserError) when vLLM would refuse it.
    ``base``: the exported base's URI, when the adapter's base is not spec.model.source."""
    from .servable import check_adapter

    model.save_pretrained(str(folder), safe_serialization=True)
    linear = linear_modules(model)
    path = folder / "adapter_config.json"
    config = serving_config(json.loads(path.read_text()), spec.model, linear, base)
    path.write_text(json.dumps(config, indent=2) + "\n")
    check_adapter(folder, linear)


def merged_model(model_dir: Path, adapter_dir: Path, spec: api.FineTuneJobSpec) -> PreTrainedModel:
    """Base weights reloaded unquantized (QLoRA's 4-bit base cannot be merged into) plus the
    adapter, merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype: Any = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(spec.output.mergedDtype, "auto")
    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=spec.model.trustRemoteCode,
    )
    merged: PreTrainedModel = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged


def export_base(model_dir: Path, source: api.ModelSpec, storage: Storage) -> str:
    """Commit the dequantized base (``model.from_gguf``'s safetensors folder, tokenizer
    included) as base/, with a note of the .gguf it came from; its URI."""
    note = {
        "source": source.source,
        "revision": source.revision,
        "note": "dequantized from the GGUF file to float32 safetensors before training: the "
        "weights the adapter was trained on",
    }
    (model_dir / "kubetune-source.json").write_text(json.dumps(note, indent=2) + "\n")
    uri: str = storage.commit_dir(model_dir, "base")
    return uri


def export(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: api.FineTuneJobSpec,
    storage: Storage,
    model_dir: Path,
    scratch: Path | None = None,
) -> api.Artifacts:
    """Write and commit the artifacts; returns their URIs."""
    artifacts = api.Artifacts(checkpoints=storage.uri_for("checkpoints"))
    if spec.method.type == "full":

        def write_model(folder: Path) -> None:
            model.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(folder)

        artifacts.model = _commit(storage, "model", write_model, scratch)
    else:
        if api.is_gguf_source(spec.model.source):
            artifacts.base = export_base(model_dir, spec.model, storage)
        with tempfile.TemporaryDirectory(prefix="kubetune-adapter-", dir=scratch) as tmp:
            adapter_dir = Path(tmp)
            save_adapter(cast("PeftModel", model), adapter_dir, spec, artifacts.base)
            artifacts.adapter = storage.commit_dir(adapter_dir, "adapter")
            if spec.output.mergeAdapter:

                def write_merged(folder: Path) -> None:
                    merged = merged_model(model_dir, adapter_dir, spec)
                    merged.save_pretrained(folder, safe_serialization=True)
                    tokenizer.save_pretrained(folder)

                artifacts.merged = _commit(storage, "merged", write_merged, scratch)
    artifacts.tokenizer = _commit(storage, "tokenizer", tokenizer.save_pretrained, scratch)
    return artifacts
