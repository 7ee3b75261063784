"""One training record per row, for DP-SGD of causal-LM fine-tuning and SFT (transformer/train/dp.py).

The guarantee of DP-SGD is about the unit whose gradient is clipped. Packing puts pieces of several
documents into a row and cuts a document across rows, so a row is not a record. With `dp.enabled`
the `lm` and `sft` objectives therefore read every record (a document of the text files, a
conversation) into a row of its own, never packed:

- a document: its tokens (with BOS/EOS as in pretraining), the first `data.max_length` kept, the
  rest of the row padding (segment 0, weight 0);
- a conversation: as SFT renders it (transformer/data/sft.py already truncates to
  `data.max_length`), alone in its row, the loss on the assistant's tokens only.

Batches are Poisson-sampled over records (transformer/data/poisson.py), padded with all-zero rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from transformer.data import packing, pipeline, poisson, sft_batches, sources
from transformer.data.tokenizer import Tokenizer


@dataclasses.dataclass
class DocumentRow:
    """A tokenized document → [its causal-LM row] of `length` tokens (runs in the loader)."""

    length: int

    def __call__(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens = document["tokens"][: self.length]
        n = len(tokens)
        row = {"tokens": np.zeros(self.length, np.int32), "positions": np.zeros(self.length, np.int32),
               "segment_ids": np.zeros(self.length, np.int32)}
        row["tokens"][:n], row["positions"][:n], row["segment_ids"][:n] = tokens, np.arange(n), 1
        return [packing.causal_lm_batch(row)]


def count_documents(config: ml_collections.ConfigDict, split: str) -> int:
    """Documents (records) of the text split: each is one privacy unit."""
    return len(pipeline.open_source(config, split, "text"))


def documents(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
              ) -> grain.MapDataset:
    """record index → [the document's row] (`data.objective` must be 'causal')."""
    records = grain.MapDataset.source(pipeline.open_source(config, split, "text"))
    tokenize = pipeline.TokenizeDocument(tokenizer, config.text_key, "causal", config.add_eos)
    logging.info("dp.enabled: %d documents, each one row of data.max_length=%d tokens (longer ones "
                 "truncated, shorter ones padded; not packed)", len(records), config.max_length)
    return records.map(sources.decode_strings).map(tokenize).map(DocumentRow(config.max_length))


def conversations(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
                  ) -> list[list[dict[str, np.ndarray]]]:
    """[[the conversation's row]] for every conversation of the SFT split, in file order."""
    examples, report = sft_batches.read_examples(config, split, tokenizer)
    logging.info("dp.enabled: %d conversations, each one row of data.max_length=%d tokens "
                 "(not packed)%s", len(examples), config.max_length,
                 f"; {report.summary()}" if report.counts else "")
    return [[sft_batches.lm_batch(sft_batches.pack_conversations([e], config.max_length)[0])]
            for e in examples]


def count_conversations(config: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> int:
    """Conversations of the SFT split that train (each one privacy unit)."""
    return len(sft_batches.read_examples(config, split, tokenizer)[0])


def private_batches(records: Any, config: ml_collections.ConfigDict, sampling_rate: float,
                    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Poisson-sampled batches of `records` (`documents` or `conversations`)."""
    if not len(records):
        raise ValueError("the training split has no record to train on")
    if isinstance(records, list):
        records = grain.MapDataset.source(records)
    return poisson.sampled_batches(records, config, sampling_rate, process_index, process_count)
