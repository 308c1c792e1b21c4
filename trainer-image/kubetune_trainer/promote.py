"""The promote stage: after report.json is committed, record the promotion decision and, with
``output.registry.mlflow``, log the run to MLflow and register the model version.

What goes to MLflow: params (the spec's model, dataset, method and training fields), metrics
(``base.*``, ``tuned.*``, ``delta.*`` from the test split), tags with every artifact URI, and
report.json plus the loss curve as run artifacts (small files, through the server's artifact
proxy). Remote weights are not copied: the model version's ``source`` is the committed artifact
URI in the output location (``s3://...``), so a registry entry never points at a half-uploaded
copy and gigabytes are not stored twice. A local output (``file://``, ``kubetune run``) is copied
into the run's artifacts and that copy registered: a local path means nothing on another
machine, and MLflow refuses local sources outside the run's artifacts. The version gets alias
``staging``; ``production`` follows when the gates pass (promotion.py decides; with staging
configured, the staging step moves it: ``python -m kubetune_trainer.promote`` below, which the
Job from ``render.promote_job`` runs).

A registry failure never loses the training: the artifacts and report.json are already
committed, the report is rewritten with ``promotion.state: Failed`` and the message, and the
stage raises :class:`RegistrationFailed` (exit 11 when the registry was unreachable, 10 when it
refused the request).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from kubetune import api, promotion, registry

from .errors import InfraError, TrainerError, UserError

Log = Callable[[str], None]


class RegistrationFailed(TrainerError):
    """The registry step failed after training was committed; carries the final status so the
    termination message and the local table still show the trained artifacts."""

    def __init__(self, message: str, status: api.FineTuneJobStatus, transient: bool) -> None:
        super().__init__(message)
        self.status = status
        kind: type[TrainerError] = InfraError if transient else UserError
        self.exit_code = kind.exit_code


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def promote(
    config: api.TrainerConfig,
    status: api.FineTuneJobStatus,
    files: Mapping[str, bytes],
    log: Log,
    env: Mapping[str, str],
) -> tuple[api.Promotion, registry.RegistryError | None]:
    """status.promotion for this run, and the registry's error when the registry step failed
    (then the promotion's state is Failed and its message names the URI and the call).
    ``files``: run artifacts to upload (name -> bytes)."""
    spec = config.spec
    state, message = promotion.decide(spec, status.gates)
    now = now_rfc3339()
    decided = promotion.record(
        state=state, message=message, gates=status.gates, artifacts=status.artifacts, now=now
    )
    mlflow = spec.output.registry.mlflow if spec.output.registry else None
    if mlflow is None:
        return decided, None
    source = promotion.promoted_artifact(status.artifacts)
    record = api.RegistryRecord(trackingUri=mlflow.trackingUri, model=mlflow.model, source=source)
    client = registry.Client(
        mlflow.trackingUri, registry.Credentials.from_env(env), mlflow.timeoutSeconds
    )
    try:
        _log_and_register(client, mlflow, config, status, files, state, record, log)
    except registry.RegistryError as exc:
        partial = decided.model_copy(update={"registry": record})
        return promotion.failed(partial, f"output.registry.mlflow: {exc}"), exc
    if source is None:
        message += "; no model artifact to register"
    return (
        promotion.record(
            state=state,
            message=message,
            gates=status.gates,
            artifacts=status.artifacts,
            now=now,
            registry=record,
        ),
        None,
    )


def _log_and_register(
    client: registry.Client,
    mlflow: api.MlflowSpec,
    config: api.TrainerConfig,
    status: api.FineTuneJobStatus,
    files: Mapping[str, bytes],
    state: api.PromotionState,
    record: api.RegistryRecord,
    log: Log,
) -> None:
    """The MLflow calls, in order; ``record`` fills in as they succeed."""
    record.experimentId = client.experiment_id(mlflow.experiment)
    tags = registry.run_tags(config.name, config.namespace, status)
    run = client.create_run(record.experimentId, config.name, tags, registry.now_ms())
    record.runId = run_id = str(run["run_id"])
    client.log_batch(
        run_id,
        registry.run_params(config.spec),
        registry.run_metrics(status.metrics or api.Metrics()),
        registry.now_ms(),
    )
    for name, data in files.items():
        client.upload_artifact(str(run.get("artifact_uri", "")), name, data)
    client.finish_run(run_id, registry.now_ms())
    log(f"  logged run {run_id} to {mlflow.trackingUri} (experiment {mlflow.experiment})")
    if record.source is None:
        return
    local = registry.local_folder(record.source)
    if local is not None:
        # A file:// path means nothing on another machine, and MLflow refuses local sources
        # outside the run's artifacts: copy the artifact into the run and register that copy.
        name = local.name or "model"
        copy = client.upload_folder(str(run.get("artifact_uri", "")), name, local)
        if copy is None:
            raise registry.RegistryError(
                f"MLflow at {mlflow.trackingUri}: {record.source} is a local path and the server "
                "does not proxy artifacts (start it with --serve-artifacts), so it cannot be "
                "registered",
                transient=False,
            )
        record.source = copy
    client.ensure_registered_model(mlflow.model)
    version_tags = {"kubetune.job": tags["kubetune.job"]}
    record.version = client.create_model_version(mlflow.model, record.source, run_id, version_tags)
    client.set_alias(mlflow.model, registry.STAGING, record.version)
    record.aliases = [registry.STAGING]
    if state == "Promoted":
        client.set_alias(mlflow.model, registry.PRODUCTION, record.version)
        record.aliases.append(registry.PRODUCTION)
    aliases = ", ".join(record.aliases)
    log(f"  registered {mlflow.model} version {record.version} (aliases: {aliases})")


def failed_status(
    status: api.FineTuneJobStatus, error: registry.RegistryError
) -> api.FineTuneJobStatus:
    """The run's status when the registry step failed: phase Failed, the trained artifacts and
    metrics kept, a message saying both."""
    summary = (
        f"{status.message or 'training finished'}; artifacts committed; registry step failed: "
        f"output.registry.mlflow: {error}"
    )
    return status.model_copy(update={"phase": "Failed", "message": summary[:3000]})


# ---------------------------------------------------------------------------------------------
# python -m kubetune_trainer.promote: move an alias (what render.promote_job's pod runs)


def move_alias(
    tracking_uri: str, model: str, version: str, alias: str, env: Mapping[str, str], timeout: float
) -> str:
    """Point ``alias`` at ``version`` and read it back; the line to print."""
    client = registry.Client(tracking_uri, registry.Credentials.from_env(env), timeout)
    client.set_alias(model, alias, version)
    found = client.version_by_alias(model, alias)
    if str(found.get("version")) != version:
        raise registry.RegistryError(
            f"MLflow at {tracking_uri}: alias {alias} of {model} reads version "
            f"{found.get('version')} after setting it to {version}",
            transient=True,
        )
    return f"{model}: alias {alias} -> version {version} (source {found.get('source')})"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.promote",
        description="Move an MLflow registry alias to a model version (credentials from env "
        f"{', '.join(registry.CREDENTIAL_ENVS)}).",
    )
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--alias", default=registry.PRODUCTION)
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args(argv)
    try:
        line = move_alias(
            args.tracking_uri, args.model, args.version, args.alias, os.environ, args.timeout
        )
    except registry.RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return api.EXIT_INFRA_ERROR if exc.transient else api.EXIT_USER_ERROR
    print(line, flush=True)
    return api.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
