"""The FineTuneJob API: the single source of truth.

Every field has a description, a constraint and a camelCase alias. The CRD (`kubetune crd`), the
manifest reference (docs/api.md) and the trainer's config all come from these models.

Cross-field rules raise ``ValueError("<relative.path>: <message>")``; :func:`format_errors`
turns that prefix into the full camelCase field path a user can find in their manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]

# Names of children are "<name>" plus short suffixes; Job names must stay label-safe (63).
MAX_NAME_LENGTH = 52
# The API server refuses an object whose annotations (keys + values) exceed 256 KiB.
MAX_ANNOTATIONS_BYTES = 256 * 1024
# status.lastHandledConfiguration: no tighter than a whole object may be (etcd's 1.5 MiB).
MAX_HANDLED_CONFIGURATION = 3 * 512 * 1024

# A storage location: s3://bucket[/prefix], file:///abs/path, or a plain path (local mode).
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+|[^:]+)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
MODULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

# A FineTuneJob's phases, in the order a run goes through them (status, metrics, CRD).
Phase = Literal["Pending", "Suspended", "Running", "Succeeded", "Failed"]
PHASES: tuple[Phase, ...] = get_args(Phase)

# Metrics the evaluator reports for both base and tuned models (and their delta).
EvalMetric = Literal["loss", "perplexity", "tokenAccuracy", "exactMatch", "rougeL"]
EVAL_METRICS: tuple[EvalMetric, ...] = (
    "loss",
    "perplexity",
    "tokenAccuracy",
    "exactMatch",
    "rougeL",
)
SAFETY_METRICS = (
    "toxicityRate",
    "meanToxicity",
    "refusalRate",
    "oodPerplexity",
    "latencyP50Ms",
    "latencyP95Ms",
    "generationTokensPerSecond",
)
# Inference exports made from the merged model (output.quantize): bitsandbytes 8-bit (LLM.int8)
# and 4-bit NF4 checkpoints, and GGUF files (llama.cpp's format) with Q8_0, Q4_0 or F16 weights.
QuantizeFormat = Literal["int8", "nf4", "gguf-q8_0", "gguf-q4_0", "gguf-f16"]
QUANTIZE_FORMATS: tuple[QuantizeFormat, ...] = get_args(QuantizeFormat)
GGUF_FILE = "model.gguf"  # the one file of a gguf-* export, in its folder quantized/<format>/


def is_gguf_format(name: str) -> bool:
    return name.startswith("gguf-")


# Why vLLM 0.32, the staging engine of the operator's default images and of
# scripts/install-vllm.sh, cannot serve an output.quantize export (what it answers, seen in
# tests/integration/test_vllm_serving.py): upstream removed its bitsandbytes and GGUF loaders.
VLLM_CANNOT_SERVE = {
    "bitsandbytes": "vLLM 0.32 has no bitsandbytes loader (it answers 'Unknown quantization "
    "method: bitsandbytes')",
    "gguf": "vLLM 0.32 has no GGUF loader (it reads the .gguf file as a config.json and fails)",
}


def quantized_loader(name: str) -> str:
    """The loader an engine needs for an output.quantize format: gguf or bitsandbytes."""
    return "gguf" if is_gguf_format(name) else "bitsandbytes"


# Only meaningful as a comparison: tuned / base.
RATIO_METRICS = ("oodPerplexityRatio",)
GATE_METRIC_PATTERN = (
    r"^((base|tuned|delta)\.("
    + "|".join(EVAL_METRICS + SAFETY_METRICS)
    + r")|delta\.("
    + "|".join(RATIO_METRICS)
    + r"))$"
)

Uri = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=URI_PATTERN)]
Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=253)]
Label = Annotated[str, StringConstraints(max_length=63)]
ModuleName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=MODULE_NAME_PATTERN)
]


class ApiModel(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, no unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _cel(*rules: tuple[str, str]) -> ConfigDict:
    """Attach CEL rules (x-kubernetes-validations) to a model's CRD schema."""
    validations: list[JsonValue] = [{"rule": rule, "message": message} for rule, message in rules]
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


# --------------------------------------------------------------------------------------------
# spec.model


class ModelSpec(ApiModel):
    source: Uri = Field(
        description="Where the base model lives: a folder with config.json, tokenizer files and "
        "safetensors weights, or one .gguf file (llama.cpp format, dequantized to fp32 before "
        "training: quality is that of the quantized weights; exported as safetensors). "
        "s3://bucket/prefix, file:///path, or a local path.",
    )
    revision: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None,
        description="The model version you mean (commit, tag or your own label). Recorded in "
        "the reproducibility record; when the model folder has a kubetune-revision file, the "
        "run fails if it differs.",
    )
    trustRemoteCode: bool = Field(
        default=False,
        description="Allow Python code shipped with the model to run. Off by default: enable "
        "only for models you trust.",
    )
    license: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None,
        description="The base model's license (SPDX id or name), recorded in the report.",
    )


# --------------------------------------------------------------------------------------------
# spec.dataset


class LicenseSpec(ApiModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="The dataset's license: an SPDX identifier such as CC-BY-4.0 or Apache-2.0, "
        "or the name of your own agreement.",
    )
    usage: Literal["commercial", "research", "internal", "evaluation"] = Field(
        description="What the tuned model will be used for. A non-commercial license with "
        "commercial usage is refused; the operator's allow-list can refuse others.",
    )
    attestedBy: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None,
        description="Who checked the license terms (a person or team); recorded in the report.",
    )
    url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        default=None, description="Where the license text can be read."
    )


class SplitSpec(ApiModel):
    model_config = _cel(
        (
            "!has(self.validation) || !has(self.test) || self.validation + self.test < 0.9",
            "split: validation + test must leave at least 10% of the rows for training",
        ),
    )

    validation: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        description="Fraction of rows held out for evaluation during training (ignored when "
        "validationSource is set).",
    )
    test: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        description="Fraction of rows held out for the final base-vs-tuned comparison (ignored "
        "when testSource is set).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Salt of the split hash. Rows are assigned by hashing their stable key, so "
        "adding rows never moves existing ones between splits.",
    )
    validationSource: Uri | None = Field(
        default=None, description="An explicit validation file instead of a fraction."
    )
    testSource: Uri | None = Field(
        default=None, description="An explicit test file instead of a fraction."
    )

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitSpec:
        held = (0.0 if self.validationSource else self.validation) + (
            0.0 if self.testSource else self.test
        )
        if held >= 0.9:
            raise ValueError(
                f"validation: validation + test = {held:g} leaves less than 10% of the rows "
                "for training; lower the fractions"
            )
        return self


