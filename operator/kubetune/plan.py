"""Before launch: what full, LoRA and QLoRA (4- and 8-bit) would cost for one FineTuneJob.

Pure arithmetic on the model's config.json and its safetensors headers (tensor names, shapes
and dtypes: no weight is read) plus the spec. Per device and per optimizer step it estimates

- parameters: total, and trainable for each method (LoRA: r x (in + out) per adapted linear);
- memory: weights (LoRA adapters in float32, as peft keeps them; QLoRA's quantized linears at
  4 or 8 bits plus their scales, the rest in float32 as prepare_model_for_kbit_training casts
  it), gradients and AdamW's two moments for the trainable parameters, and activations for one
  micro-batch of ``batchSize`` packed rows of ``maxSeqLength`` tokens (every token a target:
  an upper bound), with or without gradient checkpointing;
- time per epoch: 6 N FLOPs per token for a full fine-tune, 4 N with a frozen base (no weight
  gradients), plus 2 N with gradient checkpointing (the forward runs twice), at a FLOP rate
  (a GPU table below, times a utilization).

The numbers are checked against measured peak memory in tests/integration/test_plan_memory.py.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune import api

Method = Literal["full", "lora", "qlora-4bit", "qlora-8bit"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora-4bit", "qlora-8bit")

GIB = 1024**3

# GPU memory per device and dense bf16 FLOP rate (vendor datasheets). The operator finds a
# job's device in its nodeSelector (``device_memory``): a memory label wins over this table.
GPUS: dict[str, tuple[float, float]] = {  # name: (memory GiB, bf16 TFLOP/s)
    "H200": (141, 989),
    "H100-80GB": (80, 989),
    "A100-80GB": (80, 312),
    "A100-40GB": (40, 312),
    "L40S": (48, 362),
    "A10G": (24, 125),
    "L4": (24, 121),
    "T4": (16, 65),
}
CPU_TFLOPS = 0.2  # a few cores, fp32: a rough figure for local runs
UTILIZATION = 0.4  # model FLOP utilization a fine-tune typically reaches
HEADROOM = 0.9  # the CUDA context and allocator fragmentation: plan to fill 90% of a device

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}


# --------------------------------------------------------------------------------------------
# reading the model without its weights


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def safetensors_header(path: Path) -> list[Tensor]:
    """The tensors of one .safetensors file, from its JSON header (the first bytes only)."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > MAX_HEADER:
            raise ValueError(f"{path.name}: implausible safetensors header of {size} bytes")
        header = json.loads(handle.read(size))
    return header_tensors(header)


MAX_HEADER = 100 * 1024 * 1024


def header_tensors(header: Mapping[str, Any]) -> list[Tensor]:
    """The tensors a parsed safetensors header lists."""
    return [
        Tensor(name, tuple(info["shape"]), info["dtype"])
        for name, info in header.items()
        if name != "__metadata__"
    ]


def read_model(folder: Path) -> tuple[dict[str, Any], list[Tensor]]:
    """config.json and every tensor header of a model folder."""
    config = json.loads((folder / "config.json").read_text())
    tensors: list[Tensor] = []
    for path in sorted(folder.glob("*.safetensors")):
        tensors += safetensors_header(path)
    if not tensors:
        raise ValueError(f"{folder}: no .safetensors files")
    return config, tensors


# --------------------------------------------------------------------------------------------
# the estimate


@dataclass
class Memory:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_api(self) -> dict[str, int]:
        return {
            "weightsBytes": self.weights,
            "gradientsBytes": self.gradients,
            "optimizerBytes": self.optimizer,
            "activationsBytes": self.activations,
            "totalBytes": self.total,
        }


@dataclass
class MethodPlan:
    method: Method
    parameters: int
    trainable: int
    memory: Memory  # per device
    flops_per_token: float
    fits: bool | None = None  # None: no device memory known
    gpus_needed: int | None = None  # full fine-tunes shard over GPUs (FSDP)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "parameters": self.parameters,
            "trainableParameters": self.trainable,
            "memory": self.memory.to_api(),
            "flopsPerToken": self.flops_per_token,
        }
        if self.fits is not None:
            out["fits"] = self.fits
        if self.gpus_needed is not None:
            out["gpusNeeded"] = self.gpus_needed
        return out


