"""Reading and validating datasets: every format, fieldMap, every kind of bad row."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune import api
from kubetune_trainer import data
from kubetune_trainer.errors import UserError


def spec(**fields: Any) -> api.DatasetSpec:
    return api.DatasetSpec.model_validate(
        {"source": "train.jsonl", "license": {"name": "MIT", "usage": "research"}, **fields}
    )


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Name a colour.", "output": "blue"},
]


# ---- formats


def test_alpaca_rows_become_user_and_assistant_turns(tmp_path: Path) -> None:
    ds = data.load_dataset(write_jsonl(tmp_path / "a.jsonl", ALPACA), spec(format="alpaca"))
    assert ds.format == "alpaca" and ds.total_rows == 3 and ds.invalid == []
    first, second, third = ds.examples
    assert first.messages == (("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5"))
    assert second.messages == (("user", "Say hi."), ("assistant", "hi"))  # empty input: no gap
    assert third.completion == "blue" and not third.raw
    assert [e.row for e in ds.examples] == [1, 2, 3]


def test_chat_rows_keep_their_turns(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]
    ds = data.load_dataset(write_jsonl(tmp_path / "c.jsonl", rows), spec(format="chat"))
    (example,) = ds.examples
    assert example.messages[0] == ("system", "Be brief.")
    assert example.completion == "4"
    assert example.prompt_messages[-1] == ("user", "2+2?")


def test_prompt_completion_rows_are_raw(tmp_path: Path) -> None:
    rows = [{"prompt": "The sky is", "completion": " blue."}]
    ds = data.load_dataset(
        write_jsonl(tmp_path / "p.jsonl", rows), spec(format="prompt-completion")
    )
    (example,) = ds.examples
    assert example.raw
    assert example.messages == (("user", "The sky is"), ("assistant", " blue."))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "output": "o"}, "alpaca"),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            "chat",
        ),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ],
)
def test_auto_detects_the_format(tmp_path: Path, row: dict[str, Any], expected: str) -> None:
    ds = data.load_dataset(write_jsonl(tmp_path / "x.jsonl", [row]), spec())
    assert ds.format == expected and len(ds.examples) == 1


def test_auto_detection_failure_names_the_columns_and_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as error:
        data.load_dataset(path, spec())
    message = str(error.value)
    assert message.startswith("spec.dataset.source: cannot detect")
    assert "answer, question" in message and "spec.dataset.fieldMap" in message


def test_field_map_renames_alpaca_columns(tmp_path: Path) -> None:
    rows = [{"question": "Capital of France?", "context": "Europe", "answer": "Paris", "key": 7}]
    field_map = {"instruction": "question", "input": "context", "output": "answer", "id": "key"}
    ds = data.load_dataset(write_jsonl(tmp_path / "x.jsonl", rows), spec(fieldMap=field_map))
    (example,) = ds.examples
    assert ds.format == "alpaca"  # detected through the map
    assert example.messages == (("user", "Capital of France?\n\nEurope"), ("assistant", "Paris"))
    assert example.id == "7"


def test_field_map_renames_chat_keys_and_sharegpt_roles(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    field_map = {"messages": "conversations", "role": "from", "content": "value"}
    ds = data.load_dataset(write_jsonl(tmp_path / "x.jsonl", rows), spec(fieldMap=field_map))
    assert ds.format == "chat"
    assert ds.examples[0].messages == (("user", "Hi"), ("assistant", "Yo"))


def test_field_map_renames_prompt_completion(tmp_path: Path) -> None:
    rows = [{"src": "a", "tgt": "b"}]
    field_map = {"prompt": "src", "completion": "tgt"}
    ds = data.load_dataset(write_jsonl(tmp_path / "x.jsonl", rows), spec(fieldMap=field_map))
    assert ds.format == "prompt-completion" and ds.examples[0].completion == "b"


def test_mapped_field_problems_name_the_users_column(tmp_path: Path) -> None:
    rows = [{"question": "q"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    field_map = {"instruction": "question", "output": "answer"}
    with pytest.raises(UserError, match=r"row 1: missing field 'answer' \(mapped to output\)"):
        data.load_dataset(path, spec(format="alpaca", fieldMap=field_map))


# ---- file types


def test_json_csv_parquet_and_jsonl_give_the_same_examples(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": f"r{i}", "instruction": f"Do {i}", "input": "", "output": f"done {i}"}
        for i in range(4)
    ]
    paths = [write_jsonl(tmp_path / "d.jsonl", rows)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    paths.append(tmp_path / "d.json")
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths.append(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths.append(tmp_path / "d.parquet")
    loaded = [data.load_dataset(p, spec(format="alpaca")) for p in paths]
    for ds in loaded:
        assert ds.examples == loaded[0].examples
        assert ds.sha256 == hashlib.sha256(Path(paths[loaded.index(ds)]).read_bytes()).hexdigest()
    assert [e.id for e in loaded[0].examples] == ["r0", "r1", "r2", "r3"]


def test_csv_chat_messages_as_json_text(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi, there"}, {"role": "assistant", "content": "Hello"}]
    with (tmp_path / "c.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(messages)])
    ds = data.load_dataset(tmp_path / "c.csv", spec(format="chat"))
    assert ds.examples[0].messages == (("user", "Hi, there"), ("assistant", "Hello"))


def test_csv_ragged_record_is_reported_with_its_number(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("instruction,output\na,b\nc,d,e\nf,g\n")
    with pytest.raises(UserError, match=r"row 2: 1 more value\(s\) than the header"):
        data.load_dataset(tmp_path / "r.csv", spec(format="alpaca"))


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(
        UserError, match=r"spec.dataset.source: d.txt: unsupported file type '.txt'"
    ):
        data.load_dataset(tmp_path / "d.txt", spec())
    with pytest.raises(UserError, match=r"spec.dataset.source: .*nope.jsonl: not found"):
        data.load_dataset(tmp_path / "nope.jsonl", spec())


def test_json_file_must_hold_an_array(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(UserError, match="expected a JSON array of rows, got object"):
        data.load_dataset(tmp_path / "d.json", spec())
    (tmp_path / "e.json").write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(UserError, match="invalid JSON at line 2"):
        data.load_dataset(tmp_path / "e.json", spec())


# ---- bad rows


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("alpaca", {"instruction": "i"}, "missing field 'output'"),
        ("alpaca", {"instruction": "", "output": "o"}, "empty field 'instruction'"),
        ("alpaca", {"instruction": "  ", "output": "o"}, "empty field 'instruction'"),
        (
            "alpaca",
            {"instruction": "i", "output": 5},
            "field 'output' must be a string, got number",
        ),
        (
            "alpaca",
            {"instruction": "i", "input": ["x"], "output": "o"},
            "field 'input' must be a string, got array",
        ),
        ("alpaca", {"instruction": "i", "output": None}, "missing field 'output'"),
        ("alpaca", [1, 2], "expected an object with the alpaca fields, got array"),
        ("alpaca", "text", "expected an object with the alpaca fields, got string"),
        (
            "alpaca",
            {"id": {"a": 1}, "instruction": "i", "output": "o"},
            "field 'id' must be a string or an integer, got object",
        ),
        ("chat", {"messages": "hi"}, "field 'messages' is not a JSON list"),
        ("chat", {"messages": []}, "field 'messages' is empty"),
        (
            "chat",
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0]: unknown role 'bot'",
        ),
        ("chat", {"messages": [{"content": "x"}]}, "messages[0]: missing field 'role'"),
        (
            "chat",
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content must be a string, got number",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}]},
            "must end with an assistant message (last is user)",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            "messages[0]: empty user message",
        ),
        (
            "chat",
            {"messages": [{"role": "assistant", "content": "a"}]},
            "needs a user message before the last assistant message",
        ),
        ("chat", {"messages": ["x"]}, "messages[0] must be an object, got string"),
        ("prompt-completion", {"prompt": "p"}, "missing field 'completion'"),
        (
            "prompt-completion",
            {"prompt": "p", "completion": True},
            "field 'completion' must be a string, got boolean",
        ),
    ],
)
def test_each_kind_of_bad_row_has_its_reason(fmt: str, row: Any, reason: str) -> None:
    result = data.parse_row(3, row, fmt, {})
    assert isinstance(result, str) and reason in result


def test_bad_rows_fail_with_row_numbers_first_five_and_the_count(tmp_path: Path) -> None:
    lines = [json.dumps(ALPACA[0])] * 3  # rows 1-3 fine
    lines += ['{"instruction": "x"}'] * 7  # rows 4-10: missing output
    lines += ["{not json"]  # row 11
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        data.load_dataset(path, spec(format="alpaca"))
    message = str(error.value)
    assert message.startswith("spec.dataset.source: 8 of 11 rows are invalid")
    assert "row 4: missing field 'output'; row 5:" in message
    assert "row 8: missing field 'output'; and 3 more" in message
    assert "row 9" not in message  # only the first five are quoted
    assert "maxInvalidFraction is 0" in message


def test_json_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "syntax.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "a", "output": "b",}\n')
    ds = data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=0.5))
    assert ds.total_rows == 2  # the blank line is not a row...
    ((row, reason),) = ds.invalid
    assert row == 3 and reason.startswith("invalid JSON (line 3, column 36):")  # line numbers
    assert "cut short" not in reason


def test_a_line_cut_short_reports_the_unterminated_string(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    whole = json.dumps(ALPACA[0])
    path.write_text(whole + "\n" + whole[:25] + "\n" + whole + "\n" + '{"instruction": 1\n')
    ds = data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=0.5))
    assert ds.invalid == [
        (
            2,
            "invalid JSON (line 2, column 17): Unterminated string starting at (the line ends "
            "inside the JSON: is it cut short?)",
        ),
        (
            4,
            "invalid JSON (line 4, column 18): Expecting ',' delimiter (the line ends inside "
            "the JSON: is it cut short?)",
        ),
    ]


def test_invalid_utf8_row(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(ALPACA[0]).encode() + b"\n\xff\xfe\n")
    ds = data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=0.5))
    assert ds.invalid == [(2, "not valid UTF-8")]


@pytest.mark.parametrize(("fraction", "fails"), [(0.25, False), (0.2499, True), (0.0, True)])
def test_max_invalid_fraction_boundary(tmp_path: Path, fraction: float, fails: bool) -> None:
    rows: list[Any] = [ALPACA[0], ALPACA[1], ALPACA[2], {"instruction": "broken"}]  # 1 of 4 bad
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    if fails:
        with pytest.raises(UserError, match="1 of 4 rows are invalid"):
            data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=fraction))
    else:
        ds = data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=fraction))
        assert len(ds.examples) == 3 and ds.invalid == [(4, "missing field 'output'")]


def test_no_valid_rows_fails_even_when_every_row_may_be_invalid(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a"}, {"instruction": "b"}])
    with pytest.raises(UserError, match=r"no valid rows \(2 of 2 invalid"):
        data.load_dataset(path, spec(format="alpaca", maxInvalidFraction=1.0))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "e.jsonl").write_text(content)
    with pytest.raises(UserError, match=r"spec.dataset.source: e.jsonl: the dataset is empty"):
        data.load_dataset(tmp_path / "e.jsonl", spec())


def test_empty_csv_and_json(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("instruction,output\n")
    (tmp_path / "e.json").write_text("[]")
    for name in ("e.csv", "e.json"):
        with pytest.raises(UserError, match="the dataset is empty"):
            data.load_dataset(tmp_path / name, spec())


# ---- ids and duplicates


def test_ids_are_content_hashes_independent_of_row_order(tmp_path: Path) -> None:
    forward = data.load_dataset(write_jsonl(tmp_path / "f.jsonl", ALPACA), spec())
    backward = data.load_dataset(write_jsonl(tmp_path / "b.jsonl", ALPACA[::-1]), spec())
    assert {e.id for e in forward.examples} == {e.id for e in backward.examples}
    canonical = json.dumps(ALPACA[0], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert forward.examples[0].id == hashlib.sha256(canonical.encode()).hexdigest()
    # Key order inside a row does not matter either.
    reordered = {k: ALPACA[0][k] for k in reversed(list(ALPACA[0]))}
    assert data.parse_row(1, reordered, "alpaca", {}) == data.Example(
        forward.examples[0].id, 1, forward.examples[0].messages
    )


def test_exact_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], ALPACA[1], ALPACA[0]])
    ds = data.load_dataset(path, spec())
    assert len(ds.examples) == 2 and ds.duplicates == [(3, 1)] and ds.invalid == []


def test_duplicate_explicit_ids_are_invalid(tmp_path: Path) -> None:
    rows = [{"id": "a", **ALPACA[0]}, {"id": "a", **ALPACA[1]}]
    with pytest.raises(UserError, match=r"row 2: duplicate id 'a' \(also row 1\)"):
        data.load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), spec())


# ---- property: no row can crash validation

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "instruction",
                    "input",
                    "output",
                    "messages",
                    "role",
                    "content",
                    "prompt",
                    "completion",
                    "id",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, fmt=st.sampled_from(data.FORMATS), number=st.integers(1, 10**6))
def test_any_json_value_gives_an_example_or_a_reason(value: Any, fmt: str, number: int) -> None:
    result = data.parse_row(number, value, fmt, {})
    if isinstance(result, data.Example):
        assert result.row == number and result.messages[-1][0] == "assistant"
        assert result.completion.strip()
    else:
        assert isinstance(result, str) and result


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(json_values, min_size=1, max_size=6))
def test_any_jsonl_file_loads_or_fails_with_a_user_error(
    tmp_path_factory: Any, rows: list[Any]
) -> None:
    path = write_jsonl(tmp_path_factory.mktemp("h") / "h.jsonl", rows)
    try:
        ds = data.load_dataset(path, spec(maxInvalidFraction=1.0))
    except UserError as error:
        assert str(error).startswith("spec.dataset.source: ")
    else:
        assert len(ds.examples) + len(ds.invalid) + len(ds.duplicates) == ds.total_rows == len(rows)
        assert all(1 <= n <= len(rows) and reason for n, reason in ds.invalid)
