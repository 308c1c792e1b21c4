"""The trainer recipe: config -> license -> data -> model -> train -> evaluate -> export -> report.

    python -m kubetune_trainer --config config.json      # what the Job runs (api.TrainerConfig)
    torchrun --nproc-per-node 2 -m kubetune_trainer --config config.json     # data-parallel

Exit codes (docs/trainer.md): 0 done; 10 user error (bad spec or data: not retried); 11
infrastructure error (storage, network, an unexpected exception: retried); 12 preempted
(SIGTERM or SIGINT: what was done is committed; retried, not counted). Every failure prints
one line (a traceback only for unexpected exceptions) and writes the termination message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import api

from .errors import InfraError, Preempted, TrainerError, UserError

if TYPE_CHECKING:  # the stages' data flow, checked by mypy; imported lazily at run time
    import torch
    from transformers import PreTrainedTokenizerBase

    from .data import Dataset, Splits
    from .interrupts import Interrupts
    from .report import Telemetry
    from .safety import SafetyInputs
    from .storage import Storage
    from .train import Plan, Resumed, TrainState, World

Log = Callable[[str], None]


@dataclass
class Options:
    """How this run is wired (not what it trains: that is the config)."""

    base_dir: Path | None = None  # relative paths in the spec resolve here (kubetune run)
    metrics_port: int = api.TRAINER_METRICS_PORT  # 0: no /metrics server
    metrics_host: str = "0.0.0.0"  # the address /metrics binds
    termination_log: str | None = api.TERMINATION_LOG
    progress: Callable[[dict[str, Any]], None] | None = None  # per training step; None: no bars
    # Evaluation progress: (which model, rows done, rows to do), e.g. ("tuned", 12, 40).
    evaluation_progress: Callable[[str, int, int], None] | None = None
    log: Log = field(default=lambda line: print(line, flush=True))
    workdir: Path | None = None  # scratch space (downloads, staging); scratch.py by default


@dataclass
class Result:
    status: api.FineTuneJobStatus
    report: dict[str, Any]
    notes: list[str]


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current = "start"

    @contextmanager
    def stage(self, name: str, log: Log) -> Iterator[None]:
        start = time.monotonic()
        self.current = name
        log(f"[{name}]")
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 3)


# ---------------------------------------------------------------------------------------------
# stages


def load_config(path: Path) -> api.TrainerConfig:
    from pydantic import ValidationError

    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--config: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return api.TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        lines = api.format_errors(exc)
        raise UserError(f"{path}: invalid trainer config: " + "; ".join(lines[:5])) from exc


def check_license(config: api.TrainerConfig) -> None:
    from .data import check_license as gate

    gate(config.spec.dataset.license, config.policy)


@dataclass
class DataStage:
    dataset: Dataset
    splits: Splits
    source: str
    safety: SafetyInputs | None = None  # the safety evals' inputs, read once

    def summary(self) -> str:
        d, s = self.dataset, self.splits
        return (
            f"  {d.total_rows} rows ({len(d.invalid)} invalid): train {len(s.train)}, "
            f"validation {len(s.validation)}, test {len(s.test)}"
        )


def load_data(config: api.TrainerConfig, options: Options, workdir: Path) -> DataStage:
    from .data import load_dataset, split_dataset
    from .storage import fetch

    spec, s3 = config.spec.dataset, config.spec.storage.s3

    def load(uri: str, field: str) -> Dataset:
        path = fetch(uri, s3, workdir / "data", base_dir=options.base_dir, field=field)
        return load_dataset(path, spec, field=field)

    dataset = load(spec.source, "spec.dataset.source")
    validation = (
        load(spec.split.validationSource, "spec.dataset.split.validationSource")
        if spec.split.validationSource
        else None
    )
    test = (
        load(spec.split.testSource, "spec.dataset.split.testSource")
        if spec.split.testSource
        else None
    )
    splits = split_dataset(dataset, spec.split, validation=validation, test=test)  # raises if empty
    return DataStage(dataset, splits, spec.source)


def check_same_training(
    config: api.TrainerConfig, data: DataStage, world: World, output: Storage
) -> dict[str, Any]:
    """The fingerprint of this training; refuses before anything is written when the output
    already holds checkpoints of another one."""
    from . import train as train_stage

    hashes = {"spec.dataset.source content (sha256)": data.dataset.sha256}
    for name, digest in data.splits.hashes.items():
        hashes[f"{name} split (sha256 of row ids)"] = digest
    prints = train_stage.fingerprint(config.spec, hashes, world.size)
    train_stage.check_resumable(output, prints)
    return prints


def load_safety_inputs(config: api.TrainerConfig, options: Options) -> SafetyInputs | None:
    """Safety prompt files and the classifier are checked before training: a typo must fail in
    seconds, not after hours of GPU time."""
    safety = config.spec.evaluation.safety
    if safety is not None:
        from .safety import load_inputs

        return load_inputs(safety, storage_s3=config.spec.storage.s3, base_dir=options.base_dir)
    return None


def commit_splits(data: DataStage, output: Storage, workdir: Path) -> None:
    """Per-split row ids and their sha256, committed to <output>/splits/ (versioned splits)."""
    from .data import write_split_manifests

    write_split_manifests(data.splits, workdir / "splits")
    output.commit_dir(workdir / "splits", "splits")


def fetch_model(config: api.TrainerConfig, options: Options, workdir: Path) -> Path:
    from .model import check_model_dir, from_gguf
    from .storage import fetch

    spec = config.spec.model
    path = fetch(
        spec.source,
        config.spec.storage.s3,
        workdir / "model",
        base_dir=options.base_dir,
        field="spec.model.source",
    )
    if api.is_gguf_source(spec.source):
        path = from_gguf(path, workdir / "model-from-gguf", spec)  # dequantized, safetensors
    check_model_dir(path, spec)
    return path


@contextmanager
def distributed() -> Iterator[World]:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on GPU. The process group this creates
    lives exactly as long as the block, however the block ends."""
    from .train import World

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World()
        return
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        yield World(rank=dist.get_rank(), size=dist.get_world_size())
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def score(
    config: api.TrainerConfig,
    options: Options,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    data: DataStage,
    device: torch.device,
    label: str,
) -> tuple[dict[str, float], list[str]]:
    """Held-out metrics on the test split (plus safety evals when configured) for one model
    (`label`: "base" or "tuned")."""
    from .evaluate import evaluate_model
    from .safety import run_safety

    spec, test = config.spec, data.splits.test
    notes: list[str] = []
    values: dict[str, float] = {}
    shown = options.evaluation_progress
    if test:
        values = evaluate_model(
            model,
            tokenizer,
            test,
            spec.evaluation,
            max_seq_length=spec.dataset.maxSeqLength,
            device=device,
            progress=(lambda done, total: shown(label, done, total)) if shown else None,
        )
    else:
        notes.append("the test split is empty: held-out metrics were not measured")
    if spec.evaluation.safety is not None:
        safety, safety_notes = run_safety(
            model,
            tokenizer,
            spec.evaluation.safety,
            storage_s3=spec.storage.s3,
            base_dir=options.base_dir,
            device=device,
            max_new_tokens=spec.evaluation.maxNewTokens,
            inputs=data.safety,
        )
        values.update(safety)
        notes.extend(safety_notes)
    return values, notes


