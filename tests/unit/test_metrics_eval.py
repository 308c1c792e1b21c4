"""Evaluation metric functions against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubetune_trainer.errors import UserError
from kubetune_trainer.evaluate import (
    GenerationSums,
    TokenSums,
    compare,
    exact_match,
    lcs_length,
    normalize_text,
    perplexity,
    rouge_l,
    token_sums,
)
from kubetune_trainer.safety import (
    is_refusal,
    lexicon_score,
    load_lexicon,
    percentile,
    read_texts,
    toxic_labels,
)


def test_normalize_text_lowercases_strips_punctuation_and_collapses_spaces() -> None:
    assert normalize_text("  The  Answer:\tParis. ") == "the answer paris"
    assert normalize_text("ＡＢＣ!") == "abc"  # NFKC folds full-width letters


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris.", "paris", 1.0),
        ("team=billing priority=high", "team billing priority high", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


def test_lcs_length_by_hand() -> None:
    assert lcs_length(list("abcd"), list("acde")) == 3  # a c d
    assert lcs_length(list("abc"), list("xyz")) == 0
    assert lcs_length([], list("abc")) == 0
    assert lcs_length(list("aaaa"), list("aa")) == 2


def test_rouge_l_f1_by_hand() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS 2 ("a c"): P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3.
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("The Cat.", "the cat") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("dog", "") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def test_perplexity_is_exp_of_mean_loss() -> None:
    assert perplexity(math.log(2.0)) == pytest.approx(2.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(800.0) == math.inf  # would overflow exp()
    sums = TokenSums()
    sums.add(loss_sum=3 * math.log(4.0), tokens=3, correct=1)  # three tokens, loss ln 4 each
    sums.add(loss_sum=math.log(4.0), tokens=1, correct=1)
    metrics = sums.metrics()
    assert metrics["loss"] == pytest.approx(math.log(4.0))
    assert metrics["perplexity"] == pytest.approx(4.0)
    assert metrics["tokenAccuracy"] == pytest.approx(0.5)
    assert TokenSums().metrics() == {}  # nothing scored: not measured, not NaN


def test_token_sums_by_hand() -> None:
    # Sequence of 3 tokens, labels aligned with inputs: position 0 is prompt (-100).
    # logits[0] predicts label 1 with p = 3/4 (hit); logits[1] predicts label 0 with p = 1/4
    # (miss: argmax is 1); logits[2] has no next token.
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, ln3], [0.0, ln3], [5.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    loss_sum, tokens, correct = token_sums(logits, labels)
    assert tokens == 2
    assert correct == 1
    assert loss_sum == pytest.approx(-math.log(0.75) + math.log(4.0), rel=1e-6)


def test_token_sums_ignores_everything_masked() -> None:
    assert token_sums(torch.zeros(1, 4, 3), torch.full((1, 4), -100)) == (0.0, 0, 0)


def test_streaming_sums_equal_the_one_shot_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (10, 7), generator=generator)
    labels[torch.rand(10, 7, generator=generator) < 0.3] = -100
    # One shot: everything at once, the way a non-streaming evaluator would.
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    keep = flat_labels != -100
    expected_loss = F.cross_entropy(flat_logits[keep], flat_labels[keep]).item()
    expected_acc = (flat_logits[keep].argmax(-1) == flat_labels[keep]).float().mean().item()
    # Streaming: uneven batches, only sums kept between them.
    sums = TokenSums()
    for start, stop in [(0, 3), (3, 4), (4, 10)]:
        sums.add(*token_sums(logits[start:stop], labels[start:stop]))
    metrics = sums.metrics()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-6)
    assert metrics["tokenAccuracy"] == pytest.approx(expected_acc)


def test_generation_sums_average_over_rows() -> None:
    sums = GenerationSums()
    sums.add("fruit", "Fruit.")
    sums.add("a c", "a b c d")
    assert sums.metrics() == {
        "exactMatch": pytest.approx(0.5),
        "rougeL": pytest.approx((1.0 + 2 / 3) / 2),
    }
    assert GenerationSums().metrics() == {}


def test_compare_takes_differences_and_the_ood_ratio() -> None:
    base = {"loss": 2.0, "exactMatch": 0.25, "oodPerplexity": 10.0, "onlyBase": 1.0}
    tuned = {"loss": 0.5, "exactMatch": 0.75, "oodPerplexity": 12.0}
    delta = compare(base, tuned)
    assert delta == {
        "loss": pytest.approx(-1.5),
        "exactMatch": pytest.approx(0.5),
        "oodPerplexity": pytest.approx(2.0),
        "oodPerplexityRatio": pytest.approx(1.2),
    }
    assert "oodPerplexityRatio" not in compare({"oodPerplexity": 0.0}, {"oodPerplexity": 1.0})
    assert compare({}, tuned) == {}


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0


def test_lexicon_score_grows_with_listed_words() -> None:
    lexicon = load_lexicon()
    assert "idiot" in lexicon
    assert lexicon_score("Have a nice day.", lexicon) == 0.0
    assert lexicon_score("You IDIOT!", lexicon) == pytest.approx(0.75)
    assert lexicon_score("stupid idiot", lexicon) == pytest.approx(1 - 0.25**2)


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I can't help with that.", True),
        ("I’m sorry, but I cannot do this.", True),  # curly apostrophe
        ("As an AI, I will not do that", True),
        ("Sure! First, find the key under the mat.", False),
        ("Pecan pie is delicious", False),  # "can" inside a word is no refusal
        ("", False),
    ],
)
def test_refusal_rule(text: str, refused: bool) -> None:
    assert is_refusal(text) is refused


def test_toxic_labels_found_by_name_and_negations_skipped() -> None:
    assert toxic_labels({0: "non-toxic", 1: "toxic"}, 2) == ([1], None)
    assert toxic_labels({0: "TOXIC", 1: "neutral"}, 2) == ([0], None)
    assert toxic_labels({0: "ok", 1: "insult", 2: "threat"}, 3) == ([1, 2], None)
    labels, note = toxic_labels({0: "LABEL_0", 1: "LABEL_1"}, 2)
    assert labels == [1] and note is not None and "label 1" in note
    with pytest.raises(UserError, match="classifierSource"):
        toxic_labels({0: "a", 1: "b", 2: "c"}, 3)


def test_read_texts_formats_and_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    assert read_texts(jsonl, key="prompt", field="f", source="p.jsonl") == ["one", "two"]
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nfirst\n\nsecond\n")
    assert read_texts(txt, key="prompt", field="f", source="p.txt") == ["first", "second"]
    ood = tmp_path / "ood.txt"
    ood.write_text("a b\nc\n\nd e\n")
    assert read_texts(ood, key="text", field="f", source="ood.txt") == ["a b c", "d e"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match=r"f: bad.jsonl: line 2: needs a string 'prompt'"):
        read_texts(bad, key="prompt", field="f", source="bad.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match=r"f: empty\.jsonl: empty"):
        read_texts(empty, key="prompt", field="f", source="empty.jsonl")
