"""`kubetune plan job.yaml [--gpu-memory 80Gi] [--gpu A100-80GB]`: the planner on a manifest.

Reads the manifest, the model folder's config.json and safetensors headers (or a .gguf file's
header: kubetune.gguf_header), and counts the training split's tokens with the model's
tokenizer when the dataset is a local file and the model a folder (for the time per epoch).
Exit 0: the requested method fits (or no device memory was given); 10: it does not fit (a
DoesNotFit: line; the recommendation says what would), or bad input (one error line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kubetune import api, gguf_header, manifests, plan


def _local(uri: str, base: Path) -> Path | None:
    if uri.startswith("s3://"):
        return None
    path = Path(uri.removeprefix("file://"))
    return path if path.is_absolute() else (base / path).resolve()


def count_tokens(dataset: Path, model: Path, train_fraction: float) -> int | None:
    """Tokens in every string of the dataset's rows (jsonl/json) times the training fraction;
    None when the tokenizer or the format is not available."""
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    except Exception:  # no tokenizers package, or a tokenizer file it cannot read
        return None
    if dataset.suffix == ".jsonl":
        rows = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    elif dataset.suffix == ".json":
        rows = json.loads(dataset.read_text())
    else:
        return None

    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    texts = [s for row in rows for s in strings(row)]
    total = sum(len(e.ids) for e in tokenizer.encode_batch(texts)) if texts else 0
    return int(total * train_fraction)


def gguf_note(header: gguf_header.GGUFHeader, size: int) -> str:
    return (
        f"a .gguf file ({plan.gib(size)}; {gguf_header.file_types(header)}): the trainer "
        "dequantizes it to float32 and trains that, so the estimate is for the dequantized "
        "model (its quality is that of the quantized weights)"
    )


def main(path: str, *, gpu_memory: str | None, gpu: str | None, as_json: bool) -> int:
    def fail(line: str) -> int:
        print(f"error: {line}", file=sys.stderr)
        return api.EXIT_USER_ERROR

    loaded = manifests.load_file(path)
    if loaded.problems:
        return fail(loaded.problems[0])
    if len(loaded.jobs) != 1:
        return fail(f"{path}: expected one FineTuneJob, found {len(loaded.jobs)}")
    job = loaded.jobs[0]
    spec = job.spec
    base = Path(path).resolve().parent
    folder = _local(spec.model.source, base)
    if folder is None:
        return fail(
            "spec.model.source: kubetune plan reads a local model folder (s3:// is "
            "not supported yet)"
        )
    if gpu is not None and gpu not in plan.GPUS:
        return fail(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(plan.GPUS)}")
    memory: int | None = None
    try:
        if gpu_memory is not None:
            memory = plan.parse_bytes(gpu_memory)
        elif gpu is not None:
            memory = int(plan.GPUS[gpu][0] * plan.GIB)
    except ValueError as exc:
        return fail(f"--gpu-memory: {exc}")
    notes: list[str] = []
    try:
        if api.is_gguf_source(spec.model.source):
            header = gguf_header.read_local(folder)
            config, tensors = gguf_header.as_model(header, folder.name)
            notes.append(gguf_note(header, folder.stat().st_size))
        else:
            config, tensors = plan.read_model(folder)
    except (OSError, ValueError, KeyError) as exc:
        return fail(f"spec.model.source: cannot read the model's headers: {exc}")
    split = spec.dataset.split
    train = (
        1.0
        - (0 if split.validationSource else split.validation)
        - (0 if split.testSource else split.test)
    )
    dataset = _local(spec.dataset.source, base)
    tokens = (
        count_tokens(dataset, folder, train)
        if dataset and dataset.exists() and folder.is_dir()
        else None
    )
    if api.is_gguf_source(spec.model.source):
        notes.append("training tokens not counted (no tokenizer.json next to a .gguf file)")
    on_gpu = spec.resources.gpus > 0
    result = plan.estimate(
        config, tensors, spec, device_memory=memory, gpu=gpu, tokens_per_epoch=tokens, on_gpu=on_gpu
    )
    result.notes += notes
    if not on_gpu:
        result.notes.append("resources.gpus is 0: CPU, float32, no flash attention")
    if as_json:
        print(json.dumps(result.to_api(), indent=2))
    else:
        print(
            f"{job.metadata.name}: {len(tensors)} tensors, "
            f"{config.get('model_type', '?')} model, {tokens or '?'} training tokens/epoch"
        )
        print(plan.format_plan(result))
    reason = plan.does_not_fit(result, spec)
    if reason:
        print(f"DoesNotFit: {reason}", file=sys.stderr)
        return api.EXIT_USER_ERROR
    return api.EXIT_OK
