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

# A chat with one answer: encoded like QA, with the system turn in the prompt.
SYSTEM_QA = data.Example("sqa", 4, (("system", "Be brief."), *QA.messages))
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


@pytest.mark.parametrize("example", [QA, SYSTEM_QA, RAW], ids=["qa", "system-qa", "raw"])
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
    # Every assistant turn is a target, not only the last one.
    trained = tokenizer.decode(trained_part(encoded), skip_special_tokens=True)
    assert trained == "team=billingpriority=high"


def test_default_template_when_the_tokenizer_has_none() -> None:
    tokenizer = make_tokenizer(chat_template=False, add_bos=True)
    prompt = tokenizer.decode(data.prompt_ids(CHAT, tokenizer, 512))
    assert prompt == (
        "<s>### System:\nBe brief.\n\n### User:\nRoute this ticket.\n\n"
        "### Assistant:\nteam=billing</s>\n\n### User:\nAnd the priority?\n\n### Assistant:\n"
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


# --------------------------------------------------------------------------------------------
# multi-turn chat: every assistant turn is trained

ANSWERS = ("team=billing", "priority=high")


def labelled_spans(encoded: data.Encoded) -> list[list[int]]:
    """The runs of consecutive trained positions, in order."""
    spans: list[list[int]] = []
    previous = IGNORE
    for label in encoded.labels:
        if label != IGNORE:
            if previous == IGNORE:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def test_every_assistant_turn_is_trained_with_a_chat_template() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    encoded = data.encode(CHAT, tokenizer, 512)
    assert not encoded.truncated and len(encoded.labels) == len(encoded.input_ids)
    # Labels equal inputs where trained (the model shifts), and nothing else is trained.
    assert all(
        lab in (IGNORE, tok) for lab, tok in zip(encoded.labels, encoded.input_ids, strict=True)
    )
    # The template closes each answer with "</s>": trained with it, as the template writes it.
    spans = [tokenizer.decode(span) for span in labelled_spans(encoded)]
    assert spans == [f"{answer}</s>" for answer in ANSWERS]
    # The rest - BOS, system and user turns, the assistant cues - is masked.
    masked = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab == IGNORE]
    assert tokenizer.decode(masked) == (
        "<s><|system|>\nBe brief.<|user|>\nRoute this ticket.<|assistant|>\n"
        "<|user|>\nAnd the priority?<|assistant|>\n"
    )
    # The whole sequence is the template's own rendering of the conversation.
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in CHAT.messages], tokenize=False
    )


@pytest.mark.parametrize("add_bos", [True, False])
def test_every_assistant_turn_is_trained_with_the_default_template(add_bos: bool) -> None:
    tokenizer = make_tokenizer(chat_template=False, add_bos=add_bos)
    encoded = data.encode(CHAT, tokenizer, 512)
    spans = [tokenizer.decode(span) for span in labelled_spans(encoded)]
    assert spans == [f"{answer}</s>" for answer in ANSWERS]  # each answer learns to stop
    masked = [t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab == IGNORE]
    assert tokenizer.decode(masked) == ("<s>" if add_bos else "") + (
        "### System:\nBe brief.\n\n### User:\nRoute this ticket.\n\n### Assistant:\n"
        "\n\n### User:\nAnd the priority?\n\n### Assistant:\n"
    )


