"""Operator at scale: N FineTuneJobs created at once in the Kubernetes emulator.

    .venv/bin/python benchmarks/operator_scale.py --jobs 500 --running-seconds 60

What runs: the emulator (tests/support/kmock_adapter.py) in this process; the real operator
(`kubetune operator`, a subprocess with KUBECONFIG, default settings: 10 s timer, progress
patches at most every 10 s); a fake Job controller in this process that, for every Job the
operator creates, adds a Running pod and marks the Job active. All "trainers" share one real
trainer metrics page (kubetune_trainer.report.Telemetry) whose step advances every second, so
every job has live progress to report.

Measured:
- time from the first create until every FineTuneJob has its Job and a status phase;
- API requests by the operator per job (kopf's and the operator's own client, told apart from
  this script's by User-Agent), and writes per job until every job is Running;
- status patches per job per minute while running (over --running-seconds);
- operator peak RSS (VmHWM of the process).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kmock_adapter import Counters, Kube  # noqa: E402
from tests.support.kmock_kubelet import free_port  # noqa: E402
from tests.support.operator_harness import FTJ, Cluster  # noqa: E402

OPERATOR_CLIENTS = ("kopf", "kubetune-operator")
WRITES = ("create", "patch", "update", "delete")


def manifest(i: int) -> dict[str, Any]:
    return {
        "apiVersion": FTJ,
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{i:04d}", "namespace": "default"},
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


def operator_requests(counters: Counters) -> tuple[int, int, collections.Counter[str]]:
    total = writes = 0  # writes: object writes (Kubernetes Events are counted apart)
    by_kind: collections.Counter[str] = collections.Counter()
    for (client, verb, label), n in counters.by_client.items():
        if client in OPERATOR_CLIENTS and verb != "watch":
            total += n
            if verb in WRITES:
                by_kind[f"{verb} {label}"] += n
                writes += 0 if label == "events" else n
    return total, writes, by_kind


def writes_until_running(counters: Counters, history: Any, names: list[str]) -> list[int]:
    """Per job: object writes by the operator to the job and its children up to (and with) the
    status write that first said Running."""
    running_rv: dict[str, int] = {}
    for event in history:
        if event.key == ("kubetune.io", "finetunejobs"):
            name = event.obj["metadata"]["name"]
            if name not in running_rv and (event.obj.get("status") or {}).get("phase") == "Running":
                running_rv[name] = event.rv
    per_job: collections.Counter[str] = collections.Counter()
    owner = {}
    for name in names:
        owner.update({name: name, f"{name}-config": name, f"{name}-trainer": name})
    for rv, client, _verb, label, _ns, obj in counters.log:
        job = owner.get(obj or "")
        mine = client in OPERATOR_CLIENTS and label != "events"
        if mine and job in running_rv and rv <= running_rv[job]:
            per_job[job] += 1
    return [per_job[name] for name in names if name in running_rv]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class FakeJobController(threading.Thread):
    """Every new Job gets a Running pod (podIP 127.0.0.1, the shared metrics port)."""

    def __init__(self, kube: Kube, port: int) -> None:
        super().__init__(daemon=True)
        self.kube, self.port = kube, port
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8)

    def run(self) -> None:
        while not self.stop.is_set():
            fresh = [
                j
                for j in self.kube.list("batch/v1", "jobs", "default")
                if j["metadata"]["name"] not in self.seen
            ]
            for job in fresh:
                self.seen.add(job["metadata"]["name"])
            list(self.pool.map(self.start_pod, fresh))
            self.stop.wait(0.5)

    def start_pod(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        spec = json.loads(json.dumps(template["spec"]))
        spec["containers"][0]["ports"][0]["containerPort"] = self.port
        self.kube.create(
            "v1",
            "pods",
            "default",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-0",
                    "namespace": "default",
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": name,
                            "uid": job["metadata"]["uid"],
                        }
                    ],
                },
                "spec": spec,
            },
        )
        self.kube.patch(
            "v1",
            "pods",
            "default",
            f"{name}-0",
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "containerStatuses": [{"name": "trainer", "state": {"running": {}}}],
                }
            },
            sub="status",
        )
        self.kube.patch(
            "batch/v1",
            "jobs",
            "default",
            name,
            {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}},
            sub="status",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--running-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    from kubetune_trainer.report import Telemetry

    telemetry = Telemetry(port=free_port(), host="127.0.0.1")
    telemetry.update(step=0, total_steps=1000, loss=2.0, tokens_per_second=1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), progress_interval=10.0)
        kube = cluster.kube
        counters: Counters = cluster.emulator.emulator.counters  # type: ignore[union-attr]
        cluster.start_operator(KUBETUNE_PROGRESS_MIN_INTERVAL="10")
        assert cluster.operator is not None
        pid = cluster.operator.pid
        time.sleep(3)  # operator started and watching
        controller = FakeJobController(kube, telemetry.port)
        controller.start()
        ticking = threading.Event()

        def tick() -> None:
            step = 0
            while not ticking.is_set():
                step += 1
                telemetry.update(step=step, loss=2.0 - step / 1000)
                ticking.wait(1.0)

        threading.Thread(target=tick, daemon=True).start()

        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: kube.create(FTJ, "finetunejobs", "default", manifest(i)),
                    range(args.jobs),
                )
            )
        created = time.monotonic() - start

        def phases() -> collections.Counter[str]:
            items = kube.list(FTJ, "finetunejobs", "default")
            return collections.Counter(
                (o.get("status") or {}).get("phase", "-")
                if (o.get("status") or {}).get("jobName")
                else "-"
                for o in items
            )

        reconciled_at = running_at = None
        while time.monotonic() - start < args.timeout:
            count = phases()
            jobs = len(kube.list("batch/v1", "jobs", "default"))
            if reconciled_at is None and count["-"] == 0 and jobs == args.jobs:
                reconciled_at = time.monotonic() - start
            if count.get("Running", 0) == args.jobs:
                running_at = time.monotonic() - start
                break
            time.sleep(0.5)
        total_to_running, writes_to_running, by_kind = operator_requests(counters)
        names = [f"bench-{i:04d}" for i in range(args.jobs)]
        emulator = cluster.emulator.emulator
        assert emulator is not None
        per_job = cluster.emulator.call(
            lambda: writes_until_running(counters, list(emulator.history), names)
        )

        before = sum(
            n
            for (c, v, lbl), n in counters.by_client.items()
            if c in OPERATOR_CLIENTS and v == "patch" and lbl == "finetunejobs/status"
        )
        window = time.monotonic()
        time.sleep(args.running_seconds)
        after = sum(
            n
            for (c, v, lbl), n in counters.by_client.items()
            if c in OPERATOR_CLIENTS and v == "patch" and lbl == "finetunejobs/status"
        )
        minutes = (time.monotonic() - window) / 60
        rss = peak_rss(pid)
        total_all, _, _ = operator_requests(counters)
        ticking.set()
        controller.stop.set()
        alive = cluster.operator.poll() is None
        cluster.close()
        telemetry.close()

    n = args.jobs
    result = {
        "jobs": n,
        "created_all_in_s": round(created, 1),
        "all_reconciled_in_s": round(reconciled_at, 1) if reconciled_at else None,
        "all_running_in_s": round(running_at, 1) if running_at else None,
        "operator_requests_per_job_until_running": round(total_to_running / n, 2),
        "operator_object_writes_per_job_until_all_running": round(writes_to_running / n, 2),
        "object_writes_per_job_to_its_running": {
            "jobs_measured": len(per_job),
            "min": min(per_job, default=None),
            "mean": round(sum(per_job) / max(len(per_job), 1), 2),
            "max": max(per_job, default=None),
        },
        "operator_events_per_job_until_running": round(by_kind["create events"] / n, 2),
        "writes_until_running_by_kind": {k: round(v / n, 2) for k, v in sorted(by_kind.items())},
        "status_patches_per_job_per_minute_running": round((after - before) / n / minutes, 2),
        "operator_requests_per_job_total": round(total_all / n, 2),
        "operator_peak_rss_mb": round(rss / 2**20, 1),
        "operator_alive": alive,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    ok = (
        reconciled_at is not None
        and reconciled_at < 60
        and len(per_job) == n
        and max(per_job) <= 6
        and rss < 250 * 2**20
    )
    print(
        "goals (all reconciled < 60 s, <= 6 object writes/job to Running, RSS < 250 MB):",
        "met" if ok else "NOT met",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
