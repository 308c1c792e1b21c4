"""`kubetune run job.yaml`: the same manifest and the same trainer, without a cluster.

The manifest is validated like ``kubetune validate`` (problems printed, exit 10), relative paths
resolve against the manifest's folder, then the recipe runs in this process with a progress bar
and ends with a table: base vs tuned on the test split, gates, artifact locations.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from kubetune import api, manifests, promotion

from .__main__ import Options, Result, run, run_and_report
from .errors import UserError
from .promote import RegistrationFailed

# Uri fields a manifest may give as paths relative to itself (dotted, under spec).
_PATH_FIELDS = (
    ("model", "source"),
    ("dataset", "source"),
    ("dataset", "split", "validationSource"),
    ("dataset", "split", "testSource"),
    ("output", "destination"),
    ("evaluation", "safety", "toxicity", "classifierSource"),
    ("evaluation", "safety", "toxicity", "promptsSource"),
    ("evaluation", "safety", "jailbreak", "promptsSource"),
    ("evaluation", "safety", "ood", "source"),
)


def resolve_paths(spec: dict[str, Any], base: Path) -> dict[str, Any]:
    """Plain relative paths (not s3://, not file://, not absolute) become absolute from base."""
    for path in _PATH_FIELDS:
        node: Any = spec
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(path[-1]), str):
            continue
        value = node[path[-1]]
        if "://" not in value and not Path(value).is_absolute():
            node[path[-1]] = str((base / value).resolve())
    return spec


# Command-line flags that override a spec field, for messages about their values.
_FLAGS = {"spec.output.destination": "--output", "spec.training.maxSteps": "--max-steps"}


def build_config(
    job: api.FineTuneJob, manifest: Path, *, output: str | None, max_steps: int | None
) -> api.TrainerConfig:
    """The trainer config of a manifest and the command's overrides; UserError naming the flag
    when an override is invalid."""
    from pydantic import ValidationError

    spec = resolve_paths(job.spec.to_api(), manifest.resolve().parent)
    if output is not None:
        # A URI (s3://, file://) stays as given; a plain path is relative to the shell's cwd.
        local = "://" not in output
        spec["output"]["destination"] = (
            str(Path(output).expanduser().resolve()) if local else output
        )
    if max_steps is not None:
        spec["training"]["maxSteps"] = max_steps
    try:
        validated = api.FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        lines = api.format_errors(exc, ("spec",))
        for field, flag in _FLAGS.items():
            lines = [f"{flag} ({line})" if line.startswith(field + ":") else line for line in lines]
        raise UserError("; ".join(lines)) from None
    return api.TrainerConfig(
        name=job.metadata.name, namespace=job.metadata.namespace or "default", spec=validated
    )


