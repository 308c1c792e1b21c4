"""Operator at scale on the real control plane: N FineTuneJobs at once, with the built-in Job
controller on N plain Jobs as the baseline, in the same run.

    .venv/bin/python benchmarks/operator_scale.py --jobs 1000

What runs: etcd, kube-apiserver and kube-controller-manager (tests/support/controlplane.py), the
real `kubetune operator` as the chart's ServiceAccount (tests/support/cluster.py) with its
default timing (10 s timer, progress patches at most every 10 s), and the process kubelet with
``--no-exec --poll=1``: it binds every pod and reports it Running without starting a process.
All pods get one address, where one real trainer metrics page (kubetune_trainer.report.Telemetry)
serves a step that advances every second, so every job has live progress to report. No trainer
runs: the point is the operator's reconcile, not a thousand trainers.

1. Baseline: N plain Jobs (the pod template the operator renders) created at once by an admin;
   time until every Job has its pod (status.active) and until every pod is Running and ready
   (status.ready); kube-apiserver CPU seconds. Then their namespace is deleted, and gone.
2. Operator: N FineTuneJobs created at once; time until every one has its Job and a status
   (jobName, phase), and until every one says Running; the operator's object writes per job
   until its Running (the API audit log: creates and patches of the FineTuneJob, its status
   and its children; Events counted apart); status patches per job per minute while running
   (over --running-seconds); operator peak RSS (VmHWM); kube-apiserver CPU seconds.

This script watches (no polling); the kubelet's list of its pods every second is in both
phases' API server CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubetune import api, render  # noqa: E402
from tests.support.cluster import FTJ, Session, established  # noqa: E402
from tests.support.kube import ApiStatus, Kube  # noqa: E402

WRITES = ("create", "patch", "update")
BASELINE_NS, BENCH_NS, CREATE_NS = "baseline", "bench", "create-cost"
NO_CEL_GROUP, NO_SCHEMA_GROUP = "nocel.bench.kubetune.io", "noschema.bench.kubetune.io"


def manifest(i: int) -> dict[str, Any]:
    return {
        "apiVersion": FTJ,
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{i:04d}", "namespace": BENCH_NS},
        "spec": {
            "model": {"source": "s3://models/tiny"},
            "dataset": {
                "source": "s3://data/train.jsonl",
                "license": {"name": "CC0-1.0", "usage": "research"},
            },
            "training": {"maxSteps": 1000},
            "output": {"destination": f"s3://out/bench-{i:04d}"},
            "resources": {"gpus": 1},
        },
    }


def plain_job(i: int) -> dict[str, Any]:
    """The Job the operator would render for manifest(i), as a plain Job of nobody's."""
    doc = manifest(i)
    doc["metadata"]["namespace"] = BASELINE_NS
    job = render.render(api.parse_job(doc), uid="0", default_image="kubetune-trainer:test").job
    labels = {"bench": "baseline"}
    job["metadata"] = {"name": job["metadata"]["name"], "namespace": BASELINE_NS, "labels": labels}
    job["spec"]["template"]["metadata"] = {"labels": labels}
    return job


def now_stamp() -> str:
    """Now, as the audit log writes its timestamps (they compare as strings)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_by_process(session: Session) -> dict[str, float]:
    """CPU seconds so far of each control-plane process and of the operator."""
    pids = {name: proc.pid for name, proc in session.plane.procs.items()}
    if session.operator is not None:
        pids["operator"] = session.operator.pid
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_since(before: dict[str, float], session: Session, n: int) -> dict[str, float]:
    """CPU seconds per job of each process since ``before``."""
    after = cpu_by_process(session)
    return {name: round((after[name] - before.get(name, 0.0)) / n, 4) for name in sorted(after)}


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def create_all(kube: Kube, api_version: str, plural: str, ns: str, docs: list[Any]) -> float:
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: kube.create(api_version, plural, ns, d), docs))
    return time.monotonic() - start


def wait_until(
    what: str, probe: Callable[[], bool], timeout: float, check: Callable[[], None]
) -> float | None:
    """Seconds until ``probe`` holds (polled every second), None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        check()
        if probe():
            return time.monotonic() - start
        time.sleep(1.0)
    print(f"timed out after {timeout:.0f}s waiting for {what}", file=sys.stderr)
    return None


