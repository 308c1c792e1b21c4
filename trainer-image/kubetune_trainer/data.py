"""Data: read, validate, license-check, split, hash, encode.

Read top to bottom, this is what happens to a dataset:

1. :func:`read_rows` yields (row number, value) from .jsonl / .json / .csv / .parquet.
2. :func:`parse_row` turns one value into an :class:`Example` - or a reason it cannot. Every row
   is checked; :func:`load_dataset` collects the reasons with their row numbers and fails the
   job when they exceed ``spec.dataset.maxInvalidFraction`` (default 0: any bad row fails).
3. :func:`check_license` applies the license gate (declared license, allow-list, usage).
4. :func:`split_dataset` assigns each row to train/validation/test by hashing (seed, row id):
   adding rows never moves existing ones. :func:`write_split_manifests` writes the ids and
   their sha256 so the split is versioned with the output.
5. :func:`encode` turns an example into token ids and labels: the tokenizer's chat template (or
   :data:`DEFAULT_TEMPLATE`), EOS after the completion, loss on the answers only (every
   assistant turn of a chat).

Row numbers in messages: .jsonl counts lines (blank lines included, so an editor's line number
finds the row); .json counts array items, .csv and .parquet count records (the CSV header is
not a record); all from 1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubetune import api
from kubetune.policy import license_problem

from .errors import UserError
from .storage import sha256_file

FORMATS = ("alpaca", "chat", "prompt-completion")
ROLES = ("system", "user", "assistant")
# ShareGPT-style role names, accepted and normalized (use fieldMap role: from, content: value).
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
SHOWN_PROBLEMS = 5  # bad rows quoted in a failure message; the count covers all of them
IGNORE_INDEX = -100  # label value the loss ignores (torch CrossEntropyLoss default)
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    id: str  # the row's id field if present, else sha256 of its canonical JSON: row-order free
    row: int  # 1-based row number in its source (for messages)
    messages: tuple[tuple[str, str], ...]  # (role, content); ends with the assistant turn
    raw: bool = False  # prompt-completion: plain concatenation, no chat template

    @property
    def completion(self) -> str:
        """The last assistant content: what evaluation generates and compares with (training
        learns every assistant turn of a chat, see :func:`encode`)."""
        return self.messages[-1][1]

    @property
    def prompt_messages(self) -> tuple[tuple[str, str], ...]:
        """Everything before the final assistant turn."""
        return self.messages[:-1]


@dataclass
class Dataset:
    examples: list[Example]
    invalid: list[tuple[int, str]]  # (row number, reason)
    total_rows: int
    sha256: str  # of the source file's bytes
    format: str  # the detected format when spec.dataset.format is auto
    # (row, first row) of exact duplicates without an explicit id: dropped, so one example can
    # never sit in train and test at once, and counted here for the report.
    duplicates: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Unreadable:
    """A row that could not even be decoded (bad JSON, bad UTF-8, ragged CSV record)."""

    reason: str


# --------------------------------------------------------------------------------------------
# reading


def read_rows(path: Path, *, field: str = "spec.dataset.source") -> Iterator[tuple[int, Any]]:
    """(row number, value) of every row, by file suffix. Undecodable rows come as
    :class:`Unreadable` so they are reported with their number like any other bad row."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"{field}: {path}: not found")
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path, field)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, field, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".pq"):
        yield from _parquet_rows(path, field)
    else:
        raise UserError(
            f"{field}: {path.name}: unsupported file type {suffix or '(none)'!r}; use .jsonl, "
            ".json, .csv or .parquet"
        )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            # Without its line ending: a line cut short inside a string would otherwise read
            # as "Invalid control character" (the newline), not as the unterminated string.
            text = line.rstrip(b"\r\n")
            try:
                yield number, json.loads(text.decode("utf-8"))
            except UnicodeDecodeError:
                yield number, Unreadable("not valid UTF-8")
            except json.JSONDecodeError as exc:
                cut = " (the line ends inside the JSON: is it cut short?)"
                yield (
                    number,
                    Unreadable(
                        f"invalid JSON (line {number}, column {exc.colno}): {exc.msg}"
                        + (
                            cut
                            if exc.pos >= len(exc.doc.rstrip()) or "Unterminated" in exc.msg
                            else ""
                        )
                    ),
                )