def evaluate(
    config: api.TrainerConfig,
    options: Options,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    data: DataStage,
    device: torch.device,
    base_before: dict[str, float] | None,
) -> tuple[api.Metrics, list[api.GateResult], list[str]]:
    """The same evaluation on base and tuned. For adapters the base is the same model with the
    adapter switched off (no second copy of the weights); a full fine-tune scored its base
    before training (base_before)."""
    from .evaluate import check_gates, compare

    tuned, notes = score(config, options, model, tokenizer, data, device, "tuned")
    base: dict[str, float] = {}
    if config.spec.evaluation.compareToBase:
        if base_before is not None:
            base = base_before
        else:
            with model.disable_adapter():
                base, base_notes = score(config, options, model, tokenizer, data, device, "base")
            notes += [n for n in base_notes if n not in notes]
    metrics = api.Metrics(base=base, tuned=tuned, delta=compare(base, tuned) if base else {})
    return metrics, check_gates(list(config.spec.evaluation.gates), metrics), notes


@dataclass
class ModelStage:
    model: Any  # the PeftModel (lora, qlora) or the model itself (full)
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path
    device: torch.device
    base_before: dict[str, float] | None  # a full fine-tune's base scores, taken before training
    trainable: int
    total: int


def load_model(
    config: api.TrainerConfig, options: Options, data: DataStage, main: bool, workdir: Path
) -> ModelStage:
    from . import model as model_stage
    from .train import seed_everything

    spec = config.spec
    seed_everything(spec.training.seed)  # before LoRA init
    library_progress_bars(options.progress is not None)
    model_dir = fetch_model(config, options, workdir)
    device = model_stage.pick_device()
    tokenizer = model_stage.load_tokenizer(model_dir, spec.model)
    model = model_stage.load_base(model_dir, spec, device)
    base_before = None
    if spec.method.type == "full" and spec.evaluation.compareToBase and main:
        # A full fine-tune overwrites the base weights: score them first.
        base_before, _ = score(config, options, model, tokenizer, data, device, "base")
    model = model_stage.apply_method(model, spec)
    trainable, total = model_stage.count_parameters(model)
    return ModelStage(model, tokenizer, model_dir, device, base_before, trainable, total)


