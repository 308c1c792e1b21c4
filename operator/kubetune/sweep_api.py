"""The FineTuneSweep API: a hyperparameter search whose trials are FineTuneJobs.

``spec.template`` is :class:`kubetune.api.FineTuneJobSpec` itself (one spec model): a trial is
the template with each parameter's value written at its path. The CRD (`kubetune crd
FineTuneSweep`) and docs/api.md are generated from these models.

Rules a JSON schema cannot state (a parameter path exists in the spec model, a value at each
bound still gives a valid FineTuneJob, the objective is measured by the template's evaluation)
are checked by :func:`problems`, which returns one ``spec.field.path: message`` line each.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from kubetune import api

KIND = "FineTuneSweep"
PLURAL = "finetunesweeps"
SINGULAR = "finetunesweep"
SHORT_NAMES = ["fts"]

# Trials are "<sweep>-t<NNN>": the trial name must itself be a valid FineTuneJob name.
TRIAL_SUFFIX_LENGTH = len("-t000")
MAX_NAME_LENGTH = api.MAX_NAME_LENGTH - TRIAL_SUFFIX_LENGTH
MAX_TRIALS = 1000  # three digits in the trial name

# Objectives read from a trial's status: the last validation loss or the last training loss
# (status.progress), or a test-split metric (status.metrics.base|tuned|delta).
PROGRESS_OBJECTIVES = ("evalLoss", "loss")
OBJECTIVE_PATTERN = r"^(evalLoss|loss|" + api.GATE_METRIC_PATTERN[2:-2] + r")$"
PATH_PATTERN = r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)+$"

# A categorical choice is any JSON scalar: the CRD keeps it as is (no single type fits).
Choice = Annotated[
    str | int | float | bool,
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


LABEL_SWEEP = "kubetune.io/finetunesweep"  # the owning sweep's name, on every trial
ANNOTATION_PARAMS = "kubetune.io/trial-params"  # the trial's parameters (JSON)
ANNOTATION_PRUNED = "kubetune.io/pruned"  # set (with spec.suspend) when the sweep prunes it


class ParameterSpec(api.ApiModel):
    path: Annotated[str, StringConstraints(max_length=253, pattern=PATH_PATTERN)] = Field(
        description="Where the value goes in spec.template, dotted camelCase, e.g. "
        "training.learningRate, method.lora.r, method.type. Must name a scalar field of the "
        "FineTuneJob spec.",
    )
    type: Literal["float", "int", "categorical"] = Field(
        description="float and int: a range [low, high]; categorical: one of choices.",
    )
    low: float | None = Field(default=None, description="Lower bound (float, int).")
    high: float | None = Field(default=None, description="Upper bound, inclusive (float, int).")
    log: bool = Field(
        default=False, description="Sample on a log scale (float, int; low must be > 0)."
    )
    step: float | None = Field(
        default=None,
        gt=0,
        description="Spacing of the values (int: default 1; float: none). Required by the "
        "grid sampler for float ranges.",
    )
    choices: list[Choice] | None = Field(
        default=None,
        max_length=64,
        description="The values of a categorical parameter (strings, numbers or booleans).",
    )

    @model_validator(mode="after")
    def _shape(self) -> ParameterSpec:
        if self.type == "categorical":
            if self.choices is None or len(self.choices) == 0:
                raise ValueError("choices: a categorical parameter needs at least one choice")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError("choices: values must be distinct")
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: not used by a categorical parameter")
            return self
        if self.choices is not None:
            raise ValueError(f"choices: only for type categorical, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(
                f"{'low' if self.low is None else 'high'}: a {self.type} range needs low and high"
            )
        if self.low > self.high:
            raise ValueError(f"low: {self.low:g} is above high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError("low: a log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step: cannot be combined with log")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"{name}: an int parameter needs whole numbers, not {value}")
        return self

    def values(self) -> list[Any] | None:
        """Every value (categorical, int, float with a step); None for a continuous range."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            if self.log:
                return None
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


class ObjectiveSpec(api.ApiModel):
    metric: Annotated[str, StringConstraints(max_length=64, pattern=OBJECTIVE_PATTERN)] = Field(
        description="What a trial is scored by: evalLoss (last validation loss), loss (last "
        "training loss), or a test-split metric base.<m>, tuned.<m>, delta.<m> as in "
        "evaluation.gates (e.g. tuned.exactMatch, delta.oodPerplexityRatio).",
    )
    direction: Literal["minimize", "maximize"] = Field(
        description="minimize (losses, perplexity) or maximize (exactMatch, rougeL)."
    )