class DatasetSpec(ApiModel):
    source: Uri = Field(
        description="The training data: a .jsonl, .json, .csv or .parquet file (s3:// or a path)."
    )
    format: Literal["auto", "alpaca", "chat", "prompt-completion"] = Field(
        default="auto",
        description="Row schema. alpaca: instruction/input/output; chat: messages[] with "
        "role/content; prompt-completion: prompt/completion; auto: detected from the first row.",
    )
    fieldMap: dict[Annotated[str, StringConstraints(max_length=64)], ShortText] = Field(
        default_factory=dict,
        max_length=16,
        description="Rename your columns to the format's names, e.g. {instruction: question, "
        "output: answer}: keys are the format's field names, values are your column names.",
    )
    license: LicenseSpec = Field(
        description="The dataset's license and intended use. Required: a job without a "
        "declared license does not run.",
    )
    split: SplitSpec = Field(
        default_factory=SplitSpec, description="How rows are split into train/validation/test."
    )
    maxSeqLength: int = Field(
        default=1024,
        ge=16,
        le=131072,
        description="Longest tokenized sample; longer samples are truncated and counted in "
        "the report.",
    )
    maxInvalidFraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of rows that may fail validation before the job fails. 0: any "
        "malformed row fails the job, with its row number and reason.",
    )
    trainOnPrompt: bool = Field(
        default=False,
        description="Also compute the loss on prompt tokens. Off: loss on completion tokens only.",
    )

    @field_validator("fieldMap")
    @classmethod
    def _known_targets(cls, value: dict[str, str]) -> dict[str, str]:
        known = {
            "instruction",
            "input",
            "output",
            "messages",
            "prompt",
            "completion",
            "id",
            "role",
            "content",
        }
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown target field(s) {unknown}; keys must be one of {sorted(known)}"
            )
        return value


# --------------------------------------------------------------------------------------------
# spec.method

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


# The largest LoRA rank vLLM serves (vLLM 0.32's --max-lora-rank choices end at 512). Every
# adapter is exported in the form vLLM loads and checked against its rules (trainer
# servable.py), so a larger rank would train and then fail at export: refused here.
MAX_LORA_RANK = 512


class LoraSpec(ApiModel):
    r: int = Field(
        default=16,
        gt=0,
        json_schema_extra={"maximum": MAX_LORA_RANK},
        description=f"LoRA rank, at most {MAX_LORA_RANK} (the largest rank vLLM serves; above "
        "that, method full trains every weight).",
    )
    alpha: int = Field(default=32, gt=0, le=4096, description="LoRA scaling (alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on LoRA inputs.")
    targetModules: list[ModuleName] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Module names to adapt (suffix match), or [all-linear] for every linear "
        "layer except the output head. Unknown names fail with the model's module names.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which biases are trained."
    )

    @field_validator("r")
    @classmethod
    def _servable_rank(cls, value: int) -> int:
        if value > MAX_LORA_RANK:
            raise ValueError(
                f"rank {value} is above {MAX_LORA_RANK}, the largest LoRA rank vLLM serves "
                "(every adapter is exported for vLLM and checked against its rules): use r <= "
                f"{MAX_LORA_RANK}, or method.type full"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_dora(cls, data: Any) -> Any:
        # DoRA is not offered: vLLM refuses DoRA adapters (HTTP 500 on load), so neither
        # staging nor a user's server could serve what it trains.
        named = [k for k in ("useDora", "use_dora", "dora") if isinstance(data, dict) and k in data]
        if named:
            raise ValueError(
                f"{named[0]}: DoRA is not supported: vLLM does not serve DoRA adapters (it "
                "answers HTTP 500 when one is loaded); train plain LoRA, or method full"
            )
        return data


class QuantizationSpec(ApiModel):
    bits: Literal[4, 8] = Field(
        default=4, description="Weight bits for the frozen base (bitsandbytes)."
    )
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    doubleQuant: bool = Field(
        default=True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    computeDtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Dtype of the matmuls; auto: bfloat16 on GPU, float32 on CPU."
    )


class MethodSpec(ApiModel):
    model_config = _cel(
        (
            "!has(self.quantization) || (has(self.type) && self.type == 'qlora')",
            "method.quantization is only used with type qlora",
        ),
        (
            "!has(self.type) || self.type != 'full' || !has(self.lora)",
            "method.lora is not used with type full",
        ),
    )

    type: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="lora: train small adapters (fast, small output); qlora: LoRA on a 4/8-bit "
        "frozen base (least memory); full: update every weight (most memory, most capacity).",
    )
    lora: LoraSpec | None = Field(
        default=None, description="LoRA settings (lora and qlora); defaults apply when omitted."
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="Quantization of the frozen base (qlora only; default 4-bit nf4)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        if self.type != "qlora" and self.quantization is not None:
            raise ValueError(f"quantization: only applies to type qlora, not {self.type}")
        if self.type == "full" and self.lora is not None:
            raise ValueError("lora: does not apply to type full (no adapter is trained)")
        if self.type in ("lora", "qlora") and self.lora is None:
            self.lora = LoraSpec()
        if self.type == "qlora" and self.quantization is None:
            self.quantization = QuantizationSpec()
        return self


# --------------------------------------------------------------------------------------------
# spec.training


class EarlyStoppingSpec(ApiModel):
    patience: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Stop after this many evaluations without improvement.",
    )
    metric: Literal["evalLoss"] = Field(
        default="evalLoss", description="Metric to watch (lower is better)."
    )
    minDelta: float = Field(
        default=0.0, ge=0.0, description="Smallest decrease that counts as an improvement."
    )


class TrainingSpec(ApiModel):
    model_config = _cel(
        ("has(self.epochs) || has(self.maxSteps)", "training: set epochs or maxSteps"),
    )

    epochs: float | None = Field(
        default=None, gt=0, le=1000, description="Passes over the training split."
    )
    maxSteps: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="Optimizer steps to run; wins over epochs when both are set.",
    )
    learningRate: float = Field(
        default=2e-4, gt=0, le=1.0, description="Peak learning rate (AdamW)."
    )
    batchSize: int = Field(
        default=8, ge=1, le=4096, description="Samples per device per micro-batch."
    )
    gradientAccumulationSteps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    weightDecay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    warmupRatio: float = Field(
        default=0.03, ge=0.0, lt=1.0, description="Fraction of steps with a linear warmup."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    maxGradNorm: float = Field(default=1.0, gt=0, le=1000, description="Gradient clipping norm.")
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Seed for every random generator."
    )
    packing: bool = Field(
        default=True,
        description="Pack samples into rows with position_ids and no cross-sample attention: no "
        "padding waste, same results as unpacked.",
    )
    gradientCheckpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="Training precision; auto: bf16 on GPU, fp32 on CPU."
    )
    evalEverySteps: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Evaluate on the validation split every N steps.",
    )
    checkpointEverySteps: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Commit a resumable checkpoint every N steps (and on SIGTERM).",
    )
    keepCheckpoints: int = Field(
        default=2, ge=1, le=100, description="Committed checkpoints to keep (newest first)."
    )
    earlyStopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when the validation metric stops improving."
    )

    @model_validator(mode="after")
    def _has_length(self) -> TrainingSpec:
        if self.epochs is None and self.maxSteps is None:
            raise ValueError("epochs: set training.epochs or training.maxSteps")
        return self