def library_progress_bars(enabled: bool) -> None:
    """transformers draws bars of its own ("Loading weights"): only where ours are shown, not
    in pod logs or under --no-progress."""
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


@dataclass
class Trained:
    state: TrainState
    plan: Plan
    resumed_from: str | None
    attention: str
    truncated: dict[str, int]
    parallelism: str  # "none", "ddp" or "fsdp"
    notes: list[str] = field(default_factory=list)  # for the log's reader: report and summary


def train_model(
    config: api.TrainerConfig,
    options: Options,
    m: ModelStage,
    splits: Splits,
    world: World,
    output: Storage,
    telemetry: Telemetry,
    log: Log,
    prints: dict[str, Any] | None = None,
    interrupts: Interrupts | None = None,
    workdir: Path | None = None,
) -> Trained:
    """Encode, plan, restore the newest checkpoint, run the loop; leaves m.model unwrapped
    (on rank 0: unsharded), in eval mode and on plain sdpa attention for evaluation and
    export."""
    from . import model as model_stage
    from . import packing
    from . import train as train_stage
    from .data import check_truncation, encode_all

    spec = config.spec
    max_len = spec.dataset.maxSeqLength
    train_rows, train_cut = encode_all(
        splits.train, m.tokenizer, max_len, train_on_prompt=spec.dataset.trainOnPrompt
    )
    val_rows, val_cut = encode_all(splits.validation, m.tokenizer, max_len)
    notes = check_truncation(train_rows, max_len)  # refuses when no answer survives whole
    for note in notes:
        log(f"  warning: {note}")
    attention = model_stage.attention_for(m.device) if spec.training.packing else "sdpa"
    model_stage.set_attention(m.model, attention)
    wrapped, parallelism = m.model, "none"
    if world.size > 1 and spec.method.type == "full":
        # A full fine-tune holds weights, gradients and two AdamW moments for every parameter:
        # sharded (FSDP) each rank holds 1/WORLD_SIZE of them. Adapters are small: DDP.
        layers = model_stage.shard(m.model, m.device)
        parallelism = "fsdp"
        log(f"  FSDP: {layers} decoder layers and the root sharded over {world.size} ranks")
    elif world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [m.device.index] if m.device.type == "cuda" else None
        wrapped = DistributedDataParallel(m.model, device_ids=device_ids)
        parallelism = "ddp"
    lengths = [len(r.input_ids) for r in train_rows]
    plan = train_stage.make_plan(lengths, spec.training, max_len, world)
    optimizer, scheduler = train_stage.build_optimizer(m.model, spec.training, plan.total_steps)
    resumed = resume(output, m.model, optimizer, scheduler, world, log, workdir)
    state = resumed.state or train_stage.TrainState()
    if resumed.uri:
        log(f"  resumed from {resumed.uri} (step {state.step}/{plan.total_steps})")
    layout = packing.collate_mode(spec.training.packing, attention, m.model)
    log(
        f"  {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), packing "
        f"{spec.training.packing} ({packing.LAYOUTS[layout]}), attention {attention}, "
        f"{len(train_rows)} train rows ({train_cut} truncated)"
    )
    setup = train_stage.Setup(
        model=wrapped,
        core=m.model,
        train=train_rows,
        validation=val_rows,
        spec=spec.training,
        max_len=max_len,
        pad_id=m.tokenizer.pad_token_id,
        device=m.device,
        world=world,
        storage=output,
        collate_mode=layout,
        fingerprint=prints,
        scratch=workdir,
    )
    state = train_stage.train(
        setup,
        optimizer,
        scheduler,
        state,
        plan,
        telemetry=telemetry,
        progress=options.progress if world.main else None,
        log=log,
        interrupts=interrupts,
    )
    if state.stopped_early:
        log(f"  early stop at step {state.step} (best eval loss {state.best_eval})")
    if parallelism == "fsdp":
        m.model = model_stage.unshard(m.model, m.model_dir, spec, m.device, world.main)
    model_stage.set_attention(m.model, "sdpa")
    m.model.eval()
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank is done with the model before rank 0 evaluates it alone
    truncated = {"train": train_cut, "validation": val_cut}
    notes += [f"{why}: skipped and deleted" for _, why in resumed.corrupt]
    return Trained(state, plan, resumed.uri, attention, truncated, parallelism, notes)