@dataclass
class Plan:
    methods: list[MethodPlan]
    requested: Method
    device_memory: int | None
    tokens_per_epoch: int | None
    flop_rate: float  # FLOP/s assumed, utilization included
    recommendation: str
    recommended: Method
    recommended_gpus: int
    notes: list[str] = field(default_factory=list)

    def get(self, method: Method) -> MethodPlan:
        return next(m for m in self.methods if m.method == method)

    def seconds_per_epoch(self, method: Method) -> float | None:
        if self.tokens_per_epoch is None:
            return None
        return self.tokens_per_epoch * self.get(method).flops_per_token / self.flop_rate

    def to_api(self) -> dict[str, Any]:
        methods = []
        for m in self.methods:
            row = m.to_api()
            seconds = self.seconds_per_epoch(m.method)
            if seconds is not None:
                row["secondsPerEpoch"] = round(seconds, 1)
            methods.append(row)
        out: dict[str, Any] = {
            "requested": self.requested,
            "methods": methods,
            "recommended": self.recommended,
            "recommendedGpus": self.recommended_gpus,
            "recommendation": self.recommendation,
            "flopRate": self.flop_rate,
        }
        if self.device_memory is not None:
            out["deviceMemoryBytes"] = self.device_memory
        if self.tokens_per_epoch is not None:
            out["tokensPerEpoch"] = self.tokens_per_epoch
        if self.notes:
            out["notes"] = self.notes
        return out


def requested_method(spec: api.FineTuneJobSpec) -> Method:
    if spec.method.type == "qlora":
        bits = spec.method.quantization.bits if spec.method.quantization else 4
        return "qlora-8bit" if bits == 8 else "qlora-4bit"
    return spec.method.type


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _is_linear(t: Tensor) -> bool:
    return len(t.shape) == 2 and t.name.endswith(".weight") and "embed" not in t.name


def adapted(tensors: list[Tensor], targets: list[str]) -> list[Tensor]:
    """The linear weights LoRA adapts: suffix match on the module name, or all-linear (every
    linear except the output head)."""
    linears = [t for t in tensors if _is_linear(t)]
    if "all-linear" in targets:
        return [t for t in linears if not _module(t.name).endswith("lm_head")]
    return [
        t
        for t in linears
        if any(_module(t.name) == s or _module(t.name).endswith("." + s) for s in targets)
    ]


def activation_bytes(
    config: Mapping[str, Any],
    tokens: int,
    row_length: int,
    dtype_bytes: int,
    *,
    checkpointing: bool,
    flash: bool,
    adapter_width: int = 0,
) -> int:
    """Activations alive at the step's peak for one micro-batch of ``tokens`` tokens.

    Per token and decoder layer (a Llama-style block, calibrated against measured peaks in
    tests/integration/test_plan_memory.py): 3h + q + 2 kv + 2.5 i values (norms, projections,
    rotary copies, the MLP), each adapted linear's LoRA path (r + out features:
    ``adapter_width``), and without a flash kernel the attention probabilities (heads x the
    row length). The output head holds logits, a float32 log-softmax and a gradient.

    Without checkpointing every layer's activations and the head's are alive together at the
    loss. With it only each layer's input is kept; the head's tensors are gone before the
    backward pass recomputes one layer at a time, so the peak is the larger of the two.
    """
    h = int(config["hidden_size"])
    i = int(config.get("intermediate_size", 4 * h))
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads", 1))
    kv = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or h // heads)
    vocab = int(config["vocab_size"])
    values = 3 * h + heads * head_dim + 2 * kv * head_dim + 2.5 * i + adapter_width
    if not flash:
        values += heads * row_length
    per_layer = int(values * dtype_bytes)
    head = tokens * vocab * (dtype_bytes + 8)
    inputs = tokens * h * dtype_bytes
    if checkpointing:
        return int(inputs * (layers + 1) + max(head, tokens * per_layer))
    return int(tokens * per_layer * layers + head + inputs)


def method_plan(
    method: Method,
    config: Mapping[str, Any],
    tensors: list[Tensor],
    spec: api.FineTuneJobSpec,
    *,
    dtype_bytes: int,
    flash: bool,
) -> MethodPlan:
    total = sum(t.numel for t in tensors)
    lora = spec.method.lora or api.LoraSpec()
    targets = adapted(tensors, list(lora.targetModules))
    adapter = sum(lora.r * (t.shape[0] + t.shape[1]) for t in targets)
    training = spec.training
    tokens = training.batchSize * spec.dataset.maxSeqLength
    layers = max(1, int(config["num_hidden_layers"]))
    width = 0 if method == "full" else sum(lora.r + t.shape[0] for t in targets) // layers
    activations = activation_bytes(
        config,
        tokens,
        spec.dataset.maxSeqLength,
        dtype_bytes,
        checkpointing=training.gradientCheckpointing,
        flash=flash,
        adapter_width=width,
    )
    if method == "full":
        trainable = total
        weights = total * dtype_bytes
        grads, optimizer = trainable * dtype_bytes, 2 * trainable * dtype_bytes
        flops = 6.0 * total
    else:
        trainable = adapter
        if method == "lora":
            weights = total * dtype_bytes + adapter * 4
        else:
            quantized = [
                t for t in tensors if _is_linear(t) and not t.name.endswith("lm_head.weight")
            ]
            q = sum(t.numel for t in quantized)
            if method == "qlora-4bit":
                double = spec.method.quantization is None or spec.method.quantization.doubleQuant
                packed = q // 2 + (q // 64) * (1 if double else 4)  # 4 bit + a scale per 64
            else:
                packed = q + sum(t.shape[0] for t in quantized) * 4  # int8 + a scale per row
            weights = packed + (total - q) * 4 + adapter * 4
        grads, optimizer = adapter * 4, 2 * adapter * 4
        flops = 4.0 * total
    if training.gradientCheckpointing:
        flops += 2.0 * total
    return MethodPlan(
        method=method,
        parameters=total + (adapter if method != "full" else 0),
        trainable=trainable,
        memory=Memory(weights, grads, optimizer, activations),
        flops_per_token=flops,
    )


