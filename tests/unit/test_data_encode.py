"""Encoding with real tokenizers: templates, label masking, EOS, truncation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer import data
from kubetune_trainer.errors import UserError
from tests.support.tiny_tokenizer import make_tokenizer

IGNORE = data.IGNORE_INDEX
DEMO_MODEL = Path(__file__).resolve().parents[2] / "examples" / "demo-model"

QA = data.Example("qa", 1, (("user", "What is the capital of France?"), ("assistant", "Paris.")))
CHAT = data.Example(
    "chat",
    2,
    (
        ("system", "Be brief."),
        ("user", "Route this ticket."),
        ("assistant", "team=billing"),
        ("user", "And the priority?"),
        ("assistant", "priority=high"),
    ),
)
_TOKENIZERS = {
    True: make_tokenizer(chat_template=True),
    False: make_tokenizer(chat_template=False, add_bos=True),
}

RAW = data.Example(
    "raw", 3, (("user", "The quick brown fox"), ("assistant", " jumps over the dog.")), raw=True
)


@pytest.fixture(scope="module", params=["template", "default-bos", "default-nobos"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return {
        "template": lambda: make_tokenizer(chat_template=True),
        "default-bos": lambda: make_tokenizer(chat_template=False, add_bos=True),
        "default-nobos": lambda: make_tokenizer(chat_template=False, add_bos=False),
    }[request.param]()


def trained_part(encoded: data.Encoded) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE]


@pytest.mark.parametrize("example", [QA, CHAT, RAW], ids=["qa", "chat", "raw"])
def test_loss_only_on_completion_and_eos(tokenizer: Any, example: data.Example) -> None:
    encoded = data.encode(example, tokenizer, 512)
    prompt = data.prompt_ids(example, tokenizer, 512)
    assert not encoded.truncated
    assert len(encoded.labels) == len(encoded.input_ids)
    # The prompt is exactly what generation will see, and it is masked.
    assert encoded.input_ids[: len(prompt)] == prompt and encoded.prompt_len == len(prompt)
    assert encoded.labels[: len(prompt)] == [IGNORE] * len(prompt)
    # Everything after it is trained, labels equal inputs (the model shifts), EOS last.
    completion = encoded.input_ids[len(prompt) :]
    assert trained_part(encoded) == completion
    assert completion[-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(completion, skip_special_tokens=True).strip() == example.completion.strip()
    )


def test_train_on_prompt_labels_everything(tokenizer: Any) -> None:
    encoded = data.encode(QA, tokenizer, 512, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids == data.encode(QA, tokenizer, 512).input_ids


def test_chat_template_is_used_when_present() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    encoded = data.encode(CHAT, tokenizer, 512)
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<s><|system|>") and "<|assistant|>" in text
    assert text.count("</s>") == 2  # the template closes both answers; no extra EOS added
    # Earlier assistant turns are context, not targets: only the last answer is trained.
    trained = tokenizer.decode(trained_part(encoded), skip_special_tokens=True)
    assert "priority=high" in trained and "team=billing" not in trained


def test_default_template_when_the_tokenizer_has_none() -> None:
    tokenizer = make_tokenizer(chat_template=False, add_bos=True)
    prompt = tokenizer.decode(data.prompt_ids(CHAT, tokenizer, 512))
    assert prompt == (
        "<s>### System:\nBe brief.\n\n### User:\nRoute this ticket.\n\n"
        "### Assistant:\nteam=billing\n\n### User:\nAnd the priority?\n\n### Assistant:\n"
    )


def test_raw_examples_use_no_template(tokenizer: Any) -> None:
    text = tokenizer.decode(data.encode(RAW, tokenizer, 512).input_ids, skip_special_tokens=True)
    assert text == "The quick brown fox jumps over the dog."


def test_prompt_and_completion_are_encoded_separately() -> None:
    # Encoded as one text, "Summar" + "ize" merges into different tokens than "Summar" alone:
    # the prompt ids must stay exactly the prompt's own encoding (what generation sees).
    tokenizer = make_tokenizer(chat_template=False, add_bos=False)
    alone = tokenizer("Summar", add_special_tokens=False)["input_ids"]
    joined = tokenizer("Summarize", add_special_tokens=False)["input_ids"]
    assert joined[: len(alone)] != alone  # the case this test is about
    example = data.Example("m", 1, (("user", "Summar"), ("assistant", "ize")), raw=True)
    encoded = data.encode(example, tokenizer, 64)
    assert encoded.input_ids[: encoded.prompt_len] == alone
    assert encoded.labels[: encoded.prompt_len] == [IGNORE] * len(alone)
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True) == "Summarize"


def test_truncation_cuts_the_completion_tail_and_the_prompt_from_the_left() -> None:
    tokenizer = make_tokenizer(chat_template=False, add_bos=True)
    long_prompt = "Summarize the following text in one sentence, please. " * 20
    long_answer = "The quick brown fox jumps over the lazy dog. " * 20
    example = data.Example("t", 1, (("user", long_prompt), ("assistant", long_answer)))
    full = data.encode(example, tokenizer, 10_000)
    encoded = data.encode(example, tokenizer, 64)
    assert encoded.truncated and not full.truncated
    assert len(encoded.input_ids) == 64
    # Half the window goes to the completion's head; its EOS is cut with its tail.
    completion = full.input_ids[full.prompt_len :]
    assert encoded.input_ids[encoded.prompt_len :] == completion[:32]
    assert tokenizer.eos_token_id not in encoded.input_ids
    # The prompt keeps BOS and its END (the question and the assistant cue).
    prompt = full.input_ids[: full.prompt_len]
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids[1 : encoded.prompt_len] == prompt[-(encoded.prompt_len - 1) :]
    assert trained_part(encoded) == completion[:32]


def test_short_completion_keeps_all_of_it_when_the_prompt_is_long() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    example = data.Example(
        "t", 1, (("user", "Route this support ticket. " * 40), ("assistant", "ok"))
    )
    full = data.encode(example, tokenizer, 10_000)
    encoded = data.encode(example, tokenizer, 48)
    completion = full.input_ids[full.prompt_len :]
    assert encoded.truncated and len(encoded.input_ids) == 48
    assert encoded.input_ids[-len(completion) :] == completion  # answer + EOS intact
    assert encoded.input_ids[0] == tokenizer.bos_token_id


def test_prompt_ids_are_cut_from_the_left() -> None:
    tokenizer = make_tokenizer(chat_template=False, add_bos=True)
    example = data.Example(
        "t", 1, (("user", "Route this support ticket. " * 40), ("assistant", "ok"))
    )
    full = data.prompt_ids(example, tokenizer, 10_000)
    cut = data.prompt_ids(example, tokenizer, 16)
    assert len(cut) == 16 and cut[0] == tokenizer.bos_token_id and cut[1:] == full[-15:]


def test_encode_all_counts_truncations() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    long = data.Example("l", 2, (("user", "Say hi. " * 50), ("assistant", "hi")))
    fits = max(len(data.encode(e, tokenizer, 10_000).input_ids) for e in (QA, CHAT))
    assert len(data.encode(long, tokenizer, 10_000).input_ids) > fits
    encoded, truncated = data.encode_all([QA, long, CHAT], tokenizer, fits)
    assert [e.truncated for e in encoded] == [False, True, False] and truncated == 1


def test_template_errors_name_the_row() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match=r"row 2: the tokenizer's chat template refused"):
        data.encode(CHAT, tokenizer, 64)


def test_demo_model_tokenizer_from_pretrained() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert tokenizer.chat_template
    encoded = data.encode(QA, tokenizer, 128)
    completion = tokenizer.decode(trained_part(encoded))
    assert completion == "Paris." + tokenizer.eos_token
    assert tokenizer.decode(encoded.input_ids[: encoded.prompt_len]).endswith("<|assistant|>\n")


_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=80
).filter(lambda t: bool(t.strip()))


@settings(max_examples=150, deadline=None)
@given(
    prompt=_text,
    completion=_text,
    raw=st.booleans(),
    template=st.booleans(),
    max_len=st.integers(16, 96),
)
def test_encode_invariants(
    prompt: str, completion: str, raw: bool, template: bool, max_len: int
) -> None:
    tokenizer = _TOKENIZERS[template]
    example = data.Example("h", 1, (("user", prompt), ("assistant", completion)), raw=raw)
    encoded = data.encode(example, tokenizer, max_len)
    assert len(encoded.input_ids) == len(encoded.labels) <= max_len
    trained = [t for t in encoded.labels if t != IGNORE]
    assert trained and trained == encoded.input_ids[encoded.prompt_len :]
    assert encoded.labels[: encoded.prompt_len] == [IGNORE] * encoded.prompt_len
    full = data.encode(example, tokenizer, 100_000)
    assert encoded.truncated == (len(full.input_ids) > max_len)
    if not encoded.truncated:
        assert encoded == full and full.input_ids[-1] == tokenizer.eos_token_id