class Watcher(threading.Thread):
    """Watches one namespace's objects of a kind (a watch, not polling: polling a thousand
    objects every second would cost the API server more than what is measured); ``marks``
    maps each mark to {name: when first seen (monotonic s, audit timestamp)}."""

    def __init__(
        self, kube: Kube, api_version: str, plural: str, ns: str, rules: dict[str, Any]
    ) -> None:
        super().__init__(daemon=True)
        self.kube, self.api_version, self.plural, self.ns = kube, api_version, plural, ns
        self.rules = rules  # mark -> predicate on the object's status
        self.marks: dict[str, dict[str, tuple[float, str]]] = {m: {} for m in rules}
        # name -> each (phase, message) its status went through, in order
        self.history: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        self.stop = threading.Event()

    def run(self) -> None:
        version = ""
        while not self.stop.is_set():
            try:
                for event in self.kube.watch(
                    self.api_version, self.plural, self.ns, version, timeout=30
                ):
                    obj = event["object"]
                    if event["type"] == "ERROR":  # e.g. 410 Gone: start over
                        version = ""
                        break
                    version = obj["metadata"]["resourceVersion"]
                    status, name = obj.get("status") or {}, obj["metadata"]["name"]
                    seen = (str(status.get("phase")), str(status.get("message")))
                    if status and self.history[name][-1:] != [seen]:
                        self.history[name].append(seen)
                    for mark, holds in self.rules.items():
                        if holds(status):
                            self.marks[mark].setdefault(name, (time.monotonic(), now_stamp()))
            except (OSError, ValueError, ApiStatus):
                time.sleep(1.0)

    def count(self, mark: str) -> int:
        return len(self.marks[mark])

    def last(self, mark: str, start: float) -> float | None:
        times = [t for t, _ in self.marks[mark].values()]
        return max(times) - start if times else None


def baseline(session: Session, kube: Kube, n: int, timeout: float) -> dict[str, Any]:
    pid = session.plane.procs["kube-apiserver"].pid
    kube.create("v1", "namespaces", None, {"metadata": {"name": BASELINE_NS}})
    watcher = Watcher(
        kube,
        "batch/v1",
        "jobs",
        BASELINE_NS,
        {"active": lambda s: bool(s.get("active")), "ready": lambda s: bool(s.get("ready"))},
    )
    watcher.start()
    time.sleep(1.0)
    cpu, processes = cpu_seconds(pid), cpu_by_process(session)
    start = time.monotonic()
    created = create_all(kube, "batch/v1", "jobs", BASELINE_NS, [plain_job(i) for i in range(n)])
    wait_until(
        "every plain Job's pod ready", lambda: watcher.count("ready") == n, timeout, session.check
    )
    cpu, processes = cpu_seconds(pid) - cpu, cpu_since(processes, session, n)
    watcher.stop.set()
    result = {
        "created_all_in_s": round(created, 1),
        "all_have_their_pod_in_s": _round(
            watcher.last("active", start) if watcher.count("active") == n else None
        ),
        "all_running_in_s": _round(
            watcher.last("ready", start) if watcher.count("ready") == n else None
        ),
        "apiserver_cpu_s_per_job": round(cpu / n, 4),
        "cpu_s_per_job_by_process": processes,
    }
    kube.delete("v1", "namespaces", None, BASELINE_NS)  # and wait: a clean start for ours
    wait_until(
        "the baseline namespace gone",
        lambda: kube.get("v1", "namespaces", None, BASELINE_NS) is None,
        timeout,
        session.check,
    )
    return result