def _fits(plan: MethodPlan, memory: int) -> bool:
    return plan.memory.total <= HEADROOM * memory


def _sharded_gpus(plan: MethodPlan, memory: int, limit: int = 64) -> int | None:
    """GPUs a full fine-tune needs when FSDP shards weights, gradients and optimizer state."""
    state = plan.memory.weights + plan.memory.gradients + plan.memory.optimizer
    for n in range(1, limit + 1):
        if state / n + plan.memory.activations <= HEADROOM * memory:
            return n
    return None


def estimate(
    config: Mapping[str, Any],
    tensors: list[Tensor],
    spec: api.FineTuneJobSpec,
    *,
    device_memory: int | None,
    gpu: str | None = None,
    tokens_per_epoch: int | None = None,
    on_gpu: bool = True,
) -> Plan:
    """Every method's estimate, whether each fits ``device_memory``, and a recommendation."""
    precision = spec.training.precision
    dtype_bytes = 4 if precision == "fp32" or (precision == "auto" and not on_gpu) else 2
    plans = [
        method_plan(m, config, tensors, spec, dtype_bytes=dtype_bytes, flash=on_gpu)
        for m in METHODS
    ]
    rate = (
        (GPUS[gpu][1] * 1e12 if gpu in GPUS else GPUS["A100-80GB"][1] * 1e12)
        if on_gpu
        else (CPU_TFLOPS * 1e12)
    )
    rate *= UTILIZATION
    requested = requested_method(spec)
    notes = []
    if on_gpu and gpu not in GPUS:
        notes.append("time assumes an A100 (bf16 312 TFLOP/s) at 40% utilization")

    def verdict(reason: str, method: Method, gpus: int) -> Plan:
        return Plan(
            plans, requested, device_memory, tokens_per_epoch, rate, reason, method, gpus, notes
        )

    if device_memory is None:
        return verdict(
            f"{requested}: no device memory known, nothing to compare",
            requested,
            max(1, spec.resources.gpus),
        )
    for p in plans:
        p.fits = _fits(p, device_memory)
    full = plans[0]
    full.gpus_needed = _sharded_gpus(full, device_memory)
    chosen = next(p for p in plans if p.method == requested)
    gpus = max(1, spec.resources.gpus) * spec.resources.numNodes
    if requested == "full" and full.gpus_needed is not None and full.gpus_needed <= gpus:
        return verdict(
            f"full fits on {gpus} GPU(s)",
            "full",
            gpus,
        )
    if chosen.fits and requested != "full":
        return verdict(
            f"{requested} fits on one GPU",
            requested,
            gpus,
        )
    # What would fit instead: the requested method on more GPUs (full), else the next lighter.
    if requested == "full" and full.gpus_needed is not None:
        return verdict(
            f"full needs {full.gpus_needed} GPUs (FSDP); or lora fits"
            if plans[1].fits
            else f"full needs {full.gpus_needed} GPUs (FSDP)",
            "full",
            full.gpus_needed,
        )
    for p in plans[1:]:
        if p.fits:
            return verdict(
                f"{requested} does not fit one GPU; {p.method} does",
                p.method,
                1,
            )
    return verdict(
        "no method fits: lower batchSize or maxSeqLength, or enable gradientCheckpointing",
        requested,
        gpus,
    )


# --------------------------------------------------------------------------------------------
# the operator's side: the device a job asks for, and the plan as status.plan

MEMORY_LABEL = "kubetune.io/gpu-memory"  # a quantity, e.g. 80Gi
GFD_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, as NVIDIA GPU feature discovery labels nodes
GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"  # e.g. NVIDIA-A100-SXM4-80GB


def gpu_model(product: str) -> str | None:
    """The GPUS entry a GPU feature discovery product name denotes (every '-' part of the
    entry's name is a part of the product: NVIDIA-A100-SXM4-80GB is A100-80GB)."""
    parts = set(product.upper().split("-"))
    for name in sorted(GPUS, key=len, reverse=True):
        if set(name.upper().split("-")) <= parts:
            return name
    return None


