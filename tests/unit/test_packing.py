"""Packing: plans are tight and deterministic; packed logits equal each sample run alone."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune_trainer import packing, train

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo-model"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def test_pack_rows_fits_every_sample_once_and_is_tight() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    rows = packing.pack_rows(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # best fit: no two rows could be merged
    totals = sorted(sum(lengths[i] for i in row) for row in rows)
    assert totals[0] + totals[1] > 128
    assert packing.pack_rows(lengths, 128) == rows


def test_epoch_batches_deterministic_and_cover_epoch() -> None:
    lengths = [random.Random(i).randint(4, 60) for i in range(97)]
    for use_packing in (True, False):
        a = packing.epoch_batches(
            lengths, packing=use_packing, batch_size=8, max_len=64, seed=1, epoch=0
        )
        b = packing.epoch_batches(
            lengths, packing=use_packing, batch_size=8, max_len=64, seed=1, epoch=0
        )
        c = packing.epoch_batches(
            lengths, packing=use_packing, batch_size=8, max_len=64, seed=1, epoch=1
        )
        assert a == b
        assert a != c
        assert sorted(i for batch in a for row in batch for i in row) == list(range(97))


def test_collate_flat_has_no_padding_and_masks_first_token() -> None:
    samples = [Sample([5, 6, 7], [5, 6, 7]), Sample([8, 9], [-100, 9])]
    batch = packing.collate(samples, [[0, 1]], pad_id=0, mode="flat")
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch.inputs["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch.inputs["kubetune_segments"] == (0, 3, 5)
    assert "attention_mask" not in batch.inputs
    assert (batch.tokens, batch.padded, batch.targets) == (5, 5, 3)


@pytest.fixture(scope="module")
def model() -> Any:
    packing.register_varlen()
    m = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32, use_safetensors=True)
    return m.eval()


def _samples() -> list[Sample]:
    rng = random.Random(0)
    out = []
    for length in (17, 5, 30, 11):
        ids = [rng.randint(10, 1500) for _ in range(length)]
        out.append(Sample(ids, ids))
    return out


def _alone(model: Any, sample: Sample) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(
            input_ids=torch.tensor([sample.input_ids]), use_cache=False
        ).logits[0]
    return logits


def _packed_logits(model: Any, batch: packing.Batch, **extra: object) -> torch.Tensor:
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    inputs.update(extra)
    with torch.no_grad():
        logits: torch.Tensor = model(**inputs).logits
    return logits


@pytest.mark.parametrize(
    ("attn", "mode"),
    # flat (one concatenated sequence) is what the trainer feeds the varlen attention; rows
    # is the fallback for sdpa/eager, whose block-causal mask comes from position_ids.
    [("sdpa", "rows"), ("eager", "rows"), (packing.VARLEN, "rows"), (packing.VARLEN, "flat")],
)
def test_packed_logits_equal_each_sample_alone(model: Any, attn: str, mode: str) -> None:
    samples = _samples()
    model.set_attn_implementation(attn)
    try:
        alone = [_alone(model, s) for s in samples]
        batch = packing.collate(samples, [[0, 1], [2, 3]], pad_id=0, mode=mode)
        logits = _packed_logits(model, batch, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    flat = logits.reshape(-1, logits.shape[-1])
    width = logits.shape[1]
    offsets = {"flat": [0, 17, 22, 52], "rows": [0, 17, width, width + 30]}[mode]
    for sample, reference, start in zip(samples, alone, offsets, strict=True):
        got = flat[start : start + len(sample.input_ids)]
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def _contaminated(model: Any, **extra: object) -> float:
    """Largest logit difference of the second packed sample vs. running it alone."""
    samples = _samples()[:2]
    alone = _alone(model, samples[1])
    batch = packing.collate(samples, [[0, 1]], pad_id=0, mode="rows")
    packed = _packed_logits(model, batch, **extra)[0, 17:22]
    return float((packed - alone).abs().max())


def test_clean_packing_setup_has_no_contamination(model: Any) -> None:
    assert _contaminated(model, use_cache=False) < 1e-5


def test_all_ones_mask_contaminates(model: Any) -> None:
    # The control: with a 2D mask transformers stops deriving the block-causal mask.
    ones = torch.ones(1, 22, dtype=torch.long)
    assert _contaminated(model, use_cache=False, attention_mask=ones) > 1e-3


def test_use_cache_contaminates(model: Any) -> None:
    # The control: with a cache transformers assumes one continuing sequence.
    assert _contaminated(model, use_cache=True) > 1e-3


def _prefixed_samples() -> list[Sample]:
    """Three samples sharing a 9-token prompt; the targets start after it (at 12, 11, 14)."""
    rng = random.Random(5)
    head = [rng.randint(10, 1500) for _ in range(9)]
    out = []
    for prompt, answer in ((3, 6), (2, 9), (5, 4)):
        ids = head + [rng.randint(10, 1500) for _ in range(prompt + answer)]
        labels = [-100] * (9 + prompt) + ids[9 + prompt :]
        out.append(Sample(ids, labels))
    return out


def test_shared_prefix_stops_before_the_first_target_and_the_shortest_sample() -> None:
    samples = _prefixed_samples()
    assert packing.shared_prefix(samples) == 9
    # A target at position 7 of one sample: position 6's logits predict it, so the prefix
    # ends at 6 (positions 0..5).
    early = Sample(samples[0].input_ids, [-100] * 7 + samples[0].input_ids[7:])
    assert packing.shared_prefix([early, *samples[1:]]) == 6
    assert packing.shared_prefix(samples[:1]) == 0
    other = Sample([1, *samples[1].input_ids[1:]], samples[1].labels)
    assert packing.shared_prefix([samples[0], other]) == 0


def test_collate_shared_feeds_the_prefix_once() -> None:
    samples = _prefixed_samples()
    batch = packing.collate(samples, [[0, 1], [2]], pad_id=0, mode="shared")
    ids = batch.inputs["input_ids"][0].tolist()
    assert len(ids) == 9 + 9 + 11 + 9
    assert ids[:18] == samples[0].input_ids
    assert ids[18:29] == samples[1].input_ids[9:]
    assert batch.inputs["position_ids"][0].tolist()[18:21] == [9, 10, 11]
    assert batch.inputs["kubetune_segments"] == (0, 9, 18, 29, 38)
    assert batch.inputs["kubetune_prefix"] == 9
    flat = packing.collate(samples, [[0, 1], [2]], pad_id=0, mode="flat")
    # Same targets, same real tokens: only the repeated prefix is gone.
    assert (batch.targets, batch.tokens) == (flat.targets, flat.tokens) == (19, 56)
    kept = [x for x in batch.inputs["labels"][0].tolist() if x != -100]
    assert kept == [x for x in flat.inputs["labels"][0].tolist() if x != -100]


def test_shared_prefix_logits_and_gradients_equal_the_unshared_batch(model: Any) -> None:
    """Forward: every sample's logits equal the sample run alone. Backward: the gradient of
    the summed target loss equals the unshared (flat) batch's, for every weight."""
    samples = _prefixed_samples()
    model.set_attn_implementation(packing.VARLEN)
    try:
        shared = packing.collate(samples, [[0, 1, 2]], pad_id=0, mode="shared")
        logits = _packed_logits(model, shared, use_cache=False)[0]
        starts = list(shared.inputs["kubetune_segments"])
        for i, sample in enumerate(samples):
            got = torch.cat((logits[:9], logits[starts[i + 1] : starts[i + 2]]))
            torch.testing.assert_close(got, _alone(model, sample), atol=1e-5, rtol=1e-5)
        grads = {}
        for mode in ("flat", "shared"):
            batch = packing.collate(samples, [[0, 1, 2]], pad_id=0, mode=mode)
            model.zero_grad(set_to_none=True)
            train._loss_sum(model, dict(batch.inputs)).backward()  # the trainer's own loss
            grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    finally:
        model.set_attn_implementation("sdpa")
    for name, grad in grads["flat"].items():
        torch.testing.assert_close(grads["shared"][name], grad, atol=1e-5, rtol=1e-4)


def test_the_prefix_is_shared_only_without_dropout(model: Any) -> None:
    from peft import LoraConfig, get_peft_model

    assert packing.collate_mode(True, packing.VARLEN, model) == "shared"
    assert packing.collate_mode(True, "flash_attention_2", model) == "flat"
    assert packing.collate_mode(False, packing.VARLEN, model) == "padded"
    for dropout, mode in ((0.0, "shared"), (0.05, "flat")):
        config = LoraConfig(r=2, lora_dropout=dropout, target_modules=["q_proj"])
        tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO), config)
        assert packing.collate_mode(True, packing.VARLEN, tuned) == mode
    dropping = AutoModelForCausalLM.from_pretrained(DEMO, attention_dropout=0.1)
    assert packing.collate_mode(True, packing.VARLEN, dropping) == "flat"
