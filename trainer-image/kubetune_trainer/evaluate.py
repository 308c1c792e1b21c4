"""Held-out evaluation: the same code scores the base and the tuned model on the test split.

Metrics (docs/evaluation.md has the exact definitions):

- ``loss``: mean cross-entropy per completion token (prompt tokens are not scored);
- ``perplexity``: ``exp(loss)``;
- ``tokenAccuracy``: share of completion tokens where the argmax prediction is the label;
- ``exactMatch``: share of rows whose greedy generation equals the reference completion after
  :func:`normalize_text`;
- ``rougeL``: mean ROUGE-L F1 (longest common subsequence of whitespace tokens, normalized).

Evaluation streams: every batch is reduced to a few sums (:class:`TokenSums`,
:class:`GenerationSums`) before the next one runs, so peak memory depends on the batch size,
never on the number of test rows. Generation is greedy, batched with left padding, bounded by
``maxNewTokens`` and stops at EOS.

This module also holds the comparison (``delta``), the promotion gates and the local table.
Safety and robustness evals live in :mod:`kubetune_trainer.safety`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from kubetune import api
from kubetune_trainer.data import IGNORE_INDEX, Example, encode, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKEN_METRICS = frozenset({"loss", "perplexity", "tokenAccuracy"})
GENERATION_METRICS = frozenset({"exactMatch", "rougeL"})
# exp() overflows a float past ~709; a loss that high means the model is broken, not better.
_MAX_LOG_PERPLEXITY = 700.0

# --------------------------------------------------------------------------------------------
# metric functions (pure)

_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
_SPACES = re.compile(r"\s+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Normalization for exactMatch and rougeL: Unicode NFKC, lower case, punctuation removed,
    whitespace collapsed. So "The answer: Paris." equals "the answer paris"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _PUNCTUATION.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both are equal after :func:`normalize_text`, else 0.0."""
    return 1.0 if normalize_text(prediction) == normalize_text(reference) else 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on normalized whitespace tokens. Two empty texts agree (1.0); one empty: 0.0."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def perplexity(mean_loss: float) -> float:
    """exp of the mean token loss; inf when the loss is too large to exponentiate."""
    return math.exp(mean_loss) if mean_loss < _MAX_LOG_PERPLEXITY else math.inf


@dataclass
class TokenSums:
    """Running sums for the token metrics: enough to finish the mean without keeping logits."""

    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, loss_sum: float, tokens: int, correct: int) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.correct += correct

    def metrics(self) -> dict[str, float]:
        if self.tokens == 0:
            return {}  # nothing scored (e.g. every completion truncated away): not measured
        loss = self.loss_sum / self.tokens
        return {
            "loss": loss,
            "perplexity": perplexity(loss),
            "tokenAccuracy": self.correct / self.tokens,
        }


@dataclass
class GenerationSums:
    """Running sums for the generation metrics."""

    exact: float = 0.0
    rouge: float = 0.0
    rows: int = 0

    def add(self, prediction: str, reference: str) -> None:
        self.exact += exact_match(prediction, reference)
        self.rouge += rouge_l(prediction, reference)
        self.rows += 1

    def metrics(self) -> dict[str, float]:
        if self.rows == 0:
            return {}
        return {"exactMatch": self.exact / self.rows, "rougeL": self.rouge / self.rows}


def token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(summed loss, scored tokens, argmax hits) of one batch.

    ``labels`` follow the Hugging Face convention: aligned with ``input_ids`` (the shift to
    next-token targets happens here) and ``-100`` where no loss is taken (prompt, padding).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # Select the scored positions before upcasting: float32 copies of the whole batch's logits
    # would double the peak memory for bf16 models.
    scored = logits[:, :-1, :][mask].float()
    wanted = targets[mask]
    if wanted.numel() == 0:
        return 0.0, 0, 0
    loss = F.cross_entropy(scored, wanted, reduction="sum")
    correct = (scored.argmax(dim=-1) == wanted).sum()
    return float(loss.item()), int(wanted.numel()), int(correct.item())


# --------------------------------------------------------------------------------------------
# model glue


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, or EOS when it has none (common for decoder-only models)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        return 0  # padded positions are masked out, any id works
    return int(pad)


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often add an
    end-of-turn token there)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return sorted(ids)


def batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    device: torch.device | str,
) -> list[list[int]]:
    """Greedy continuations of one batch of prompts, each cut at its first stop token.

    Prompts are left-padded so that every row's next token sits in the last column; the
    attention mask keeps padding out of attention and position ids.
    """
    pad, stop = pad_token_id(tokenizer), stop_token_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        # Unset fields are filled from the model's generation_config; pin those that would
        # make this something other than plain greedy decoding stopped at EOS.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        pad_token_id=pad,
        eos_token_id=stop or None,
        use_cache=True,  # training may have turned the cache off (packing); decoding wants it
    )
    # cast: transformers' annotations make mypy see a Tensor attribute here.
    output = cast(Any, model).generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
    )
    continuations = []
    for row in output[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop), len(row))
        continuations.append(row[:cut])
    return continuations


def _text_length(example: Example, *, prompt_only: bool) -> int:
    """A cheap length proxy (characters) to sort rows into batches with little padding,
    without tokenizing every row up front."""
    messages = example.messages[:-1] if prompt_only else example.messages
    return sum(len(content) for _, content in messages)