def resume(
    output: Storage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    world: World,
    log: Log,
    workdir: Path | None,
) -> Resumed:
    """The newest checkpoint that verifies. Newer corrupted ones are deleted (rank 0, once
    every rank has loaded): left in place they would stay "newest", so checkpoint rotation
    would delete the new checkpoints instead of them. Checkpoint folders a killed run left
    uncommitted (no manifest) are removed first: nothing else would ever delete them."""
    from . import train as train_stage

    if world.main:
        swept = output.sweep_uncommitted(train_stage.CHECKPOINTS)
        if swept:
            log(f"  removed {len(swept)} uncommitted checkpoint folder(s): {', '.join(swept)}")
    resumed = train_stage.load_checkpoint(output, model, optimizer, scheduler, scratch=workdir)
    for _, why in resumed.corrupt:
        fallback = resumed.uri or "step 0 (no checkpoint verifies)"
        log(f"  {why}: falling back to {fallback}")
    if resumed.corrupt and world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    if resumed.corrupt and world.main:
        for rel, _ in resumed.corrupt:
            output.delete(rel)
    return resumed


def final_status(
    config: api.TrainerConfig,
    data: DataStage,
    m: ModelStage,
    trained: Trained,
    results: tuple[api.Metrics, list[api.GateResult]],
    artifacts: api.Artifacts,
) -> api.FineTuneJobStatus:
    """What the operator copies into the FineTuneJob's status (via the termination message)."""
    from . import model as model_stage
    from . import report as report_stage

    metrics, gates = results
    state, spec = trained.state, config.spec
    last = state.history[-1] if state.history else {}
    evals = [h["evalLoss"] for h in state.history if "evalLoss" in h]
    message = f"trained {state.step} steps" + (" (early stop)" if state.stopped_early else "")
    message += f"; gates {'passed' if all(g.passed for g in gates) else 'FAILED'}"
    return api.FineTuneJobStatus(
        phase="Succeeded",
        message=message,
        progress=api.Progress(
            step=state.step,
            totalSteps=trained.plan.total_steps,
            percent=100.0,
            etaSeconds=0,
            loss=last.get("loss"),
            evalLoss=evals[-1] if evals else None,
            evalHistory=[
                api.EvalPoint(step=h["step"], evalLoss=h["evalLoss"])
                for h in state.history
                if "evalLoss" in h
            ][-api.MAX_EVAL_HISTORY :],
        ),
        metrics=metrics,
        gates=gates,
        artifacts=artifacts,
        usage=api.Usage(
            parameters=m.total,
            trainableParameters=m.trainable,
            peakMemoryBytes=report_stage.peak_memory_bytes(),
            trainSeconds=state.train_seconds,
        ),
        reproducibility=api.Reproducibility(
            dataHash=data.dataset.sha256,
            splitHashes=dict(data.splits.hashes),
            modelRevision=spec.model.revision,
            modelHash=model_stage.weights_hash(m.model_dir),
            seed=spec.training.seed,
            configHash=report_stage.config_hash(config),
            image=config.image,
        ),
    )