# --------------------------------------------------------------------------------------------
# spec.evaluation


class ToxicitySpec(ApiModel):
    enabled: bool = Field(default=True, description="Score generations for toxicity.")
    classifierSource: Uri | None = Field(
        default=None,
        description="A Hugging Face sequence-classification model (folder or s3 prefix). "
        "Without it a documented word-list scorer is used and the report says so.",
    )
    promptsSource: Uri | None = Field(
        default=None,
        description="Prompts to generate from (.jsonl with 'prompt' or .txt); a "
        "small bundled set by default.",
    )
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Score above which a generation counts as toxic."
    )


class JailbreakSpec(ApiModel):
    enabled: bool = Field(default=True, description="Measure the refusal rate on red-team prompts.")
    promptsSource: Uri | None = Field(
        default=None,
        description="Red-team prompts (.jsonl with 'prompt' or .txt); bundled by default.",
    )


class OodSpec(ApiModel):
    enabled: bool = Field(
        default=True, description="Perplexity on out-of-domain text (forgetting)."
    )
    source: Uri | None = Field(
        default=None,
        description="Out-of-domain text (.txt or .jsonl with 'text'); bundled by default.",
    )


class LatencySpec(ApiModel):
    enabled: bool = Field(default=True, description="Measure generation latency at batch size 1.")
    samples: int = Field(default=8, ge=1, le=1000, description="Generations to time.")


class SafetySpec(ApiModel):
    toxicity: ToxicitySpec = Field(default_factory=ToxicitySpec, description="Toxicity eval.")
    jailbreak: JailbreakSpec = Field(default_factory=JailbreakSpec, description="Jailbreak eval.")
    ood: OodSpec = Field(default_factory=OodSpec, description="Out-of-distribution eval.")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="Latency eval.")


class GateSpec(ApiModel):
    metric: Annotated[str, StringConstraints(max_length=64)] = Field(
        json_schema_extra={"pattern": GATE_METRIC_PATTERN},
        description="base.<m>, tuned.<m> or delta.<m> with <m> one of "
        + ", ".join(EVAL_METRICS + SAFETY_METRICS)
        + "; or delta.oodPerplexityRatio (tuned / base).",
    )
    op: Literal[">=", ">", "<=", "<", "=="] = Field(description="Comparison.")
    value: float = Field(description="Threshold.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if not re.match(GATE_METRIC_PATTERN, value):
            names = ", ".join(EVAL_METRICS + SAFETY_METRICS)
            raise ValueError(
                f"unknown metric {value!r}: use base.<m>, tuned.<m> or delta.<m> with <m> one of "
                f"{names}; or delta.oodPerplexityRatio"
            )
        return value


class EvaluationSpec(ApiModel):
    compareToBase: bool = Field(
        default=True, description="Also evaluate the base model on the test split, same code."
    )
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(EVAL_METRICS),
        max_length=5,
        description="Held-out metrics to compute on the test split.",
    )
    maxNewTokens: int = Field(
        default=64, ge=1, le=4096, description="Greedy generation length for exactMatch/rougeL."
    )
    maxSamples: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Cap on test rows evaluated (all by default)."
    )
    batchSize: int = Field(default=8, ge=1, le=1024, description="Evaluation batch size.")
    safety: SafetySpec | None = Field(
        default=None, description="Safety and robustness evals (off when omitted)."
    )
    gates: list[GateSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Promotion gates checked at the end; status condition GatesPassed.",
    )

    @model_validator(mode="after")
    def _gates_measurable(self) -> EvaluationSpec:
        # A gate on a metric this spec never measures would fail every run: refuse it up front.
        for gate in self.gates:
            reason = _unmeasured_reason(self, gate.metric)
            if reason:
                raise ValueError(f"gates: {gate.metric} is never measured: {reason}")
        return self


def _unmeasured_reason(spec: EvaluationSpec, metric: str) -> str | None:
    group, _, name = metric.partition(".")
    if group in ("base", "delta") and not spec.compareToBase:
        return "compareToBase is false, so there is no base model"
    if name in EVAL_METRICS and name not in spec.metrics:
        return f"add {name} to evaluation.metrics"
    if name in SAFETY_METRICS or name in RATIO_METRICS:
        if spec.safety is None:
            return "add evaluation.safety ({} enables every safety eval)"
        evals = {
            "toxicityRate": "toxicity",
            "meanToxicity": "toxicity",
            "refusalRate": "jailbreak",
            "oodPerplexity": "ood",
            "oodPerplexityRatio": "ood",
            "latencyP50Ms": "latency",
            "latencyP95Ms": "latency",
            "generationTokensPerSecond": "latency",
        }
        part = evals[name]
        if not getattr(spec.safety, part).enabled:
            return f"evaluation.safety.{part}.enabled is false"
    return None


# --------------------------------------------------------------------------------------------
# spec.output, spec.storage


