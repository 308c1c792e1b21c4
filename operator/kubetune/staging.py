"""spec.staging: serve the trained result with a real engine, load-test it, gate on the numbers.

Pure: no API, no env, no clock (callers pass ``now`` and what they read). After training
succeeded, the operator creates (names from the FineTuneJob, so a restart finds them):

- the engine: a vLLM Deployment ``<name>-serve`` and a Service ``<name>-serve`` (or, where the
  KServe CRD is installed, an InferenceService ``<name>-serve``). An init container (the trainer
  image) copies the base model and the artifact from storage into an emptyDir; vLLM serves them
  under the model name :data:`SERVED_MODEL` (and the bare base as :data:`BASE_MODEL` when the
  artifact is the adapter);
- the load: a Job ``<name>-load`` (the trainer image) that draws prompts from the test split,
  runs guidellm against the Service and ends with a compact JSON result in its termination
  message, as the trainer does;

then :func:`step` turns what it sees into ``status.staging``: results, gates, and what to
create or delete next. Staging never changes the training outcome: a staging failure is
``status.staging.phase: Failed`` plus conditions, the trained artifacts stay recorded.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from kubetune import api, render

ENGINE_CONTAINER = "engine"
# KServe's name for a custom predictor's serving container (its defaulting webhook renames a
# lone container to it): sent as is, so what the API server stores is what we rendered.
KSERVE_CONTAINER = "kserve-container"
FETCH_CONTAINER = "fetch"
LOAD_CONTAINER = "load"
ENGINE_PORT = 8000
MODELS_DIR = "/models"
SERVED_MODEL = "tuned"
BASE_MODEL = "base"
KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
# KServe's rule for InferenceService names (its validating webhook; the CRD schema does not say
# it), and the suffix of the Deployment and Service it makes for the predictor (a Service name
# is a DNS label: at most 63 characters).
KSERVE_NAME_PATTERN = r"[a-z]([-a-z0-9]*[a-z0-9])?"
KSERVE_PREDICTOR_SUFFIX = "-predictor"
ENGINE_USER = 1000  # vLLM runs as any uid with a writable HOME (the emptyDir /cache)
# Seconds the load Job may run past its planned benchmarks (prompt preparation, tokenizer).
LOAD_SLACK_SECONDS = 300
LOG_TAIL_LINES = 20

Kind = Literal["Deployment", "InferenceService"]


def server_name(name: str) -> str:
    return f"{name}-serve"


def load_job_name(name: str) -> str:
    return f"{name}-load"


def engine_container(kind: Kind) -> str:
    return KSERVE_CONTAINER if kind == "InferenceService" else ENGINE_CONTAINER


def labels(name: str, component: str) -> dict[str, str]:
    return {
        **render.labels(name),
        "app.kubernetes.io/name": f"kubetune-{component}",
        "app.kubernetes.io/component": component,
    }


def _selector(name: str) -> dict[str, str]:
    return {render.LABEL_JOB: name, "app.kubernetes.io/component": "staging-engine"}


def _meta(child: str, name: str, namespace: str, uid: str | None, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child,
        "namespace": namespace,
        "labels": labels(name, component),
    }
    if uid:
        meta["ownerReferences"] = [render.owner_reference(name, uid)]
    return meta


# --------------------------------------------------------------------------------------------
# what to serve


@dataclass(frozen=True)
class Served:
    """The engine's model folders (inside the pod) and where they come from (URIs)."""

    model: str  # the folder (or, for GGUF, the file) vLLM serves
    sources: dict[str, str]  # folder name under MODELS_DIR -> storage URI
    lora: bool  # the artifact is an adapter on ``model``
    tokenizer: str | None = None  # --tokenizer: a GGUF file's tokenizer folder