class AlgorithmSpec(api.ApiModel):
    sampler: Literal["tpe", "random", "grid", "cmaes"] = Field(
        default="tpe",
        description="Optuna sampler: tpe (default), random, grid (every combination, each once; "
        "float ranges need a step) or cmaes (float and int parameters only).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Seed of the sampler. With the same seed and the same finished trials the "
        "next trial's parameters are the same, so an operator restart changes nothing.",
    )
    startupTrials: int = Field(
        default=4,
        ge=0,
        le=1000,
        description="Random trials before TPE or CMA-ES start to model the results.",
    )


class SweepEarlyStoppingSpec(api.ApiModel):
    type: Literal["median"] = Field(
        default="median",
        description="median: stop a trial whose best validation loss so far is worse than the "
        "median of the finished trials' validation losses at the same step (Optuna's "
        "MedianPruner).",
    )
    startupTrials: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Finished trials needed before any trial is pruned.",
    )
    warmupSteps: int = Field(
        default=0, ge=0, le=10_000_000, description="Never prune a trial before this step."
    )


class FineTuneSweepSpec(api.ApiModel):
    template: api.FineTuneJobSpec = Field(
        description="The FineTuneJob spec every trial starts from (same fields as a "
        "FineTuneJob's spec)."
    )
    parameters: list[ParameterSpec] = Field(
        min_length=1, max_length=32, description="The search space: one entry per field."
    )
    objective: ObjectiveSpec = Field(description="The metric to optimize and its direction.")
    algorithm: AlgorithmSpec = Field(
        default_factory=AlgorithmSpec, description="How new parameters are chosen."
    )
    maxTrials: int = Field(
        default=10,
        ge=1,
        le=MAX_TRIALS,
        description="Trials to run in total (grid: at most the number of combinations).",
    )
    parallelism: int = Field(
        default=1, ge=1, le=100, description="Trials running at the same time."
    )
    maxFailedTrials: int = Field(
        default=3,
        ge=0,
        le=MAX_TRIALS,
        description="Failed trials tolerated; one more fails the sweep. Pruned trials do not "
        "count.",
    )
    earlyStopping: SweepEarlyStoppingSpec | None = Field(
        default=None, description="Prune trials that fall behind (off when omitted)."
    )

    @model_validator(mode="after")
    def _parallelism(self) -> FineTuneSweepSpec:
        if self.parallelism > self.maxTrials:
            raise ValueError(f"parallelism: {self.parallelism} is above maxTrials {self.maxTrials}")
        return self


# --------------------------------------------------------------------------------------------
# status

TrialPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"]