class OutputSpec(ApiModel):
    destination: Uri = Field(
        description="Where checkpoints and artifacts go (s3://bucket/prefix or a path). A rerun "
        "with the same destination resumes from the newest committed checkpoint.",
    )
    mergeAdapter: bool = Field(
        default=False, description="Also save the base model with the adapter merged in."
    )
    mergedDtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Dtype of merged weights; auto: the base model's dtype."
    )
    quantize: list[QuantizeFormat] = Field(
        default_factory=list,
        max_length=len(QUANTIZE_FORMATS),
        description="Quantized inference exports made from the merged model, each evaluated "
        "on the test split against it: int8 and nf4 (bitsandbytes checkpoints), gguf-q8_0, "
        "gguf-q4_0, gguf-f16 (GGUF files; Llama-architecture models). A format this model "
        "cannot take is reported with its reason; the run still succeeds.",
    )
    registry: RegistrySpec | None = Field(
        default=None, description="A model registry the run is logged to and promoted in."
    )

    @field_validator("quantize")
    @classmethod
    def _quantize_unique(cls, value: list[QuantizeFormat]) -> list[QuantizeFormat]:
        repeated = sorted({f for f in value if value.count(f) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return value


# MLflow registered model names: letters, digits, '.', '_', '-' (dots allow catalog.schema.model).
MLFLOW_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}$"
# The registry is reached over MLflow's REST API: http(s) only, and no user:password@ in the URI
# (credentials come from credentialsSecret, so they never sit in the spec).
TRACKING_URI_PATTERN = r"^https?://[^/@\s]+(/\S*)?$"


class MlflowSpec(ApiModel):
    trackingUri: Annotated[str, StringConstraints(max_length=2048)] = Field(
        json_schema_extra={"pattern": TRACKING_URI_PATTERN},
        description="MLflow tracking server URL (http:// or https://), e.g. "
        "http://mlflow.mlflow.svc:5000. Credentials never go in the URL: use credentialsSecret.",
    )
    model: Annotated[str, StringConstraints(max_length=256)] = Field(
        json_schema_extra={"pattern": MLFLOW_MODEL_PATTERN},
        description="Registered model name; each successful run adds a model version.",
    )
    experiment: Annotated[str, StringConstraints(min_length=1, max_length=500)] = Field(
        default="kubetune", description="Experiment the run is logged to (created if missing)."
    )
    credentialsSecret: (
        Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None
    ) = Field(
        default=None,
        description="Name of a Secret in the job's namespace with MLFLOW_TRACKING_TOKEN (a "
        "bearer token) or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth). "
        "Omit for a server without authentication. Values never appear in the spec or status.",
    )
    timeoutSeconds: int = Field(
        default=30, ge=1, le=600, description="Timeout of each request to the tracking server."
    )

    @field_validator("trackingUri")
    @classmethod
    def _http_uri(cls, value: str) -> str:
        if not re.match(TRACKING_URI_PATTERN, value):
            if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
                raise ValueError("credentials do not go in the URL: use credentialsSecret")
            raise ValueError(
                f"{value!r} is not an http:// or https:// URL (the registry is reached over "
                "MLflow's REST API)"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not re.match(MLFLOW_MODEL_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a registered model name: letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return value


class RegistrySpec(ApiModel):
    mlflow: MlflowSpec | None = Field(
        default=None,
        description="MLflow: log params, metrics and artifacts to a run, register a model "
        "version with alias staging, move alias production when the gates pass.",
    )


class S3Spec(ApiModel):
    endpoint: (
        Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://.+$")] | None
    ) = Field(default=None, description="S3 endpoint URL (MinIO, Ceph, ...); AWS when omitted.")
    region: Annotated[str, StringConstraints(max_length=64, pattern=r"^[a-z0-9-]+$")] | None = (
        Field(default=None, description="Region name.")
    )
    credentialsSecret: (
        Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None
    ) = Field(
        default=None,
        description="Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optional AWS_SESSION_TOKEN). Omit to use the pod's "
        "identity (IRSA, workload identity). Values never appear in the spec or status.",
    )
    addressingStyle: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket addressing style."
    )


class StorageSpec(ApiModel):
    s3: S3Spec = Field(default_factory=S3Spec, description="S3 client settings.")


# --------------------------------------------------------------------------------------------
# spec.resources, spec.scheduling, spec.runPolicy


class Toleration(ApiModel):
    key: Annotated[str, StringConstraints(max_length=316)] | None = Field(
        default=None, description="Taint key."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal."
    )
    value: Label | None = Field(default=None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect."
    )
    tolerationSeconds: int | None = Field(default=None, ge=0, description="For NoExecute.")


class ResourcesSpec(ApiModel):
    model_config = _cel(
        (
            "!has(self.numNodes) || self.numNodes == 1 || !has(self.gpus) || self.gpus > 0",
            "resources: numNodes > 1 needs gpus > 0",
        ),
    )

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per node (one process each).")
    gpuResourceName: Annotated[str, StringConstraints(max_length=253)] = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPU."
    )
    numNodes: int = Field(
        default=1,
        ge=1,
        le=128,
        description="Nodes for data-parallel training (an Indexed Job with a headless Service).",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per node, e.g. '8'.")
    memory: Quantity | None = Field(default=None, description="Memory request per node, e.g. 64Gi.")
    sharedMemory: Quantity = Field(
        default="8Gi",
        description="Size of /dev/shm (an in-memory emptyDir) for data loaders and NCCL.",
    )
    nodeSelector: dict[Annotated[str, StringConstraints(max_length=316)], Label] = Field(
        default_factory=dict, description="Node labels the pod must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for GPU node taints."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A Kubernetes Affinity object, passed through to the pod."
    )
    image: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, description="Trainer image; the operator's default when omitted."
    )
    serviceAccountName: (
        Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None
    ) = Field(
        default=None,
        description="Service account for cloud identity (e.g. IRSA). Its API token is never "
        "mounted.",
    )

    @model_validator(mode="after")
    def _multinode_gpus(self) -> ResourcesSpec:
        if self.numNodes > 1 and self.gpus == 0:
            raise ValueError("gpus: numNodes > 1 needs gpus > 0")
        return self


class SchedulingSpec(ApiModel):
    queueName: (
        Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL_PATTERN)] | None
    ) = Field(default=None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    priorityClassName: (
        Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None
    ) = Field(default=None, description="PriorityClass of the trainer pods.")


class RunPolicySpec(ApiModel):
    backoffLimit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Pod failures to retry (each resumes from the last checkpoint). Preemption "
        "and node disruption do not count; user errors fail at once.",
    )
    activeDeadlineSeconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of the whole job."
    )
    ttlSecondsAfterFinished: int | None = Field(
        default=None, ge=0, description="Delete the finished Job (not the FineTuneJob) after this."
    )


# --------------------------------------------------------------------------------------------
# spec.staging

# What staging can serve besides a quantized export's name (spec.output.quantize).
STAGING_ARTIFACTS = ("adapter", "merged")
ARTIFACT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,62}$"