@torch.no_grad()
def generations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Example],
    spec: api.EvaluationSpec,
    max_seq_length: int,
    device: torch.device | str,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The greedy continuation (token ids, stop token cut) of each row's prompt, in row order:
    what generation metrics score. Rows of similar prompt length share a batch."""
    out: list[list[int]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: _text_length(rows[i], prompt_only=True))
    for batch in batches(order, spec.batchSize):
        prompts = [prompt_ids(rows[i], tokenizer, max_seq_length) for i in batch]
        continuations = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=spec.maxNewTokens, device=device
        )
        for i, tokens in zip(batch, continuations, strict=True):
            out[i] = tokens
        if progress is not None:
            progress(len(batch))
    return out


@torch.no_grad()
def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    spec: api.EvaluationSpec,
    *,
    max_seq_length: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """The metrics named in ``spec.metrics`` for one model on ``examples`` (the test split).

    The model must already be on ``device``. Metrics that could not be measured (no scored
    tokens) are absent rather than NaN, so every value fits the status and JSON.
    ``progress(done, total)`` follows the rows scored (each pass over the rows counts).
    """
    wanted = set(spec.metrics)
    rows = examples[: spec.maxSamples] if spec.maxSamples else examples
    passes = bool(wanted & TOKEN_METRICS) + bool(wanted & GENERATION_METRICS)
    done, total = 0, passes * len(rows)

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        if wanted & TOKEN_METRICS:
            sums = TokenSums()
            order = sorted(range(len(rows)), key=lambda i: _text_length(rows[i], prompt_only=False))
            for batch in batches(order, spec.batchSize):
                sums.add(
                    *_batch_token_sums(
                        model, tokenizer, [rows[i] for i in batch], max_seq_length, device
                    )
                )
                advance(len(batch))
            results.update(sums.metrics())
        if wanted & GENERATION_METRICS:
            generated = GenerationSums()
            outputs = generations(
                model, tokenizer, rows, spec, max_seq_length, device, progress=advance
            )
            for row, tokens in zip(rows, outputs, strict=True):
                text = str(tokenizer.decode(tokens, skip_special_tokens=True))
                generated.add(text, row.completion)
            results.update(generated.metrics())
    finally:
        model.train(was_training)
    return {k: v for k, v in results.items() if k in wanted and math.isfinite(v)}


def _batch_token_sums(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Example],
    max_seq_length: int,
    device: torch.device | str,
) -> tuple[float, int, int]:
    encoded = [encode(row, tokenizer, max_seq_length) for row in rows]
    width = max(len(e.input_ids) for e in encoded)
    pad = pad_token_id(tokenizer)
    input_ids = torch.tensor(
        [list(e.input_ids) + [pad] * (width - len(e.input_ids)) for e in encoded], device=device
    )
    attention_mask = torch.tensor(
        [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded],
        device=device,
    )
    labels = torch.tensor(
        [list(e.labels) + [IGNORE_INDEX] * (width - len(e.labels)) for e in encoded],
        device=device,
    )
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_sums(logits, labels)


# --------------------------------------------------------------------------------------------
# comparison and gates (pure)


def compare(base: dict[str, float], tuned: dict[str, float]) -> dict[str, float]:
    """delta = tuned - base for every metric both have; oodPerplexityRatio = tuned / base."""
    delta = {name: tuned[name] - base[name] for name in tuned if name in base}
    if base.get("oodPerplexity") and "oodPerplexity" in tuned:
        delta["oodPerplexityRatio"] = tuned["oodPerplexity"] / base["oodPerplexity"]
    return {name: value for name, value in delta.items() if math.isfinite(value)}


# "==" on measured floats compares with a tolerance: 0.1 + 0.2 must equal 0.3.
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}


def gate_value(metric: str, metrics: api.Metrics) -> float | None:
    """The measured value a gate path (base.x / tuned.x / delta.x) points at, or None."""
    group, _, name = metric.partition(".")
    table = {"base": metrics.base, "tuned": metrics.tuned, "delta": metrics.delta}.get(group)
    value = None if table is None else table.get(name)
    return value if value is not None and math.isfinite(value) else None


def check_gates(gates: list[api.GateSpec], metrics: api.Metrics) -> list[api.GateResult]:
    """Every gate with its measured value; a gate whose metric was not measured fails."""
    results = []
    for gate in gates:
        actual = gate_value(gate.metric, metrics)
        passed = actual is not None and _OPS[gate.op](actual, gate.value)
        results.append(
            api.GateResult(
                metric=gate.metric, op=gate.op, value=gate.value, actual=actual, passed=passed
            )
        )
    return results


# --------------------------------------------------------------------------------------------
# the local table

_ORDER = [*api.EVAL_METRICS, *api.SAFETY_METRICS, *api.RATIO_METRICS]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(
    metrics: api.Metrics,
    gates: Sequence[api.GateResult] = (),
    notes: Sequence[str] = (),
) -> str:
    """Base vs tuned (and delta) for every metric, then gate results and evaluation notes."""
    names = [n for n in _ORDER if n in metrics.base or n in metrics.tuned or n in metrics.delta]
    names += sorted((set(metrics.base) | set(metrics.tuned) | set(metrics.delta)) - set(names))
    width = max([len("metric"), *(len(n) for n in names)])
    lines = [f"{'metric':<{width}}  {'base':>10}  {'tuned':>10}  {'delta':>10}"]
    for name in names:
        lines.append(
            f"{name:<{width}}  {_cell(metrics.base.get(name)):>10}  "
            f"{_cell(metrics.tuned.get(name)):>10}  {_cell(metrics.delta.get(name)):>10}"
        )
    if gates:
        lines.append("gates:")
        lines.extend(f"  {g.describe()}" for g in gates)
    if notes:
        lines.append("notes:")
        lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)
