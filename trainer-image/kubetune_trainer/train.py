"""The training loop: hand-written, so every step is visible.

AdamW (weight decay on matrices only), warmup + cosine/linear/constant schedule, gradient
accumulation with the loss normalized by the target tokens of the whole optimizer step (so
accumulation and packing do not change the loss scale), clipping, seeded everything.
Validation loss every ``evalEverySteps``; early stopping on it. A checkpoint every
``checkpointEverySteps`` (and on SIGTERM, and at the end) goes to
``<output>/checkpoints/step-<N>/`` through ``Storage.commit_dir`` (manifest last: a checkpoint
without its manifest does not exist). A restarted run resumes from the newest committed one:
the data order of an epoch depends only on (seed, epoch), so it jumps straight to the next
micro-batch instead of replaying the skipped ones.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP, or, for a full fine-tune,
sharded with FSDP2 (model.shard); each rank takes every WORLD_SIZE-th micro-batch of the same
plan, and only rank 0 writes to storage. A sharded model's checkpoint is gathered into full
tensors on rank 0 (a collective every rank joins) and scattered back into shards on resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from kubetune import api

from . import packing
from .data import IGNORE_INDEX
from .errors import Preempted
from .interrupts import Interrupts
from .model import is_sharded, trainable_parameters
from .packing import EncodedLike
from .report import Telemetry, peak_memory_bytes

if TYPE_CHECKING:
    from .storage import Storage

Scheduler = torch.optim.lr_scheduler.LambdaLR

CHECKPOINTS = "checkpoints"
Progress = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# state that survives a restart


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch: int = 0  # index (in this rank's list) of the next micro-batch of that epoch
    tokens: int = 0  # real tokens trained on (this rank)
    train_seconds: float = 0.0
    best_eval: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    # Processes that wrote this state (batch and tokens are per rank); None: a checkpoint
    # from before this was recorded, taken as written by as many processes as now.
    world_size: int | None = None

    def for_world(self, size: int) -> TrainState:
        """This state for `size` processes. Rank r takes every size-th micro-batch of one
        plan, so k micro-batches on each of n ranks are the plan's first k*n: resume at
        k*n // size (a few micro-batches run again when it does not divide, none is skipped)."""
        if self.world_size is None or self.world_size == size:
            return replace(self, world_size=size)
        consumed = self.batch * self.world_size
        tokens = self.tokens * self.world_size
        return replace(self, batch=consumed // size, tokens=tokens // size, world_size=size)


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Plan:
    micro_per_epoch: int  # micro-batches per epoch on each rank
    steps_per_epoch: int
    total_steps: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def rank_batches(
    lengths: Sequence[int], spec: api.TrainingSpec, max_len: int, epoch: int, world: World
) -> list[list[list[int]]]:
    """This rank's micro-batches of one epoch; every rank gets the same count (the few left
    over batches are dropped under DDP so no rank waits in an all-reduce forever)."""
    batches = packing.epoch_batches(
        lengths,
        packing=spec.packing,
        batch_size=spec.batchSize,
        max_len=max_len,
        seed=spec.seed,
        epoch=epoch,
    )
    usable = len(batches) // world.size * world.size
    return batches[world.rank : usable : world.size]


def make_plan(lengths: Sequence[int], spec: api.TrainingSpec, max_len: int, world: World) -> Plan:
    micro = len(rank_batches(lengths, spec, max_len, 0, world))
    if micro == 0:
        from .errors import UserError

        raise UserError(
            f"spec.training.batchSize: the training split ({len(lengths)} rows) gives no batch "
            f"for {world.size} process(es); add rows or lower the batch size"
        )
    per_epoch = math.ceil(micro / spec.gradientAccumulationSteps)
    total = spec.maxSteps or max(1, math.ceil((spec.epochs or 1.0) * per_epoch))
    return Plan(micro, per_epoch, total)


def build_optimizer(
    model: torch.nn.Module, spec: api.TrainingSpec, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for p in trainable_parameters(model).values():
        # Weight decay on matrices only: decaying norms and biases just hurts.
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.weightDecay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=spec.learningRate, betas=(0.9, 0.999)
    )
    warmup = int(spec.warmupRatio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# the training fingerprint: a checkpoint resumes only the training that wrote it

FINGERPRINT = "fingerprint.json"
# The spec sections that decide the trained weights.
_TRAINING_SECTIONS = ("model", "dataset", "method", "training")
# Fields in those sections that cannot change the weights, so a resume may change them: where
# the data lives (its content is fingerprinted instead), license records, checkpoint cadence,
# and recomputing activations (gradient checkpointing trades memory for time, same math).
_RESULT_NEUTRAL = (
    "spec.model.license",
    "spec.dataset.source",
    "spec.dataset.split.validationSource",
    "spec.dataset.split.testSource",
    "spec.dataset.license",
    "spec.dataset.maxInvalidFraction",
    "spec.training.checkpointEverySteps",
    "spec.training.keepCheckpoints",
    "spec.training.gradientCheckpointing",
    "spec.training.gradientAccumulationSteps",  # replaced by the step's micro-batches below
)
MICRO_BATCHES_PER_STEP = "micro-batches per optimizer step (gradientAccumulationSteps x processes)"


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}")
    else:
        yield prefix, value


def fingerprint(
    spec: api.FineTuneJobSpec, data_hashes: dict[str, str], world_size: int
) -> dict[str, Any]:
    """Every input that changes the trained weights, as {field: value}. ``data_hashes`` names
    the data's content (e.g. the dataset and each split's sha256). A job may come back with
    another number of GPUs: only the micro-batches of one optimizer step count."""
    body = {name: spec.to_api().get(name, {}) for name in _TRAINING_SECTIONS}
    prints = {
        key: value
        for key, value in _flatten(body, "spec")
        if not any(key == n or key.startswith(n + ".") for n in _RESULT_NEUTRAL)
    }
    prints[MICRO_BATCHES_PER_STEP] = spec.training.gradientAccumulationSteps * world_size
    prints.update(data_hashes)
    return prints


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: old -> new' for every field that differs (absent: unset)."""

    def shown(value: Any) -> str:
        return "unset" if value is None else json.dumps(value)

    return [
        f"{key} {shown(saved.get(key))} -> {shown(current.get(key))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def check_resumable(storage: Storage, current: dict[str, Any]) -> None:
    """Refuse (UserError) when the output holds checkpoints of a different training: resuming
    would mix two trainings in one model and one report. Checkpoints written before
    fingerprints existed resume as they always did."""
    from .errors import UserError

    for rel in reversed(storage.committed(CHECKPOINTS)):
        key = f"{rel}/{FINGERPRINT}"
        if not storage.exists(key):
            continue
        try:
            saved = json.loads(storage.read_bytes(key))
        except ValueError:
            continue  # corrupt: loading verifies the checkpoint and falls back past it
        differences = fingerprint_differences(saved, current)
        if differences:
            raise UserError(
                f"spec.output.destination: {storage.uri_for(rel)} was trained with another "
                f"config ({'; '.join(differences)}); resuming would mix two trainings: choose a "
                "new output destination (or restore those values to resume)"
            )
        return


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, main: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(trainable tensors, optimizer state) on rank 0, None elsewhere. Sharded (FSDP) this is a
    collective every rank must join: full tensors are gathered onto rank 0's CPU, and the
    optimizer state is keyed by parameter name (so a resume can shard it again)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if not main:
            return None
        # named_parameters lists tied weights once, as the unsharded path stores them.
        tensors = {name: cast(torch.Tensor, full[name]) for name in trainable_parameters(model)}
        return tensors, cast(dict[str, Any], optim)
    if not main:
        return None
    params = trainable_parameters(model)
    return {k: v.detach().contiguous().cpu() for k, v in params.items()}, optimizer.state_dict()


def save_checkpoint(
    storage: Storage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    state: TrainState,
    keep: int,
    *,
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    prints: dict[str, Any] | None = None,
    scratch: Path | None = None,
) -> str:
    """Write the checkpoint locally, commit it (manifest last), then prune old ones. A sharded
    model passes its `gathered` checkpoint_state (rank 0 alone writes)."""
    from safetensors.torch import save_file

    if gathered is None:  # unsharded: rank 0 reads its own model
        gathered = checkpoint_state(model, optimizer, main=True)
        assert gathered is not None
    tensors, optim = gathered
    # Staged in the run's scratch folder, which the next run removes if this one is killed.
    with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-", dir=scratch) as tmp:
        folder = Path(tmp)
        save_file(
            {k: v.detach().contiguous() for k, v in tensors.items()},
            str(folder / "trainable.safetensors"),
        )
        torch.save(optim, folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng.pt")
        record = asdict(state)
        record["python_rng"] = _jsonable(random.getstate())
        (folder / "state.json").write_text(json.dumps(record, indent=1))
        if prints is not None:
            (folder / FINGERPRINT).write_text(json.dumps(prints, indent=1, sort_keys=True))
        uri: str = storage.commit_dir(folder, f"{CHECKPOINTS}/step-{state.step}")
    for old in storage.committed(CHECKPOINTS)[:-keep]:
        storage.delete(old)
    return uri


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


@dataclass
class Resumed:
    state: TrainState | None  # None: start from step 0
    uri: str | None  # the checkpoint restored
    corrupt: list[tuple[str, str]]  # (key, why) of newer checkpoints that failed verification


def load_checkpoint(
    storage: Storage,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    *,
    scratch: Path | None = None,
) -> Resumed:
    """Restore the newest committed checkpoint that matches its manifest (size and sha256 of
    every file). A corrupted one must not block the job forever: it is skipped (and listed in
    ``corrupt``) for the next older one."""
    from .storage import CorruptFolder

    corrupt: list[tuple[str, str]] = []
    for rel in reversed(storage.committed(CHECKPOINTS)):
        with tempfile.TemporaryDirectory(prefix="kubetune-resume-", dir=scratch) as tmp:
            try:
                folder = storage.download_dir(rel, Path(tmp))
            except CorruptFolder as exc:
                corrupt.append((rel, str(exc)))
                continue
            state = _restore(folder, storage.uri_for(rel), model, optimizer, scheduler)
        return Resumed(state, storage.uri_for(rel), corrupt)
    return Resumed(None, None, corrupt)


def _restore(
    folder: Path,
    uri: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
) -> TrainState:
    """Load a verified checkpoint folder into the model, optimizer, scheduler and RNGs."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    params = trainable_parameters(model)
    mismatched = sorted(
        name
        for name, p in params.items()
        if name not in tensors or tuple(tensors[name].shape) != tuple(p.shape)
    )
    if mismatched:
        from .errors import UserError

        raise UserError(
            f"spec.output.destination: checkpoint {uri} does not match the model "
            f"({', '.join(mismatched[:3])} missing or of another shape): it was written "
            "by a different job; use a new output destination"
        )
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Every rank read the full tensors; each keeps its own shard. Not strict: a tied
        # head is stored once (under the embedding's name), and the check above already
        # proved every parameter is there.
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, dict(tensors), options=full)
        named = _by_name(optim, model, optimizer)
        set_optimizer_state_dict(model, optimizer, named, options=full)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    record = json.loads((folder / "state.json").read_text())
    random.setstate(_tupled(record.pop("python_rng")))
    # Older checkpoints carry fields TrainState no longer has (e.g. an unused "extra").
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in record.items() if k in known})


def _by_name(
    optim: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, as FSDP's loader wants it. A checkpoint of an
    unsharded run (one process, or DDP) keys it by position in the optimizer's parameter list,
    which build_optimizer lays out the same way for the same model."""
    if all(isinstance(k, str) for k in optim["state"]):
        return optim
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[int(k)]: v for k, v in optim["state"].items()},
        "param_groups": [
            {**group, "params": [order[int(i)] for i in group["params"]]}
            for group in optim["param_groups"]
        ],
    }


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class Setup:
    model: torch.nn.Module  # possibly DDP-wrapped (FSDP shards in place: then model is core)
    core: torch.nn.Module  # the unwrapped model (for saving)
    train: Sequence[EncodedLike]
    validation: Sequence[EncodedLike]
    spec: api.TrainingSpec
    max_len: int
    pad_id: int
    device: torch.device
    world: World = field(default_factory=World)
    storage: Storage | None = None  # checkpoint storage; only rank 0 writes
    collate_mode: str = "flat"
    fingerprint: dict[str, Any] | None = None  # written with every checkpoint
    scratch: Path | None = None  # where checkpoints are staged (default: the temp dir)


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _loss_sum(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Summed cross-entropy over target tokens. Labels are not shifted in the batch; the first
    token of every packed sample is -100 (packing.collate), so nothing crosses samples."""
    labels = inputs.pop("labels")
    if labels.shape[0] == 1:
        # One flat sequence: run the output head only where a target follows (completion
        # tokens). The head is a large share of a step (vocab x hidden per token) and most
        # positions are prompt.
        keep = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits[0]
        return F.cross_entropy(logits.float(), labels[0, keep + 1], reduction="sum")
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _all_reduce(value: float, world: World, device: torch.device, op: str = "sum") -> float:
    if world.size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor.item())


@torch.no_grad()
def validation_loss(setup: Setup) -> float | None:
    """Mean loss per target token on the validation split (sharded across ranks)."""
    if not setup.validation:
        return None
    lengths = [len(s.input_ids) for s in setup.validation]
    if setup.collate_mode == "padded":
        # One sample per row: a padded batch carries a 2D mask, which must never span samples.
        rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: lengths[i])]
    else:
        rows = packing.pack_rows(lengths, setup.max_len)
    per_batch = max(1, round(setup.spec.batchSize * len(rows) / len(lengths)))
    batches = [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]
    mine: list[list[list[int]] | None] = list(batches[setup.world.rank :: setup.world.size])
    if is_sharded(setup.core):
        # Every FSDP forward gathers weights from all ranks: each rank must run as many
        # forwards as the others, so a rank short of batches runs one more it does not count.
        mine += [None] * (math.ceil(len(batches) / setup.world.size) - len(mine))
    setup.model.eval()
    total, targets = 0.0, 0
    try:
        for batch_rows in mine:
            batch = packing.collate(
                setup.validation,
                batch_rows or batches[0],
                pad_id=setup.pad_id,
                mode=setup.collate_mode,
            )
            # The unwrapped model: DDP forward outside backward would desync its buckets.
            loss_sum = float(_loss_sum(setup.core, _to_device(batch.inputs, setup.device)))
            if batch_rows is not None:
                total += loss_sum
                targets += batch.targets
    finally:
        setup.model.train()
    total = _all_reduce(total, setup.world, setup.device)
    targets = int(_all_reduce(float(targets), setup.world, setup.device))
    return total / targets if targets else None


def train(
    setup: Setup,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    state: TrainState,
    plan: Plan,
    *,
    telemetry: Telemetry | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    interrupts: Interrupts | None = None,
) -> TrainState:
    """Run optimizer steps until plan.total_steps, early stop, or SIGTERM/SIGINT: then a
    checkpoint and Preempted. ``interrupts`` is the run's handler (installed here if none)."""
    spec, world, model = setup.spec, setup.world, setup.model
    lengths = [len(s.input_ids) for s in setup.train]
    accum = spec.gradientAccumulationSteps
    params = list(trainable_parameters(setup.core).values())
    state = state.for_world(world.size)  # a job may come back with another number of GPUs
    started, steps_at_start, tokens_at_start = time.monotonic(), state.step, state.tokens
    saved_at = state.step  # a resumed step is committed already; step 0 never is needed
    previous = started
    model.train()
    with contextlib.ExitStack() as stack:
        if interrupts is None:
            interrupts = stack.enter_context(Interrupts().installed())
        stack.enter_context(interrupts.deferred())
        epoch_cache: tuple[int, list[list[list[int]]]] = (-1, [])
        while state.step < plan.total_steps and not state.stopped_early:
            if epoch_cache[0] != state.epoch:
                epoch_cache = (
                    state.epoch,
                    rank_batches(lengths, spec, setup.max_len, state.epoch, world),
                )
            batches = epoch_cache[1]
            if state.batch >= len(batches):
                state.epoch, state.batch = state.epoch + 1, 0
                continue
            group = batches[state.batch : state.batch + accum]
            collated = [
                packing.collate(setup.train, rows, pad_id=setup.pad_id, mode=setup.collate_mode)
                for rows in group
            ]
            targets = _all_reduce(float(sum(c.targets for c in collated)), world, setup.device)
            step_loss = 0.0
            for i, batch in enumerate(collated):
                final_micro = i == len(collated) - 1
                with _gradient_sync(model, world.size == 1 or final_micro):
                    loss_sum = _loss_sum(model, _to_device(batch.inputs, setup.device))
                    # DDP and FSDP average gradients over ranks; scaling by size makes it a
                    # global sum.
                    (loss_sum * world.size / max(targets, 1.0)).backward()
                step_loss += float(loss_sum.detach())
            torch.nn.utils.clip_grad_norm_(params, spec.maxGradNorm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch += len(group)
            state.tokens += sum(c.tokens for c in collated)
            loss = _all_reduce(step_loss, world, setup.device) / max(targets, 1.0)
            now = time.monotonic()
            run_seconds = now - started
            rate = (state.step - steps_at_start) / run_seconds if run_seconds > 0 else 0.0
            entry: dict[str, Any] = {
                "step": state.step,
                "loss": round(loss, 6),
                "learningRate": scheduler.get_last_lr()[0],
                "epoch": round(state.epoch + state.batch / max(1, len(batches)), 4),
            }
            if state.step % spec.evalEverySteps == 0 or state.step == plan.total_steps:
                eval_loss = validation_loss(setup)
                if eval_loss is not None:
                    entry["evalLoss"] = round(eval_loss, 6)
                    _early_stopping(state, spec, eval_loss)
            state.history.append(entry)
            state.train_seconds += now - previous
            previous = now
            tokens_per_second = (
                (state.tokens - tokens_at_start) * world.size / max(run_seconds, 1e-9)
            )
            eta = (plan.total_steps - state.step) / rate if rate > 0 else None
            if telemetry is not None:
                telemetry.update(
                    step=state.step,
                    total_steps=plan.total_steps,
                    loss=loss,
                    eval_loss=entry.get("evalLoss"),
                    learning_rate=entry["learningRate"],
                    tokens_per_second=tokens_per_second,
                    epoch=entry["epoch"],
                    peak_memory_bytes=peak_memory_bytes(),
                    eta_seconds=eta,
                )
            if progress is not None:
                progress({**entry, "totalSteps": plan.total_steps, "etaSeconds": eta})
            received = interrupts.received
            stop = _all_reduce(1.0 if received else 0.0, world, setup.device, op="max")
            due = state.step % spec.checkpointEverySteps == 0
            if due or stop:
                uri = _checkpoint(setup, optimizer, scheduler, state)
                saved_at = state.step
                if uri is not None:
                    log(f"checkpoint step {state.step}: {uri}")
            if stop:
                raise Preempted(
                    f"{received or 'SIGTERM'} at step {state.step}/{plan.total_steps}: "
                    "checkpoint committed; rerunning resumes from it"
                )
        state.train_seconds = round(state.train_seconds, 3)
        if saved_at != state.step:
            # A final checkpoint: a rerun after a failed (or interrupted) evaluation or export
            # resumes here instead of retraining.
            _checkpoint(setup, optimizer, scheduler, state)
        if interrupts.received:
            raise Preempted(
                f"{interrupts.received} at the end of training (step {state.step}): checkpoint "
                "committed; rerunning evaluates and exports without training again"
            )
    return state


def _checkpoint(
    setup: Setup, optimizer: torch.optim.Optimizer, scheduler: Scheduler, state: TrainState
) -> str | None:
    """Every rank calls this (a sharded model is gathered first); rank 0 alone writes."""
    if setup.storage is None:
        return None
    gathered = checkpoint_state(setup.core, optimizer, setup.world.main)
    if gathered is None:
        return None
    return save_checkpoint(
        setup.storage,
        setup.core,
        optimizer,
        scheduler,
        state,
        setup.spec.keepCheckpoints,
        gathered=gathered,
        prints=setup.fingerprint,
        scratch=setup.scratch,
    )


@contextlib.contextmanager
def _gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Micro-batches before the last of an optimizer step accumulate gradients locally: no
    DDP all-reduce, no FSDP reduce-scatter until the last one."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        yield
    elif not enabled:
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def _early_stopping(state: TrainState, spec: api.TrainingSpec, eval_loss: float) -> None:
    rule = spec.earlyStopping
    if state.best_eval is None or eval_loss < state.best_eval - (rule.minDelta if rule else 0.0):
        state.best_eval, state.bad_evals = eval_loss, 0
        return
    state.bad_evals += 1
    if rule is not None and state.bad_evals >= rule.patience:
        state.stopped_early = True
