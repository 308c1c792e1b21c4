"""Training pieces: schedules, plans, early stopping, model/method errors, report shapes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune import api
from kubetune_trainer import model as model_stage
from kubetune_trainer import report, train
from kubetune_trainer.errors import UserError
from tests.support import trainer_runs as tr


def _training(**values: Any) -> api.TrainingSpec:
    return api.TrainingSpec.model_validate({"maxSteps": 100, **values})


def _lrs(spec: api.TrainingSpec, steps: int) -> list[float]:
    layer = torch.nn.Linear(2, 2)
    optimizer, scheduler = train.build_optimizer(layer, spec, steps)
    out = []
    for _ in range(steps):
        out.append(float(scheduler.get_last_lr()[0]))
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = _lrs(_training(learningRate=0.1, warmupRatio=0.1, scheduler="cosine"), 100)
    assert lrs[0] < lrs[5] < lrs[9] <= 0.1
    assert max(lrs) == pytest.approx(0.1, rel=1e-6)
    assert lrs[-1] < 0.001
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_linear_and_constant_schedules() -> None:
    linear = _lrs(_training(learningRate=1.0, warmupRatio=0.0, scheduler="linear"), 10)
    assert linear == pytest.approx([1 - i / 10 for i in range(10)])
    constant = _lrs(_training(learningRate=0.5, warmupRatio=0.0, scheduler="constant"), 10)
    assert constant == pytest.approx([0.5] * 10)


def test_weight_decay_only_on_matrices() -> None:
    layer = torch.nn.Linear(3, 3)
    optimizer, _ = train.build_optimizer(layer, _training(weightDecay=0.1), 10)
    by_decay = {g["weight_decay"]: [p.ndim for p in g["params"]] for g in optimizer.param_groups}
    assert by_decay == {0.1: [2], 0.0: [1]}


def test_plan_counts_steps_from_epochs_and_accumulation() -> None:
    lengths = [10] * 64
    spec = api.TrainingSpec(epochs=2, batchSize=8, gradientAccumulationSteps=3, packing=False)
    plan = train.make_plan(lengths, spec, 128, train.World())
    assert plan.micro_per_epoch == 8
    assert plan.steps_per_epoch == 3
    assert plan.total_steps == 6
    halves = train.make_plan(lengths, spec, 128, train.World(rank=1, size=2))
    assert halves.micro_per_epoch == 4


def test_ranks_get_disjoint_batches_of_equal_count() -> None:
    lengths = [5 + i % 17 for i in range(101)]
    spec = api.TrainingSpec(epochs=1, batchSize=4, packing=True)
    shards = [train.rank_batches(lengths, spec, 64, 0, train.World(r, 2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    seen = [i for shard in shards for batch in shard for row in batch for i in row]
    assert len(seen) == len(set(seen))


def test_early_stopping_patience_and_min_delta() -> None:
    spec = _training(earlyStopping={"patience": 2, "minDelta": 0.1})
    state = train.TrainState()
    for loss in (1.0, 0.95, 0.8, 0.75):
        train._early_stopping(state, spec, loss)
        assert not state.stopped_early
    train._early_stopping(state, spec, 0.79)
    assert state.stopped_early
    assert state.best_eval == 0.8


def test_unknown_target_module_lists_the_models_linear_modules() -> None:
    spec = api.FineTuneJobSpec.model_validate(
        tr.spec_dict(Path("x.jsonl"), Path("out"))
        | {"method": {"type": "lora", "lora": {"targetModules": ["q_proj", "query_key_value"]}}}
    )
    base = model_stage.load_base(tr.DEMO_MODEL, spec, torch.device("cpu"))
    with pytest.raises(UserError) as caught:
        model_stage.apply_method(base, spec)
    message = str(caught.value)
    assert message.startswith("spec.method.lora.targetModules: query_key_value not found")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert "lm_head" not in message


def test_all_linear_lora_trains_only_adapters() -> None:
    spec = api.FineTuneJobSpec.model_validate(
        tr.spec_dict(Path("x.jsonl"), Path("out"))
        | {"method": {"type": "lora", "lora": {"r": 2, "targetModules": ["all-linear"]}}}
    )
    peft_model = model_stage.apply_method(
        model_stage.load_base(tr.DEMO_MODEL, spec, torch.device("cpu")), spec
    )
    names = list(model_stage.trainable_parameters(peft_model))
    assert names and all("lora_" in n for n in names)
    assert any("down_proj" in n for n in names)


def test_model_folder_without_weights_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tr.DEMO_MODEL, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights.*pytorch_model\.bin"):
        model_stage.check_model_dir(folder, api.ModelSpec(source=str(folder)))


def test_revision_mismatch_is_a_user_error() -> None:
    spec = api.ModelSpec(source=str(tr.DEMO_MODEL), revision="v9")
    with pytest.raises(UserError, match=r"spec.model.revision: 'v9'.*'demo-v1'"):
        model_stage.check_model_dir(tr.DEMO_MODEL, spec)


def test_termination_message_is_status_shaped_and_small() -> None:
    status = api.FineTuneJobStatus(
        phase="Succeeded",
        message="ok",
        metrics=api.Metrics(base={"loss": 2.0}, tuned={"loss": 1.0}, delta={"loss": -1.0}),
        gates=[
            api.GateResult(metric=f"delta.loss{i}", op="<", value=0, passed=True)
            for i in range(200)
        ],
        artifacts=api.Artifacts(adapter="s3://b/adapter"),
    )
    text = report.termination_message(status)
    assert len(text.encode()) < report.TERMINATION_LIMIT
    parsed = api.FineTuneJobStatus.model_validate(json.loads(text))
    assert parsed.phase == "Succeeded"
    assert parsed.metrics is not None and parsed.metrics.tuned == {"loss": 1.0}
    assert parsed.artifacts is not None and parsed.artifacts.adapter == "s3://b/adapter"
    assert parsed.gates == []  # dropped to fit


def test_telemetry_exposes_the_gauges_the_operator_reads() -> None:
    telemetry = report.Telemetry(port=0)
    telemetry.update(step=3, total_steps=10, loss=1.5, eta_seconds=math.nan)
    text = telemetry.exposition()
    for name in report.GAUGES:
        assert f"kubetune_trainer_{name} " in text
    assert "kubetune_trainer_step 3.0" in text
    assert "kubetune_trainer_loss 1.5" in text
    assert "kubetune_trainer_eta_seconds 0.0" in text  # NaN is not published


def test_loss_curve_png(tmp_path: Path) -> None:
    history = [{"step": i, "loss": 1 / i} for i in range(1, 20)] + [{"step": 20, "evalLoss": 0.1}]
    path = report.loss_curve(history, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _quickstart_samples(count: int) -> list[Any]:
    """The first ``count`` quickstart rows, parsed and encoded as the trainer does."""
    from transformers import AutoTokenizer

    from kubetune_trainer.data import Example, encode, parse_row

    tokenizer = AutoTokenizer.from_pretrained(tr.DEMO_MODEL)
    lines = tr.QUICKSTART.read_text().splitlines()[:count]
    examples = [parse_row(i + 1, json.loads(line), "alpaca", {}) for i, line in enumerate(lines)]
    assert all(isinstance(e, Example) for e in examples), examples
    return [encode(e, tokenizer, 128) for e in examples if isinstance(e, Example)]


def test_validation_loss_is_the_same_packed_or_padded() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import packing

    tokenizer = AutoTokenizer.from_pretrained(tr.DEMO_MODEL)
    samples = _quickstart_samples(20)
    model = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, use_safetensors=True)
    losses = {}
    modes = (
        ("flat", packing.VARLEN),
        ("shared", packing.VARLEN),
        ("rows", "sdpa"),
        ("padded", "sdpa"),
    )
    for mode, attention in modes:
        model_stage.set_attention(model, attention)
        setup = train.Setup(
            model=model,
            core=model,
            train=[],
            validation=samples,
            spec=_training(batchSize=4),
            max_len=128,
            pad_id=tokenizer.pad_token_id,
            device=torch.device("cpu"),
            collate_mode=mode,
        )
        losses[mode] = train.validation_loss(setup)
    assert losses["flat"] is not None
    assert losses["shared"] == pytest.approx(losses["flat"], rel=1e-5)
    assert losses["rows"] == pytest.approx(losses["flat"], rel=1e-5)
    assert losses["padded"] == pytest.approx(losses["flat"], rel=1e-5)


def test_sharing_the_prompt_prefix_trains_the_same_run() -> None:
    """Not one batch but a run: optimizer steps with gradient accumulation, the loss normalized
    by each step's targets, on quickstart rows (they share the chat template's and the
    instruction's opening). Flat and shared give the same losses step by step and the same
    adapter weights, up to float rounding."""
    from kubetune_trainer import packing

    spec = api.FineTuneJobSpec.model_validate(
        tr.spec_dict(
            Path("x.jsonl"),
            Path("out"),
            maxSteps=8,
            batchSize=4,
            gradientAccumulationSteps=2,
            learningRate=2e-3,
        )
        | {"method": {"type": "lora", "lora": {"r": 4, "dropout": 0.0}}}
    )
    runs = {}
    for mode in ("flat", "shared"):
        torch.manual_seed(0)
        base = model_stage.load_base(tr.DEMO_MODEL, spec, torch.device("cpu"))
        model = model_stage.apply_method(base, spec)
        model_stage.set_attention(model, packing.VARLEN)
        rows = _quickstart_samples(64)
        assert packing.shared_prefix(rows[:4]) > 0  # the case under test
        plan = train.make_plan([len(r.input_ids) for r in rows], spec.training, 128, train.World())
        optimizer, scheduler = train.build_optimizer(model, spec.training, plan.total_steps)
        setup = train.Setup(
            model=model,
            core=model,
            train=rows,
            validation=[],
            spec=spec.training,
            max_len=128,
            pad_id=0,
            device=torch.device("cpu"),
            collate_mode=mode,
        )
        state = train.train(
            setup, optimizer, scheduler, train.TrainState(), plan, log=lambda _: None
        )
        weights = model_stage.trainable_parameters(model)
        runs[mode] = ([h["loss"] for h in state.history if "loss" in h], weights)
    (flat, flat_w), (shared, shared_w) = runs["flat"], runs["shared"]
    assert len(flat) == 8 and shared == pytest.approx(flat, rel=1e-5)
    for name, value in flat_w.items():
        torch.testing.assert_close(shared_w[name], value, rtol=1e-4, atol=1e-6)


def _spec(**training: Any) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate(
        tr.spec_dict(Path("d.jsonl"), Path("out"), **training)
    )


def test_the_fingerprint_holds_what_changes_the_weights_and_nothing_else() -> None:
    hashes = {"data": "abc"}
    base = train.fingerprint(_spec(), hashes, world_size=1)
    # Neutral: checkpoint cadence, where the data lives, evaluation, output, resources.
    neutral = _spec(checkpointEverySteps=5, keepCheckpoints=4, gradientCheckpointing=True)
    neutral.dataset.source = "elsewhere/d.jsonl"
    neutral.evaluation.maxNewTokens = 99
    neutral.output.mergeAdapter = True
    assert train.fingerprint(neutral, hashes, world_size=1) == base
    # Two processes with half the accumulation: the same optimizer step.
    assert train.fingerprint(_spec(gradientAccumulationSteps=2), hashes, 1) == train.fingerprint(
        _spec(), hashes, 2
    )
    changed = _spec(learningRate=0.0001, seed=8)
    changed.dataset.maxSeqLength = 256
    assert changed.method.lora is not None
    changed.method.lora.r = 8
    differences = train.fingerprint_differences(base, train.fingerprint(changed, {"data": "d"}, 1))
    assert differences == [
        'data "abc" -> "d"',
        "spec.dataset.maxSeqLength 128 -> 256",
        "spec.method.lora.r 4 -> 8",
        "spec.training.learningRate 0.002 -> 0.0001",
        "spec.training.seed 7 -> 8",
    ]


def test_a_resume_with_another_number_of_processes_continues_the_same_plan() -> None:
    spec = _training(batchSize=2, packing=False)
    lengths = [8 + i % 5 for i in range(40)]
    one = train.rank_batches(lengths, spec, 64, 0, train.World())
    # One process did 6 micro-batches; two ranks go on with the plan's 7th and 8th.
    state = train.TrainState(step=3, batch=6, tokens=600, world_size=1).for_world(2)
    assert (state.batch, state.tokens, state.world_size) == (3, 300, 2)
    ranks = [train.rank_batches(lengths, spec, 64, 0, train.World(r, 2)) for r in range(2)]
    assert [ranks[0][state.batch], ranks[1][state.batch]] == one[6:8]
    # And back: two ranks' 3 each are the plan's first 6.
    back = replace(state, batch=4).for_world(1)
    assert back.batch == 8 and one[8] == ranks[0][4]
    # A checkpoint that did not record its world size keeps its position.
    assert train.TrainState(batch=5).for_world(2).batch == 5
