"""kopf handlers: glue between the API server, render.py and status.py.

- create/resume: validate, create the children (409 = already there), first status;
- update of spec: suspend/resume the Job; any other change is ignored with a condition;
- timer (per job, while not finished): Job + pods (from watch-fed indexes, no polling of the
  API) + the trainer's /metrics -> st.compute -> one status patch when something changed;
- staging timer (spec.staging, after training succeeded): engine + load Job -> staging.step
  -> status.staging, conditions Staged and GatesPassed; the engine is torn down afterwards;
  when staging promotes a registered version it creates the promote Job;
- promote timer (status.promotion Promoting): the promote Job + its pods -> status.promotion
  (Promoted, or Failed with the pod's termination message) and condition Promoted;
- delete: children go by owner reference; the operator only forgets the job's metrics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from kubetune import (
    api,
    k8s,
    metrics,
    model_headers,
    plan,
    promotion,
    render,
    staging,
    sweep_api,
    sweep_handlers,
)
from kubetune import status as st
from kubetune.policy import license_problem
from kubetune.registry import PRODUCTION
from kubetune.settings import Settings

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
log = logging.getLogger(__name__)
# kopf's own fields in status: kopf writes them, the handlers' status patches never do.
_KOPF_FIELDS = {"lastHandledConfiguration", "handlerProgress"}
_STATUS_FIELDS = set(api.FineTuneJobStatus.model_fields) - _KOPF_FIELDS


def _now() -> datetime:
    return datetime.now(UTC)


def _created(meta: Mapping[str, Any]) -> datetime | None:
    stamp = meta.get("creationTimestamp")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


def _stored_status(raw: Mapping[str, Any]) -> api.FineTuneJobStatus:
    """The status as stored, without kopf's fields; unknown keys (another tool's) are
    ignored, not fatal."""
    known = {k: v for k, v in raw.items() if k in _STATUS_FIELDS}
    try:
        return api.FineTuneJobStatus.model_validate(known)
    except ValidationError:
        return api.FineTuneJobStatus()


def _parse(body: Mapping[str, Any]) -> api.FineTuneJob:
    meta = body.get("metadata", {})
    return api.parse_job(
        {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": body.get("spec", {}),
        }
    )


def _policy_errors(job: api.FineTuneJob, policy: api.Policy) -> list[str]:
    """The trainer's own license gate (kubetune.policy), run before any pod is scheduled: a
    dataset the platform does not allow fails at once instead of after a GPU was found and the
    image pulled."""
    problem = license_problem(job.spec.dataset.license, policy)
    return [problem] if problem else []


def _write(patch: kopf.Patch, old: api.FineTuneJobStatus, new: api.FineTuneJobStatus) -> None:
    changes = st.patch_for(old, new, now=_now(), min_progress_interval=0)
    if changes:
        patch.setdefault("status", {}).update(changes)


def _announce(body: kopf.Body, old: api.FineTuneJobStatus, new: api.FineTuneJobStatus) -> None:
    for event in st.transitions(old, new):
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _snapshot(body: kopf.Body, *, job: bool = False) -> dict[str, Any]:
    """A plain copy of a child for the index (its values outlive the event), without what the
    status never reads: managedFields and a Job's pod template, most of each object's size,
    held once per child (1000 jobs: two children each)."""
    kept = {k: copy.deepcopy(dict(body.get(k) or {})) for k in ("metadata", "spec", "status")}
    kept["metadata"].pop("managedFields", None)
    if job:
        kept["spec"].pop("template", None)
    return kept


class StatusDiffBase(kopf.MultiDiffBaseStorage):
    """kopf's diff base (the spec it last handled) in ``status.lastHandledConfiguration``,
    written with the handler's own status patch: one request instead of a status patch and
    an annotations patch. Also read from the annotation where an older operator kept it (so
    that after an upgrade no object looks new); written only to status."""

    def __init__(self) -> None:
        self.status = kopf.StatusDiffBaseStorage(field="status.lastHandledConfiguration")
        legacy = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP, key="last-handled-configuration")
        super().__init__([self.status, legacy])

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.status.store(body=body, patch=patch, essence=essence)


class ChildRefused(Exception):
    """The API server refused a child object itself: the job cannot run as specified."""


class Operator:
    """The handlers with their settings and API client; `register` wires them into kopf."""

    def __init__(self, config: Settings, client: k8s.Client | None = None) -> None:
        self.config = config
        self.client = client or k8s.Client()
        self.policy = api.Policy(allowedLicenses=config.allowed_licenses)
        self._scraper: aiohttp.ClientSession | None = None

    def problems(self, job: api.FineTuneJob) -> list[str]:
        """What would fail after the schema passed it: the license policy, and children the
        API server would refuse (a ConfigMap over 1 MiB would be retried forever)."""
        return _policy_errors(job, self.policy) + render.size_problems(
            job, default_image=self.config.trainer_image, policy=self.policy
        )

    async def plan(self, job: api.FineTuneJob) -> tuple[api.JobPlan | None, str | None]:
        """status.plan and the DoesNotFit reason, when planning is on and the model's headers
        can be read (S3, the operator's identity); (None, None) otherwise: the job goes on."""
        source = job.spec.model.source
        if not self.config.plan_models or not source.startswith("s3://"):
            return None, None
        try:
            config, tensors = await asyncio.to_thread(
                model_headers.read_s3_model, source, job.spec.storage.s3
            )
            return plan.job_plan(config, tensors, job.spec)
        except (model_headers.Unreadable, KeyError, ValueError) as error:
            log.info("no plan for %s: %s", job.metadata.name, error)
            return None, None

    async def ensure_children(self, job: api.FineTuneJob, uid: str) -> render.Children | None:
        """Create the children that are missing; None when the namespace is being deleted (the
        job goes with it: nothing to retry, nothing worth an error). :class:`ChildRefused` when
        the API server refuses a child itself (400/422, e.g. a limit our validation does not
        know): retrying the same object cannot help."""
        children = render.render(
            job, uid=uid, default_image=self.config.trainer_image, policy=self.policy
        )
        for obj in children.all():
            try:
                await self.client.create(obj)
            except k8s.ApiError as error:
                if error.namespace_terminating:
                    log.info("namespace being deleted: %s", error)
                    return None
                if error.invalid:
                    raise ChildRefused(
                        f"the API server refused {obj['kind']} {obj['metadata']['name']}: "
                        f"{error.message}"
                    ) from error
                raise kopf.TemporaryError(
                    f"cannot create {obj['kind']}: {error}", delay=10
                ) from error
        return children

    async def reconcile(
        self,
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        uid: str,
        name: str,
        namespace: str | None,
        **indexes: Any,
    ) -> None:
        """create and resume: validate, create children if missing, first status."""
        namespace, generation = namespace or "default", meta.get("generation")
        now, old = _now(), _stored_status(status)
        with metrics.reconcile_timer("create"):
            known = (namespace, name) in indexes["trainer_jobs"]
            if old.phase in st.TERMINAL or (old.jobName and known):
                # Operator restart: nothing to create; the timer carries the status on.
                metrics.job_state(namespace, name, old.phase, old.progress, _created(meta), now)
                return
            planned, refusal = None, None
            try:
                job = _parse(body)
                problems = self.problems(job)
            except ValidationError as error:
                problems = api.format_errors(error)
            if not problems:
                planned, refusal = await self.plan(job)
            if problems:
                new = st.invalid(problems, generation=generation, now=now)
            elif refusal is not None and planned is not None:
                new = st.does_not_fit(refusal, planned, generation=generation, now=now)
            else:
                try:
                    children = await self.ensure_children(job, uid)
                except ChildRefused as error:
                    new = st.invalid([str(error)], generation=generation, now=now)
                else:
                    if children is None:
                        return
                    created = st.created(
                        old,
                        job_name=children.job["metadata"]["name"],
                        suspended=job.spec.suspend,
                        generation=generation,
                        now=now,
                    )
                    # What the timer will compute from the new Job, so that its first tick has
                    # nothing to write (one status write fewer per job).
                    new = st.compute(
                        previous=created.model_copy(update={"plan": planned}),
                        generation=generation,
                        spec=job.spec,
                        job=children.job,
                        pods=[],
                        live=None,
                        now=now,
                    )
            _write(patch, old, new)
            if new.phase == "Failed":
                reason = st.DOES_NOT_FIT if refusal else st.SPEC_INVALID
                kopf.warn(body, reason=reason, message=new.message or "")
            elif old.phase is None:
                kopf.info(body, reason=st.JOB_CREATED, message=new.message or "")
            metrics.job_state(namespace, name, new.phase, None, _created(meta), now)

    async def spec_changed(
        self,
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        diff: kopf.Diff,
        new: Any,
        namespace: str | None,
        **_: Any,
    ) -> None:
        """spec.suspend toggles the Job; other changes are refused by the CRD (CEL) on a real
        API server, and ignored here with a condition saying so."""
        with metrics.reconcile_timer("update"):
            old, generation = _stored_status(status), meta.get("generation")
            changed = {".".join(str(p) for p in item[1]) or "spec" for item in diff}
            if "suspend" in changed and old.jobName and old.phase not in st.TERMINAL:
                suspend = bool((new or {}).get("suspend"))
                await self.client.set_job_suspended(namespace or "default", old.jobName, suspend)
                kopf.info(
                    body,
                    reason=st.JOB_SUSPENDED if suspend else st.JOB_RESUMED,
                    message="Job suspended" if suspend else "Job resumed",
                )
            ignored = {f"spec.{field}" for field in changed - {"suspend"}}
            updated = old.model_copy(update={"observedGeneration": generation})
            if ignored:
                updated = st.spec_change_ignored(
                    updated, ignored, generation=generation, now=_now()
                )
                kopf.warn(body, reason=st.SPEC_IMMUTABLE, message=updated.message or "")
            _write(patch, old, updated)

    async def refresh(
        self,
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        uid: str,
        name: str,
        namespace: str | None,
        **indexes: Any,
    ) -> None:
        """The per-job timer: recompute the status from the indexes and the trainer's /metrics."""
        namespace = namespace or "default"
        trainer_jobs: kopf.Index[Any, Any] = indexes["trainer_jobs"]
        trainer_pods: kopf.Index[Any, Any] = indexes["trainer_pods"]
        with metrics.reconcile_timer("refresh"):
            try:
                job = _parse(body)
            except ValidationError:
                return  # reconcile() already marked it Failed
            key = (namespace, name)
            found = list(trainer_jobs.get(key, []))
            pods = list(trainer_pods.get(key, []))
            now, old = _now(), _stored_status(status)
            facts = st.pod_facts(pods)
            live = None
            if facts.running and facts.pod_ip:
                text = await k8s.fetch_metrics(self.scraper(), facts.pod_ip, facts.metrics_port)
                live = st.parse_trainer_metrics(text, now=now) if text else None
            current = found[0] if found else await self.client.get_job(namespace, old.jobName or "")
            if current is None:
                if meta.get("deletionTimestamp"):
                    return  # going away (e.g. with its namespace): nothing to make again
                # Deleted by someone: make it again (the trainer resumes); None: its namespace
                # is being deleted.
                try:
                    if await self.ensure_children(job, uid) is None:
                        return
                except ChildRefused as error:  # accepted once, refused now: the server changed
                    raise kopf.TemporaryError(str(error), delay=60) from error
            new = st.compute(
                previous=old,
                generation=meta.get("generation"),
                spec=job.spec,
                job=current,
                pods=pods,
                live=live,
                now=now,
            )
            changes = st.patch_for(
                old, new, now=now, min_progress_interval=self.config.progress_min_interval
            )
            if changes:
                patch.setdefault("status", {}).update(changes)
                _announce(body, old, new)
            metrics.job_state(namespace, name, new.phase, new.progress, _created(meta), now)

    async def engine_kind(self) -> staging.Kind:
        """Deployment + Service, or a KServe InferenceService where its CRD is served. Asked
        by API discovery (no RBAC needed) when a job's staging starts, not once per process: a
        KServe installed (or removed) while the operator runs is seen by the next job."""
        choice = self.config.staging_engine
        if choice == "deployment":
            return "Deployment"
        if choice == "inferenceservice":
            return "InferenceService"
        group = f"{staging.KSERVE_GROUP}/{staging.KSERVE_VERSION}"
        served = await self.client.serves(group, "inferenceservices")
        return "InferenceService" if served else "Deployment"

    async def stage(
        self,
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        uid: str,
        name: str,
        namespace: str | None,
        **indexes: Any,
    ) -> None:
        """spec.staging after training: one step of staging.step per tick."""
        namespace = namespace or "default"
        try:
            job = _parse(body)
        except ValidationError:
            return
        now, old = _now(), _stored_status(status)
        spec = job.spec
        assert spec.staging is not None
        try:
            kind = old.staging.kind if old.staging else await self.engine_kind()
            engine_version = "apps/v1" if kind == "Deployment" else "serving.kserve.io/v1beta1"
            child = staging.server_name(name)
            engine = await self.client.get(engine_version, kind, namespace, child)
            load_name = staging.load_job_name(name)
            load_job = await self.client.get("batch/v1", "Job", namespace, load_name)
        except k8s.ApiError as error:
            raise kopf.TemporaryError(f"staging: {error}", delay=10) from error
        pods = list(indexes["trainer_pods"].get((namespace, name), []))
        problem = staging.engine_problem(staging.engine_pods(pods))
        if kind == "InferenceService":
            said = staging.inference_service_problem(engine)
            problem = "\n".join(p for p in (said, problem) if p)
        if staging.deploy_timed_out(spec, old.staging, now):
            for pod in staging.engine_pods(pods)[:1]:
                tail = await self.client.pod_log(
                    namespace,
                    pod["metadata"]["name"],
                    staging.engine_container(kind),
                    staging.LOG_TAIL_LINES,
                )
                if tail.strip():
                    problem = f"{problem}\nlog tail:\n{tail.strip()}".strip()
        served, missing = staging.artifact_source(spec, old.artifacts, old.quantized)
        result = staging.step(
            spec,
            old.staging,
            staging.Seen(
                engine_exists=engine is not None,
                ready_replicas=staging.ready_replicas(engine, kind),
                engine_problem=problem,
                load_job=load_job,
                load_pods=staging.load_pods(pods),
            ),
            name=name,
            kind=kind,
            now=now,
            problem=missing
            or (staging.kserve_name_problem(name) if kind == "InferenceService" else None),
        )
        image = spec.resources.image or self.config.trainer_image
        try:
            if result.create_engine and served is not None:
                engine_image = spec.staging.image or (
                    self.config.vllm_image if spec.staging.gpus else self.config.vllm_cpu_image
                )
                for obj in staging.render_engine(
                    job, served, kind=kind, uid=uid, engine_image=engine_image, trainer_image=image
                ):
                    if refusal := await self._create_or_refusal(obj):
                        result = staging.refused(result.status, refusal, now=now)
                        break
            if result.create_load:
                artifacts = old.artifacts or api.Artifacts()
                target = staging.engine_target(engine, kind, name, namespace)
                tokenizer = artifacts.tokenizer or spec.model.source
                load = staging.render_load_job(
                    job, target=target, tokenizer=tokenizer, uid=uid, trainer_image=image
                )
                if refusal := await self._create_or_refusal(load):
                    result = staging.refused(result.status, refusal, now=now)
            if result.tear_down:
                await self.client.delete(engine_version, kind, namespace, child)
                if kind == "Deployment":
                    await self.client.delete("v1", "Service", namespace, child)
        except k8s.ApiError as error:
            raise kopf.TemporaryError(f"staging: {error}", delay=10) from error
        new = st.with_staging(
            old, result.status, spec=spec, generation=meta.get("generation"), now=now
        )
        if promotion.moves_production(old.promotion, new.promotion):
            assert new.promotion is not None and new.promotion.registry is not None
            version = str(new.promotion.registry.version)
            mover = render.promote_job(
                job, uid=uid, default_image=image, version=version, alias=PRODUCTION
            )
            if mover is not None:
                try:
                    await self.client.create(mover)
                except k8s.ApiError as error:
                    raise kopf.TemporaryError(f"promotion: {error}", delay=10) from error
                new = st.promoting(
                    new, mover["metadata"]["name"], generation=meta.get("generation"), now=now
                )
        changes = st.patch_for(old, new, now=now, min_progress_interval=0)
        if changes:
            patch.setdefault("status", {}).update(changes)
            _announce(body, old, new)
            if old.staging is None or old.staging.phase != result.status.phase:
                warn = result.status.phase == "Failed"
                (kopf.warn if warn else kopf.info)(
                    body,
                    reason=st.condition(new, st.STAGED).reason,  # type: ignore[union-attr]
                    message=result.status.message or result.status.phase,
                )

    async def promote(
        self,
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        name: str,
        namespace: str | None,
        **indexes: Any,
    ) -> None:
        """While status.promotion is Promoting: follow the promote Job (watch-fed indexes; a
        GET only when the index has not seen it) into status.promotion and condition
        Promoted."""
        namespace = namespace or "default"
        key = (namespace, name)
        found = list(indexes["promote_jobs"].get(key, []))
        pods = list(indexes["promote_pods"].get(key, []))
        try:
            job = (
                found[0]
                if found
                else await self.client.get(
                    "batch/v1", "Job", namespace, render.promote_job_name(name)
                )
            )
        except k8s.ApiError as error:
            raise kopf.TemporaryError(f"promotion: {error}", delay=10) from error
        now, old = _now(), _stored_status(status)
        new = st.with_promote_job(old, job, pods, generation=meta.get("generation"), now=now)
        _write(patch, old, new)
        _announce(body, old, new)

    async def _create_or_refusal(self, obj: dict[str, Any]) -> str | None:
        """Create a staging object; the API server's reason when it refuses the object itself
        (400/422: retrying the same object cannot help). Other errors raise."""
        try:
            await self.client.create(obj)
        except k8s.ApiError as error:
            if not error.invalid:
                raise
            return f"{obj['kind']} {obj['metadata']['name']}: {error}"
        return None

    def scraper(self) -> aiohttp.ClientSession:
        if self._scraper is None or self._scraper.closed:
            # The trainer's server closes each connection: none to keep, at most a few open.
            self._scraper = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=k8s.CLIENT_CONNECTIONS, force_close=True)
            )
        return self._scraper

    async def close(self) -> None:
        await self.client.close()
        if self._scraper is not None:
            await self._scraper.close()