def artifact_source(
    spec: api.FineTuneJobSpec,
    artifacts: api.Artifacts | None,
    quantized: Iterable[api.QuantizedExport] = (),
) -> tuple[Served | None, str | None]:
    """What to fetch for spec.staging.artifact, or (None, why) when training did not record it."""
    assert spec.staging is not None
    artifact, found = spec.staging.artifact, artifacts or api.Artifacts()
    if artifact == "adapter":
        if not found.adapter:
            return None, "training recorded no adapter artifact"
        # A GGUF source's adapter applies to the dequantized base the trainer exported (vLLM
        # loads a LoRA on safetensors weights, not on the .gguf).
        source = found.base or spec.model.source
        if api.is_gguf_source(source):
            return None, (
                "training recorded no base artifact for the GGUF spec.model.source (vLLM "
                "serves an adapter only on a safetensors base)"
            )
        base = f"{MODELS_DIR}/base"
        return Served(base, {"base": source, "adapter": found.adapter}, True), None
    if artifact == "merged":
        uri = found.merged or found.model
        if not uri:
            return None, "training recorded no merged model"
        return Served(f"{MODELS_DIR}/merged", {"merged": uri}, False), None
    export = next((q for q in quantized if q.format == artifact), None)
    if export is None or not export.uri:
        why = f": {export.reason}" if export is not None and export.reason else ""
        return None, f"training recorded no quantized export {artifact!r}{why}"
    if api.is_gguf_format(artifact):
        # vLLM loads a GGUF file, not its folder, and is told to use the trainer's tokenizer
        # rather than convert the one inside the file.
        tokenizer = found.tokenizer or spec.model.source
        sources = {artifact: export.uri, "tokenizer": tokenizer}
        model = f"{MODELS_DIR}/{artifact}/{api.GGUF_FILE}"
        return Served(model, sources, False, tokenizer=f"{MODELS_DIR}/tokenizer"), None
    return Served(f"{MODELS_DIR}/{artifact}", {artifact: export.uri}, False), None


def engine_args(
    staging: api.StagingSpec,
    served: Served,
    *,
    lora_rank: int | None = None,
    model: str | None = None,
    adapter: str | None = None,
    tokenizer: str | None = None,
    host: str = "$(POD_IP)",
    port: int = ENGINE_PORT,
) -> list[str]:
    """vLLM's command line: the tuned model under SERVED_MODEL, on the pod's own address
    (``model``/``adapter``/``tokenizer``/``host``/``port`` differ for `kubetune run`)."""
    args = ["vllm", "serve", model or served.model, "--host", host, "--port", str(port)]
    if served.tokenizer:
        args += ["--tokenizer", tokenizer or served.tokenizer]
    if served.lora:
        # The base under its own name, the adapter as the LoRA module SERVED_MODEL: one engine
        # answers both, so tuned and base can be compared under the same load.
        args += ["--served-model-name", BASE_MODEL, "--enable-lora"]
        args += ["--lora-modules", f"{SERVED_MODEL}={adapter or MODELS_DIR + '/adapter'}"]
        if lora_rank:
            args += ["--max-lora-rank", str(lora_rank)]
    else:
        args += ["--served-model-name", SERVED_MODEL]
    if staging.gpus > 1:
        args += ["--tensor-parallel-size", str(staging.gpus)]
    if staging.maxModelLen:
        args += ["--max-model-len", str(staging.maxModelLen)]
    return args


# vLLM's --max-lora-rank takes one of these (its MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(spec: api.FineTuneJobSpec) -> int | None:
    """The --max-lora-rank that fits the adapter: the smallest of vLLM's that holds r."""
    if spec.method.lora is None:
        return None
    r = spec.method.lora.r
    return next((rank for rank in VLLM_LORA_RANKS if rank >= r), r)


# --------------------------------------------------------------------------------------------
# rendering


