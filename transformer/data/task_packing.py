"""Packing a batch of fine-tuning examples into fewer rows, with segment ids.

A batch of N examples padded to T tokens (the format of `transformer.data.tasks`) spends most of
its FLOPs on padding when examples are short (SST-2: 13 tokens on average, padded to 64 or 128).
`pack_task_batch` places the same N examples end to end into R ≤ N rows of T tokens (first fit,
longest first), each example its own segment with positions from 0, so attention never crosses
examples and the model computes exactly what it computes on the padded batch. The example count
per step is unchanged (learning rates and schedules stay comparable); only the row count varies,
rounded up to a multiple of `row_multiple` so that a run compiles a handful of shapes at most.

Packed batch: input_ids, token_type_ids, segment_ids, positions [R, T]; per example
(weights, labels, entity_positions as before, plus) example_rows, example_starts,
example_lengths [N]: where each example lies. Token labels are packed with the tokens ([R, T]).
Extractive QA is not packed: its windows nearly fill the row, and its loss takes a softmax over
the whole window.
"""

from __future__ import annotations

import math

import numpy as np

from transformer.data.tasks import IGNORE

PACKABLE_KINDS = ("classification", "token_classification", "relation")
EXAMPLE_KEYS = ("example_rows", "example_starts", "example_lengths")


def default_row_multiple(examples: int, devices: int = 1) -> int:
    """Rows grow in steps of an eighth of the batch (at most 8 compiled shapes), and stay
    divisible by the devices the rows are sharded over."""
    return math.lcm(max(1, examples // 8), devices)


def assign_rows(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit-decreasing bin packing: (row, start) of every example and the rows used.

    Empty examples (evaluation padding) take no room; they are given row 0, start 0."""
    rows = np.zeros(len(lengths), np.int32)
    starts = np.zeros(len(lengths), np.int32)
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        if n == 0:
            continue
        if n > row_length:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {row_length}")
        row = next((r for r, used in enumerate(fill) if used + n <= row_length), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[i], starts[i] = row, fill[row]
        fill[row] += n
    return rows, starts, max(len(fill), 1)


def pack_task_batch(
    batch: dict[str, np.ndarray], row_multiple: int = 1, num_rows: int | None = None
) -> dict[str, np.ndarray]:
    """The padded batch `batch` packed into rows (see the module docstring).

    `num_rows` fixes the row count (evaluation: one shape for the whole split); otherwise it is
    the rows needed rounded up to `row_multiple`."""
    mask = batch["attention_mask"].astype(bool)
    examples, length = mask.shape
    lengths = mask.sum(1).astype(np.int32)
    if not (mask == (np.arange(length) < lengths[:, None])).all():
        raise ValueError("pack_task_batch needs right-padded examples (attention_mask 1…1 0…0)")
    rows, starts, needed = assign_rows(lengths, length)
    if num_rows is None:
        num_rows = -(-needed // row_multiple) * row_multiple
    if num_rows < needed:
        raise ValueError(f"num_rows={num_rows} cannot hold this batch: it needs {needed} rows")
    out = {k: np.zeros((num_rows, length), np.int32)
           for k in ("input_ids", "token_type_ids", "segment_ids", "positions")}
    tokens_2d = "labels" in batch and batch["labels"].ndim == 2
    if tokens_2d:
        out["labels"] = np.full((num_rows, length), IGNORE, np.int32)
    segment = np.zeros(num_rows, np.int32)
    for i in range(examples):
        n, r, s = lengths[i], rows[i], starts[i]
        if n == 0:
            continue
        segment[r] += 1
        out["input_ids"][r, s:s + n] = batch["input_ids"][i, :n]
        if "token_type_ids" in batch:
            out["token_type_ids"][r, s:s + n] = batch["token_type_ids"][i, :n]
        out["segment_ids"][r, s:s + n] = segment[r]
        out["positions"][r, s:s + n] = np.arange(n)
        if tokens_2d:
            out["labels"][r, s:s + n] = batch["labels"][i, :n]
    for key, value in batch.items():
        if key not in out and key not in ("attention_mask", "input_ids", "token_type_ids"):
            out[key] = value  # Per-example arrays: weights, labels, entity_positions.
    out.update(example_rows=rows, example_starts=starts, example_lengths=lengths)
    return out


def rows_needed(batch: dict[str, np.ndarray]) -> int:
    lengths = batch["attention_mask"].astype(bool).sum(1)
    return assign_rows(lengths, batch["attention_mask"].shape[1])[2]


def is_packed(batch: dict) -> bool:
    return "example_rows" in batch


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens that are not padding, in a padded or packed task batch or an LM batch."""
    for key in ("example_lengths", "attention_mask", "segment_ids"):
        if key in batch:
            return int((np.asarray(batch[key]) > 0).sum() if key == "segment_ids"
                       else np.asarray(batch[key]).sum())
    return int(np.asarray(next(iter(batch.values()))).size)