def _not_finished(status: kopf.Status, **_: Any) -> bool:
    return bool(status.get("jobName")) and status.get("phase") not in st.TERMINAL


def _staging_due(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    if not spec.get("staging") or status.get("phase") != "Succeeded":
        return False
    return (status.get("staging") or {}).get("phase") not in api.STAGING_TERMINAL


def _promoting(status: kopf.Status, **_: Any) -> bool:
    return (status.get("promotion") or {}).get("state") == "Promoting"


def _index_by(label: str, *, job: bool) -> Callable[..., Awaitable[Any]]:
    """A kopf index handler: the object's snapshot under (namespace, its ``label`` value)."""

    async def index(
        *, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
    ) -> Any:
        return {(namespace, labels[label]): _snapshot(body, job=job)}

    return index


def register(
    config: Settings, client: k8s.Client | None = None, namespace: str = ""
) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator; ``namespace``: the one it watches
    (empty: all)."""
    registry = kopf.OperatorRegistry()
    op = Operator(config, client)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{api.GROUP}/finalizer"
        # kopf's bookkeeping in status, where the handlers' own status patch carries it: kopf
        # writes no annotations (they cost a second request per reconcile, and the event in
        # between looked like a new object when the status half came late).
        settings.persistence.progress_storage = kopf.StatusProgressStorage(
            field="status.handlerProgress", touch_field="status.handlerProgress.touch"
        )
        settings.persistence.diffbase_storage = StatusDiffBase()
        settings.peering.standalone = True  # one replica; no peering CRDs to install
        # No CRD scanning unless granted: the chart's RBAC has no list/watch on CRDs by default.
        settings.scanning.disabled = not config.watch_crds
        settings.posting.enabled = True  # kopf.event() -> Kubernetes Events
        settings.posting.level = logging.INFO
        # Only our own Events (kopf.info/warn: JobCreated, TrainerRunning, ...), not one per
        # kopf log line ("Handler 'reconcile' succeeded."): fewer writes per job, and none
        # retried into a namespace being deleted.
        settings.posting.loggers = False
        settings.posting.reporting_component = "kubetune-operator"
        # Only our children, filtered by the API server rather than in memory.
        settings.watching.label_selectors["batch", "v1", "jobs"] = render.CHILD_SELECTOR
        settings.watching.label_selectors["v1", "pods"] = render.CHILD_SELECTOR
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        metrics.start_server(config.metrics_port)
        # Our CRDs may have been established a moment ago: wait until the API server serves
        # them, so that kopf's first list does not log 429 retries as errors.
        base = f"/apis/{api.GROUP}/{api.VERSION}"
        scope = f"{base}/namespaces/{namespace}" if namespace else base
        await op.client.wait_served([f"{scope}/{api.PLURAL}", f"{scope}/{sweep_api.PLURAL}"])

    # A custom registry does not get kopf's default login; the API client logs in the same way
    # (kopf's session gets a bounded connection pool).
    kopf.on.login(registry=registry)(k8s.kopf_login)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await op.close()

    # Watch-fed copies of our children, keyed (namespace, owning FineTuneJob's name) by label:
    # the trainer Job and its pods, the promote Job and its pods.
    for label, prefix in ((render.LABEL_JOB, "trainer"), (render.LABEL_PROMOTE, "promote")):
        kopf.index(
            "batch",
            "v1",
            "jobs",
            id=f"{prefix}_jobs",
            labels={label: kopf.PRESENT},
            registry=registry,
        )(_index_by(label, job=True))
        kopf.index(
            "v1", "pods", id=f"{prefix}_pods", labels={label: kopf.PRESENT}, registry=registry
        )(_index_by(label, job=False))

    kopf.on.create(*RESOURCE, id="reconcile", registry=registry)(op.reconcile)
    kopf.on.resume(*RESOURCE, id="reconcile", registry=registry)(op.reconcile)
    kopf.on.update(*RESOURCE, id="spec", field="spec", registry=registry)(op.spec_changed)
    kopf.timer(
        *RESOURCE,
        id="refresh",
        interval=config.progress_interval,
        when=_not_finished,
        registry=registry,
    )(op.refresh)

    kopf.timer(
        *RESOURCE,
        id="stage",
        interval=config.progress_interval,
        when=_staging_due,
        registry=registry,
    )(op.stage)

    kopf.timer(
        *RESOURCE,
        id="promote",
        interval=config.progress_interval,
        when=_promoting,
        registry=registry,
    )(op.promote)

    sweep_handlers.register(registry, op.client, config.progress_interval)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def deleted(*, namespace: str | None, name: str, **_: Any) -> None:
        # Children (ConfigMap, Job, pods, Service) go by owner reference; artifacts stay.
        metrics.job_deleted(namespace or "default", name)

    return registry


class _QuietTimer(logging.Filter):
    """Drop kopf's "Timer 'refresh' succeeded." line: one per job per tick is noise (500 jobs
    at 10 s = 50 lines/s); failures and everything else still get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.getMessage() in _TIMER_OK)


_TIMER_OK = (
    "Timer 'refresh' succeeded.",
    "Timer 'stage' succeeded.",
    "Timer 'promote' succeeded.",
)


def run(config: Settings, namespace: str | None = None) -> int:
    """`kubetune operator`: run until interrupted."""
    kopf.configure(
        verbose=False,
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietTimer())
    watch = config.namespace if namespace is None else namespace
    kopf.run(
        registry=register(config, namespace=watch),
        standalone=True,
        clusterwide=not watch,
        namespaces=[watch] if watch else (),
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )
    return 0
