"""The base model and the training method: full, LoRA or QLoRA.

Weights load only from safetensors (never pickles) or from one GGUF file, dequantized into
a safetensors folder first (from_gguf), and model code runs only with
``spec.model.trustRemoteCode``. Precision: bf16 on a GPU that supports it, fp32 on CPU (CPU
bf16 matmuls are slow and fp16 training needs loss scaling we do not do).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kubetune import api

from .errors import UserError
from .packing import VARLEN, register_varlen

LORA_ALL_LINEAR = "all-linear"
# Heads are never adapted by all-linear (as in peft): they tie to embeddings in many models.
_HEADS = ("lm_head", "embed_out", "output")


def pick_device() -> torch.device:
    """cuda:<LOCAL_RANK> when a GPU is there (one process per GPU under torchrun), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp32 (fp16 without loss scaling is unsafe, so
    auto never picks it; an explicit fp16 is honored)."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and (device.type == "cpu" or not torch.cuda.is_bf16_supported()):
        return torch.float32
    return torch.bfloat16


def attention_for(device: torch.device) -> str:
    """flash_attention_2 (true varlen kernels) when installed on a GPU, else our per-sample
    attention (packing.varlen_attention): both keep packed samples apart without padding."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return register_varlen()


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def check_model_dir(model_dir: Path, spec: api.ModelSpec) -> None:
    """A clear UserError for a folder that cannot be a model we load."""
    where = f"spec.model.source: {spec.source}"
    if not model_dir.is_dir():
        raise UserError(f"{where}: not a folder (expected config.json, tokenizer, *.safetensors)")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{where}: no config.json in the model folder")
    if not weight_files(model_dir):
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        hint = f" (found {', '.join(pickles)}: convert them to safetensors)" if pickles else ""
        raise UserError(f"{where}: no *.safetensors weights in the model folder{hint}")
    marker = model_dir / "kubetune-revision"
    if spec.revision and marker.is_file():
        found = marker.read_text().strip()
        if found != spec.revision:
            raise UserError(
                f"spec.model.revision: {spec.revision!r} but the model folder is revision "
                f"{found!r} (its kubetune-revision file)"
            )


def gguf_architecture(path: Path, where: str) -> str:
    """The file's general.architecture; UserError when the file is not a complete GGUF (the
    reader maps every tensor, so a truncated file fails here, before any loading)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = str(field.contents())
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except KeyError:
        raise UserError(f"{where}: no general.architecture in the GGUF") from None
    except (ValueError, OSError, IndexError, struct.error) as exc:
        raise UserError(
            f"{where}: not a complete GGUF file (truncated or corrupt: {exc})"
        ) from None
    if end > path.stat().st_size:
        raise UserError(f"{where}: truncated GGUF file ({end} bytes expected)")
    return architecture


