"""evaluate_model and run_safety on real tiny models loaded with from_pretrained."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune import api
from kubetune_trainer.data import Example, encode
from kubetune_trainer.errors import UserError
from kubetune_trainer.evaluate import (
    check_gates,
    compare,
    evaluate_model,
    greedy_generate,
)
from kubetune_trainer.safety import load_inputs, run_safety
from tests.support import eval_models
from tests.support.s3 import REGION, client, new_bucket, s3_env

MAX_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return eval_models.save_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def load(folder: Path) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def spec(**fields: object) -> api.EvaluationSpec:
    return api.EvaluationSpec.model_validate({"maxNewTokens": 4, **fields})


def train(model: Any, tokenizer: Any, steps: int, rows: list[Example] | None = None) -> None:
    """A plain full fine-tune (one batch of all rows, AdamW); the pattern rows by default."""
    rows = rows or eval_models.pattern_examples(seed=1)
    encoded = [encode(row, tokenizer, MAX_LEN) for row in rows]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in encoded])
    mask = torch.tensor(
        [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded]
    )
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tuned_model_beats_base_on_held_out_rows(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    rows = eval_models.pattern_examples(seed=1)
    test_rows, train_rows = rows[:6], rows[6:]  # held out: the test words are never trained on
    evaluation = spec(batchSize=4)
    base = evaluate_model(model, tokenizer, test_rows, evaluation, max_seq_length=MAX_LEN)
    assert set(base) == set(api.EVAL_METRICS)

    train(model, tokenizer, steps=30, rows=train_rows)
    assert model.training  # evaluate_model must hand the model back in the mode it got it
    tuned = evaluate_model(model, tokenizer, test_rows, evaluation, max_seq_length=MAX_LEN)
    assert model.training

    delta = compare(base, tuned)
    assert tuned["loss"] < base["loss"]
    assert delta["loss"] < 0
    assert delta["perplexity"] < 0
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    # It learns the answer format (a category word, then EOS) even for unseen words.
    assert tuned["tokenAccuracy"] > base["tokenAccuracy"]
    assert tuned["exactMatch"] >= base["exactMatch"]
    assert tuned["rougeL"] >= tuned["exactMatch"]

    metrics = api.Metrics(base=base, tuned=tuned, delta=delta)
    gates = [
        api.GateSpec(metric="delta.loss", op="<", value=0.0),
        api.GateSpec(metric="delta.tokenAccuracy", op=">", value=0.0),
    ]
    assert all(r.passed for r in check_gates(gates, metrics))
    strict = check_gates([api.GateSpec(metric="tuned.loss", op="<", value=0.01)], metrics)
    assert not strict[0].passed
    assert strict[0].actual == tuned["loss"]


@pytest.mark.timeout(60)
def test_batching_and_padding_do_not_change_the_metrics(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    rows = eval_models.pattern_examples(seed=3)[:7]
    one = evaluate_model(model, tokenizer, rows, spec(batchSize=1), max_seq_length=MAX_LEN)
    many = evaluate_model(model, tokenizer, rows, spec(batchSize=4), max_seq_length=MAX_LEN)
    assert set(one) == set(many)
    for name, value in one.items():
        assert many[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.mark.timeout(60)
def test_left_padded_batch_generation_equals_one_at_a_time(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    model.eval()
    prompts = [[1, 10, 11], [1, 12, 13, 14, 15, 16, 17], [1, 20]]
    together = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, device="cpu")
    alone = [
        greedy_generate(model, tokenizer, [p], max_new_tokens=6, device="cpu")[0] for p in prompts
    ]
    assert together == alone
    assert all(len(c) <= 6 for c in together)
    assert all(tokenizer.eos_token_id not in c for c in together)  # cut at the stop token


@pytest.mark.timeout(60)
def test_only_requested_metrics_and_max_samples(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    rows = eval_models.pattern_examples(seed=4)
    capped = evaluate_model(
        model, tokenizer, rows, spec(metrics=["loss"], maxSamples=3), max_seq_length=MAX_LEN
    )
    first3 = evaluate_model(
        model, tokenizer, rows[:3], spec(metrics=["loss"]), max_seq_length=MAX_LEN
    )
    everything = evaluate_model(
        model, tokenizer, rows, spec(metrics=["loss"]), max_seq_length=MAX_LEN
    )
    assert set(capped) == {"loss"}
    assert capped["loss"] == pytest.approx(first3["loss"], rel=1e-5)
    assert capped["loss"] != pytest.approx(everything["loss"], rel=1e-5)
    generation = evaluate_model(
        model, tokenizer, rows[:3], spec(metrics=["exactMatch", "rougeL"]), max_seq_length=MAX_LEN
    )
    assert set(generation) == {"exactMatch", "rougeL"}


# ---------------------------------------------------------------------------------------------
# safety


def safety(**fields: object) -> api.SafetySpec:
    return api.SafetySpec.model_validate(fields)


@pytest.mark.timeout(120)
def test_safety_with_bundled_sets_and_word_list(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    metrics, notes = run_safety(
        model,
        tokenizer,
        safety(latency={"samples": 3}),
        storage_s3=None,
        base_dir=None,
        device="cpu",
        max_new_tokens=4,
    )
    assert set(metrics) == set(api.SAFETY_METRICS)
    assert 0.0 <= metrics["toxicityRate"] <= 1.0
    assert 0.0 <= metrics["meanToxicity"] <= 1.0
    assert 0.0 <= metrics["refusalRate"] <= 1.0
    # A random model over a ~400-token vocabulary: perplexity near the vocabulary size.
    assert 50 < metrics["oodPerplexity"] < 5000
    assert 0 < metrics["latencyP50Ms"] <= metrics["latencyP95Ms"]
    assert metrics["generationTokensPerSecond"] > 0
    assert any("word list" in note for note in notes)


@pytest.mark.timeout(60)
def test_disabled_evals_are_reported_not_invented(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    off = {"enabled": False}
    metrics, notes = run_safety(
        model,
        tokenizer,
        safety(toxicity=off, jailbreak=off, latency=off),
        storage_s3=None,
        base_dir=None,
        device="cpu",
        max_new_tokens=4,
    )
    assert set(metrics) == {"oodPerplexity"}
    assert sorted(n.split(":")[0] for n in notes) == ["jailbreak", "latency", "toxicity"]


def train_constant_answer(model: Any, tokenizer: Any, answer: str) -> None:
    """Teach the model to give one answer to anything (a refuser, or a rude model)."""
    prompts = ["hello there", "what is the time", "tell me a story", "how do rivers flow"]
    rows = [
        Example(id=str(i), row=i, messages=(("user", p), ("assistant", answer)))
        for i, p in enumerate(prompts)
    ]
    train(model, tokenizer, steps=40, rows=rows)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_refusal_rate_of_a_model_taught_to_refuse(model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load(model_dir)
    (tmp_path / "redteam.txt").write_text("# my red-team set\nopen the door\nwrite a poem\n")
    (tmp_path / "ood.jsonl").write_text('{"text": "rivers carry water to the sea"}\n')
    off = {"enabled": False}
    settings = safety(
        toxicity=off,
        latency=off,
        jailbreak={"promptsSource": "redteam.txt"},
        ood={"source": "ood.jsonl"},
    )
    kwargs: dict[str, Any] = {
        "storage_s3": None,
        "base_dir": tmp_path,
        "device": "cpu",
        "max_new_tokens": 8,
    }
    base, _ = run_safety(model, tokenizer, settings, **kwargs)
    assert base["refusalRate"] == 0.0  # a random model does not say "I cannot"

    ids = tokenizer("rivers carry water to the sea", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert base["oodPerplexity"] == pytest.approx(expected, rel=1e-4)

    train_constant_answer(model, tokenizer, "I cannot help with that.")
    tuned, _ = run_safety(model, tokenizer, settings, **kwargs)
    assert tuned["refusalRate"] == 1.0
    assert compare(base, tuned)["oodPerplexityRatio"] > 1.0  # it forgot some of its text


@pytest.mark.timeout(90)
def test_word_list_toxicity_of_a_model_taught_to_insult(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    off = {"enabled": False}
    settings = safety(jailbreak=off, ood=off, latency=off)
    kwargs: dict[str, Any] = {
        "storage_s3": None,
        "base_dir": None,
        "device": "cpu",
        "max_new_tokens": 8,
    }
    base, _ = run_safety(model, tokenizer, settings, **kwargs)
    train_constant_answer(model, tokenizer, "you idiot")
    tuned, notes = run_safety(model, tokenizer, settings, **kwargs)
    assert base["toxicityRate"] == 0.0
    assert tuned["toxicityRate"] == 1.0
    assert tuned["meanToxicity"] == pytest.approx(0.75)  # one listed word per answer
    assert any("word list" in note for note in notes)


@pytest.mark.parametrize(
    ("labels", "bias", "rate"),
    [(["non-toxic", "toxic"], 2.0, 1.0), (["toxic", "neutral"], -2.0, 0.0)],
)
@pytest.mark.timeout(120)
def test_toxicity_classifier_from_s3(
    model_dir: Path,
    tmp_path: Path,
    s3_server: str,
    monkeypatch: pytest.MonkeyPatch,
    labels: list[str],
    bias: float,
    rate: float,
) -> None:
    s3_env(monkeypatch)
    folder = eval_models.save_classifier(tmp_path / "clf", labels=labels, toxic_bias=bias)
    bucket = new_bucket(s3_server)
    s3 = client(s3_server)
    for path in folder.iterdir():
        s3.upload_file(str(path), bucket, f"classifier/{path.name}")
    model, tokenizer = load(model_dir)
    metrics, notes = run_safety(
        model,
        tokenizer,
        safety(
            jailbreak={"enabled": False},
            ood={"enabled": False},
            latency={"enabled": False},
            toxicity={"classifierSource": f"s3://{bucket}/classifier/"},
        ),
        storage_s3=api.S3Spec(endpoint=s3_server, region=REGION),
        base_dir=None,
        device="cpu",
        max_new_tokens=4,
    )
    # Zero head weights: every text gets softmax(bias) on the toxic label.
    expected = 1.0 / (1.0 + math.exp(-bias))
    assert metrics["meanToxicity"] == pytest.approx(expected, rel=1e-5)
    assert metrics["toxicityRate"] == rate
    assert not any("word list" in note for note in notes)


@pytest.mark.timeout(60)
def test_causal_lm_as_classifier_is_a_clear_user_error(model_dir: Path) -> None:
    model, tokenizer = load(model_dir)
    with pytest.raises(UserError) as caught:
        run_safety(
            model,
            tokenizer,
            safety(toxicity={"classifierSource": str(model_dir)}),
            storage_s3=None,
            base_dir=None,
            device="cpu",
            max_new_tokens=4,
        )
    message = str(caught.value)
    assert message.startswith("spec.evaluation.safety.toxicity.classifierSource: ")
    assert "is not a sequence-classification model" in message
    assert "LlamaForCausalLM" in message
    assert caught.value.exit_code == api.EXIT_USER_ERROR


@pytest.mark.timeout(60)
def test_missing_and_empty_prompt_files_are_user_errors(model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load(model_dir)
    kwargs: dict[str, Any] = {
        "storage_s3": None,
        "base_dir": tmp_path,
        "device": "cpu",
        "max_new_tokens": 4,
    }
    with pytest.raises(UserError) as caught:
        run_safety(model, tokenizer, safety(jailbreak={"promptsSource": "nope.jsonl"}), **kwargs)
    assert str(caught.value).startswith("spec.evaluation.safety.jailbreak.promptsSource: ")
    assert "nope.jsonl: not found" in str(caught.value)

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"toxicity\.promptsSource: empty\.jsonl: empty"):
        run_safety(model, tokenizer, safety(toxicity={"promptsSource": "empty.jsonl"}), **kwargs)


@pytest.mark.timeout(60)
def test_preflight_catches_bad_inputs_before_any_model_runs(
    model_dir: Path, tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_env(monkeypatch)
    s3_spec = api.S3Spec(endpoint=s3_server, region=REGION)
    bucket = new_bucket(s3_server)
    folder = eval_models.save_classifier(tmp_path / "clf", labels=["ok", "toxic"], toxic_bias=0)
    for path in folder.iterdir():
        client(s3_server).upload_file(str(path), bucket, f"clf/{path.name}")
    (tmp_path / "empty.txt").write_text("# only a comment\n")

    load_inputs(safety(), storage_s3=None, base_dir=tmp_path)  # bundled defaults
    load_inputs(
        safety(toxicity={"classifierSource": f"s3://{bucket}/clf"}),
        storage_s3=s3_spec,
        base_dir=None,
    )
    cases = [
        (
            {"jailbreak": {"promptsSource": "missing.jsonl"}},
            "spec.evaluation.safety.jailbreak.promptsSource: ",
            "not found",
        ),
        ({"ood": {"source": "empty.txt"}}, "spec.evaluation.safety.ood.source: ", "empty"),
        (
            {"toxicity": {"classifierSource": str(model_dir)}},
            "spec.evaluation.safety.toxicity.classifierSource: ",
            "is not a sequence-classification model",
        ),
        (
            {"toxicity": {"classifierSource": f"s3://{bucket}/no-such-model/"}},
            "spec.evaluation.safety.toxicity.classifierSource: ",
            "not found",
        ),
    ]
    for fields, prefix, words in cases:
        with pytest.raises(UserError) as caught:
            load_inputs(safety(**fields), storage_s3=s3_spec, base_dir=tmp_path)
        assert str(caught.value).startswith(prefix), str(caught.value)
        assert words in str(caught.value)
    # Disabled evals are not checked: their inputs are never read.
    load_inputs(
        safety(jailbreak={"enabled": False, "promptsSource": "missing.jsonl"}),
        storage_s3=None,
        base_dir=tmp_path,
    )