def build_report(
    config: api.TrainerConfig,
    status: api.FineTuneJobStatus,
    data: DataStage,
    m: ModelStage,
    trained: Trained,
    notes: list[str],
    world_size: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """report.json: everything about the run."""
    from . import model as model_stage
    from . import report as report_stage

    spec, state, dataset, splits = config.spec, trained.state, data.dataset, data.splits
    reproducibility = status.reproducibility or api.Reproducibility()
    return {
        "name": config.name,
        "namespace": config.namespace,
        "uid": config.uid,
        "config": config.to_api(),
        "configHash": reproducibility.configHash,
        "status": status.to_api(),
        "data": {
            "source": data.source,
            "sha256": dataset.sha256,
            "format": dataset.format,
            "totalRows": dataset.total_rows,
            "invalidRows": len(dataset.invalid),
            "invalidShown": [{"row": r, "reason": why} for r, why in dataset.invalid[:20]],
            "duplicateRows": len(dataset.duplicates),
            "splits": {
                name: {"rows": len(part), "sha256": splits.hashes.get(name)}
                for name, part in splits.items()
            },
            "truncated": trained.truncated,
        },
        "model": {
            "source": spec.model.source,
            "revision": spec.model.revision,
            "license": spec.model.license,
            "weightsHash": reproducibility.modelHash,
            "parameters": m.total,
            "trainableParameters": m.trainable,
            "method": spec.method.type,
            "device": str(m.device),
            "dtype": str(model_stage.train_dtype(spec.training.precision, m.device)),
            "attention": trained.attention,
        },
        "training": {
            "totalSteps": trained.plan.total_steps,
            "steps": state.step,
            "stepsPerEpoch": trained.plan.steps_per_epoch,
            "worldSize": world_size,
            "parallelism": trained.parallelism,
            "stoppedEarly": state.stopped_early,
            "bestEvalLoss": state.best_eval,
            "resumedFrom": trained.resumed_from,
            "realTokens": state.tokens * world_size,
            "trainSeconds": state.train_seconds,
            "peakMemoryBytes": report_stage.peak_memory_bytes(),
        },
        "history": state.history,
        "metrics": status.metrics.to_api() if status.metrics else {},
        "gates": [g.to_api() for g in status.gates],
        "notes": trained.notes,  # training: corrupted checkpoints skipped, truncation
        "evaluationNotes": [n for n in notes if n not in trained.notes],
        "artifacts": status.artifacts.to_api() if status.artifacts else {},
        "packages": report_stage.package_versions(),
        "timings": timings,
    }


def write_report(output: Storage, workdir: Path, report: dict[str, Any]) -> None:
    """The loss curve, then report.json (last: its presence means the run finished)."""
    from . import report as report_stage

    report_stage.loss_curve(report["history"], workdir / "loss-curve.png")
    report_stage.write_json(workdir / "report.json", report)
    output.write_bytes("loss-curve.png", (workdir / "loss-curve.png").read_bytes())
    output.write_bytes("report.json", (workdir / "report.json").read_bytes())


def promote_stage(
    config: api.TrainerConfig,
    status: api.FineTuneJobStatus,
    report: dict[str, Any],
    output: Storage,
    workdir: Path,
    log: Log,
) -> api.FineTuneJobStatus:
    """status.promotion (promote.py): decided by the gates, logged and registered in MLflow when
    output.registry is set. report.json is committed before this and rewritten after it, so a
    registry failure leaves the trained artifacts and the report in place and says why."""
    from . import promote

    files = {name: (workdir / name).read_bytes() for name in ("report.json", "loss-curve.png")}
    done, error = promote.promote(config, status, files, log, os.environ)
    status = status.model_copy(update={"promotion": done})
    if error is not None:
        status = promote.failed_status(status, error)
    report["status"] = status.to_api()
    report["promotion"] = done.to_api()
    write_report(output, workdir, report)
    if error is not None:
        raise promote.RegistrationFailed(done.message, status, error.transient)
    log(f"  promotion: {done.state}: {done.message}")
    return status


# ---------------------------------------------------------------------------------------------
# the recipe


def run(config: api.TrainerConfig, options: Options | None = None) -> Result:
    """The whole run under one SIGTERM/SIGINT handler: a signal anywhere exits 12 with a
    message saying what a rerun redoes (interrupts.py)."""
    from . import scratch
    from .interrupts import Interrupted, Interrupts

    options = options or Options()
    timer, committed = Timer(), Committed()
    with Interrupts().installed() as interrupts:
        try:
            with scratch.workdir(options.workdir) as workdir, distributed() as world:
                return run_stages(config, options, world, workdir, timer, interrupts, committed)
        except Interrupted as stop:
            raise Preempted(
                interrupted_message(stop.signal_name, timer.current, committed)
            ) from None


@dataclass
class Committed:
    """What is committed so far, for the message of an interrupted run."""

    trained_steps: int | None = None  # set once training is done and checkpointed


def interrupted_message(signal_name: str, stage: str, committed: Committed) -> str:
    if committed.trained_steps is None:
        return (
            f"{signal_name} during the {stage} stage, before training: nothing to save; "
            "rerunning starts over (from the newest checkpoint, if any)"
        )
    return (
        f"{signal_name} during the {stage} stage: training is done and its checkpoint "
        f"(step {committed.trained_steps}) committed; rerunning redoes only evaluation, export "
        "and report"
    )


def run_stages(
    config: api.TrainerConfig,
    options: Options,
    world: World,
    workdir: Path,
    timer: Timer,
    interrupts: Interrupts,
    committed: Committed,
) -> Result:
    from .export import export
    from .report import Telemetry
    from .storage import Storage

    spec = config.spec
    log: Log = options.log if world.main else (lambda line: None)
    telemetry = Telemetry(options.metrics_port if world.main else 0, options.metrics_host)
    output = Storage.open(
        spec.output.destination,
        spec.storage.s3,
        base_dir=options.base_dir,
        field="spec.output.destination",
    )
    try:
        with timer.stage("license", log):
            check_license(config)
        with timer.stage("data", log):
            data = load_data(config, options, workdir)
            prints = check_same_training(config, data, world, output)
            data.safety = load_safety_inputs(config, options)
            if world.main:
                commit_splits(data, output, workdir)
            log(data.summary())
        with timer.stage("model", log):
            m = load_model(config, options, data, world.main, workdir)
            log(f"  {m.total:,} parameters, {m.trainable:,} trainable ({spec.method.type})")
        with timer.stage("train", log):
            trained = train_model(
                config,
                options,
                m,
                data.splits,
                world,
                output,
                telemetry,
                log,
                prints,
                interrupts,
                workdir,
            )
            committed.trained_steps = trained.state.step
        if not world.main:
            return Result(api.FineTuneJobStatus(phase="Succeeded"), {}, [])  # rank 0 reports
        with timer.stage("evaluate", log):
            metrics, gates, eval_notes = evaluate(
                config, options, m.model, m.tokenizer, data, m.device, m.base_before
            )
            notes = trained.notes + eval_notes
        with timer.stage("export", log):
            artifacts = export(m.model, m.tokenizer, spec, output, m.model_dir, workdir)
            artifacts.report = output.uri_for("report.json")
            artifacts.lossCurve = output.uri_for("loss-curve.png")
        quantized: tuple[list[api.QuantizedExport], dict[str, Any]] | None = None
        if spec.output.quantize:
            from . import quantize

            with timer.stage("quantize", log):
                quantized = quantize.run_stage(
                    m.model, m.tokenizer, spec, m.model_dir, data.splits.test, output,
                    m.device, workdir, log,
                )  # fmt: skip
        with timer.stage("report", log):
            status = final_status(config, data, m, trained, (metrics, gates), artifacts)
            if quantized is not None:
                status.quantized = quantized[0]
            report = build_report(
                config, status, data, m, trained, notes, world.size, timer.seconds
            )
            if quantized is not None:
                report["quantization"] = quantized[1]
            write_report(output, workdir, report)
        with timer.stage("promote", log):
            status = promote_stage(config, status, report, output, workdir, log)
        return Result(status, report, notes)
    finally:
        telemetry.close()


# ---------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="api.TrainerConfig JSON")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("KUBETUNE_METRICS_PORT", api.TRAINER_METRICS_PORT)),
        help="Prometheus /metrics port (0: off); env KUBETUNE_METRICS_PORT",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("KUBETUNE_METRICS_HOST", "0.0.0.0"),
        help="address the /metrics server binds (default all); env KUBETUNE_METRICS_HOST",
    )
    parser.add_argument(
        "--termination-log",
        default=os.environ.get("KUBETUNE_TERMINATION_LOG", api.TERMINATION_LOG),
        help="where the final status JSON goes when that folder exists",
    )
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="resolve relative paths in the spec here"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = Options(
        base_dir=args.base_dir,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        termination_log=args.termination_log,
    )
    return run_and_report(lambda: run(load_config(args.config), options), options)


def run_and_report(job: Callable[[], Result], options: Options) -> int:
    """Run, then turn the outcome into an exit code and a termination message."""
    from . import report

    try:
        result = job()
    except TrainerError as exc:
        return fail(exc, options)
    except OSError as exc:  # a local file outside Storage (scratch, staging): by errno
        from .storage import os_error

        return fail(os_error(exc, str(exc.filename or "a local file")), options)
    except Exception as exc:  # unexpected: infrastructure until proven otherwise (retried)
        traceback.print_exc()
        return fail(InfraError(f"internal error: {type(exc).__name__}: {exc}"), options)
    report.write_termination(report.termination_message(result.status), options.termination_log)
    return api.EXIT_OK


def fail(error: TrainerError, options: Options) -> int:
    """One 'error:' line, the termination message, the exit code."""
    from . import report

    print(f"error: {error}", file=sys.stderr, flush=True)
    # A failure after training (the registry step) keeps the committed results in the status.
    status = getattr(error, "status", None) or report.failure_status(
        str(error), preempted=isinstance(error, Preempted)
    )
    report.write_termination(report.termination_message(status), options.termination_log)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