def _without_cel(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [_without_cel(v) for v in node]
    return node


def crd_variant(group: str, *, schema: bool) -> dict[str, Any]:
    """Our FineTuneJob CRD under another group, without its CEL rules (``schema``: the same
    structural schema otherwise) or without any schema (every object accepted as it is)."""
    crd = yaml.safe_load((ROOT / "crds" / f"finetunejobs.{api.GROUP}.yaml").read_text())
    crd = _without_cel(crd)
    crd["metadata"] = {"name": f"{api.PLURAL}.{group}"}
    crd["spec"]["group"] = group
    crd["spec"]["names"] = {k: crd["spec"]["names"][k] for k in ("kind", "listKind", "plural")}
    if not schema:
        for version in crd["spec"]["versions"]:
            version["schema"] = {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            }
    return crd


def create_cost(session: Session, kube: Kube, n: int, timeout: float) -> dict[str, Any]:
    """What the API server spends creating one object, with nothing reacting to the creates
    (the operator stopped): n ConfigMaps (the one the operator renders), n FineTuneJobs (our
    CRD: structural schema with defaults, and CEL rules), and n of each of two copies of the
    CRD under other groups, one without the CEL rules, one without any schema."""
    pid = session.plane.procs["kube-apiserver"].pid
    variants = {"no_cel": crd_variant(NO_CEL_GROUP, schema=True)}
    variants["no_schema"] = crd_variant(NO_SCHEMA_GROUP, schema=False)
    for crd in variants.values():
        kube.create("apiextensions.k8s.io/v1", "customresourcedefinitions", None, crd)
    names = [crd["metadata"]["name"] for crd in variants.values()]
    wait_until("the CRD copies Established", lambda: established(kube, names), 60, session.check)
    time.sleep(5.0)  # a CRD established a moment ago answers 429 for a few seconds
    kube.create("v1", "namespaces", None, {"metadata": {"name": CREATE_NS}})
    session.stop_operator()

    def configmap(i: int) -> dict[str, Any]:
        doc = manifest(i)
        doc["metadata"]["namespace"] = CREATE_NS
        job = api.parse_job(doc)
        cm = render.render(job, uid="0", default_image="kubetune-trainer:t").config_map
        cm["metadata"] = {"name": cm["metadata"]["name"], "namespace": CREATE_NS}
        return cm

    def custom(api_version: str) -> Callable[[int], dict[str, Any]]:
        def one(i: int) -> dict[str, Any]:
            doc = manifest(i)
            doc["apiVersion"], doc["metadata"]["namespace"] = api_version, CREATE_NS
            return doc

        return one

    series: dict[str, tuple[str, str, Callable[[int], dict[str, Any]]]] = {
        "configmap": ("v1", "configmaps", configmap),
        "finetunejob": (FTJ, api.PLURAL, custom(FTJ)),
        "finetunejob_without_cel": (
            f"{NO_CEL_GROUP}/{api.VERSION}",
            api.PLURAL,
            custom(f"{NO_CEL_GROUP}/{api.VERSION}"),
        ),
        "finetunejob_without_schema": (
            f"{NO_SCHEMA_GROUP}/{api.VERSION}",
            api.PLURAL,
            custom(f"{NO_SCHEMA_GROUP}/{api.VERSION}"),
        ),
    }
    result: dict[str, Any] = {}
    for what, (api_version, plural, make) in series.items():
        docs = [make(i) for i in range(n)]
        cpu = cpu_seconds(pid)
        wall = create_all(kube, api_version, plural, CREATE_NS, docs)
        cpu = cpu_seconds(pid) - cpu
        result[what] = {
            "created_all_in_s": round(wall, 1),
            "apiserver_cpu_ms_per_object": round(1000 * cpu / n, 1),
        }
    kube.delete("v1", "namespaces", None, CREATE_NS)
    wait_until(
        "the create-cost namespace gone",
        lambda: kube.get("v1", "namespaces", None, CREATE_NS) is None,
        timeout,
        session.check,
    )
    for name in names:
        kube.delete("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
    return result


def _round(value: Any) -> float | None:
    return round(float(value), 1) if value is not None else None


def operator_events(session: Session, since: str) -> list[dict[str, Any]]:
    return [
        e
        for e in session.audit()
        if e["stageTimestamp"] >= since and e.get("objectRef", {}).get("namespace") == BENCH_NS
    ]


def is_write(event: dict[str, Any]) -> bool:
    return event["verb"] in WRITES and event.get("responseStatus", {}).get("code", 500) < 300


def label(event: dict[str, Any]) -> str:
    ref = event["objectRef"]
    return ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def operator(
    session: Session, kube: Kube, n: int, running_seconds: float, timeout: float
) -> dict[str, Any]:
    pid = session.plane.procs["kube-apiserver"].pid
    kube.create("v1", "namespaces", None, {"metadata": {"name": BENCH_NS}})
    names = [f"bench-{i:04d}" for i in range(n)]
    watcher = Watcher(
        kube,
        FTJ,
        "finetunejobs",
        BENCH_NS,
        {
            # jobName is written once the Job is created (the status after the create).
            "reconciled": lambda s: bool(s.get("jobName") and s.get("phase")),
            "running": lambda s: s.get("phase") == "Running",
        },
    )
    watcher.start()
    time.sleep(1.0)
    since = now_stamp()
    cpu, processes = cpu_seconds(pid), cpu_by_process(session)
    start = time.monotonic()
    created = create_all(kube, FTJ, "finetunejobs", BENCH_NS, [manifest(i) for i in range(n)])
    wait_until(
        "every FineTuneJob Running", lambda: watcher.count("running") == n, timeout, session.check
    )
    cpu, processes = cpu_seconds(pid) - cpu, cpu_since(processes, session, n)
    watcher.stop.set()
    jobs = len(kube.list("batch/v1", "jobs", BENCH_NS))
    reconciled_at = watcher.last("reconciled", start) if watcher.count("reconciled") == n else None
    running_at = watcher.last("running", start) if watcher.count("running") == n else None
    # name -> when the watch first showed it Running (audit-log time)
    running_since = {name: stamp for name, (_, stamp) in watcher.marks["running"].items()}
    # Running: a window of status patches (progress every 10 s at most).
    window_start, window = now_stamp(), time.monotonic()
    time.sleep(running_seconds)
    window_end, minutes = now_stamp(), (time.monotonic() - window) / 60
    assert session.operator is not None
    rss = peak_rss(session.operator.pid)

    events = operator_events(session, since)
    owner = {}
    for name in names:
        owner.update({name: name, f"{name}-config": name, f"{name}-trainer": name})
    per_job: collections.Counter[str] = collections.Counter()
    writes_of: dict[str, list[str]] = collections.defaultdict(list)
    by_kind: collections.Counter[str] = collections.Counter()
    event_posts = requests = 0
    for event in events:
        job = owner.get(event["objectRef"].get("name", ""))
        # Received before the watch showed it Running: the write that made it Running too
        # (its response can complete after the watch event went out).
        if job in running_since and event["requestReceivedTimestamp"] <= running_since[job]:
            requests += 1
            if is_write(event) and event["objectRef"]["resource"] != "events":
                per_job[job] += 1
                writes_of[job].append(f"{event['verb']} {label(event)}")
                by_kind[f"{event['verb']} {label(event)}"] += 1
        if is_write(event) and event["objectRef"]["resource"] == "events":
            event_posts += event["stageTimestamp"] < window_start
    patches = sum(
        1
        for e in events
        if is_write(e)
        and label(e) == "finetunejobs/status"
        and window_start <= e["stageTimestamp"] <= window_end
    )
    counts = [per_job[name] for name in names if name in running_since]
    most = max((name for name in names if name in running_since), key=per_job.__getitem__)
    return {
        "created_all_in_s": round(created, 1),
        "all_reconciled_in_s": _round(reconciled_at if jobs == n else None),
        "jobs_created": jobs,
        "all_running_in_s": _round(running_at),
        "apiserver_cpu_s_per_job": round(cpu / n, 4),
        "cpu_s_per_job_by_process": processes,
        "object_writes_per_job_to_its_running": {
            "jobs_measured": len(counts),
            "min": min(counts, default=None),
            "mean": round(sum(counts) / max(len(counts), 1), 2),
            "max": max(counts, default=None),
            "by_kind": {k: round(v / max(len(counts), 1), 2) for k, v in sorted(by_kind.items())},
            "one_with_the_most": {
                "name": most,
                "writes": writes_of[most],
                "statuses_seen": [f"{p}: {m}" for p, m in watcher.history[most]],
            },
        },
        "operator_requests_per_job_to_its_running": round(requests / max(len(counts), 1), 2),
        "events_posted_per_job_to_running": round(event_posts / n, 2),
        "status_patches_per_job_per_minute_running": round(patches / n / minutes, 2),
        "operator_peak_rss_mb": round(rss / 2**20, 1),
        "operator_alive": session.operator.poll() is None,
    }


def dump_profile(pid: int, out: Path, timeout: float = 120.0) -> None:
    """Ask the operator's profiling hook for its stacks (and allocations) now: SIGUSR2."""
    marker = out / "dumped"
    marker.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--running-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--no-create-cost", action="store_true", help="skip the create-cost series (faster)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample the operator's stack into DIR/stacks.txt (benchmarks/profiling)",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="with --profile: also DIR/memory.txt, the operator's live allocations at the end "
        "(slows it and inflates its RSS: not for the timing figures)",
    )
    args = parser.parse_args()

    from kubetune_trainer.report import Telemetry

    # `timeout` or Ctrl-C: still stop every process of the cluster (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = args.jobs
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        session = Session(
            Path(tmp), progress_interval=10.0, kueue=False, kubelet_args=["--no-exec", "--poll=1"]
        )
        telemetry = None
        try:
            session.start()
            host = f"{session.plane.pod_ip_prefix}.1"  # where --no-exec puts every pod
            telemetry = Telemetry(port=api.TRAINER_METRICS_PORT, host=host)
            telemetry.update(step=0, total_steps=1000, loss=2.0, tokens_per_second=1000.0)
            ticking = threading.Event()

            def tick() -> None:
                step = 0
                while not ticking.wait(1.0):
                    step += 1
                    telemetry.update(step=step, loss=2.0 - step / 1000)

            threading.Thread(target=tick, daemon=True).start()
            admin = Kube(session.plane.kubeconfig, timeout=120)
            base = baseline(session, admin, n, args.timeout)
            cost = None if args.no_create_cost else create_cost(session, admin, n, args.timeout)
            profiling = {}
            if args.profile:
                profiling = {
                    "PYTHONPATH": f"{ROOT / 'benchmarks' / 'profiling'}:"
                    + os.environ.get("PYTHONPATH", ""),
                    "KUBETUNE_BENCH_PROFILE": str(args.profile.resolve()),
                    "KUBETUNE_BENCH_TRACEMALLOC": "1" if args.tracemalloc else "",
                }
            # The default progress interval (the session's tests lower it).
            session.restart_operator(KUBETUNE_PROGRESS_MIN_INTERVAL="10", **profiling)
            ours = operator(session, admin, n, args.running_seconds, args.timeout)
            ticking.set()
            if args.profile and session.operator is not None:
                dump_profile(session.operator.pid, args.profile)
            forbidden = len(session.forbidden())
        except ApiStatus as error:
            print(f"error: {error}", file=sys.stderr)
            return 11
        finally:
            session.close()
            if telemetry is not None:
                telemetry.close()

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    result = {
        "jobs": n,
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "baseline_job_controller": base,
        "create_cost_nothing_reacting": cost,
        "operator": ours,
        "ratio_operator_to_job_controller": {
            "reconciled_vs_pods_created": ratio(
                ours["all_reconciled_in_s"], base["all_have_their_pod_in_s"]
            ),
            "running_vs_running": ratio(ours["all_running_in_s"], base["all_running_in_s"]),
            "apiserver_cpu_per_job": ratio(
                ours["apiserver_cpu_s_per_job"], base["apiserver_cpu_s_per_job"]
            ),
        },
        "operator_forbidden_requests": forbidden,
    }
    writes = ours["object_writes_per_job_to_its_running"]
    ok = (
        ours["all_reconciled_in_s"] is not None
        and ours["all_reconciled_in_s"] < 60
        and writes["jobs_measured"] == n
        and writes["max"] <= 6
        and ours["operator_peak_rss_mb"] < 250
        and forbidden == 0
    )
    result["goals_met"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    print(
        "goals (all reconciled < 60 s, <= 6 object writes/job to Running, RSS < 250 MB, "
        "no forbidden request):",
        "met" if ok else "NOT met",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
