"""Deployment artifacts, each committed as its own folder with a manifest (written last):

- ``adapter/``: the LoRA adapter alone (``PeftModel.from_pretrained(base, <adapter>)``);
- ``tokenizer/``: the tokenizer (with its chat template);
- ``merged/``: base + adapter merged (``output.mergeAdapter``), loadable with
  ``AutoModelForCausalLM.from_pretrained``, tokenizer included;
- ``model/``: the fully fine-tuned model (method ``full``), tokenizer included.

Each folder is written locally first and committed only when complete, so a failure leaves no
half-written artifact (an earlier, complete one may stay until overwritten).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        with tempfile.TemporaryDirectory(prefix="kubetune-adapter-", dir=scratch) as tmp:
            adapter_dir = Path(tmp)
            model.save_pretrained(str(adapter_dir), safe_serialization=True)
            artifacts.adapter = storage.commit_dir(adapter_dir, "adapter")
            if spec.output.mergeAdapter:

                def write_merged(folder: Path) -> None:
                    merged = merged_model(model_dir, adapter_dir, spec)
                    merged.save_pretrained(folder, safe_serialization=True)
                    tokenizer.save_pretrained(folder)

                artifacts.merged = _commit(storage, "merged", write_merged, scratch)
    artifacts.tokenizer = _commit(storage, "tokenizer", tokenizer.save_pretrained, scratch)
    return artifacts