class LoadProfileSpec(ApiModel):
    model_config = _cel(
        (
            "!has(self.type) || self.type == 'concurrency' || has(self.rate)",
            "load: constant and poisson need rate (requests per second)",
        ),
        (
            "!has(self.type) || self.type != 'concurrency' || has(self.concurrency)",
            "load: concurrency needs concurrency (a list of levels)",
        ),
    )

    type: Literal["constant", "poisson", "concurrency"] = Field(
        default="poisson",
        description="constant: requests at a fixed rate; poisson: requests at random times "
        "with the given mean rate (what independent users do); concurrency: a sweep, each "
        "level keeps that many requests in flight for durationSeconds.",
    )
    rate: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="Requests per second (constant and poisson).",
    )
    concurrency: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Requests in flight, one benchmark per level (type concurrency).",
    )
    durationSeconds: int = Field(
        default=60, ge=5, le=3600, description="Length of each benchmark (each level of a sweep)."
    )
    maxPrompts: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Prompts drawn from the test split (formatted as the trainer formats "
        "them); each request asks for as many tokens as that row's real completion has.",
    )
    maxOutputTokens: int = Field(
        default=256,
        ge=1,
        le=32_768,
        description="Cap on the tokens one request asks for.",
    )

    @model_validator(mode="after")
    def _shape(self) -> LoadProfileSpec:
        if self.type in ("constant", "poisson") and self.rate is None:
            raise ValueError(f"rate: type {self.type} needs rate (requests per second)")
        if self.type == "concurrency" and not self.concurrency:
            raise ValueError("concurrency: type concurrency needs a list of levels, e.g. [1, 4]")
        if self.type != "concurrency" and self.concurrency is not None:
            raise ValueError(f"concurrency: only used with type concurrency, not {self.type}")
        if self.type == "concurrency" and self.rate is not None:
            raise ValueError("rate: not used with type concurrency")
        return self


class StagingGatesSpec(ApiModel):
    p95TtftMs: float | None = Field(
        default=None, gt=0, description="Highest allowed p95 time to first token, ms."
    )
    p95ItlMs: float | None = Field(
        default=None, gt=0, description="Highest allowed p95 inter-token latency, ms."
    )
    minOutputTokensPerSecond: float | None = Field(
        default=None, gt=0, description="Lowest allowed output throughput, tokens/s."
    )
    maxCostPer1MTokens: float | None = Field(
        default=None,
        gt=0,
        description="Highest allowed serving cost per million output tokens (needs "
        "costPerGpuHour), in its currency.",
    )