@pytest.mark.parametrize("template", [True, False])
def test_multi_turn_train_on_prompt_labels_everything(template: bool) -> None:
    tokenizer = make_tokenizer(chat_template=template)
    encoded = data.encode(CHAT, tokenizer, 512, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids == data.encode(CHAT, tokenizer, 512).input_ids


@pytest.mark.parametrize("template", [True, False])
def test_multi_turn_prompt_ids_end_before_the_last_answer(template: bool) -> None:
    tokenizer = make_tokenizer(chat_template=template)
    encoded = data.encode(CHAT, tokenizer, 512)
    prompt = data.prompt_ids(CHAT, tokenizer, 512)
    # Generation sees the conversation up to the last answer, exactly as training laid it out
    # (earlier answers included, as context).
    assert encoded.prompt_len == len(prompt) and encoded.input_ids[: len(prompt)] == prompt
    assert "team=billing" in tokenizer.decode(prompt)
    assert tokenizer.decode(encoded.labels[len(prompt) :], skip_special_tokens=True).strip() == (
        "priority=high"
    )


LONG_CHAT = data.Example(
    "long",
    4,
    (
        ("system", "Be brief."),
        *(
            turn
            for i in range(8)
            for turn in (
                ("user", f"Route support ticket {i} to the billing team, please."),
                ("assistant", f"team=billing priority=normal ticket={i}"),
            )
        ),
    ),
)


@pytest.mark.parametrize("template", [True, False])
def test_long_multi_turn_chat_keeps_its_most_recent_turns(template: bool) -> None:
    tokenizer = make_tokenizer(chat_template=template)
    full = data.encode(LONG_CHAT, tokenizer, 10_000)
    assert len(labelled_spans(full)) == 8 and not full.truncated
    encoded = data.encode(LONG_CHAT, tokenizer, 96)
    assert encoded.truncated and len(encoded.input_ids) == len(encoded.labels) == 96
    # Cut from the left, keeping BOS: what remains is the END of the conversation, unchanged,
    # with the same labels - the last answer whole, earlier answers that fit still trained.
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids[1:] == full.input_ids[-95:]
    assert encoded.labels[1:] == full.labels[-95:]
    spans = labelled_spans(encoded)
    assert len(spans) >= 2
    assert tokenizer.decode(spans[-1], skip_special_tokens=True).strip() == (
        "team=billing priority=normal ticket=7"
    )
    assert tokenizer.decode(spans[-2], skip_special_tokens=True).strip().endswith("ticket=6")
    _, truncated = data.encode_all([CHAT, LONG_CHAT], tokenizer, 96)
    assert truncated == 1


def test_a_long_last_answer_keeps_half_the_window_in_a_multi_turn_chat() -> None:
    tokenizer = make_tokenizer(chat_template=True)
    answer = "The quick brown fox jumps over the lazy dog. " * 20
    example = data.Example(
        "l", 5, (*LONG_CHAT.messages, ("user", "Tell me more."), ("assistant", answer))
    )
    encoded = data.encode(example, tokenizer, 64)
    assert encoded.truncated and len(encoded.input_ids) == 64
    # The final answer's head fills half the window; the context before it is cut from the left.
    assert len(encoded.input_ids) - encoded.prompt_len == 32
    assert encoded.labels[encoded.prompt_len :] == encoded.input_ids[encoded.prompt_len :]
    assert tokenizer.eos_token_id not in encoded.input_ids[encoded.prompt_len :]


def test_answers_the_template_renders_differently_later_become_context() -> None:
    # Like templates that drop the reasoning of earlier answers: once a later turn follows, an
    # answer "why|what" is rendered as "what" only. The sequence must still be the template's
    # own rendering; the earlier answer, which never appears as trained, becomes context.
    tokenizer = make_tokenizer(chat_template=True)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('|')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    example = data.Example(
        "r",
        6,
        (
            ("user", "Route this ticket."),
            ("assistant", "billing words|team=billing"),
            ("user", "And the priority?"),
            ("assistant", "high words|priority=high"),
        ),
    )
    encoded = data.encode(example, tokenizer, 512)
    messages = [{"role": r, "content": c} for r, c in example.messages]
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(
        messages[:3], tokenize=False, add_generation_prompt=True
    ) + ("high words|priority=high</s>")
    spans = [tokenizer.decode(span) for span in labelled_spans(encoded)]
    assert spans == ["high words|priority=high</s>"]


_turns = st.lists(st.tuples(_text, _text), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(turns=_turns, template=st.booleans(), max_len=st.integers(16, 160))
def test_multi_turn_encode_invariants(
    turns: list[tuple[str, str]], template: bool, max_len: int
) -> None:
    tokenizer = _TOKENIZERS[template]
    messages = tuple(m for q, a in turns for m in (("user", q), ("assistant", a)))
    example = data.Example("h", 1, messages)
    encoded = data.encode(example, tokenizer, max_len)
    assert len(encoded.input_ids) == len(encoded.labels) <= max_len
    # Trained labels are the inputs themselves; the last answer is always trained.
    assert all(
        lab in (IGNORE, tok) for lab, tok in zip(encoded.labels, encoded.input_ids, strict=True)
    )
    assert encoded.labels[encoded.prompt_len :] == encoded.input_ids[encoded.prompt_len :]
    assert encoded.prompt_len < len(encoded.input_ids)
    full = data.encode(example, tokenizer, 100_000)
    assert encoded.truncated == (len(full.input_ids) > max_len)
    assert len(labelled_spans(full)) == len(turns)  # every answer, apart
    assert full.input_ids[: full.prompt_len] == data.prompt_ids(example, tokenizer, 100_000)
    if not encoded.truncated:
        assert encoded == full and full.input_ids[-1] == tokenizer.eos_token_id
