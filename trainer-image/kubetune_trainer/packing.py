"""Batches without padding waste and without cross-sample attention.

Packing puts several encoded samples into one row of at most ``maxSeqLength`` tokens
(best-fit decreasing). Inside a row, ``position_ids`` restart at 0 for every sample and there
is NO attention mask: transformers (sdpa/eager) then derives a block-causal mask from the
position_ids, so a sample only sees itself. An all-ones 2D mask, or ``use_cache=True``, would
silently let each sample attend to the ones before it (tests/unit/test_packing.py proves both).

Why rows and not one flattened batch: without varlen kernels, attention over a row costs the
square of the row's length, so one 8k-token row is ~6x slower than the same tokens in 1k rows.
We go one step further with :func:`varlen_attention`: the rows of a micro-batch are concatenated
into one sequence (no padding at all, so linear layers see only real tokens) and attention runs
per sample, so its cost grows with each sample's own length. On a GPU with flash-attention
installed, flash_attention_2 does the same natively.

Shared prompt prefixes (mode ``shared``, the trainer's default with :func:`varlen_attention`
and no dropout): when every sample of a micro-batch starts with the same tokens (a system
prompt, a fixed instruction) and none of them is a target, that prefix is fed once; each
sample's remainder follows with position_ids continuing after it and attends to the one copy
of the prefix and to itself. A causal model computes the same prefix activations for every
sample, so this is the same forward and, through autograd summing the samples' gradients
into the one copy, the same backward: only the repeated work goes (tests/unit/test_packing.py
compares logits and gradients with the unshared batch).

Loss masking: the first token of every sample gets label -100. Unpacked, that token is never a
target (labels shift left by one); packed, it would otherwise be predicted from the previous
sample's last token.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

VARLEN = "kubetune_varlen"


class EncodedLike(Protocol):
    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def labels(self) -> Sequence[int]: ...


# ---------------------------------------------------------------------------------------------
# planning: which samples go together (pure, deterministic)


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of at most ``max_len`` tokens.

    Longest first, each into the fullest row that still fits it; ties keep index order, so the
    plan depends only on the lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (free space, row index) kept sorted: the best fit is the first with free >= length.
    free: list[tuple[int, int]] = []
    for index in order:
        length = min(lengths[index], max_len)
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (space - length, row))
        else:
            rows.append([index])
            bisect.insort(free, (max_len - length, len(rows) - 1))
    return [sorted(row) for row in rows]


def epoch_batches(
    lengths: Sequence[int],
    *,
    packing: bool,
    batch_size: int,
    max_len: int,
    seed: int,
    epoch: int,
) -> list[list[list[int]]]:
    """The micro-batches of one epoch: each a list of rows, each row a list of sample indices.

    Deterministic from (seed, epoch), so a resumed run can jump straight to batch k of epoch e.
    With packing, a micro-batch holds as many rows as carry about ``batch_size`` samples. Without
    packing every row is one sample and batches are length-grouped (sorted within windows of
    50 batches, then shuffled), which keeps dynamic padding small.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if packing:
        rows = pack_rows(lengths, max_len)
        rng.shuffle(rows)
        per_batch = max(1, round(batch_size * len(rows) / max(1, len(lengths))))
        return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[list[int]]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [
            [[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)
        ]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# collation: tensors for one micro-batch


# What each collate mode means, for the trainer's log.
LAYOUTS = {
    "shared": "each micro-batch's common prompt prefix fed once",
    "flat": "every sample fed whole",
    "rows": "rows padded to the longest",
    "padded": "one sample per row, padded",
}


def collate_mode(packing: bool, attention: str, model: torch.nn.Module) -> str:
    """The trainer's collate mode: packed micro-batches share their common prompt prefix where
    our varlen attention runs and nothing in the model drops out; unpacked ones are padded.
    flash-attention's varlen kernels take sequence starts from position_ids, which the shared
    layout does not restart at every sample. Dropout (LoRA's, or the model's own) would draw one
    mask for the prefix that every sample then shares, where unshared each sample draws its own:
    not the same training, so with dropout the prefix is fed per sample."""
    if not packing:
        return "padded"
    return "shared" if attention == VARLEN and not _drops_out(model) else "flat"


def _drops_out(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@dataclass
class Batch:
    """Model inputs for one micro-batch plus what the loop needs to account for it."""

    inputs: dict[str, Any]
    targets: int  # label tokens that count in the loss
    tokens: int  # real (non-padding) tokens
    padded: int  # tokens including padding


def _sample_labels(sample: EncodedLike) -> list[int]:
    labels = list(sample.labels)
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def collate(
    samples: Sequence[EncodedLike],
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    mode: str,
) -> Batch:
    """Tensors for one micro-batch.

    mode ``flat``: all rows concatenated into one [1, T] sequence with position_ids and the
    sample boundaries (``kubetune_segments``) for :func:`varlen_attention`: zero padding.
    mode ``rows``: one row per packed row, right-padded to the longest; the padding is its own
    "sample" (position_ids from 0, label -100), so no mask is needed and nothing leaks.
    mode ``shared``: ``flat`` with the micro-batch's common prompt prefix fed once
    (:func:`shared_prefix`; ``kubetune_prefix`` is its length, 0 when there is none).
    mode ``padded``: classic one-sample-per-row with dynamic padding and a 2D attention mask
    (only for packing=false: a mask is correct there because each row holds one sample).
    """
    if mode not in ("flat", "shared", "rows", "padded"):
        raise ValueError(f"unknown collate mode {mode!r}")
    if mode == "shared":
        return _collate_shared(samples, [i for row in rows for i in row])
    seqs: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds: list[int] = []
        for index in row:
            sample = samples[index]
            bounds.append(len(ids))
            ids += list(sample.input_ids)
            labels += _sample_labels(sample)
            positions += list(range(len(sample.input_ids)))
        seqs.append((ids, labels, positions, bounds))
    real = sum(len(s[0]) for s in seqs)
    targets = sum(sum(1 for x in s[1] if x != IGNORE_INDEX) for s in seqs)
    if mode == "flat":
        ids, labels, positions, segments = [], [], [], [0]
        for row_ids, row_labels, row_positions, _ in seqs:
            ids += row_ids
            labels += row_labels
            positions += row_positions
        segments = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        inputs = {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "kubetune_segments": tuple(segments),
        }
        return Batch(inputs, targets, real, real)
    width = max(len(s[0]) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    position_t = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (ids, labels, positions, _) in enumerate(seqs):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        label_t[r, :n] = torch.tensor(labels)
        position_t[r, :n] = torch.tensor(positions)
        position_t[r, n:] = torch.arange(width - n)
        mask[r, :n] = 1
    inputs = {"input_ids": input_ids, "labels": label_t, "position_ids": position_t}
    if mode == "padded":
        inputs["attention_mask"] = mask
    return Batch(inputs, targets, real, len(seqs) * width)


def shared_prefix(samples: Sequence[EncodedLike]) -> int:
    """Length of the prompt prefix every sample starts with and that can be fed once: common
    token ids, no target among the labels it covers (positions 1..P: the logits at the prefix
    positions predict them, and those logits are computed once for all samples), and at least
    one token of every sample left after it. 0 for fewer than two samples."""
    if len(samples) < 2:
        return 0
    first = list(samples[0].input_ids)
    limit = min(len(s.input_ids) for s in samples) - 1
    for sample in samples:
        labels = sample.labels
        # The first target position (label != -100 after position 0) bounds the prefix.
        target = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), None)
        if target is not None:
            limit = min(limit, target - 1)
    length = 0
    while length < limit and all(s.input_ids[length] == first[length] for s in samples):
        length += 1
    return length


def _collate_shared(samples: Sequence[EncodedLike], order: Sequence[int]) -> Batch:
    chosen = [samples[i] for i in order]
    prefix = shared_prefix(chosen)
    ids: list[int] = list(chosen[0].input_ids[:prefix])
    labels: list[int] = [IGNORE_INDEX] * prefix
    positions: list[int] = list(range(prefix))
    segments = [0, prefix] if prefix else [0]
    for sample in chosen:
        ids += list(sample.input_ids[prefix:])
        labels += _sample_labels(sample)[prefix:]
        positions += list(range(prefix, len(sample.input_ids)))
        segments.append(len(ids))
    real = sum(len(s.input_ids) for s in chosen)
    targets = sum(1 for x in labels if x != IGNORE_INDEX)
    inputs = {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "kubetune_segments": tuple(segments),
        "kubetune_prefix": prefix,
    }
    # tokens and padded count the samples' own tokens: the throughput of the data trained on.
    return Batch(inputs, targets, real, real)


# ---------------------------------------------------------------------------------------------
# attention whose cost grows with each sample's own length


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row: [start, end) of every sample, from where position_ids restart at 0."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        out.append(list(zip(starts, [*starts[1:], len(row)], strict=True)))
    return out


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention run separately per packed sample (a CPU/GPU stand-in for FA varlen).

    With a mask (padded generation) or a KV cache (query shorter than keys) it is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or q_len != k_len or q_len == 1 or position_ids is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    given = kwargs.get("kubetune_segments")
    prefix = kwargs.get("kubetune_prefix") or 0
    if given is not None and query.shape[0] == 1:
        rows = [list(itertools.pairwise(given))]
    else:
        rows, prefix = _segments(position_ids.expand(query.shape[0], -1)), 0
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    if prefix:
        return _attend_after_prefix(query, key, value, rows[0], prefix, scaling, drop, gqa), None
    # Each sample's output is a [1, length, heads, dim] view, joined by one cat: writing them
    # into slices of one tensor would cost a full-size copy per sample in the backward.
    out = torch.cat(
        [
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query[r : r + 1, :, start:end],
                        key[r : r + 1, :, start:end],
                        value[r : r + 1, :, start:end],
                        is_causal=True,
                        dropout_p=drop,
                        scale=scaling,
                        enable_gqa=gqa,
                    ).transpose(1, 2)
                    for start, end in bounds
                ],
                dim=1,
            )
            for r, bounds in enumerate(rows)
        ]
    )
    return out, None


def _attend_after_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    prefix: int,
    scaling: float | None,
    dropout: float,
    gqa: bool,
) -> torch.Tensor:
    """Shared-prefix layout (mode ``shared``): bounds[0] is the prefix [0, prefix), causal
    over itself; every later segment sees all of the prefix and itself causally."""
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, :prefix],
            key[:, :, :prefix],
            value[:, :, :prefix],
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        ).transpose(1, 2)
    ]
    for start, end in bounds[1:]:
        length = end - start
        # Row i (position prefix + i) sees every prefix column and its own columns <= i.
        allowed = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device)
        pieces.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                torch.cat((key[:, :, :prefix], key[:, :, start:end]), dim=2),
                torch.cat((value[:, :, :prefix], value[:, :, start:end]), dim=2),
                attn_mask=allowed.tril_(prefix),
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=gqa,
            ).transpose(1, 2)
        )
    return torch.cat(pieces, dim=1)


def _varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask creation for VARLEN: no mask for packed training input, sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    result: torch.Tensor | None = sdpa_mask(*args, **kwargs)
    return result


def register_varlen() -> str:
    """Make ``attn_implementation="kubetune_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN
