"""`kubetune sweep sweep.yaml [--parallel N]`: a FineTuneSweep on one machine.

Each trial is the trainer's own recipe (``run``, as in ``kubetune run``) in a child process:
its peak memory is its own, and stopping it is what the cluster does to a pod, SIGTERM (the
trainer commits a checkpoint and exits). The parent decides like the operator does: the
trials on disk are the whole state (``<root>/<trial>/trial.json`` before a trial starts,
``outcome.json`` when it ends), the study is rebuilt from them before every decision, so a
rerun of the same command continues the sweep: finished trials are kept, an interrupted one
resumes from its checkpoint, and the next trials are the ones the first run would have made.

The sweep's folder gets ``sweep-report.json`` (every trial with its parameters, metrics,
measured peak memory, wall time and artifact size; the best trial; parameter importances) and
two plots: ``objective.png`` (objective per trial, best so far) and ``importance.png``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kubetune import api, manifests, sweep, sweep_api
from kubetune.sweep import TrialRecord

from .errors import Preempted, TrainerError
from .local import resolve_paths

REPORT = "sweep-report.json"


# --------------------------------------------------------------------------------------------
# one trial, in a child process


VERDICT_TIMEOUT = 120.0  # seconds a trial waits for the parent's verdict after an evaluation


def _child(config_json: str, base_dir: str, log_path: str, events: Any, verdicts: Any) -> None:
    """Run one trial's recipe; every outcome becomes one message on ``events``.

    After each evaluation the trial waits for the parent's verdict on ``verdicts`` before its
    next step: the pruning decision is taken at the step it is about, not some steps later
    (a small model trains several steps in the time a message takes to be read). A pruned
    trial gets its SIGTERM before the verdict, so the loop sees it at that very step."""
    from .__main__ import Options, run

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - the child's stdout for its life
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    config = api.TrainerConfig.model_validate_json(config_json)

    def progress(entry: dict[str, Any]) -> None:
        events.put(("progress", {k: entry.get(k) for k in ("step", "totalSteps", "evalLoss")}))
        if entry.get("evalLoss") is not None:
            with contextlib.suppress(queue.Empty):  # no answer: the parent is gone; go on
                verdicts.get(timeout=VERDICT_TIMEOUT)

    options = Options(
        base_dir=Path(base_dir),
        metrics_port=0,
        termination_log=None,
        progress=progress,
        log=lambda line: print(line, flush=True),
    )
    try:
        result = run(config, options)
    except Preempted as exc:
        events.put(("stopped", str(exc)))
    except TrainerError as exc:
        events.put(("failed", str(exc)))
    except Exception as exc:  # reported as the trial's failure, with the type
        traceback.print_exc()  # into the trial's train.log
        events.put(("failed", f"internal error: {type(exc).__name__}: {exc}"))
    else:
        report = result.report
        events.put(
            (
                "done",
                {
                    "status": result.status.to_api(),
                    "peakMemoryBytes": report["training"]["peakMemoryBytes"],
                    "trainSeconds": report["training"]["trainSeconds"],
                    "parameters": report["model"]["parameters"],
                    "trainableParameters": report["model"]["trainableParameters"],
                },
            )
        )


@dataclass
class Running:
    record: TrialRecord
    process: Any
    events: Any
    verdicts: Any
    started: float
    curve: dict[int, float] = field(default_factory=dict)
    step: int | None = None
    stopping: bool = False
    waiting: bool = False  # evaluated, waiting for the verdict

    def answer(self) -> None:
        if self.waiting:
            self.verdicts.put("stop" if self.stopping else "go on")
            self.waiting = False


# --------------------------------------------------------------------------------------------
# the trials on disk


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def load_trials(root: Path) -> tuple[list[TrialRecord], list[TrialRecord], dict[str, Any]]:
    """(finished records, started-but-unfinished records, extras by trial name) from disk."""
    finished: list[TrialRecord] = []
    unfinished: list[TrialRecord] = []
    extras: dict[str, Any] = {}
    for trial_file in sorted(root.glob("*/trial.json")):
        trial = _read_json(trial_file)
        if not isinstance(trial, dict):
            continue
        outcome = _read_json(trial_file.parent / "outcome.json")
        base = TrialRecord(trial["number"], trial["name"], trial["params"], "Pending")
        if not isinstance(outcome, dict):
            unfinished.append(base)
            continue
        record = TrialRecord(
            number=base.number,
            name=base.name,
            params=base.params,
            phase=outcome["phase"],
            objective=outcome.get("objective"),
            curve={int(k): v for k, v in outcome.get("curve", {}).items()},
            step=outcome.get("step"),
            message=outcome.get("message"),
        )
        finished.append(record)
        extras[base.name] = outcome.get("extras", {})
    return finished, unfinished, extras


def _artifact_bytes(status: api.FineTuneJobStatus) -> int | None:
    artifacts = status.artifacts
    if artifacts is None:
        return None
    total = 0
    for uri in (artifacts.adapter, artifacts.model, artifacts.merged):
        if uri and "://" not in uri.replace("file://", ""):
            folder = Path(uri.removeprefix("file://"))
            total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total


# --------------------------------------------------------------------------------------------
# the loop


class LocalSweep:
    def __init__(
        self,
        sweep_obj: sweep_api.FineTuneSweep,
        manifest: Path,
        root: Path,
        parallel: int,
        out: TextIO,
    ) -> None:
        self.name = sweep_obj.metadata.name
        # Locally the number of processes is the command's --parallel, not spec.parallelism.
        self.spec = sweep_obj.spec.model_copy(update={"parallelism": parallel})
        template = resolve_paths(sweep_obj.spec.template.to_api(), manifest.resolve().parent)
        template["output"]["destination"] = str(root)
        self.spec = self.spec.model_copy(
            update={"template": api.FineTuneJobSpec.model_validate(template)}
        )
        self.base_dir = manifest.resolve().parent
        self.root, self.out = root, out
        self.context = multiprocessing.get_context("spawn")  # no forked torch state
        self.finished, self.unfinished, self.extras = load_trials(root)
        self.running: dict[str, Running] = {}

    def records(self) -> list[TrialRecord]:
        live = [
            TrialRecord(
                r.record.number,
                r.record.name,
                r.record.params,
                "Running",
                curve=dict(r.curve),
                step=r.step,
            )
            for r in self.running.values()
        ]
        return self.finished + self.unfinished + live

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def start(self, record: TrialRecord) -> None:
        spec = sweep_api.trial_spec(self.spec, record.params, record.name)
        folder = self.root / record.name
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(
            folder / "trial.json",
            {"number": record.number, "name": record.name, "params": dict(record.params)},
        )
        config = api.TrainerConfig(name=record.name, spec=spec)
        events, verdicts = self.context.Queue(), self.context.Queue()
        process = self.context.Process(
            target=_child,
            args=(
                config.model_dump_json(by_alias=True),
                str(self.base_dir),
                str(folder / "train.log"),
                events,
                verdicts,
            ),
            daemon=False,
        )
        process.start()
        self.running[record.name] = Running(record, process, events, verdicts, time.monotonic())
        params = ", ".join(f"{k}={sweep._value(v)}" for k, v in record.params.items())
        self.say(f"[{record.name}] started: {params} (log: {folder / 'train.log'})")

    def finish(self, run: Running, kind: str, payload: Any) -> None:
        run.process.join(timeout=60)
        record = run.record
        wall = round(time.monotonic() - run.started, 2)
        extras: dict[str, Any] = {"wallSeconds": wall}
        if kind == "done":
            status = api.FineTuneJobStatus.model_validate(payload["status"])
            done = sweep.record_from_status(
                record.number, record.name, record.params, status, self.spec.objective.metric
            )
            extras.update({k: v for k, v in payload.items() if k != "status"})
            extras["artifactBytes"] = _artifact_bytes(status)
            extras["metrics"] = status.metrics.to_api() if status.metrics else {}
            extras["artifacts"] = status.artifacts.to_api() if status.artifacts else {}
            extras.update(plan_columns(sweep_api.trial_spec(self.spec, record.params)))
        else:
            pruned = run.stopping and kind == "stopped"
            done = TrialRecord(
                record.number,
                record.name,
                record.params,
                "Pruned" if pruned else "Failed",
                curve=dict(run.curve),
                step=run.step,
                message=sweep._pruned_message(run.curve) if pruned else str(payload),
            )
        _write_json(
            self.root / record.name / "outcome.json",
            {
                "phase": done.phase,
                "objective": done.objective,
                "curve": {str(k): v for k, v in (done.curve or run.curve).items()},
                "step": done.step if done.step is not None else run.step,
                "message": done.message,
                "extras": extras,
            },
        )
        self.finished.append(done)
        self.extras[record.name] = extras
        del self.running[record.name]
        value = (
            "" if done.objective is None else f" {self.spec.objective.metric}={done.objective:.4g}"
        )
        self.say(
            f"[{record.name}] {done.phase}{value} in {wall:.1f}s"
            + (f": {done.message}" if done.message else "")
        )
        self.say(sweep.format_table(self.spec, self.records()))

    def poll(self) -> None:
        """Read every child's events (waiting a little for the first), then prune, then answer
        the trials waiting after an evaluation."""
        for run in list(self.running.values()):
            try:
                while True:
                    kind, payload = run.events.get(timeout=0.2)
                    if kind == "progress":
                        run.step = payload["step"]
                        if payload.get("evalLoss") is not None:
                            run.waiting = True
                            run.curve[int(payload["step"])] = float(payload["evalLoss"])
                            self.say(
                                f"[{run.record.name}] step {run.step}/"
                                f"{payload['totalSteps']} evalLoss {payload['evalLoss']:.4f}"
                            )
                        continue
                    self.finish(run, kind, payload)
                    break
            except queue.Empty:
                if not run.process.is_alive() and run.record.name in self.running:
                    self.finish(run, "failed", f"trainer exited with code {run.process.exitcode}")
        records = self.records()
        for run in self.running.values():
            if run.stopping:
                run.answer()
                continue
            current = TrialRecord(
                run.record.number,
                run.record.name,
                run.record.params,
                "Running",
                curve=dict(run.curve),
                step=run.step,
            )
            if sweep.should_prune(self.spec, records, current):
                run.stopping = True
                self.say(f"[{run.record.name}] pruning: {sweep._pruned_message(run.curve)}")
                os.kill(run.process.pid, signal.SIGTERM)  # first: the verdict finds it seen
            run.answer()

    def run(self) -> sweep_api.FineTuneSweepStatus:
        if self.finished or self.unfinished:
            self.say(
                f"continuing: {len(self.finished)} trials finished, "
                f"{len(self.unfinished)} to resume"
            )
        while True:
            while self.unfinished and len(self.running) < self.spec.parallelism:
                self.start(self.unfinished.pop(0))
            for new in sweep.plan_new_trials(self.spec, self.name, self.records()):
                self.start(TrialRecord(new.number, new.name, new.params, "Pending"))
            if not self.running:
                break
            self.poll()
        status = sweep.summarize(self.spec, self.finished)
        self.write_report(status)
        return status

    def write_report(self, status: sweep_api.FineTuneSweepStatus) -> None:
        importance = sweep.importances(self.spec, self.finished)
        rows = []
        for record in sweep.ranked(self.spec, self.finished):
            rows.append({**sweep.row(record).to_api(), **self.extras.get(record.name, {})})
        report: dict[str, Any] = {
            "name": self.name,
            "spec": self.spec.to_api(),
            "status": status.to_api(),
            "trials": rows,
            "importance": importance,
        }
        if any(p.path == "method.type" for p in self.spec.parameters):
            report["tradeoff"] = tradeoff_rows(self.spec, rows)
            # The status carries the same table (the trials on disk have what the cluster's
            # statuses lack: artifact sizes, and plan estimates without the operator's reads).
            status.tradeoff = [
                sweep_api.TradeoffRow.model_validate(r)
                for r in sorted(report["tradeoff"], key=lambda r: r["trial"])
            ]
            report["status"] = status.to_api()
            self.say("\ntrade-off (plan: the estimate before launch; peak: measured)")
            self.say(format_tradeoff(report["tradeoff"]))
        _write_json(self.root / REPORT, report)
        plot(self.spec, self.finished, importance, self.root)


def plan_columns(spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """The planner's estimate for this trial's spec (local model folders only)."""
    from kubetune import plan as planner

    source = spec.model.source
    if source.startswith("s3://"):
        return {}
    try:
        config, tensors = planner.read_model(Path(source.removeprefix("file://")))
    except (OSError, ValueError, KeyError):
        return {}
    estimate = planner.estimate(
        config, tensors, spec, device_memory=None, on_gpu=spec.resources.gpus > 0
    )
    chosen = estimate.get(planner.requested_method(spec))
    return {
        "planMethod": chosen.method,
        "planTrainableParameters": chosen.trainable,
        "planMemoryBytes": chosen.memory.total,
    }


def tradeoff_rows(
    spec: sweep_api.FineTuneSweepSpec, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per method: results and costs side by side with the plan's estimates."""
    out = []
    for row in rows:
        metrics = row.get("metrics", {})
        out.append(
            {
                "method": row["params"].get("method.type"),
                "trial": row["name"],
                "phase": row["phase"],
                "objective": row.get("objective"),
                "tuned": metrics.get("tuned", {}),
                "oodPerplexityRatio": metrics.get("delta", {}).get("oodPerplexityRatio"),
                "trainableParameters": row.get("trainableParameters"),
                "planTrainableParameters": row.get("planTrainableParameters"),
                "peakMemoryBytes": row.get("peakMemoryBytes"),
                "planMemoryBytes": row.get("planMemoryBytes"),
                "wallSeconds": row.get("wallSeconds"),
                "artifactBytes": row.get("artifactBytes"),
                "message": row.get("message"),
            }
        )
    return out


def format_tradeoff(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, scale: float = 1.0, fmt: str = "{:.4g}") -> str:
        return "" if value is None else fmt.format(value / scale)

    header = [
        "method",
        "objective",
        "tuned.loss",
        "tuned.EM",
        "oodPplRatio",
        "trainable",
        "plan.trainable",
        "peak MiB",
        "plan MiB",
        "wall s",
        "artifact MiB",
    ]
    lines = [header]
    for r in rows:
        tuned = r["tuned"]
        lines.append(
            [
                str(r["method"]),
                num(r["objective"]),
                num(tuned.get("loss")),
                num(tuned.get("exactMatch")),
                num(r["oodPerplexityRatio"]),
                num(r["trainableParameters"], fmt="{:.0f}"),
                num(r["planTrainableParameters"], fmt="{:.0f}"),
                num(r["peakMemoryBytes"], 2**20, "{:.0f}"),
                num(r["planMemoryBytes"], 2**20, "{:.0f}"),
                num(r["wallSeconds"], fmt="{:.1f}"),
                num(r["artifactBytes"], 2**20, "{:.2f}"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    why = [
        f"{r['method']} ({r['trial']}): {r['phase']}: {r['message']}"
        for r in rows
        if r.get("message") and r.get("phase") != "Succeeded"
    ]
    return table + "".join(f"\n  {line}" for line in why)


def plot(
    spec: sweep_api.FineTuneSweepSpec,
    records: list[TrialRecord],
    importance: dict[str, float],
    folder: Path,
) -> None:
    """objective.png (each trial, best so far) and importance.png (fANOVA importances)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in records if r.objective is not None), key=lambda r: r.number)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if done:
        xs = [r.number for r in done]
        ys = [float(r.objective or 0.0) for r in done]
        pick = min if spec.objective.direction == "minimize" else max
        best = [pick(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, label="trial")
        ax.step(xs, best, where="post", color="tab:orange", label="best so far")
        ax.legend()
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.objective.metric)
    ax.set_title(f"objective per trial ({spec.objective.direction})")
    fig.tight_layout()
    fig.savefig(folder / "objective.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * max(1, len(importance))))
    names = list(importance)
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance (fANOVA)" if names else "importance: needs 2+ finished trials")
    fig.tight_layout()
    fig.savefig(folder / "importance.png", dpi=100)
    plt.close(fig)


def run_sweep(
    path: str, *, parallel: int = 1, output: str | None = None, stream: TextIO | None = None
) -> int:
    out = stream or sys.stdout
    loaded = manifests.load_file(path)
    problems = list(loaded.problems)
    if not problems and len(loaded.sweeps) != 1:
        problems.append(f"{path}: expected one FineTuneSweep, found {len(loaded.sweeps)}")
    if not problems and parallel < 1:
        problems.append(f"--parallel: must be at least 1, not {parallel}")
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return api.EXIT_USER_ERROR
    sweep_obj = loaded.sweeps[0]
    manifest = Path(path)
    if output is not None:
        root = Path(output).expanduser().resolve()
    else:
        destination = sweep_obj.spec.template.output.destination
        if "://" in destination.replace("file://", ""):
            print(
                "error: spec.template.output.destination: kubetune sweep keeps its trials "
                "in a local folder; give --output DIR",
                file=sys.stderr,
            )
            return api.EXIT_USER_ERROR
        folder = Path(destination.removeprefix("file://"))
        root = folder if folder.is_absolute() else (manifest.resolve().parent / folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    runner = LocalSweep(sweep_obj, manifest, root, parallel, out)
    try:
        status = runner.run()
    except KeyboardInterrupt:
        for run in runner.running.values():
            run.answer()  # a trial waiting for a verdict goes on to see its SIGINT
            run.process.join(timeout=120)  # they got the SIGINT too: checkpoint and exit
        print("interrupted: rerun the same command to continue the sweep", file=sys.stderr)
        return 130
    print(f"\n{status.phase}: {status.message}", file=out)
    print(f"report: {root / REPORT}", file=out)
    return api.EXIT_OK if status.phase == "Succeeded" else 1