class StagingSpec(ApiModel):
    model_config = _cel(
        (
            "!has(self.gates) || !has(self.gates.maxCostPer1MTokens) || has(self.costPerGpuHour)",
            "staging.gates.maxCostPer1MTokens needs staging.costPerGpuHour",
        ),
    )

    engine: Literal["vllm"] = Field(default="vllm", description="The serving engine.")
    image: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, description="Engine image; the operator's default when omitted."
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Engine replicas behind the Service.")
    gpus: int = Field(
        default=1, ge=0, le=16, description="GPUs per replica (0: the CPU build of the engine)."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per replica.")
    memory: Quantity | None = Field(default=None, description="Memory request per replica.")
    artifact: Annotated[str, StringConstraints(max_length=63, pattern=ARTIFACT_NAME_PATTERN)] = (
        Field(
            default="adapter",
            description="What to serve: adapter (the LoRA adapter on the base model), merged "
            "(the merged model, or the fully tuned one with method full), or the name of a "
            "quantized export from spec.output.quantize (needs staging.image: the default "
            "engine, vLLM 0.32, loads neither GGUF nor bitsandbytes; a GGUF file is served "
            "with --tokenizer).",
        )
    )
    maxModelLen: int | None = Field(
        default=None, ge=16, le=1_048_576, description="The engine's context length limit."
    )
    load: LoadProfileSpec = Field(
        default_factory=lambda: LoadProfileSpec(rate=1.0),
        description="The load profile (default: poisson, 1 request/s, 60 s).",
    )
    costPerGpuHour: float | None = Field(
        default=None,
        ge=0,
        description="What one GPU costs per hour (with gpus 0: one replica), in the currency "
        "of your choice; gives status.staging.results.costPer1MTokens.",
    )
    gates: StagingGatesSpec = Field(
        default_factory=StagingGatesSpec,
        description="Limits the load test must meet; all of them go into GatesPassed.",
    )
    readyTimeoutSeconds: int = Field(
        default=900,
        ge=10,
        le=86_400,
        description="How long the engine may take to become ready before staging fails.",
    )
    keep: bool = Field(
        default=False,
        description="Keep the engine running after the load test (default: torn down).",
    )

    @model_validator(mode="after")
    def _cost(self) -> StagingSpec:
        if self.gates.maxCostPer1MTokens is not None and self.costPerGpuHour is None:
            raise ValueError("gates.maxCostPer1MTokens: needs staging.costPerGpuHour")
        return self


# --------------------------------------------------------------------------------------------
# spec

_IMMUTABLE = ("model", "dataset", "method", "training", "evaluation", "output")


class FineTuneJobSpec(ApiModel):
    model_config = _cel(
        *[
            (
                f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
                f"spec.{f} is immutable: create a new FineTuneJob to change it",
            )
            for f in _IMMUTABLE
        ]
    )

    model: ModelSpec = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="Training data, its license and its splits.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="lora, qlora or full.")
    training: TrainingSpec = Field(description="Hyperparameters and cadence.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Held-out and safety evals, gates."
    )
    output: OutputSpec = Field(description="Where results go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Storage clients.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Queueing.")
    runPolicy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, limits.")
    suspend: bool = Field(
        default=False, description="Suspend the job (no pods); set back to false to resume."
    )
    staging: StagingSpec | None = Field(
        default=None,
        description="After training: serve the result with a real engine, load-test it with "
        "prompts from the test split and gate on latency, throughput and cost.",
    )

    @model_validator(mode="after")
    def _cross(self) -> FineTuneJobSpec:
        if self.method.type == "qlora" and self.training.precision == "fp16":
            # bitsandbytes k-bit training with fp16 autocast diverges without loss scaling.
            raise ValueError("training.precision: qlora supports auto, bf16 or fp32, not fp16")
        if self.staging is not None:
            problem = staging_artifact_problem(self)
            if problem:
                raise ValueError(f"staging.artifact: {problem}")
        return self


def staging_artifact_problem(spec: FineTuneJobSpec) -> str | None:
    """Why spec.staging.artifact names nothing this spec produces (None when it does)."""
    assert spec.staging is not None
    artifact = spec.staging.artifact
    if artifact == "adapter":
        if spec.method.type == "full":
            return "method full trains no adapter: serve merged (the tuned model)"
        return None
    if artifact == "merged":
        if spec.method.type != "full" and not spec.output.mergeAdapter:
            return "merged needs spec.output.mergeAdapter: true"
        return None
    exports = [str(f) for f in getattr(spec.output, "quantize", None) or []]
    if artifact not in exports:
        listed = ", ".join(exports) or "none"
        return (
            f"{artifact!r} is neither adapter, merged nor a format in spec.output.quantize "
            f"({listed})"
        )
    if spec.staging.image is None:
        loader = quantized_loader(artifact)
        return (
            f"{artifact}: the default staging engine cannot serve it: "
            f"{VLLM_CANNOT_SERVE[loader]}; serve merged, or set staging.image to a vLLM build "
            f"that loads {loader} checkpoints"
        )
    return None


def is_gguf_source(source: str) -> bool:
    """spec.model.source names one .gguf file (llama.cpp's format) rather than a folder."""
    return source.rstrip("/").lower().endswith(".gguf")


def notes(spec: FineTuneJobSpec) -> list[str]:
    """What a valid spec will do that its author may not expect (kubetune validate prints it)."""
    lines = []
    if is_gguf_source(spec.model.source):
        line = (
            "spec.model.source is a GGUF file: it is dequantized to fp32 before training, so "
            "quality is that of its quantized weights; artifacts are exported as safetensors, "
            "and the dequantized base too (artifact base, which the adapter names as its base: "
            "servers load a LoRA on safetensors weights, not on the .gguf)"
        )
        if spec.method.type == "qlora":
            line += "; qlora then re-quantizes the dequantized weights with bitsandbytes"
        lines.append(line)
    staged = spec.staging.artifact if spec.staging is not None else ""
    if staged in QUANTIZE_FORMATS:
        loader = quantized_loader(staged)
        line = (
            f"spec.staging serves the {staged} export with staging.image, which must load "
            f"{loader} checkpoints ({VLLM_CANNOT_SERVE[loader]}); `kubetune run` checks its "
            "own vLLM before training"
        )
        if loader == "gguf":
            line += f"; the engine gets the {GGUF_FILE} file and --tokenizer (the tokenizer)"
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------
# status


class Condition(ApiModel):
    type: Annotated[str, StringConstraints(max_length=64)] = Field(description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="", description="CamelCase reason."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] = Field(
        default="", description="Human-readable details."
    )
    lastTransitionTime: str | None = Field(
        default=None, description="RFC 3339 time of the last change."
    )
    observedGeneration: int | None = Field(default=None, ge=0, description="Generation evaluated.")


# Validation losses kept in status.progress.evalHistory (the newest; a sweep prunes on them).
MAX_EVAL_HISTORY = 50


class EvalPoint(ApiModel):
    step: int = Field(ge=0, description="Optimizer step of the evaluation.")
    evalLoss: float = Field(description="Validation loss at that step.")


# At most one condition per type (a list-map keyed by type, as the Kubernetes API conventions
# have it, so server-side apply merges by type); room for every type with margin.
MAX_CONDITIONS = 16
ConditionList = Annotated[
    list[Condition],
    Field(
        max_length=MAX_CONDITIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class Progress(ApiModel):
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    totalSteps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps in %.")
    etaSeconds: int | None = Field(default=None, ge=0, description="Estimated seconds left.")
    epoch: float | None = Field(default=None, ge=0, description="Epochs done (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    evalLoss: float | None = Field(default=None, description="Latest validation loss.")
    learningRate: float | None = Field(default=None, description="Current learning rate.")
    tokensPerSecond: float | None = Field(default=None, ge=0, description="Training throughput.")
    updatedAt: str | None = Field(default=None, description="When this was read from the trainer.")
    evalHistory: list[EvalPoint] = Field(
        default_factory=list,
        max_length=MAX_EVAL_HISTORY,
        description="Validation loss per evaluation step (the newest "
        f"{MAX_EVAL_HISTORY}); a FineTuneSweep's median pruning compares trials on it.",
    )


class Metrics(ApiModel):
    base: dict[str, float] = Field(
        default_factory=dict, description="Base model on the test split."
    )
    tuned: dict[str, float] = Field(
        default_factory=dict, description="Tuned model on the test split."
    )
    delta: dict[str, float] = Field(
        default_factory=dict, description="tuned - base (ratios for *Ratio)."
    )


class GateResult(ApiModel):
    metric: str = Field(description="Gate metric.")
    op: str = Field(description="Comparison.")
    value: float = Field(description="Threshold.")
    actual: float | None = Field(
        default=None, description="Measured value (absent if not measured)."
    )
    passed: bool = Field(description="Whether the gate held.")

    def describe(self) -> str:
        """One line for logs, the local table and the GatesPassed condition message."""
        rule = f"{self.metric} {self.op} {self.value:g}"
        if self.actual is None:
            return f"{rule}: FAILED (not measured: see the report's evaluation notes)"
        return f"{rule}: {'passed' if self.passed else 'FAILED'} (actual {self.actual:.4g})"


StagingPhase = Literal["Deploying", "LoadTesting", "Succeeded", "Failed"]
STAGING_TERMINAL: tuple[StagingPhase, ...] = ("Succeeded", "Failed")


class StagingResults(ApiModel):
    """One load benchmark as the load generator measured it (a sweep: one per level)."""

    level: str | None = Field(
        default=None, description="The load of this benchmark: 'rate 2/s', 'concurrency 4'."
    )
    requests: int = Field(default=0, ge=0, description="Requests that completed.")
    errors: int = Field(default=0, ge=0, description="Requests that failed.")
    durationSeconds: float | None = Field(default=None, ge=0, description="Benchmark length.")
    requestsPerSecond: float | None = Field(default=None, ge=0, description="Completed req/s.")
    ttftP50Ms: float | None = Field(default=None, ge=0, description="Median time to first token.")
    ttftP95Ms: float | None = Field(default=None, ge=0, description="p95 time to first token.")
    itlP50Ms: float | None = Field(default=None, ge=0, description="Median inter-token latency.")
    itlP95Ms: float | None = Field(default=None, ge=0, description="p95 inter-token latency.")
    latencyP95Ms: float | None = Field(default=None, ge=0, description="p95 request latency.")
    outputTokensPerSecond: float | None = Field(
        default=None, ge=0, description="Output tokens per second over the benchmark."
    )
    outputTokens: int | None = Field(default=None, ge=0, description="Output tokens in total.")
    costPer1MTokens: float | None = Field(
        default=None,
        ge=0,
        description="Serving cost per million output tokens at this throughput "
        "(spec.staging.costPerGpuHour).",
    )


class StagingStatus(ApiModel):
    phase: StagingPhase = Field(description="Deploying, LoadTesting, Succeeded or Failed.")
    artifact: str = Field(description="What was served (adapter, merged or an export).")
    kind: Literal["Deployment", "InferenceService"] = Field(
        default="Deployment", description="How the engine was deployed."
    )
    server: str | None = Field(default=None, description="The engine's Deployment / ISVC.")
    service: str | None = Field(default=None, description="The Service the load goes to.")
    loadJob: str | None = Field(default=None, description="The load generator's Job.")
    startTime: str | None = Field(default=None, description="When staging began.")
    readyTime: str | None = Field(default=None, description="When the engine was ready.")
    completionTime: str | None = Field(default=None, description="When staging finished.")
    results: StagingResults | None = Field(
        default=None, description="The worst level of the load test (what the gates judge)."
    )
    levels: list[StagingResults] = Field(
        default_factory=list, max_length=16, description="Every benchmark of the load test."
    )
    gates: list[GateResult] = Field(default_factory=list, description="Staging gate results.")
    tornDown: bool | None = Field(
        default=None, description="Whether the engine was removed (false with keep: true)."
    )
    message: str | None = Field(default=None, description="What happened, or why it failed.")


class Artifacts(ApiModel):
    adapter: str | None = Field(
        default=None, description="LoRA adapter (PeftModel.from_pretrained)."
    )
    merged: str | None = Field(
        default=None, description="Merged model (AutoModel.from_pretrained)."
    )
    model: str | None = Field(default=None, description="Fully fine-tuned model.")
    base: str | None = Field(
        default=None,
        description="The base model the adapter applies to, as safetensors (the adapter's "
        "base_model_name_or_path): written when spec.model.source is a GGUF file, whose "
        "dequantized weights are what the adapter was trained on.",
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer.")
    report: str | None = Field(default=None, description="report.json.")
    lossCurve: str | None = Field(default=None, description="Loss curve PNG.")
    checkpoints: str | None = Field(default=None, description="Checkpoint prefix.")


class QuantizedExport(ApiModel):
    """One output.quantize format: where it is, how big, and how it scores against the
    unquantized merged model on the test split (or why it could not be made)."""

    format: str = Field(max_length=32, description="The output.quantize format.")
    uri: str | None = Field(default=None, description="The export (absent if not produced).")
    sizeBytes: int | None = Field(default=None, ge=0, description="Weights on disk.")
    delta: dict[str, float] = Field(
        default_factory=dict, description="Export - merged model, per test-split metric."
    )
    latencyP50Ms: float | None = Field(default=None, ge=0, description="Median ms per answer.")
    latencyP95Ms: float | None = Field(default=None, ge=0, description="p95 ms per answer.")
    tokensPerSecond: float | None = Field(
        default=None, ge=0, description="Generated tokens/s at batch size 1."
    )
    reason: str | None = Field(
        default=None, max_length=500, description="Why it was not produced, or a caveat."
    )


class Reproducibility(ApiModel):
    dataHash: str | None = Field(default=None, description="sha256 of the dataset source bytes.")
    splitHashes: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each split's row ids."
    )
    modelRevision: str | None = Field(default=None, description="Base model revision.")
    modelHash: str | None = Field(
        default=None, description="sha256 over the base model's weight files."
    )
    seed: int | None = Field(default=None, description="Training seed.")
    configHash: str | None = Field(
        default=None, description="sha256 of the resolved trainer config."
    )
    image: str | None = Field(default=None, description="Trainer image.")


class Usage(ApiModel):
    """What the run measured about itself (the trainer's report has more)."""

    parameters: int | None = Field(
        default=None, ge=0, description="Parameters of the trained model (base + adapters)."
    )
    trainableParameters: int | None = Field(
        default=None, ge=0, description="Parameters the optimizer updated."
    )
    peakMemoryBytes: int | None = Field(
        default=None, ge=0, description="Peak memory: GPU allocator peak on GPU, max RSS on CPU."
    )
    trainSeconds: float | None = Field(default=None, ge=0, description="Seconds spent training.")


class PlannedMethod(ApiModel):
    method: Literal["full", "lora", "qlora-4bit", "qlora-8bit"] = Field(description="Method.")
    trainableParameters: int = Field(ge=0, description="Parameters the method trains.")
    memoryBytes: int = Field(
        ge=0, description="Estimated peak per device: weights, gradients, AdamW, activations."
    )
    fits: bool | None = Field(
        default=None, description="Within 90% of the device memory (unset: none known)."
    )


class JobPlan(ApiModel):
    """What `kubetune plan` estimates for this job, from the model's config.json and
    safetensors headers (no weights read)."""

    requested: Literal["full", "lora", "qlora-4bit", "qlora-8bit"] = Field(
        description="The job's method."
    )
    parameters: int = Field(ge=0, description="Parameters of the base model.")
    methods: list[PlannedMethod] = Field(
        default_factory=list, max_length=4, description="Every method's estimate."
    )
    deviceMemoryBytes: int | None = Field(
        default=None, ge=0, description="Memory per device the estimate is compared with."
    )
    deviceMemoryFrom: str | None = Field(
        default=None,
        max_length=256,
        description="Where that figure comes from (a node-selector label, the GPU table, "
        "resources.memory).",
    )
    recommended: Literal["full", "lora", "qlora-4bit", "qlora-8bit"] = Field(
        description="The method the plan recommends."
    )
    recommendedGpus: int = Field(ge=0, description="GPUs the recommendation needs.")
    recommendation: str = Field(max_length=512, description="Why, in words.")


# status.promotion.state: Promoted (every gate passed; with a registry: alias production),
# Promoting (every gate passed; the operator's promote Job is moving alias production),
# Pending (evaluation gates passed, waiting for the staging gates; a registered version has
# alias staging), NotPromoted (a gate failed: a registered version keeps alias staging only),
# Failed (the registry step or the promote Job failed; the trained artifacts are committed all
# the same).
PromotionState = Literal["Promoted", "Promoting", "Pending", "NotPromoted", "Failed"]


class RegistryRecord(ApiModel):
    trackingUri: str = Field(description="The MLflow tracking server.")
    model: str = Field(description="Registered model name.")
    experimentId: str | None = Field(default=None, description="MLflow experiment id.")
    runId: str | None = Field(default=None, description="MLflow run with params and metrics.")
    version: str | None = Field(default=None, description="Model version registered.")
    source: str | None = Field(
        default=None, description="The version's source: the committed artifact URI."
    )
    aliases: list[str] = Field(
        default_factory=list, max_length=8, description="Aliases this version holds."
    )


class Promotion(ApiModel):
    state: PromotionState = Field(
        description="Promoted, Promoting (the promote Job is moving alias production), Pending, "
        "NotPromoted or Failed (message says why; the trained artifacts stay)."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] = Field(
        default="", description="What happened, in one line."
    )
    artifact: str | None = Field(
        default=None, description="The promoted artifact URI (merged, full model or adapter)."
    )
    artifacts: Artifacts | None = Field(default=None, description="Every artifact URI of the run.")
    gates: list[str] = Field(
        default_factory=list, max_length=128, description="The gates that decided, as checked."
    )
    registry: RegistryRecord | None = Field(default=None, description="The registry's record.")
    registeredAt: str | None = Field(default=None, description="When the version was registered.")
    promotedAt: str | None = Field(default=None, description="When it was promoted.")


# kopf's bookkeeping in the status of both kinds (handlers.py keeps it there, not in
# annotations): the diff base and a retried handler's progress.
HandledConfiguration = Annotated[
    str | None,
    Field(
        max_length=MAX_HANDLED_CONFIGURATION,
        description="The operator's own record (JSON) of the spec, labels and annotations it "
        "last acted on: how it tells a spec change from a status write. Not for users.",
    ),
]
HandlerProgress = Annotated[
    dict[str, Any] | None,
    Field(
        description="The operator's own record of a handler being retried (attempts, next "
        "try); empty once it succeeds. Not for users."
    ),
]


class FineTuneJobStatus(ApiModel):
    phase: Phase | None = Field(default=None, description="Summary for humans and printer columns.")
    observedGeneration: int | None = Field(
        default=None, ge=0, description="Last spec generation acted on."
    )
    conditions: ConditionList = Field(default_factory=list, description="Detailed state.")
    jobName: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    startTime: str | None = Field(default=None, description="When training started.")
    completionTime: str | None = Field(default=None, description="When the job finished.")
    attempts: int | None = Field(default=None, ge=0, description="Pod attempts so far.")
    message: str | None = Field(default=None, description="The latest human-readable message.")
    progress: Progress | None = Field(default=None, description="Live training progress.")
    metrics: Metrics | None = Field(default=None, description="Base vs tuned on the test split.")
    gates: list[GateResult] = Field(default_factory=list, description="Gate results.")
    artifacts: Artifacts | None = Field(default=None, description="Artifact URIs.")
    quantized: list[QuantizedExport] = Field(
        default_factory=list, description="Quantized exports (output.quantize), one per format."
    )
    reproducibility: Reproducibility | None = Field(
        default=None, description="What makes it repeatable."
    )
    usage: Usage | None = Field(
        default=None, description="Parameters, peak memory and training time, as measured."
    )
    plan: JobPlan | None = Field(
        default=None,
        description="The estimate before launch (`kubetune plan`), when the operator could "
        "read the model's headers (docs/operations.md).",
    )
    promotion: Promotion | None = Field(
        default=None, description="What was promoted (model version, artifacts, gates) and when."
    )
    staging: StagingStatus | None = Field(
        default=None, description="The staging load test (spec.staging)."
    )
    lastHandledConfiguration: HandledConfiguration = None
    handlerProgress: HandlerProgress = None


# --------------------------------------------------------------------------------------------
# the resource and the trainer's config


class ObjectMeta(BaseModel):
    """The part of metadata kubetune reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL_PATTERN)
    ]
    namespace: (
        Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL_PATTERN)] | None
    ) = None
    annotations: dict[str, str] | None = None

    @field_validator("annotations")
    @classmethod
    def _annotations_fit(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # The API server's rule: keys plus values, in bytes, at most 256 KiB in total.
        size = sum(len(k.encode()) + len(v.encode()) for k, v in (value or {}).items())
        if size > MAX_ANNOTATIONS_BYTES:
            raise ValueError(
                f"total size {size} bytes exceeds the API server's limit of "
                f"{MAX_ANNOTATIONS_BYTES} bytes (256 KiB)"
            )
        return value


class FineTuneJob(ApiModel):
    apiVersion: Literal["kubetune.io/v1alpha1"] = Field(description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="What to train.")
    status: FineTuneJobStatus | None = Field(default=None, description="What happened.")


class Policy(ApiModel):
    """Platform policy the operator (or `kubetune run`) passes to the trainer."""

    allowedLicenses: list[str] | None = Field(
        default=None, description="Dataset licenses allowed (case-insensitive); None: any."
    )


class TrainerConfig(ApiModel):
    """What the trainer reads (config.json in the Job's ConfigMap, or built by `kubetune run`)."""

    name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(default="default", description="FineTuneJob namespace.")
    uid: str | None = Field(default=None, description="FineTuneJob uid.")
    image: str | None = Field(default=None, description="Trainer image, for the record.")
    spec: FineTuneJobSpec = Field(description="The validated spec.")
    policy: Policy = Field(default_factory=Policy, description="Platform policy.")


# --------------------------------------------------------------------------------------------
# errors a person can act on

_REL_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*): (.*)$", re.S)


def _path_part(part: str | int) -> str:
    # A key that is not a plain name (empty, spaces, ": ") is quoted so the path stays readable.
    if isinstance(part, int):
        return f"[{part}]"
    if part.replace("-", "_").isidentifier():
        return part
    return f"[{json.dumps(part, ensure_ascii=False)}]"


def format_errors(error: ValidationError, prefix: Iterable[str | int] = ()) -> list[str]:
    """One 'field.path: message' line per problem, in the manifest's camelCase names."""
    lines = []
    for item in error.errors():
        path = [_path_part(p) for p in (*prefix, *item["loc"])]
        message = item["msg"]
        if item["type"] == "value_error":
            original = str(item.get("ctx", {}).get("error", ""))
            match = _REL_PATH.match(original)
            if match:
                rel, message = match.groups()
                path = [*path, *rel.split(".")]
            else:
                message = original or message
        elif item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; fields are camelCase)"
        dotted = ".".join(path).replace(".[", "[")
        lines.append(f"{dotted or '<document>'}: {message}")
    return lines


def _plain(value: object) -> object:
    # kopf hands out read-only Mapping views; JSON needs dicts.
    return dict(value) if isinstance(value, Mapping) else str(value)


def parse_job(document: Any) -> FineTuneJob:
    """Validate one manifest document as the API server reads it; raises ValidationError.

    Strict, on the document's JSON form: the CRD schema refuses ``packing: "yes"`` or
    ``batchSize: "8"``, so this does too instead of coercing them. (The trainer's config.json,
    written from an already validated model, is read without strict mode.)
    """
    return FineTuneJob.model_validate_json(json.dumps(document, default=_plain), strict=True)


# --------------------------------------------------------------------------------------------
# the trainer contract: shared by the trainer (which exits and serves) and the operator (which
# renders the pod and reads the results)

EXIT_OK = 0
EXIT_USER_ERROR = 10  # bad spec or data: retrying cannot help; the Job fails at once
EXIT_INFRA_ERROR = 11  # storage, network, hardware: retried (counts against backoffLimit)
EXIT_PREEMPTED = 12  # SIGTERM: a final checkpoint was committed; retried, not counted

TRAINER_METRICS_PORT = 9400
TERMINATION_LOG = "/dev/termination-log"
CONFIG_FILE = "config.json"
