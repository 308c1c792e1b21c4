"""Operator Prometheus metrics (served on the operator's metrics port, default 8080).

Handlers call the module-level functions (`job_state`, `job_deleted`, `reconcile_timer`,
`api_error`, `start_server`); they write to one process-wide `OperatorMetrics`. Tests build
their own `OperatorMetrics` so that every test starts from zero.

Cardinality is bounded on purpose:
- `kubetune_finetunejobs{phase}` and `..._phase_transitions_total{from,to}` only take the five
  phases as label values (pre-created at 0, so `increase()` sees the first transition);
- per-job series (`{namespace,name}`) exist only while a job is live: progress gauges while it
  is Running, `pending_since` while it is Pending; they go when it finishes or is deleted;
- histograms have no per-job labels;
- per-sweep series (`{namespace,name}`: trials by phase, the best objective) exist while the
  sweep exists, finished or not (a sweep's result is what a dashboard shows; sweeps are few and
  each has a bounded number of trials); they go when it is deleted.

A dedicated registry (not prometheus_client's global one) holds these plus the process,
platform and GC collectors, so nothing is registered twice when the module is imported by
tests, and `exposition()` returns exactly what the operator serves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from kubetune import __version__, api

PHASES: Final = api.PHASES
SWEEP_PHASES: Final = ("Pending", "Running", "Succeeded", "Failed")
TRIAL_PHASES: Final = ("Pending", "Running", "Succeeded", "Failed", "Pruned")
TERMINAL: Final = frozenset({"Succeeded", "Failed"})

# Time to Running is queueing + image pull + scheduling: seconds to hours (Kueue can hold a job).
TIME_TO_RUNNING_BUCKETS: Final = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
# Time to completion is a whole fine-tuning run: minutes (CI, demos) to days.
TIME_TO_COMPLETION_BUCKETS: Final = (
    60,
    300,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    24 * 3600,
    3 * 24 * 3600,
    7 * 24 * 3600,
)
RECONCILE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# A label value we did not choose (API error reasons) is cut, so a long message cannot
# become a new series each time.
MAX_LABEL_LENGTH: Final = 64

# Every metric name this module exports (tests and the chart's PromQL check use it).
OPERATOR_METRICS: Final = (
    "kubetune_operator_info",
    "kubetune_finetunejobs",
    "kubetune_finetunejob_phase_transitions_total",
    "kubetune_finetunejob_time_to_running_seconds",
    "kubetune_finetunejob_time_to_completion_seconds",
    "kubetune_finetunejob_pending_since_timestamp_seconds",
    "kubetune_finetunejob_step",
    "kubetune_finetunejob_total_steps",
    "kubetune_finetunejob_loss",
    "kubetune_finetunejob_eval_loss",
    "kubetune_finetunejob_tokens_per_second",
    "kubetune_reconcile_duration_seconds",
    "kubetune_reconcile_errors_total",
    "kubetune_api_errors_total",
    "kubetune_finetunesweeps",
    "kubetune_finetunesweep_trials",
    "kubetune_finetunesweep_best_objective",
)

JobKey = tuple[str, str]


def _label(value: str) -> str:
    return value[:MAX_LABEL_LENGTH] if value else "unknown"


class OperatorMetrics:
    """All operator metrics in one registry, plus the little state they need."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.info = Gauge(
            "kubetune_operator_info", "kubetune operator build information.", ["version"],
            registry=r,
        )  # fmt: skip
        self.info.labels(version=__version__).set(1)
        self.jobs = Gauge(
            "kubetune_finetunejobs", "FineTuneJobs known to the operator, by phase.", ["phase"],
            registry=r,
        )  # fmt: skip
        self.transitions = Counter(
            "kubetune_finetunejob_phase_transitions",
            "Phase changes the operator observed (not counted for a job's first sighting).",
            ["from", "to"],
            registry=r,
        )
        self.time_to_running = Histogram(
            "kubetune_finetunejob_time_to_running_seconds",
            "Seconds from a FineTuneJob's creation to its first Running phase.",
            buckets=TIME_TO_RUNNING_BUCKETS,
            registry=r,
        )
        self.time_to_completion = Histogram(
            "kubetune_finetunejob_time_to_completion_seconds",
            "Seconds from a FineTuneJob's creation to Succeeded or Failed.",
            ["phase"],
            buckets=TIME_TO_COMPLETION_BUCKETS,
            registry=r,
        )
        self.pending_since = Gauge(
            "kubetune_finetunejob_pending_since_timestamp_seconds",
            "Unix time a FineTuneJob entered Pending (only while it is Pending).",
            ["namespace", "name"],
            registry=r,
        )
        per_job = ["namespace", "name"]
        self.step = Gauge(
            "kubetune_finetunejob_step", "Optimizer steps done (Running jobs only).", per_job,
            registry=r,
        )  # fmt: skip
        self.total_steps = Gauge(
            "kubetune_finetunejob_total_steps", "Optimizer steps planned (Running jobs only).",
            per_job, registry=r,
        )  # fmt: skip
        self.loss = Gauge(
            "kubetune_finetunejob_loss", "Latest training loss (Running jobs only).", per_job,
            registry=r,
        )  # fmt: skip
        self.eval_loss = Gauge(
            "kubetune_finetunejob_eval_loss", "Latest validation loss (Running jobs only).",
            per_job, registry=r,
        )  # fmt: skip
        self.tokens_per_second = Gauge(
            "kubetune_finetunejob_tokens_per_second",
            "Training throughput in tokens/s (Running jobs only).",
            per_job,
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time spent in an operator handler.",
            ["handler"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors",
            "Operator handler runs that raised (kopf retries them).",
            ["handler"],
            registry=r,
        )
        self.api_errors = Counter(
            "kubetune_api_errors",
            "Kubernetes API calls that failed, by operation and reason.",
            ["operation", "reason"],
            registry=r,
        )
        self.sweeps = Gauge(
            "kubetune_finetunesweeps", "FineTuneSweeps known to the operator, by phase.",
            ["phase"], registry=r,
        )  # fmt: skip
        self.sweep_trials = Gauge(
            "kubetune_finetunesweep_trials",
            "Trials of a FineTuneSweep, by phase (Pending, Running, Succeeded, Failed, Pruned).",
            ["namespace", "name", "phase"],
            registry=r,
        )
        self.sweep_best = Gauge(
            "kubetune_finetunesweep_best_objective",
            "The best objective among a FineTuneSweep's succeeded trials (absent before one).",
            ["namespace", "name", "metric", "direction"],
            registry=r,
        )
        for phase in SWEEP_PHASES:
            self.sweeps.labels(phase=phase).set(0)
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)
            for source in PHASES:
                if source != phase:
                    self.transitions.labels(source, phase)

        self._lock = threading.Lock()
        self._phase: dict[JobKey, str | None] = {}
        self._ran: set[JobKey] = set()  # time to Running observed
        self._finished: set[JobKey] = set()  # time to completion observed
        self._sweep_phase: dict[JobKey, str | None] = {}
        self._sweep_best: dict[JobKey, tuple[str, str]] = {}  # the labels of its best series

    # ----------------------------------------------------------------------------------------

    def job_state(
        self,
        namespace: str,
        name: str,
        phase: str | None,
        progress: api.Progress | None,
        created: datetime | None,
        now: datetime,
    ) -> None:
        """Record what the operator just computed for one job (idempotent; call it often)."""
        key = (namespace, name)
        with self._lock:
            seen = key in self._phase
            previous = self._phase.get(key)
            self._phase[key] = phase
            if phase != previous:
                if previous in PHASES:
                    self.jobs.labels(phase=previous).dec()
                if phase in PHASES:
                    self.jobs.labels(phase=phase).inc()
                # After an operator restart every job is "new" to us: a transition counted then
                # would be made up, and its durations would be since creation, not since now.
                if seen and previous in PHASES and phase in PHASES:
                    self.transitions.labels(previous, phase).inc()
            witnessed = seen and phase != previous
            age = (now - created).total_seconds() if created is not None else None

            if phase == "Running" and key not in self._ran:
                self._ran.add(key)
                if witnessed and age is not None:
                    self.time_to_running.observe(max(age, 0.0))
            if phase in TERMINAL and key not in self._finished:
                self._finished.add(key)
                self._ran.add(key)
                if witnessed and age is not None:
                    self.time_to_completion.labels(phase=phase).observe(max(age, 0.0))

            if phase == "Pending":
                if not (seen and previous == "Pending"):
                    # A job first seen Pending (operator restart) has waited since creation.
                    since = now if seen or created is None else created
                    self.pending_since.labels(namespace, name).set(since.timestamp())
            else:
                self._remove(self.pending_since, key)

            if phase != "Running":
                self._drop_progress(key)
            elif progress is not None:  # None: no news from the trainer, keep the last values
                self._set_progress(key, progress)

    def job_deleted(self, namespace: str, name: str) -> None:
        """Forget a job: its phase count and every per-job series."""
        key = (namespace, name)
        with self._lock:
            previous = self._phase.pop(key, None)
            if previous in PHASES:
                self.jobs.labels(phase=previous).dec()
            self._ran.discard(key)
            self._finished.discard(key)
            self._remove(self.pending_since, key)
            self._drop_progress(key)

    def sweep_state(
        self,
        namespace: str,
        name: str,
        phase: str | None,
        trials: Mapping[str, int],
        best: float | None,
        metric: str,
        direction: str,
    ) -> None:
        """Record one sweep's phase, its trials by phase and its best objective (idempotent)."""
        key = (namespace, name)
        with self._lock:
            previous = self._sweep_phase.get(key)
            self._sweep_phase[key] = phase
            if phase != previous:
                if previous in SWEEP_PHASES:
                    self.sweeps.labels(phase=previous).dec()
                if phase in SWEEP_PHASES:
                    self.sweeps.labels(phase=phase).inc()
            for trial_phase in TRIAL_PHASES:
                self.sweep_trials.labels(namespace, name, trial_phase).set(
                    trials.get(trial_phase, 0)
                )
            labels = (_label(metric), direction)
            old = self._sweep_best.pop(key, None)
            if old is not None and (best is None or old != labels):
                with suppress(KeyError):
                    self.sweep_best.remove(namespace, name, *old)
            if best is not None:
                self.sweep_best.labels(namespace, name, *labels).set(best)
                self._sweep_best[key] = labels

    def sweep_deleted(self, namespace: str, name: str) -> None:
        """Forget a sweep: its phase count and its series."""
        key = (namespace, name)
        with self._lock:
            previous = self._sweep_phase.pop(key, None)
            if previous in SWEEP_PHASES:
                self.sweeps.labels(phase=previous).dec()
            for trial_phase in TRIAL_PHASES:
                with suppress(KeyError):
                    self.sweep_trials.remove(namespace, name, trial_phase)
            old = self._sweep_best.pop(key, None)
            if old is not None:
                with suppress(KeyError):
                    self.sweep_best.remove(namespace, name, *old)

    @contextmanager
    def reconcile_timer(self, handler: str) -> Iterator[None]:
        """Time a handler; an exception that escapes is also counted as a reconcile error."""
        start = time.perf_counter()
        try:
            yield
        except Exception:  # not BaseException: a cancelled handler (shutdown) is no error
            self.reconcile_errors.labels(handler=_label(handler)).inc()
            raise
        finally:
            self.reconcile_duration.labels(handler=_label(handler)).observe(
                time.perf_counter() - start
            )

    def api_error(self, operation: str, reason: str) -> None:
        self.api_errors.labels(operation=_label(operation), reason=_label(reason)).inc()

    def exposition(self) -> bytes:
        """The text the metrics endpoint serves."""
        disable_created_metrics()
        return generate_latest(self.registry)

    def live_jobs(self) -> int:
        """How many jobs have per-job progress series (for tests and debugging)."""
        with self._lock:
            return sum(1 for phase in self._phase.values() if phase == "Running")

    # ----------------------------------------------------------------------------------------

    def _set_progress(self, key: JobKey, progress: api.Progress) -> None:
        for gauge, value in self._progress_values(progress):
            if value is None:
                self._remove(gauge, key)
            else:
                gauge.labels(*key).set(value)

    def _drop_progress(self, key: JobKey) -> None:
        for gauge in self._progress_gauges():
            self._remove(gauge, key)

    def _progress_gauges(self) -> tuple[Gauge, ...]:
        return (self.step, self.total_steps, self.loss, self.eval_loss, self.tokens_per_second)

    def _progress_values(self, p: api.Progress) -> list[tuple[Gauge, float | None]]:
        values = (p.step, p.totalSteps, p.loss, p.evalLoss, p.tokensPerSecond)
        return list(zip(self._progress_gauges(), values, strict=True))

    @staticmethod
    def _remove(gauge: Gauge, key: JobKey) -> None:
        with suppress(KeyError):  # the series did not exist: nothing to drop
            gauge.remove(*key)


# --------------------------------------------------------------------------------------------
# the process-wide instance and the functions handlers call

METRICS = OperatorMetrics()


def job_state(
    namespace: str,
    name: str,
    phase: str | None,
    progress: api.Progress | None,
    created: datetime | None,
    now: datetime,
) -> None:
    METRICS.job_state(namespace, name, phase, progress, created, now)


def job_deleted(namespace: str, name: str) -> None:
    METRICS.job_deleted(namespace, name)


def sweep_state(
    namespace: str,
    name: str,
    phase: str | None,
    trials: Mapping[str, int],
    best: float | None,
    metric: str,
    direction: str,
) -> None:
    METRICS.sweep_state(namespace, name, phase, trials, best, metric, direction)


def sweep_deleted(namespace: str, name: str) -> None:
    METRICS.sweep_deleted(namespace, name)


def reconcile_timer(handler: str) -> AbstractContextManager[None]:
    return METRICS.reconcile_timer(handler)


def api_error(operation: str, reason: str) -> None:
    METRICS.api_error(operation, reason)


def start_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on a background thread (prometheus_client's own HTTP server)."""
    disable_created_metrics()
    start_http_server(port, addr=addr, registry=METRICS.registry)