def _json_rows(path: Path, field: str) -> Iterator[tuple[int, Any]]:
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{field}: {path.name}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{field}: {path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(document, list):
        raise UserError(
            f"{field}: {path.name}: expected a JSON array of rows, got "
            f"{_type_name(document)} (one object per line: use .jsonl)"
        )
    yield from enumerate(document, 1)


def _csv_rows(path: Path, field: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(sys.maxsize)  # long completions exceed the 128 KiB default
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{field}: {path.name}: not valid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    number = 0
    try:
        for record in reader:
            number += 1
            extra = record.pop(None, None)
            if extra:
                yield number, Unreadable(f"{len(extra)} more value(s) than the header has columns")
            else:
                # Missing trailing cells come as None: drop them so they read as "missing".
                yield number, {k: v for k, v in record.items() if v is not None}
    except csv.Error as exc:
        raise UserError(f"{field}: {path.name}: CSV error at record {number + 1}: {exc}") from None


def _parquet_rows(path: Path, field: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{field}: {path.name}: not a readable parquet file: {exc}") from None


# --------------------------------------------------------------------------------------------
# validating


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _label(name: str, field_map: dict[str, str]) -> str:
    """How to call a field in a message: the user's column, and the format's name if mapped."""
    column = field_map.get(name, name)
    return f"'{column}'" if column == name else f"'{column}' (mapped to {name})"


def _text(row: dict[str, Any], name: str, field_map: dict[str, str], *, required: bool) -> str:
    """A string field after fieldMap; raises ValueError with the reason."""
    column = field_map.get(name, name)
    value = row.get(column)
    if value is None:
        if required:
            raise ValueError(f"missing field {_label(name, field_map)}")
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"field {_label(name, field_map)} must be a string, got {_type_name(value)}"
        )
    if required and not value.strip():
        raise ValueError(f"empty field {_label(name, field_map)}")
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def row_id(row: dict[str, Any], field_map: dict[str, str]) -> tuple[str, bool]:
    """(id, explicit): the row's id field, else the sha256 of its canonical JSON - so ids never
    depend on row order and a row keeps its split when others are added."""
    column = field_map.get("id", "id")
    value = row.get(column)
    if value is None:
        return hashlib.sha256(_canonical(row).encode()).hexdigest(), False
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(
            f"field {_label('id', field_map)} must be a string or an integer, got "
            f"{_type_name(value)}"
        )
    text = str(value)
    if not text.strip() or "\n" in text:
        raise ValueError(f"field {_label('id', field_map)} must be non-empty and on one line")
    return text, True


def _chat_messages(row: dict[str, Any], field_map: dict[str, str]) -> list[tuple[str, str]]:
    column = field_map.get("messages", "messages")
    value = row.get(column)
    if value is None:
        raise ValueError(f"missing field {_label('messages', field_map)}")
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"field {_label('messages', field_map)} is not a JSON list") from None
    if not isinstance(value, list):
        raise ValueError(f"field {_label('messages', field_map)} must be a list of messages")
    if not value:
        raise ValueError(f"field {_label('messages', field_map)} is empty")
    role_key, content_key = field_map.get("role", "role"), field_map.get("content", "content")
    out = []
    for i, message in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {_type_name(message)}")
        role = message.get(role_key)
        if not isinstance(role, str):
            raise ValueError(f"{where}: missing field '{role_key}'")
        role = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        if role not in ROLES:
            raise ValueError(
                f"{where}: unknown role {str(message.get(role_key))[:40]!r} (expected system, user "
                "or assistant)"
            )
        content = message.get(content_key)
        if content is None:
            raise ValueError(f"{where}: missing field '{content_key}'")
        if not isinstance(content, str):
            raise ValueError(f"{where}.{content_key} must be a string, got {_type_name(content)}")
        if role != "system" and not content.strip():
            raise ValueError(f"{where}: empty {role} message")
        out.append((role, content))
    if out[-1][0] != "assistant":
        raise ValueError(f"{column}: must end with an assistant message (last is {out[-1][0]})")
    if not any(role == "user" for role, _ in out[:-1]):
        raise ValueError(f"{column}: needs a user message before the last assistant message")
    return out


def parse_row(number: int, value: Any, fmt: str, field_map: dict[str, str]) -> Example | str:
    """One row -> an Example, or the reason it is invalid (never another exception)."""
    if isinstance(value, Unreadable):
        return value.reason
    if not isinstance(value, dict):
        return f"expected an object with the {fmt} fields, got {_type_name(value)}"
    try:
        key, _ = row_id(value, field_map)
        if fmt == "alpaca":
            instruction = _text(value, "instruction", field_map, required=True)
            extra = _text(value, "input", field_map, required=False)
            output = _text(value, "output", field_map, required=True)
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages: Sequence[tuple[str, str]] = (("user", prompt), ("assistant", output))
        elif fmt == "chat":
            messages = _chat_messages(value, field_map)
        elif fmt == "prompt-completion":
            prompt = _text(value, "prompt", field_map, required=True)
            completion = _text(value, "completion", field_map, required=True)
            return Example(key, number, (("user", prompt), ("assistant", completion)), raw=True)
        else:
            raise AssertionError(f"unknown format {fmt}")
    except ValueError as exc:
        return str(exc)
    return Example(key, number, tuple(messages))


def detect_format(row: dict[str, Any], field_map: dict[str, str]) -> str | None:
    """The format whose fields (after fieldMap) the row has; None when none fits."""

    def has(name: str) -> bool:
        return field_map.get(name, name) in row

    if has("messages"):
        return "chat"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "prompt-completion"
    return None


def _problems(invalid: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"row {n}: {reason}" for n, reason in invalid[:SHOWN_PROBLEMS])
    more = len(invalid) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def load_dataset(
    path: Path, spec: api.DatasetSpec, *, field: str = "spec.dataset.source"
) -> Dataset:
    """Read and validate every row of a local file (fetch it from S3 first).

    UserError when the file is empty, when no row is valid, or when the invalid fraction
    exceeds spec.maxInvalidFraction; the message quotes the first problems with their row
    numbers and counts all of them."""
    field_map = dict(spec.fieldMap)
    rows = list(read_rows(path, field=field))
    if not rows:
        raise UserError(f"{field}: {path.name}: the dataset is empty (no rows)")
    fmt: str = spec.format
    if fmt == "auto":
        first = next(((n, r) for n, r in rows if isinstance(r, dict)), None)
        detected = detect_format(first[1], field_map) if first else None
        if detected is None:
            columns = ", ".join(sorted(map(str, first[1]))) if first else "no object rows"
            where = f"row {first[0]}" if first else path.name
            raise UserError(
                f"{field}: cannot detect the data format from {where} (columns: {columns}); "
                "expected alpaca (instruction, input, output), chat (messages) or "
                "prompt-completion (prompt, completion): set spec.dataset.format, and "
                "spec.dataset.fieldMap for other column names"
            )
        fmt = detected

    examples: list[Example] = []
    invalid: list[tuple[int, str]] = []
    duplicates: list[tuple[int, int]] = []
    seen: dict[str, int] = {}
    for number, value in rows:
        parsed = parse_row(number, value, fmt, field_map)
        if isinstance(parsed, str):
            invalid.append((number, parsed))
            continue
        if parsed.id in seen:
            _, explicit = row_id(value, field_map)
            if explicit:
                invalid.append((number, f"duplicate id {parsed.id!r} (also row {seen[parsed.id]})"))
            else:
                duplicates.append((number, seen[parsed.id]))
            continue
        seen[parsed.id] = number
        examples.append(parsed)

    total = len(rows)
    limit = spec.maxInvalidFraction
    if not examples:
        raise UserError(
            f"{field}: no valid rows ({len(invalid)} of {total} invalid, format {fmt}): "
            + _problems(invalid)
        )
    if len(invalid) / total > limit:
        raise UserError(
            f"{field}: {len(invalid)} of {total} rows are invalid ({len(invalid) / total:.1%}; "
            f"spec.dataset.maxInvalidFraction is {limit:g}), format {fmt}: " + _problems(invalid)
        )
    return Dataset(examples, invalid, total, sha256_file(path), fmt, duplicates)


# --------------------------------------------------------------------------------------------
# license gate


def check_license(license: api.LicenseSpec, policy: api.Policy) -> None:
    """The license gate (kubetune.policy, the operator's rule too): UserError when it fails."""
    problem = license_problem(license, policy)
    if problem is not None:
        raise UserError(problem)


# --------------------------------------------------------------------------------------------
# splitting


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    hashes: dict[str, str]  # split name -> sha256 of its .ids file (sorted ids, one per line)
    # Rows of the training source that also appear (same id) in an explicit validation or test
    # source: kept out of train so held-out results stay held out.
    overlap: int = 0

    def items(self) -> Iterable[tuple[str, list[Example]]]:
        return (("train", self.train), ("validation", self.validation), ("test", self.test))


def split_point(seed: int, example_id: str) -> float:
    """A row's fixed position in [0, 1): depends only on (seed, id), never on other rows."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def ids_text(examples: Iterable[Example]) -> str:
    """A split's manifest: sorted ids, one per line."""
    return "".join(f"{i}\n" for i in sorted(e.id for e in examples))


def split_dataset(
    data: Dataset,
    spec: api.SplitSpec,
    validation: Dataset | None = None,
    test: Dataset | None = None,
) -> Splits:
    """Assign rows to train/validation/test: [0, v) validation, [v, v+t) test, the rest train,
    by :func:`split_point`. An explicit source replaces its fraction."""
    val_fraction = 0.0 if validation is not None else spec.validation
    test_fraction = 0.0 if test is not None else spec.test
    held = {e.id for d in (validation, test) if d is not None for e in d.examples}
    train: list[Example] = []
    val: list[Example] = list(validation.examples) if validation is not None else []
    tst: list[Example] = list(test.examples) if test is not None else []
    overlap = 0
    for example in data.examples:
        if example.id in held:
            overlap += 1
            continue
        point = split_point(spec.seed, example.id)
        if point < val_fraction:
            val.append(example)
        elif point < val_fraction + test_fraction:
            tst.append(example)
        else:
            train.append(example)
    if not train:
        raise UserError(
            f"spec.dataset.split: no rows left for training ({len(data.examples)} valid rows: "
            f"{len(val)} to validation, {len(tst)} to test"
            + (f", {overlap} also in validationSource/testSource" if overlap else "")
            + "); add rows or lower spec.dataset.split.validation / spec.dataset.split.test"
        )
    hashes = {
        name: hashlib.sha256(ids_text(part).encode()).hexdigest()
        for name, part in (("train", train), ("validation", val), ("test", tst))
    }
    return Splits(train, val, tst, hashes, overlap)


def write_split_manifests(splits: Splits, dest: Path) -> None:
    """dest/{train,validation,test}.ids (sorted ids, one per line) and dest/hashes.json.
    Each hash is `sha256sum` of its .ids file, so anyone can check a split by hand."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        (dest / f"{name}.ids").write_text(ids_text(part), encoding="utf-8")
    (dest / "hashes.json").write_text(json.dumps(splits.hashes, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# encoding

# Used when the tokenizer has no chat template (tokenizer.chat_template is None), e.g. a base
# model. Each turn is "### <Role>:\n<content>\n\n"; the prompt ends with the assistant cue
# "### Assistant:\n" and the completion follows it directly, then EOS - so generation from
# prompt_ids() continues exactly where training taught the model to answer, and stops. In a
# multi-turn conversation every assistant content is followed by EOS (then the "\n\n" that
# separates turns), so each trained answer teaches stopping, like the last one.
DEFAULT_TEMPLATE = "### {role}:\n{content}\n\n"
DEFAULT_GENERATION_PROMPT = "### Assistant:\n"


@dataclass
class Encoded:
    input_ids: list[int]
    # Not shifted. IGNORE_INDEX on everything but the assistant answers (every assistant turn
    # of a chat; the completion otherwise) unless train_on_prompt.
    labels: list[int]
    truncated: bool
    # How many of input_ids come before the LAST answer: the prompt_ids() layout. In a
    # multi-turn chat this part holds the earlier answers too, and they are labelled.
    prompt_len: int = 0
    answer_cut: bool = False  # truncation cut the last answer's end (and its EOS)
    full_length: int = 0  # tokens before truncation


@dataclass
class _Layout:
    """An example as encode() lays it out, before truncation."""

    prompt: list[int]  # everything before the last answer
    answers: list[bool]  # per prompt token: part of an earlier assistant answer (trained)
    completion: list[int]  # the last answer, with the template's end of turn / EOS
    keep: int  # leading special tokens (BOS) a left cut keeps


_PREFIX_CACHE: dict[int, tuple[Any, list[int]]] = {}


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer itself puts before a text (BOS for Llama-style tokenizers; nothing
    for GPT-2-style ones). Found by probing, since tokenizers configure this differently."""
    cached = _PREFIX_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    plain = _ids(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    prefix: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix = full[:start]
            break
    _PREFIX_CACHE[id(tokenizer)] = (tokenizer, prefix)
    return prefix


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    """ids + EOS, unless the answer already ends with it (a template may write it, followed by a
    newline): the tuned model learns to stop."""
    return [*ids, eos] if eos is not None and eos not in ids[-2:] else ids


def _template_segments(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, is an answer) pieces of the tokenizer's chat template rendering, in order.

    For each assistant turn: the conversation before it rendered with add_generation_prompt,
    and the rendering with the answer - the difference is the answer as the model should write
    it (with the template's end-of-turn markers). Some templates render the history
    differently once later turns follow (e.g. they drop the reasoning of earlier answers);
    when a turn's prompt does not extend the text so far, the answers before it become
    context, as the template renders them."""
    messages = [{"role": r, "content": c} for r, c in example.messages]
    segments: list[tuple[str, bool]] = []
    done = ""  # the rendering up to and including the previous answer
    for turn, (role, content) in enumerate(example.messages):
        if role != "assistant":
            continue
        try:
            prompt = tokenizer.apply_chat_template(
                messages[:turn], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        except Exception as exc:  # jinja raises its own errors (e.g. roles must alternate)
            raise UserError(
                f"spec.dataset.source: row {example.row}: the tokenizer's chat template "
                f"refused this conversation: {exc}"
            ) from None
        if done and prompt.startswith(done):
            segments.append((prompt[len(done) :], False))
        else:
            segments = [(prompt, False)]
        # Fall back to the bare content if the template renders the history differently once
        # the answer is present.
        answer = full[len(prompt) :] if full.startswith(prompt) else content
        segments.append((answer, True))
        done = full if full.startswith(prompt) else ""
    return segments


def _default_segments(example: Example) -> list[tuple[str, bool]]:
    """(text, is an answer) pieces of the DEFAULT_TEMPLATE rendering, in order."""
    segments: list[tuple[str, bool]] = []
    context = ""
    for role, content in example.messages:
        if role == "assistant":
            segments += [(context + DEFAULT_GENERATION_PROMPT, False), (content, True)]
            context = "\n\n"  # the separator after the answer and its EOS
        else:
            context += DEFAULT_TEMPLATE.format(role=role.capitalize(), content=content)
    return segments


def _layout(example: Example, tokenizer: Any) -> _Layout:
    """The example's token ids, split into prompt (with earlier answers) and last answer.

    Each piece - context or answer - is tokenized separately and the ids concatenated: a BPE
    tokenizer can merge across a boundary when encoding the joined text, and then no prefix of
    the full ids would be exactly the prompt the model sees at generation time, nor the
    answer tokens exactly the answer."""
    eos = tokenizer.eos_token_id
    if example.raw:
        head = special_prefix(tokenizer)
        prompt = head + _ids(tokenizer, example.messages[0][1])
        completion = _with_eos(_ids(tokenizer, example.completion), eos)
        return _Layout(prompt, [False] * len(prompt), completion, len(head))
    templated = _has_template(tokenizer)
    # The template writes BOS itself, if it wants one; the default template gets the
    # tokenizer's own leading tokens.
    head = [] if templated else special_prefix(tokenizer)
    segments = _template_segments(example, tokenizer) if templated else _default_segments(example)
    prompt, answers = list(head), [False] * len(head)
    for text, is_answer in segments[:-1]:
        ids = _ids(tokenizer, text)
        # A template's end of turn is its own business; the default template adds EOS.
        if is_answer and not templated:
            ids = _with_eos(ids, eos)
        prompt += ids
        answers += [is_answer] * len(ids)
    completion = _with_eos(_ids(tokenizer, segments[-1][0]), eos)
    keep = len(head) if not templated else int(bool(prompt) and prompt[0] == tokenizer.bos_token_id)
    return _Layout(prompt, answers, completion, keep)


def _cut_left(ids: list[T], length: int, keep: int) -> list[T]:
    """The last `length` items, still starting with the first `keep` (BOS)."""
    if len(ids) <= length:
        return ids
    keep = min(keep, length)
    return ids[:keep] + ids[len(ids) - (length - keep) :] if length > keep else ids[:keep]


def encode(
    example: Example, tokenizer: Any, max_len: int, *, train_on_prompt: bool = False
) -> Encoded:
    """Token ids and labels for training.

    Trained (labels = ids): the completion with EOS; in a chat, EVERY assistant turn - its
    content, the template's end-of-turn tokens after it (the default template: EOS) - not only
    the last. Everything else (system and user turns, role markers, BOS) is IGNORE_INDEX
    unless train_on_prompt.

    Truncation, when the whole exceeds max_len: the last answer keeps its head and loses its
    tail (and then its EOS: a cut answer must not teach stopping there), keeping at least
    half the window or all of it when shorter; the part before it fills the rest and is cut
    from the LEFT, keeping BOS - the most recent turns (the question and the assistant cue)
    matter most for the answer that follows. Earlier answers that remain keep their labels,
    so a truncated example always trains on its last answer's head."""
    layout = _layout(example, tokenizer)
    prompt, answers, completion = layout.prompt, layout.answers, layout.completion
    full_length = len(prompt) + len(completion)
    truncated = full_length > max_len
    answer_len = len(completion)
    if truncated:
        completion_len = min(len(completion), max(max_len - len(prompt), max_len // 2))
        completion = completion[:completion_len]
        prompt = _cut_left(prompt, max_len - completion_len, layout.keep)
        answers = _cut_left(answers, max_len - completion_len, layout.keep)
    labels = [
        token if train_on_prompt or is_answer else IGNORE_INDEX
        for token, is_answer in zip(prompt, answers, strict=True)
    ]
    return Encoded(
        prompt + completion,
        labels + completion,
        truncated,
        len(prompt),
        answer_cut=len(completion) < answer_len,
        full_length=full_length,
    )


def prompt_ids(example: Example, tokenizer: Any, max_len: int) -> list[int]:
    """The prompt for generation, exactly as encode() lays it out before the last answer (chat
    template with add_generation_prompt, or the default template's assistant cue; earlier
    turns included); cut from the left, keeping BOS, when longer than max_len."""
    layout = _layout(example, tokenizer)
    return _cut_left(layout.prompt, max_len, layout.keep)


def encode_all(
    examples: Iterable[Example], tokenizer: Any, max_len: int, *, train_on_prompt: bool = False
) -> tuple[list[Encoded], int]:
    """encode() over a split; returns the encodings and how many were truncated."""
    encoded = [encode(e, tokenizer, max_len, train_on_prompt=train_on_prompt) for e in examples]
    return encoded, sum(e.truncated for e in encoded)


# Above this share of truncated training rows the run warns (log and report notes).
TRUNCATION_WARNING = 0.05


def check_truncation(encoded: list[Encoded], max_len: int) -> list[str]:
    """Warnings about the training split's truncation; UserError when training would be
    pointless: no target token left at all, or no answer left whole (the model would never
    see where an answer ends)."""
    if not encoded:
        return []
    rows, cut = len(encoded), sum(e.truncated for e in encoded)
    answers_cut = sum(e.answer_cut for e in encoded)
    longest = max(e.full_length for e in encoded)
    where = f"spec.dataset.maxSeqLength: {max_len} tokens"
    advice = f"the longest row has {longest} tokens: raise maxSeqLength or shorten the rows"
    if not any(label != IGNORE_INDEX for e in encoded for label in e.labels[1:]):
        raise UserError(f"{where} leave no answer token to train on in any row; {advice}")
    if answers_cut == rows:
        raise UserError(
            f"{where} cut the answer of every one of the {rows} training rows, so the model "
            f"would never learn where an answer ends; {advice}"
        )
    if cut / rows <= TRUNCATION_WARNING:
        return []
    return [
        f"spec.dataset.maxSeqLength: {cut} of {rows} training rows ({cut / rows:.0%}) are "
        f"longer than {max_len} tokens and were truncated, {answers_cut} of them losing the "
        f"end of their answer; {advice}"
    ]


__all__ = [
    "DEFAULT_GENERATION_PROMPT",
    "DEFAULT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "Dataset",
    "Encoded",
    "Example",
    "Splits",
    "check_license",
    "check_truncation",
    "encode",
    "encode_all",
    "load_dataset",
    "parse_row",
    "prompt_ids",
    "read_rows",
    "split_dataset",
    "write_split_manifests",
]