def from_gguf(path: Path, dest: Path, spec: api.ModelSpec) -> Path:
    """A .gguf file as a plain safetensors model folder in dest, which the rest of the trainer
    loads like any other.

    transformers dequantizes every tensor to fp32: the quality is that of the quantized weights
    (e.g. Q4_1), not of the original model. A gguf-loaded model refuses save_pretrained, so its
    state dict goes into a plain model of the same class built from its config (without the
    gguf quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = f"spec.model.source: {spec.source}"
    architecture = gguf_architecture(path, where)
    try:
        with gguf_bar_follows_library_bars():
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise UserError(
                f"{where}: GGUF architecture {architecture!r} is not one transformers can load"
            ) from None
        raise UserError(f"{where}: cannot load the GGUF file ({architecture}): {exc}") from None
    except (OSError, KeyError, RuntimeError) as exc:
        raise UserError(f"{where}: cannot load the GGUF file ({architecture}): {exc}") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(loaded).__name__]
    plain = type(loaded)(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())  # strict: every tensor, tied head included
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


@contextmanager
def gguf_bar_follows_library_bars() -> Iterator[None]:
    """transformers draws its GGUF dequantization bar with plain tqdm, which ignores its own
    progress-bar switch: hide it where the other library bars are hidden (pod logs,
    --no-progress)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=not hf_logging.is_progress_bar_enabled())
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def weights_hash(model_dir: Path) -> str:
    """sha256 over (name, sha256) of every weight file: one id for the exact weights."""
    outer = hashlib.sha256()
    for path in weight_files(model_dir):
        inner = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
                inner.update(chunk)
        outer.update(f"{path.name} {inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def load_tokenizer(model_dir: Path, spec: api.ModelSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.trustRemoteCode)
    except (OSError, ValueError) as exc:
        raise UserError(f"spec.model.source: cannot load the tokenizer: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(spec: api.FineTuneJobSpec, device: torch.device) -> Any:
    from transformers import BitsAndBytesConfig

    q = spec.method.quantization or api.QuantizationSpec()
    compute = {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
    }.get(q.computeDtype, train_dtype(spec.training.precision, device))
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.doubleQuant,
        bnb_4bit_compute_dtype=compute,
    )


def load_base(model_dir: Path, spec: api.FineTuneJobSpec, device: torch.device) -> Any:
    """from_pretrained: safetensors only, remote code only when the spec allows it."""
    from transformers import AutoModelForCausalLM

    dtype = train_dtype(spec.training.precision, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": spec.model.trustRemoteCode,
        "attn_implementation": "sdpa",
    }
    if spec.method.type == "qlora":
        kwargs["quantization_config"] = _quantization_config(spec, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"spec.model.source: cannot load the model: {exc}") from exc
    if spec.method.type != "qlora":
        model.to(device)
    model.config.use_cache = False  # packed rows must never see a KV cache (see packing.py)
    return model


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can adapt (q_proj, up_proj, ...), heads excluded."""
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in _HEADS:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            names.add(leaf)
    return sorted(names)


def resolve_targets(model: Any, lora: api.LoraSpec) -> list[str] | str:
    """The spec's target modules checked against the model; all-linear expanded by peft."""
    if LORA_ALL_LINEAR in lora.targetModules:
        return LORA_ALL_LINEAR
    available = linear_module_names(model)
    known = set(available)
    all_names = {n for n, _ in model.named_modules()}
    unknown = [
        t
        for t in lora.targetModules
        if t not in known and not any(n.endswith(t) for n in all_names)
    ]
    if unknown:
        raise UserError(
            f"spec.method.lora.targetModules: {', '.join(unknown)} not found in the model; its "
            f"linear modules are: {', '.join(available)} (or use [all-linear])"
        )
    return list(lora.targetModules)


def apply_method(model: Any, spec: api.FineTuneJobSpec) -> Any:
    """Full: every weight trains. LoRA/QLoRA: a PeftModel with only the adapters trainable."""
    gradient_checkpointing = spec.training.gradientCheckpointing
    if spec.method.type == "full":
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = spec.method.lora or api.LoraSpec()
    targets = resolve_targets(model, lora)
    if spec.method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: checkpoints need a grad path
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def set_attention(model: Any, name: str) -> None:
    """Switch attention kernels (training: varlen/flash; eval/export: sdpa)."""
    if name == VARLEN:
        register_varlen()
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.set_attn_implementation(name)


def shard(model: Any, device: torch.device) -> int:
    """FSDP2 for a full fine-tune under torchrun: every decoder layer (the classes transformers
    lists in ``_no_split_modules``), then the root (embeddings, final norm, head: tied weights
    stay in one unit), is sharded across all ranks in place. Each rank keeps 1/WORLD_SIZE of
    the weights, gradients and optimizer state; a layer's weights are gathered only while it
    runs. Returns the number of layer units."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    for layer in reversed(layers):  # innermost first, should the listed classes nest
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)


def is_sharded(model: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unshard(
    model: Any, model_dir: Path, spec: api.FineTuneJobSpec, device: torch.device, main: bool
) -> Any:
    """The sharded model as a plain one on rank 0, for evaluation and export (which run on
    rank 0 alone and must not issue collectives). Every rank must call this: the full weights
    are gathered onto rank 0's CPU, then loaded into a fresh copy of the base on the training
    device. Other ranks get the sharded model back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not main:
        return model
    plain = load_base(model_dir, spec, device)
    plain.load_state_dict(full)  # strict: every tensor, tied head included
    plain.eval()
    return plain


def trainable_parameters(model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: every trainable tensor by name (shared ones once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