_CACHE_ENV: list[dict[str, Any]] = [
    {"name": "HOME", "value": "/cache"},
    {"name": "XDG_CACHE_HOME", "value": "/cache"},
    {"name": "HF_HOME", "value": "/cache/huggingface"},
    {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
    {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
    {"name": "TMPDIR", "value": "/tmp"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]


def _staging_step(
    name: str,
    image: str,
    args: list[str],
    spec: api.FineTuneJobSpec,
    *,
    mounts: list[dict[str, Any]],
    result_file: bool = False,
) -> dict[str, Any]:
    """A trainer-image container running one `kubetune_trainer.staging` subcommand (fetch,
    load): non-root, read-only root, credentials only by secretKeyRef; result_file: its
    termination message is the step's result."""
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubetune_trainer.staging", *args],
        "env": [*copy.deepcopy(_CACHE_ENV), *render.s3_credentials_env(spec)],
        "volumeMounts": mounts,
        "securityContext": render.container_security(),
    }
    if result_file:
        container["terminationMessagePath"] = api.TERMINATION_LOG
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    return container


def engine_pod(
    job: api.FineTuneJob, served: Served, *, engine_image: str, trainer_image: str
) -> dict[str, Any]:
    """The engine's pod spec: fetch (init, trainer image) then vLLM, both non-root and with a
    read-only root filesystem; no API token, credentials only by secretKeyRef."""
    spec, name = job.spec, job.metadata.name
    assert spec.staging is not None
    fetch_args = ["--config", render.CONFIG_PATH, "--to", MODELS_DIR]
    for folder, uri in sorted(served.sources.items()):
        fetch_args += ["--source", f"{folder}={uri}"]
    mounts = [
        {"name": "models", "mountPath": MODELS_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    fetch = _staging_step(
        FETCH_CONTAINER,
        trainer_image,
        ["fetch", *fetch_args],
        spec,
        mounts=[
            *copy.deepcopy(mounts),
            {"name": "config", "mountPath": render.CONFIG_DIR, "readOnly": True},
        ],
    )
    engine = {
        "name": ENGINE_CONTAINER,
        "image": engine_image,
        "imagePullPolicy": "IfNotPresent",
        "command": engine_args(spec.staging, served, lora_rank=lora_rank(spec)),
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            *copy.deepcopy(_CACHE_ENV),
        ],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT}],
        "resources": render.resources(
            spec.staging.gpus, spec.staging.cpu, spec.staging.memory, spec.resources.gpuResourceName
        ),
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "volumeMounts": [*copy.deepcopy(mounts), {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": render.container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": render.pod_security(ENGINE_USER),
        "initContainers": [fetch],
        "containers": [engine],
        "volumes": [
            {"name": "config", "configMap": {"name": render.config_map_name(name)}},
            {"name": "models", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
    }
    res = spec.resources
    if res.serviceAccountName:
        pod["serviceAccountName"] = res.serviceAccountName
    if res.nodeSelector:
        pod["nodeSelector"] = dict(res.nodeSelector)
    if res.tolerations:
        pod["tolerations"] = [t.to_api() for t in res.tolerations]
    return pod


def render_engine(
    job: api.FineTuneJob,
    served: Served,
    *,
    kind: Kind,
    uid: str | None,
    engine_image: str,
    trainer_image: str,
) -> list[dict[str, Any]]:
    """The engine's objects: Deployment + Service, or one KServe InferenceService."""
    spec, name = job.spec, job.metadata.name
    assert spec.staging is not None
    namespace = job.metadata.namespace or "default"
    child = server_name(name)
    pod = engine_pod(job, served, engine_image=engine_image, trainer_image=trainer_image)
    meta = _meta(child, name, namespace, uid, "staging-engine")
    if kind == "InferenceService":
        replicas = spec.staging.replicas
        pod["containers"][0]["name"] = KSERVE_CONTAINER
        # Its labels (ours) go onto the pods KServe makes: the operator's pod watch sees them.
        predictor = {**pod, "minReplicas": replicas, "maxReplicas": replicas}
        return [
            {
                "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
                "kind": "InferenceService",
                "metadata": {
                    **meta,
                    # Plain Deployment + Service underneath: no Knative scale-to-zero, which
                    # would make the load test measure cold starts.
                    "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"},
                },
                "spec": {"predictor": predictor},
            }
        ]
    template_labels = {**labels(name, "staging-engine"), **_selector(name)}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.staging.replicas,
            "selector": {"matchLabels": _selector(name)},
            "template": {"metadata": {"labels": template_labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(child, name, namespace, uid, "staging-engine"),
        "spec": {
            "selector": _selector(name),
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http"}],
        },
    }
    return [deployment, service]


def service_url(name: str, namespace: str) -> str:
    return f"http://{server_name(name)}.{namespace}.svc:{ENGINE_PORT}"


def load_seconds(load: api.LoadProfileSpec) -> int:
    """How long the benchmarks themselves run (a sweep runs each level in turn)."""
    levels = len(load.concurrency or []) if load.type == "concurrency" else 1
    return levels * load.durationSeconds


def render_load_job(
    job: api.FineTuneJob, *, target: str, tokenizer: str, uid: str | None, trainer_image: str
) -> dict[str, Any]:
    """The load generator: one pod, no retries (a rerun would measure a different load)."""
    spec, name = job.spec, job.metadata.name
    assert spec.staging is not None
    namespace = job.metadata.namespace or "default"
    command = ["load", "--config", render.CONFIG_PATH, "--target", target]
    command += ["--model", SERVED_MODEL, "--tokenizer", tokenizer]
    container = _staging_step(
        LOAD_CONTAINER,
        trainer_image,
        command,
        spec,
        mounts=[
            {"name": "config", "mountPath": render.CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
        ],
        result_file=True,
    )
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": render.pod_security(ENGINE_USER),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": render.config_map_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if spec.resources.serviceAccountName:
        pod["serviceAccountName"] = spec.resources.serviceAccountName
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(load_job_name(name), name, namespace, uid, "staging-load"),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": load_seconds(spec.staging.load) + LOAD_SLACK_SECONDS,
            "template": {"metadata": {"labels": labels(name, "staging-load")}, "spec": pod},
        },
    }


# --------------------------------------------------------------------------------------------
# guidellm's report -> results


def _stat(metrics: Mapping[str, Any], name: str, pick: str) -> float | None:
    """One statistic of guidellm's metric ``name`` over successful requests, or None."""
    block = metrics.get(name)
    if not isinstance(block, Mapping):
        return None
    stats = block.get("successful")
    if not isinstance(stats, Mapping):
        return None
    if pick.startswith("p"):
        percentiles = stats.get("percentiles")
        value = percentiles.get(pick) if isinstance(percentiles, Mapping) else None
    else:
        value = stats.get(pick)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(totals: Any, key: str) -> int:
    value = totals.get(key) if isinstance(totals, Mapping) else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _level(benchmark: Mapping[str, Any]) -> str | None:
    config = benchmark.get("config") or {}
    strategy = config.get("strategy") if isinstance(config, Mapping) else None
    if not isinstance(strategy, Mapping):
        return None
    kind = strategy.get("type_")
    if kind == "concurrent":
        return f"concurrency {strategy.get('streams')}"
    if kind in ("constant", "poisson") and isinstance(strategy.get("rate"), int | float):
        return f"{kind} {strategy['rate']:g}/s"
    return str(kind) if kind else None


def parse_guidellm(report: Mapping[str, Any]) -> list[api.StagingResults]:
    """guidellm's JSON report (``--output-path x.json``) -> one result per benchmark.

    guidellm reports TTFT and ITL in ms, request latency in s; its totals count successful,
    errored and incomplete requests (cut off when the benchmark's time was up: not errors)."""
    out = []
    for benchmark in report.get("benchmarks") or []:
        if not isinstance(benchmark, Mapping):
            continue
        metrics = benchmark.get("metrics") or {}
        totals = (metrics.get("request_totals") or {}) if isinstance(metrics, Mapping) else {}
        duration = benchmark.get("duration")
        if not isinstance(duration, int | float):
            start, end = benchmark.get("start_time"), benchmark.get("end_time")
            ok = isinstance(start, int | float) and isinstance(end, int | float)
            duration = float(end - start) if ok else None  # type: ignore[operator]
        latency = _stat(metrics, "request_latency", "p95")
        out.append(
            api.StagingResults(
                level=_level(benchmark),
                requests=_count(totals, "successful"),
                errors=_count(totals, "errored"),
                durationSeconds=duration,
                requestsPerSecond=_stat(metrics, "requests_per_second", "mean"),
                ttftP50Ms=_stat(metrics, "time_to_first_token_ms", "p50"),
                ttftP95Ms=_stat(metrics, "time_to_first_token_ms", "p95"),
                itlP50Ms=_stat(metrics, "inter_token_latency_ms", "p50"),
                itlP95Ms=_stat(metrics, "inter_token_latency_ms", "p95"),
                latencyP95Ms=latency * 1000 if latency is not None else None,
                outputTokensPerSecond=_stat(metrics, "output_tokens_per_second", "mean"),
                outputTokens=int(_stat(metrics, "output_token_count", "total_sum") or 0),
            )
        )
    return out


def cost_per_million(staging: api.StagingSpec, results: api.StagingResults) -> float | None:
    """Serving cost per 1M output tokens: (replicas x GPUs, or replicas on CPU) x price per
    hour over output tokens per hour at the measured throughput."""
    rate = results.outputTokensPerSecond
    if staging.costPerGpuHour is None or not rate:
        return None
    units = staging.replicas * max(staging.gpus, 1)
    return staging.costPerGpuHour * units / (rate * 3600) * 1_000_000


def with_cost(
    staging: api.StagingSpec, levels: Iterable[api.StagingResults]
) -> list[api.StagingResults]:
    return [
        level.model_copy(update={"costPer1MTokens": cost_per_million(staging, level)})
        for level in levels
    ]


def worst(levels: list[api.StagingResults]) -> api.StagingResults | None:
    """The level the gates judge: the highest latencies, the lowest throughput (a sweep passes
    only when every level does)."""
    if not levels:
        return None
    if len(levels) == 1:
        return levels[0]

    def most(field: str, pick: Any = max) -> float | None:
        values = [getattr(x, field) for x in levels if getattr(x, field) is not None]
        return pick(values) if values else None

    return api.StagingResults(
        level="worst of " + ", ".join(x.level or "?" for x in levels),
        requests=sum(x.requests for x in levels),
        errors=sum(x.errors for x in levels),
        durationSeconds=sum(x.durationSeconds or 0 for x in levels),
        requestsPerSecond=most("requestsPerSecond", min),
        ttftP50Ms=most("ttftP50Ms"),
        ttftP95Ms=most("ttftP95Ms"),
        itlP50Ms=most("itlP50Ms"),
        itlP95Ms=most("itlP95Ms"),
        latencyP95Ms=most("latencyP95Ms"),
        outputTokensPerSecond=most("outputTokensPerSecond", min),
        outputTokens=sum(x.outputTokens or 0 for x in levels),
        costPer1MTokens=most("costPer1MTokens"),
    )


# (spec.staging.gates field, results field, op, name in status)
_GATES: tuple[tuple[str, str, Literal["<=", ">="], str], ...] = (
    ("p95TtftMs", "ttftP95Ms", "<=", "staging.ttftP95Ms"),
    ("p95ItlMs", "itlP95Ms", "<=", "staging.itlP95Ms"),
    ("minOutputTokensPerSecond", "outputTokensPerSecond", ">=", "staging.outputTokensPerSecond"),
    ("maxCostPer1MTokens", "costPer1MTokens", "<=", "staging.costPer1MTokens"),
)


def evaluate_gates(
    gates: api.StagingGatesSpec, results: api.StagingResults | None
) -> list[api.GateResult]:
    """Each declared gate against the judged results; a value not measured fails its gate."""
    out = []
    for field, measured, op, metric in _GATES:
        limit = getattr(gates, field)
        if limit is None:
            continue
        actual = getattr(results, measured) if results is not None else None
        passed = actual is not None and (actual <= limit if op == "<=" else actual >= limit)
        out.append(api.GateResult(metric=metric, op=op, value=limit, actual=actual, passed=passed))
    return out


def gates_passed(status: api.FineTuneJobStatus) -> bool:
    """Whether every gate passed: the evaluation gates and, with spec.staging, the staging
    gates of a finished load test. False while anything is still unknown (what promotion asks)."""
    gates = next((c for c in status.conditions if c.type == "GatesPassed"), None)
    return gates is not None and gates.status == "True"


def parse_result(text: str | None) -> tuple[list[api.StagingResults], str | None]:
    """The load Job's termination message: {"levels": [...], "message": ...}."""
    if not text:
        return [], None
    try:
        data = json.loads(text)
    except ValueError:
        return [], text.strip()[-500:] or None
    if not isinstance(data, dict):
        return [], None
    levels = []
    for item in data.get("levels") or []:
        try:
            levels.append(api.StagingResults.model_validate(item))
        except ValidationError:
            continue
    message = data.get("message")
    return levels, message if isinstance(message, str) else None


# --------------------------------------------------------------------------------------------
# the staging state machine


@dataclass(frozen=True)
class Seen:
    """What the operator read this tick."""

    engine_exists: bool = False
    ready_replicas: int = 0
    engine_problem: str = ""  # why not ready: a pod's waiting reason, its log tail
    load_job: Mapping[str, Any] | None = None
    load_pods: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Step:
    """The new status.staging and what the handler must do."""

    status: api.StagingStatus
    create_engine: bool = False
    create_load: bool = False
    tear_down: bool = False


def _seconds_since(stamp: str | None, now: datetime) -> float:
    if not stamp:
        return 0.0
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (now - then).total_seconds()


def _job_done(job: Mapping[str, Any]) -> Literal["complete", "failed", None]:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "complete"
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    return None


def _termination(pods: Iterable[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != LOAD_CONTAINER:
                continue
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                return str(terminated["message"])
    return None


def step(
    spec: api.FineTuneJobSpec,
    current: api.StagingStatus | None,
    seen: Seen,
    *,
    name: str,
    kind: Kind,
    now: datetime,
    problem: str | None = None,
) -> Step:
    """One reconcile of staging. ``problem``: why the artifact cannot be served at all."""
    assert spec.staging is not None
    staging, stamp = spec.staging, rfc3339(now)
    keep = staging.keep
    if current is None:
        base = api.StagingStatus(
            phase="Deploying",
            artifact=staging.artifact,
            kind=kind,
            server=server_name(name),
            service=server_name(name),
            startTime=stamp,
        )
        if problem:
            return Step(_failed(base, f"cannot stage: {problem}", stamp, torn_down=True))
        return Step(
            base.model_copy(update={"message": f"starting {staging.engine}"}), create_engine=True
        )
    if current.phase in api.STAGING_TERMINAL:
        return Step(current)
    if current.phase == "Deploying":
        if seen.ready_replicas >= staging.replicas:
            ready = current.model_copy(
                update={
                    "phase": "LoadTesting",
                    "readyTime": stamp,
                    "loadJob": load_job_name(name),
                    "message": f"{staging.engine} ready; load test running",
                }
            )
            return Step(ready, create_load=True)
        waited = _seconds_since(current.startTime, now)
        if waited > staging.readyTimeoutSeconds:
            why = seen.engine_problem or "no reason reported"
            message = (
                f"{staging.engine} not ready after {staging.readyTimeoutSeconds}s "
                f"({seen.ready_replicas}/{staging.replicas} replicas): {why}"
            )
            return Step(_failed(current, message, stamp, not keep), tear_down=not keep)
        message = f"waiting for {staging.engine}: {seen.ready_replicas}/{staging.replicas} ready"
        if seen.engine_problem:
            message += f" ({seen.engine_problem.splitlines()[0][:200]})"
        return Step(
            current.model_copy(update={"message": message}), create_engine=not seen.engine_exists
        )
    # LoadTesting
    if seen.load_job is None:
        return Step(current, create_load=True)  # deleted by someone: run it again
    done = _job_done(seen.load_job)
    if done is None:
        return Step(current)
    levels, said = parse_result(_termination(seen.load_pods))
    if done == "failed" or not levels:
        why = said or "the load Job failed without a result"
        return Step(
            _failed(current, f"load test failed: {why}", stamp, not keep), tear_down=not keep
        )
    levels = with_cost(staging, levels)
    judged = worst(levels)
    gates = evaluate_gates(staging.gates, judged)
    failed = [g for g in gates if not g.passed]
    summary = describe(judged)
    if failed:
        summary += "; gates failed: " + "; ".join(g.describe() for g in failed)
    elif gates:
        summary += f"; {len(gates)} gate(s) passed"
    finished = current.model_copy(
        update={
            "phase": "Succeeded",
            "completionTime": stamp,
            "levels": levels,
            "results": judged,
            "gates": gates,
            "tornDown": not keep,
            "message": summary,
        }
    )
    return Step(finished, tear_down=not keep)


def _failed(
    current: api.StagingStatus, message: str, stamp: str, torn_down: bool
) -> api.StagingStatus:
    return current.model_copy(
        update={
            "phase": "Failed",
            "completionTime": stamp,
            "tornDown": torn_down,
            "message": message[:4000],
        }
    )


def describe(results: api.StagingResults | None) -> str:
    if results is None:
        return "no results"
    parts = [f"{results.requests} requests, {results.errors} errors"]
    for label, value, unit in (
        ("p95 TTFT", results.ttftP95Ms, " ms"),
        ("p95 ITL", results.itlP95Ms, " ms"),
        ("output", results.outputTokensPerSecond, " tok/s"),
        ("cost/1M tok", results.costPer1MTokens, ""),
    ):
        if value is not None:
            parts.append(f"{label} {value:.4g}{unit}")
    return ", ".join(parts)


def table(levels: list[api.StagingResults], gates: list[api.GateResult]) -> str:
    """The local run's staging table (and what `kubetune run` prints)."""
    head = ("load", "req", "err", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "tok/s", "$/1M")
    rows = [head]

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for level in levels:
        rows.append(
            (
                level.level or "-",
                str(level.requests),
                str(level.errors),
                num(level.ttftP50Ms),
                num(level.ttftP95Ms),
                num(level.itlP50Ms),
                num(level.itlP95Ms),
                num(level.outputTokensPerSecond),
                num(level.costPer1MTokens, 3),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [f"gate {g.describe()}" for g in gates] or ["no staging gates declared"]
    return "\n".join(lines)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# reading the engine


def ready_replicas(engine: Mapping[str, Any] | None, kind: Kind) -> int:
    """Ready engine replicas: a Deployment's readyReplicas; an InferenceService counts as all
    ready when its Ready condition is True."""
    if not engine:
        return 0
    status = engine.get("status") or {}
    if kind == "Deployment":
        return int(status.get("readyReplicas") or 0)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    spec = (engine.get("spec") or {}).get("predictor") or {}
    return int(spec.get("minReplicas") or 1) if ready else 0


def engine_target(engine: Mapping[str, Any] | None, kind: Kind, name: str, namespace: str) -> str:
    """Where the load goes: our Service, or the address KServe reports."""
    if kind == "InferenceService" and engine:
        status = engine.get("status") or {}
        url = (status.get("address") or {}).get("url") or status.get("url")
        if url:
            return str(url).rstrip("/")
    return service_url(name, namespace)


def kserve_name_problem(name: str) -> str | None:
    """Why KServe would refuse or could not serve the InferenceService of FineTuneJob ``name``
    (None when it can): checked before creating it, since a webhook's refusal or a Service
    KServe cannot create would otherwise only show as a ready timeout."""
    child = server_name(name)
    fix = "rename the FineTuneJob, or run the operator with KUBETUNE_STAGING_ENGINE=deployment"
    if not re.fullmatch(KSERVE_NAME_PATTERN, child):
        return (
            f"InferenceService name {child} breaks KServe's naming rule {KSERVE_NAME_PATTERN} "
            f"(it must start with a letter): {fix}"
        )
    longest = 63 - len(KSERVE_PREDICTOR_SUFFIX) - len(server_name(""))
    if len(child) + len(KSERVE_PREDICTOR_SUFFIX) > 63:
        return (
            f"InferenceService name {child} is too long for KServe: its Service "
            f"{child}{KSERVE_PREDICTOR_SUFFIX} would exceed 63 characters (FineTuneJob names "
            f"up to {longest} characters): {fix}"
        )
    return None


def inference_service_problem(engine: Mapping[str, Any] | None) -> str:
    """Why an InferenceService is not ready, from what KServe's controller wrote in its status:
    its conditions that are not True, or that nothing has written a status at all (no KServe
    controller reconciles it)."""
    if not engine:
        return ""
    name = (engine.get("metadata") or {}).get("name", "?")
    conditions = (engine.get("status") or {}).get("conditions") or []
    if not conditions:
        return (
            f"InferenceService {name} has no status conditions: no KServe controller has "
            "reconciled it (is KServe's controller running?)"
        )
    parts = []
    for cond in conditions:
        if cond.get("status") == "True":
            continue
        why = ": ".join(str(cond[k]) for k in ("reason", "message") if cond.get(k))
        parts.append(f"{cond.get('type')}={cond.get('status')}" + (f" ({why})" if why else ""))
    return f"InferenceService {name}: " + "; ".join(parts) if parts else ""


def refused(current: api.StagingStatus, why: str, now: datetime) -> Step:
    """The API server refused an object staging renders (400/422, e.g. a field the engine's
    schema does not know under fieldValidation=Strict): no retry can fix it, so staging fails
    with the server's reason; anything already created is torn down."""
    message = f"the API server refused {why}"
    return Step(_failed(current, message, rfc3339(now), torn_down=True), tear_down=True)


def engine_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        p
        for p in pods
        if (p.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/component")
        == "staging-engine"
    ]


def load_pods(pods: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    return tuple(
        p
        for p in pods
        if (p.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/component")
        == "staging-load"
    )


def engine_problem(pods: Iterable[Mapping[str, Any]]) -> str:
    """Why engine pods are not ready, from their statuses: a waiting reason (image pull, crash
    loop), a terminated container's message (its log tail), or an unschedulable condition."""
    problems = []
    for pod in pods:
        status = pod.get("status") or {}
        name = (pod.get("metadata") or {}).get("name", "?")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                problems.append(f"pod {name}: {cond.get('reason')}: {cond.get('message', '')}")
        statuses = [*(status.get("initContainerStatuses") or [])]
        statuses += status.get("containerStatuses") or []
        for cs in statuses:
            state = cs.get("state") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
            if waiting.get("reason") and waiting.get("reason") != "PodInitializing":
                text = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
                problems.append(f"pod {name} container {cs.get('name')}: {text}")
            for ended in (terminated, last):
                if ended and ended.get("exitCode", 0) != 0:
                    message = str(ended.get("message") or ended.get("reason") or "")
                    problems.append(
                        f"pod {name} container {cs.get('name')} exited "
                        f"{ended.get('exitCode')}: {message.strip()[-1500:]}"
                    )
                    break
    return "\n".join(dict.fromkeys(problems))


def deploy_timed_out(
    spec: api.FineTuneJobSpec, current: api.StagingStatus | None, now: datetime
) -> bool:
    """True when the engine has had its readyTimeoutSeconds (the handler then reads its log)."""
    if spec.staging is None or current is None or current.phase != "Deploying":
        return False
    return _seconds_since(current.startTime, now) > spec.staging.readyTimeoutSeconds