class TrialRow(api.ApiModel):
    name: str = Field(description="The trial's FineTuneJob.")
    number: int = Field(ge=0, description="Trial number (the NNN in the name).")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameter path -> value.")
    phase: TrialPhase = Field(description="Pending, Running, Succeeded, Failed or Pruned.")
    objective: float | None = Field(default=None, description="The objective metric's value.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    evalLoss: float | None = Field(default=None, description="Latest validation loss.")
    message: str | None = Field(default=None, description="Why it failed or was pruned.")


class TradeoffRow(api.ApiModel):
    """One method of a sweep over method.type: results and costs next to the plan's estimate."""

    method: str | None = Field(default=None, description="The trial's method.type.")
    trial: str = Field(description="The trial's FineTuneJob.")
    phase: TrialPhase = Field(description="The trial's phase.")
    objective: float | None = Field(default=None, description="The objective metric's value.")
    tuned: dict[str, float] = Field(
        default_factory=dict, description="The tuned model's test-split metrics."
    )
    oodPerplexityRatio: float | None = Field(
        default=None, description="Tuned / base out-of-domain perplexity (above 1: forgetting)."
    )
    trainableParameters: int | None = Field(default=None, ge=0, description="Measured.")
    planTrainableParameters: int | None = Field(default=None, ge=0, description="Planned.")
    peakMemoryBytes: int | None = Field(default=None, ge=0, description="Measured peak memory.")
    planMemoryBytes: int | None = Field(default=None, ge=0, description="Planned peak memory.")
    wallSeconds: float | None = Field(default=None, ge=0, description="Start to end.")
    artifactBytes: int | None = Field(
        default=None, ge=0, description="Size of the adapter or model written (local sweeps)."
    )
    message: str | None = Field(default=None, description="Why it failed or was pruned.")


class BestTrial(api.ApiModel):
    name: str = Field(description="The best trial's FineTuneJob.")
    number: int = Field(ge=0, description="Trial number.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its parameters.")
    objective: float = Field(description="Its objective value.")
    artifacts: api.Artifacts | None = Field(default=None, description="Its artifact URIs.")


class FineTuneSweepStatus(api.ApiModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Summary for humans and printer columns."
    )
    observedGeneration: int | None = Field(default=None, ge=0, description="Generation acted on.")
    conditions: api.ConditionList = Field(default_factory=list, description="Detailed state.")
    message: str | None = Field(default=None, description="The latest human-readable message.")
    trialCount: int = Field(default=0, ge=0, description="Trials created so far.")
    running: int = Field(default=0, ge=0, description="Trials pending or running.")
    succeeded: int = Field(default=0, ge=0, description="Trials that finished.")
    failed: int = Field(default=0, ge=0, description="Trials that failed.")
    pruned: int = Field(default=0, ge=0, description="Trials stopped by early stopping.")
    bestObjective: float | None = Field(default=None, description="The best objective so far.")
    best: BestTrial | None = Field(default=None, description="The best finished trial.")
    trials: list[TrialRow] = Field(default_factory=list, description="One row per trial.")
    tradeoff: list[TradeoffRow] = Field(
        default_factory=list,
        description="With a method.type parameter: one row per method, results next to the "
        "plan's estimates.",
    )
    lastHandledConfiguration: api.HandledConfiguration = None
    handlerProgress: api.HandlerProgress = None


class SweepMeta(BaseModel):
    """The part of metadata kubetune reads; room is left for the trial suffix."""

    model_config = api.ObjectMeta.model_config

    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH, pattern=api.DNS_LABEL_PATTERN),
    ]
    namespace: (
        Annotated[str, StringConstraints(max_length=63, pattern=api.DNS_LABEL_PATTERN)] | None
    ) = None