class Bar:
    """tqdm progress on `stream`: the training steps (loss, and the latest eval loss, kept
    between evaluations), then one bar per evaluated model. Log lines go through write(), so
    they print above the bar instead of glued onto it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None
        self.eval_loss: float | None = None
        self.evaluating: str | None = None  # the model the evaluation bar follows

    def _open(self, **kwargs: Any) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(file=self.stream, dynamic_ncols=True, **kwargs)

    def __call__(self, entry: dict[str, Any]) -> None:
        if self.bar is None or self.evaluating is not None:
            self._open(total=entry["totalSteps"], initial=entry["step"] - 1, unit="step")
        if "evalLoss" in entry:
            self.eval_loss = entry["evalLoss"]
        postfix = {"loss": f"{entry['loss']:.4f}"}
        if self.eval_loss is not None:
            postfix["eval"] = f"{self.eval_loss:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if entry["step"] >= entry["totalSteps"]:
            self.close()  # evaluation and export follow; their lines go below the bar

    def evaluation(self, label: str, done: int, total: int) -> None:
        if self.evaluating != label:
            self._open(total=total, desc=f"evaluate {label}", unit="row")
            self.evaluating = label
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def write(self, line: str, file: TextIO) -> None:
        if self.bar is None:
            print(line, file=file, flush=True)
        else:
            self.bar.write(line, file=file)
            file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.evaluating = None


def summary(result: Result) -> str:
    from .evaluate import format_table

    status = result.status
    lines = [
        "",
        "test split: base vs tuned",
        format_table(status.metrics or api.Metrics(), status.gates, result.notes),
        "artifacts:",
    ]
    for name, uri in (status.artifacts.to_api() if status.artifacts else {}).items():
        lines.append(f"  {name:<11} {uri}")
    if result.report.get("quantization"):
        from .quantize import format_table as quantization_table

        lines += ["quantized exports: test split, vs the merged model"]
        lines.append(quantization_table(result.report["quantization"]))
    lines += promotion.summary_lines(status.promotion)
    return "\n".join(lines)


def run_manifest(
    path: str,
    *,
    output: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    metrics_port: int = 0,
    stream: TextIO | None = None,
) -> int:
    out = stream or sys.stdout
    loaded = manifests.load_file(path)
    if loaded.problems:
        for line in loaded.problems:
            print(f"error: {line}", file=sys.stderr)
        return api.EXIT_USER_ERROR
    if len(loaded.jobs) != 1:
        print(f"error: {path}: expected one FineTuneJob, found {len(loaded.jobs)}", file=sys.stderr)
        return api.EXIT_USER_ERROR
    try:
        config = build_config(loaded.jobs[0], Path(path), output=output, max_steps=max_steps)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if config.spec.staging is not None:
        from .staging import missing_loader, vllm_venv

        try:
            venv = vllm_venv()  # before training: a missing engine must fail in seconds
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        why = missing_loader(venv, config.spec.staging.artifact)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return api.EXIT_USER_ERROR
    bar = Bar(sys.stderr)
    options = Options(
        base_dir=Path(path).resolve().parent,
        metrics_port=metrics_port,
        termination_log=None,
        progress=bar if progress else None,
        evaluation_progress=bar.evaluation if progress else None,
        log=lambda line: bar.write(line, out),
    )
    results: list[Result] = []

    def job() -> Result:
        try:
            result = run(config, options)
        except RegistrationFailed as exc:  # trained and committed: the table still shows it
            results.append(Result(exc.status, {}, []))
            raise
        finally:
            bar.close()
        results.append(result)
        return result

    code = run_and_report(job, options)
    if results:
        print(summary(results[0]), file=out, flush=True)
    if code == api.EXIT_OK and results and config.spec.staging is not None:
        return stage(config, results[0], options, out)
    return code


def stage(config: api.TrainerConfig, result: Result, options: Options, out: TextIO) -> int:
    """spec.staging on this machine: vLLM (CPU) + guidellm, then the staging table. A staging
    failure is one error line and exit 11; the trained artifacts stay where they are."""
    from kubetune import staging as st

    from .errors import TrainerError
    from .staging import run_local

    artifacts = result.status.artifacts or api.Artifacts()
    try:
        staged = run_local(
            config,
            artifacts,
            quantized=list(result.status.quantized),
            base_dir=options.base_dir,
            log=options.log,
        )
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        print("training succeeded; its artifacts are listed above", file=sys.stderr, flush=True)
        return exc.exit_code
    print("", file=out)
    print(
        f"staging: {config.spec.staging.artifact if config.spec.staging else ''} on vLLM "
        f"(CPU), load {_profile(config)}",
        file=out,
    )
    print(st.table(staged.levels, staged.gates), file=out, flush=True)
    return promote_after_staging(config, result.status, staged, out)


def promote_after_staging(
    config: api.TrainerConfig, status: api.FineTuneJobStatus, staged: api.StagingStatus, out: TextIO
) -> int:
    """promotion.after_staging; with a registry, alias production moves to the version the
    promote stage registered (this process holds the registry credentials)."""
    import os
    from datetime import UTC, datetime

    from kubetune import registry
    from kubetune import status as st_status

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    done, move = promotion.after_staging(config.spec, status, st_status.staging_gates(staged), now)
    mlflow = config.spec.output.registry.mlflow if config.spec.output.registry else None
    if move and mlflow is not None and done.registry is not None and done.registry.version:
        client = registry.Client(
            mlflow.trackingUri, registry.Credentials.from_env(os.environ), mlflow.timeoutSeconds
        )
        try:
            client.set_alias(mlflow.model, "production", done.registry.version)
        except registry.RegistryError as exc:
            print(f"error: output.registry.mlflow: {exc}", file=sys.stderr, flush=True)
            return api.EXIT_INFRA_ERROR if exc.transient else api.EXIT_USER_ERROR
    for line in promotion.summary_lines(done):
        print(line, file=out)
    return api.EXIT_OK


def _profile(config: api.TrainerConfig) -> str:
    assert config.spec.staging is not None
    load = config.spec.staging.load
    what = (
        f"concurrency {','.join(map(str, load.concurrency or []))}"
        if load.type == "concurrency"
        else f"{load.type} {load.rate:g} req/s"
    )
    return f"{what}, {load.durationSeconds}s per level, prompts from the test split"