def device_memory(spec: api.FineTuneJobSpec) -> tuple[int | None, str | None]:
    """Memory per device for the job and where it comes from: for a GPU job its nodeSelector
    (``kubetune.io/gpu-memory``, ``nvidia.com/gpu.memory`` in MiB, or ``nvidia.com/gpu.product``
    looked up in GPUS); for a CPU job ``resources.memory``. (None, None): nothing says."""
    selector = spec.resources.nodeSelector
    if spec.resources.gpus == 0:
        if spec.resources.memory:
            return parse_bytes(spec.resources.memory), "resources.memory"
        return None, None
    if MEMORY_LABEL in selector:
        return parse_bytes(selector[MEMORY_LABEL]), f"nodeSelector {MEMORY_LABEL}"
    if selector.get(GFD_MEMORY_LABEL, "").isdigit():
        return int(selector[GFD_MEMORY_LABEL]) * 2**20, f"nodeSelector {GFD_MEMORY_LABEL} (MiB)"
    model = gpu_model(selector.get(GFD_PRODUCT_LABEL, ""))
    if model is not None:
        return int(GPUS[model][0] * GIB), f"nodeSelector {GFD_PRODUCT_LABEL}: {model}"
    return None, None


def job_plan(
    config: Mapping[str, Any], tensors: list[Tensor], spec: api.FineTuneJobSpec
) -> tuple[api.JobPlan, str | None]:
    """status.plan for one job, and why it does not fit its devices (None: it fits, or no
    device memory is known). The same estimate as `kubetune plan`."""
    memory, source = device_memory(spec)
    on_gpu = spec.resources.gpus > 0
    model = gpu_model(spec.resources.nodeSelector.get(GFD_PRODUCT_LABEL, ""))
    plan = estimate(config, tensors, spec, device_memory=memory, gpu=model, on_gpu=on_gpu)
    status = api.JobPlan(
        requested=plan.requested,
        parameters=sum(t.numel for t in tensors),
        methods=[
            api.PlannedMethod(
                method=m.method,
                trainableParameters=m.trainable,
                memoryBytes=m.memory.total,
                fits=m.fits,
            )
            for m in plan.methods
        ],
        deviceMemoryBytes=memory,
        deviceMemoryFrom=source,
        recommended=plan.recommended,
        recommendedGpus=plan.recommended_gpus,
        recommendation=plan.recommendation[:512],
    )
    return status, does_not_fit(plan, spec)


def does_not_fit(plan: Plan, spec: api.FineTuneJobSpec) -> str | None:
    """Why the job as written exceeds its devices (the DoesNotFit message); None if it fits."""
    if plan.device_memory is None:
        return None
    chosen = plan.get(plan.requested)
    gpus = max(1, spec.resources.gpus) * spec.resources.numNodes
    if plan.requested == "full" and chosen.gpus_needed is not None and chosen.gpus_needed <= gpus:
        return None
    if plan.requested != "full" and chosen.fits:
        return None
    device = "GPU" if spec.resources.gpus > 0 else "device"
    return (
        f"{plan.requested} needs about {gib(chosen.memory.total)} per {device}, more than "
        f"{HEADROOM:.0%} of {gib(plan.device_memory)}: {plan.recommendation}"
    )


# --------------------------------------------------------------------------------------------
# quantities and text


_QUANTITY = re.compile(r"^([0-9.]+)\s*([KMGTP]i?)?B?$")
_UNITS = {
    None: 1,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_bytes(text: str) -> int:
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"not a memory quantity: {text!r} (e.g. 80Gi, 24G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= 0.1 * GIB else f"{value / 2**20:.1f} MiB"


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def format_plan(plan: Plan) -> str:
    header = [
        "method",
        "params",
        "trainable",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "total",
        "fits",
        "s/epoch",
    ]
    lines = [header]
    for m in plan.methods:
        seconds = plan.seconds_per_epoch(m.method)
        mem = m.memory
        fits = "" if m.fits is None else ("yes" if m.fits else "no")
        if m.method == "full" and m.gpus_needed and m.gpus_needed > 1:
            fits += f" ({m.gpus_needed} GPUs)"
        lines.append(
            [
                m.method + (" *" if m.method == plan.requested else ""),
                _count(m.parameters),
                _count(m.trainable),
                gib(mem.weights),
                gib(mem.gradients),
                gib(mem.optimizer),
                gib(mem.activations),
                gib(mem.total),
                fits,
                "" if seconds is None else f"{seconds:.0f}",
            ]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )
    memory = f" on {gib(plan.device_memory)} per GPU" if plan.device_memory else ""
    text += f"\n\n* requested. recommendation{memory}: {plan.recommendation}"
    return text + "".join(f"\nnote: {n}" for n in plan.notes)
