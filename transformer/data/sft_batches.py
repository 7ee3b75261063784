"""Batches for supervised fine-tuning: whole conversations packed into rows, assistant-only loss.

Each conversation (`sft.read_sft_jsonl`) is one segment of a row: its positions start at 0 and
the attention mask (from segment ids) never lets it see another. Unlike pretraining packing, a
conversation is never cut across rows (its second half would lose the prompt it answers): the rows
are filled greedily in order, and a conversation that does not fit starts the next row. Targets
are the next token within the segment, weighted by the conversation's loss weights, so only the
assistant's tokens (and their end-of-turn token) are learned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from transformer.data import instructions, packing, pipeline, sft
from transformer.data.sources import Report, shard_bounds
from transformer.data.tokenizer import Tokenizer

ROW_KEYS = ("tokens", "loss_weights", "segment_ids", "positions")


def pack_conversations(examples: Sequence[dict[str, np.ndarray]], length: int
                       ) -> list[dict[str, np.ndarray]]:
    """Rows of `length` tokens, each holding whole conversations in order (greedy next-fit)."""
    rows: list[dict[str, np.ndarray]] = []
    row, fill, segment = None, length, 0
    for example in examples:
        n = len(example["tokens"])
        if n > length:
            raise ValueError(f"a conversation of {n} tokens does not fit a row of {length}; "
                             "read_sft_jsonl truncates to max_length: read with the row length")
        if fill + n > length:
            row = {k: np.zeros(length, np.float32 if k == "loss_weights" else np.int32)
                   for k in ROW_KEYS}
            rows.append(row)
            fill, segment = 0, 0
        segment += 1
        row["tokens"][fill:fill + n] = example["tokens"]
        row["loss_weights"][fill:fill + n] = example["loss_weights"]
        row["segment_ids"][fill:fill + n] = segment
        row["positions"][fill:fill + n] = np.arange(n)
        fill += n
    return rows


def lm_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """inputs/targets/weights of next-token prediction within each segment (as pretraining's
    `packing.causal_lm_batch`), each target weighted by that token's loss weight."""
    batch = packing.causal_lm_batch(rows)
    next_weights = np.zeros_like(batch["weights"])
    next_weights[..., :-1] = rows["loss_weights"][..., 1:]
    return {**batch, "weights": batch["weights"] * next_weights}


def read_rows(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
              ) -> tuple[list[dict[str, np.ndarray]], Report]:
    """Packed rows of the conversations of `read_examples`, in a shuffled order."""
    examples, report = read_examples(config, split, tokenizer)
    if config.shuffle:  # Packed neighbours differ from file order; the row order is shuffled too.
        order = np.random.default_rng(config.seed).permutation(len(examples))
        examples = [examples[i] for i in order]
    return pack_conversations(examples, config.max_length), report


def read_examples(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
                  ) -> tuple[list[dict[str, np.ndarray]], Report]:
    """The conversations (`tokens`, `loss_weights`) of the file(s) `config.local_files[split]`
    (comma-separated): JSONL conversations, or SQuAD questions with `local_format='squad'`
    (`instructions`); at most `sft_max_examples` (training) or `sft_max_eval_examples` of them
    per file (0 = all), in file order."""
    files = config.local_files.to_dict()
    if split not in files:
        raise KeyError(f"config.data.local_files has no split {split!r} (SFT reads JSONL files "
                       f"named there); it has {sorted(files)}")
    paths = files[split].split(",") if isinstance(files[split], str) else list(files[split])
    report = Report()
    fmt = config.local_format or "jsonl"
    key = "sft_max_examples" if split == config.train_split else "sft_max_eval_examples"
    limit = config.get(key, 0) or None
    examples = [
        e for path in paths for e in sft.sft_examples(
            instructions.conversations(path.strip(), fmt, on_error=config.on_error, report=report,
                                       limit=limit),
            tokenizer, config.max_length, on_error=config.on_error, report=report)]
    if not examples:
        raise ValueError(f"SFT split {split!r} ({paths}) has no usable conversation")
    return examples, report


def create_sft_dataset(
    config: ml_collections.ConfigDict, split: str, *, tokenizer: Tokenizer,
    process_index: int = 0, process_count: int = 1, train: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of this process's rows: repeated and shuffled for training; for evaluation every
    row once, the last batch padded with weight-0 rows."""
    rows, report = read_rows(config, split, tokenizer)
    if report.counts:
        logging.info("sft %s: %d rows; %s", split, len(rows), report.summary())
    start, end = shard_bounds(len(rows), process_index, process_count)
    size = config.global_batch_size // process_count
    ds = grain.MapDataset.source(rows[start:end])
    if train:
        if len(rows[start:end]) == 0:
            raise ValueError(f"SFT split {split!r} has {len(rows)} rows: too few for "
                             f"{process_count} processes")
        ds = ds.shuffle(seed=config.seed) if config.shuffle else ds
        ds = ds.repeat(config.num_epochs).to_iter_dataset().batch(size, drop_remainder=False)
        return iter(ds.map(_full_batch(size)))
    return iter(_full_batch(size)(b) for b in ds.batch(size, drop_remainder=False))


def _full_batch(size: int) -> Any:
    """Stacked rows → a batch of `size` rows, a short last one padded with rows of segment 0."""
    return lambda stacked: lm_batch(pipeline.pad_batch(stacked, size))