class FineTuneSweep(api.ApiModel):
    apiVersion: Literal["kubetune.io/v1alpha1"] = Field(description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneSweep"] = Field(description="FineTuneSweep")
    metadata: SweepMeta = Field(description="Standard object metadata.")
    spec: FineTuneSweepSpec = Field(description="The search.")
    status: FineTuneSweepStatus | None = Field(default=None, description="What happened.")


# --------------------------------------------------------------------------------------------
# parameter paths and spec patches

_SCALARS = (str, int, float, bool)


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X, Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def resolve_path(path: str) -> str | None:
    """Why ``path`` is not a scalar field of the FineTuneJob spec; None when it is."""
    model: Any = api.FineTuneJobSpec
    parts = path.split(".")
    for index, part in enumerate(parts):
        where = ".".join(parts[: index + 1])
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{'.'.join(parts[:index])} has no fields"
        fields = model.model_fields
        if part not in fields:
            known = ", ".join(sorted(fields))
            return f"{where} is not a field of the FineTuneJob spec (known here: {known})"
        model = _unwrap(fields[part].annotation)
    leaf = model
    origin = typing.get_origin(leaf)
    if origin is Literal or leaf in _SCALARS:
        return None
    return f"{path} is not a single value (a list, map or section cannot be searched)"


def patch(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The template (as the API stores it) with each parameter's value at its path.

    A value of method.type also drops the sections that type does not use (method.lora for
    full, method.quantization for anything but qlora), so one template serves a grid over
    full, lora and qlora.
    """
    out: dict[str, Any] = _copy(spec)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[leaf] = value
    method = out.get("method", {})
    if "method.type" in params and isinstance(method, dict):
        if method.get("type") == "full":
            method.pop("lora", None)
        if method.get("type") != "qlora":
            method.pop("quantization", None)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def trial_spec(
    sweep: FineTuneSweepSpec, params: Mapping[str, Any], name: str | None = None
) -> api.FineTuneJobSpec:
    """The FineTuneJob spec of one trial (raises pydantic.ValidationError). With the trial's
    name, its output goes to <template destination>/<name>, so trials never share a folder."""
    spec = patch(sweep.template.to_api(), dict(params))
    if name is not None:
        spec["output"]["destination"] = spec["output"]["destination"].rstrip("/") + "/" + name
    return api.FineTuneJobSpec.model_validate(spec)


# --------------------------------------------------------------------------------------------
# rules across fields


def _probe_values(parameter: ParameterSpec) -> Iterator[Any]:
    if parameter.type == "categorical":
        yield from parameter.choices or []
        return
    assert parameter.low is not None and parameter.high is not None
    cast = int if parameter.type == "int" else float
    yield cast(parameter.low)
    yield cast(parameter.high)


def objective_problem(spec: FineTuneSweepSpec) -> str | None:
    """Why no trial would report the objective; None when every trial does."""
    metric = spec.objective.metric
    evaluation = spec.template.evaluation
    if metric == "evalLoss":
        split = spec.template.dataset.split
        if split.validationSource is None and split.validation == 0:
            return "evalLoss needs a validation split (template.dataset.split.validation > 0)"
        return None
    if metric == "loss":
        return None
    reason = api._unmeasured_reason(evaluation, metric)
    return f"{metric} is never measured by the template: {reason}" if reason else None


def problems(sweep: FineTuneSweep) -> list[str]:
    """Rules across fields, one 'spec.path: message' line each (empty: the sweep is valid)."""
    spec = sweep.spec
    lines: list[str] = []
    seen: set[str] = set()
    for index, parameter in enumerate(spec.parameters):
        where = f"spec.parameters[{index}]"
        if parameter.path in seen:
            lines.append(f"{where}.path: {parameter.path} is searched twice")
            continue
        seen.add(parameter.path)
        reason = resolve_path(parameter.path)
        if reason:
            lines.append(f"{where}.path: {reason}")
            continue
        for value in _probe_values(parameter):
            try:
                trial_spec(spec, {parameter.path: value})
            except ValidationError as error:
                first = api.format_errors(error, ("spec", "template"))[0]
                lines.append(f"{where}: the value {value!r} gives an invalid trial: {first}")
                break
        if spec.algorithm.sampler == "grid" and parameter.values() is None:
            lines.append(
                f"{where}.step: the grid sampler needs a finite set of values (a step, or "
                "categorical choices)"
            )
        if spec.algorithm.sampler == "cmaes" and parameter.type == "categorical":
            lines.append(f"{where}.type: the cmaes sampler searches float and int parameters only")
    reason = objective_problem(spec)
    if reason:
        lines.append(f"spec.objective.metric: {reason}")
    if (
        spec.earlyStopping is not None
        and spec.template.dataset.split.validation == 0
        and (spec.template.dataset.split.validationSource is None)
    ):
        lines.append("spec.earlyStopping: median pruning needs a validation split in the template")
    return lines


def grid_size(spec: FineTuneSweepSpec) -> int | None:
    """The number of combinations when every parameter has finitely many values."""
    size = 1
    for parameter in spec.parameters:
        values = parameter.values()
        if values is None:
            return None
        size *= len(values)
    return size


def planned_trials(spec: FineTuneSweepSpec) -> int:
    """maxTrials, or fewer for a grid that has fewer combinations."""
    size = grid_size(spec) if spec.algorithm.sampler == "grid" else None
    return min(spec.maxTrials, size) if size is not None else spec.maxTrials


def trial_name(sweep_name: str, number: int) -> str:
    return f"{sweep_name}-t{number:03d}"


_TRIAL_NAME = re.compile(r"^(?P<sweep>.+)-t(?P<number>\d{3})$")


def trial_number(name: str) -> int | None:
    match = _TRIAL_NAME.match(name)
    return int(match.group("number")) if match else None


class SweepInvalid(ValueError):
    """A FineTuneSweep manifest that cannot run: one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def parse_sweep(document: Any) -> FineTuneSweep:
    """Validate one FineTuneSweep document; raises SweepInvalid with field-path lines."""
    try:
        # Strict on the JSON form, as api.parse_job and the API server read a manifest.
        text = json.dumps(document, default=api._plain)
        sweep = FineTuneSweep.model_validate_json(text, strict=True)
    except ValidationError as error:
        raise SweepInvalid(api.format_errors(error)) from error
    lines = problems(sweep)
    if lines:
        raise SweepInvalid(lines)
    return sweep
