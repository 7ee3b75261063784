"""T5 span corruption (Raffel et al. 2020, §3.1.4): a pretraining objective for encoder-decoders.

Of each chunk of a document, `noise_density` (0.15) of the tokens are dropped in spans of mean
length `mean_span_length` (3): the input keeps the other tokens with each dropped span replaced by
one sentinel, and the target lists the sentinels, each followed by the tokens it stands for:

    chunk   The  quick brown fox jumps over the lazy dog
    inputs  The  <s0>  fox jumps <s1> lazy dog </s>
    target  <s0> quick brown <s1> over the </s>

Sentinel k is id `vocab_size - 1 - k`, from the top of the model's vocabulary as T5's
`<extra_id_k>`; the model vocabulary must leave `num_sentinels` ids above the tokenizer's.
The number of noise tokens is round(n · density) and of spans round(noise / mean span); span
lengths are a uniformly random composition of those totals, alternating non-noise and noise and
starting with non-noise (the layout of T5's `random_spans_noise_mask`). Chunk lengths are chosen
(as T5's `random_spans_helper`) so that inputs and targets fit their rows with their EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import ml_collections
import numpy as np

from transformer.data import pipeline, seq2seq
from transformer.data.tokenizer import Tokenizer, load_tokenizer


def default_config() -> ml_collections.ConfigDict:
    """`config.span_corruption`."""
    c = ml_collections.ConfigDict()
    c.noise_density = 0.15  # Fraction of each chunk's tokens dropped into the target.
    c.mean_span_length = 3.0  # Mean length of a dropped span.
    c.num_sentinels = 100  # Ids at the top of model.vocab_size kept for sentinels (T5: 100).
    return c


def num_noise(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a chunk of `length` tokens (length ≥ 2)."""
    tokens = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(tokens / mean_span_length)), 1)
    return tokens, spans


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive lengths, uniformly over all such splits."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """bool[length]: True where a token is dropped (noise)."""
    if length < 2:
        return np.zeros(length, bool)
    noise, spans = num_noise(length, noise_density, mean_span_length)
    spans = min(spans, noise, length - noise)
    noise_lengths = _composition(noise, spans, rng)
    keep_lengths = _composition(length - noise, spans, rng)
    flags = np.repeat(np.tile([False, True], spans),
                      np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1))
    return flags


def corrupt(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `tokens` under `mask`, sentinel k = vocab_size - 1 - k (no EOS)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # The first token of each noise span.
    sentinels = vocab_size - np.cumsum(starts)  # vocab_size - 1 - k within (and after) span k.
    inputs = np.where(starts, sentinels, tokens)[~mask | starts]
    # Targets: each noise span's tokens, its sentinel before them.
    noise_starts = starts[mask]
    where = np.arange(noise_starts.size) + np.cumsum(noise_starts)  # Token slots in the target.
    targets = np.empty(noise_starts.size + noise_starts.sum(), np.int64)
    targets[where] = tokens[mask]
    targets[where[noise_starts] - 1] = sentinels[mask][noise_starts]
    return inputs.astype(np.int32), targets.astype(np.int32)


def chunk_length(inputs_length: int, targets_length: int, noise_density: float,
                 mean_span_length: float) -> int:
    """The longest chunk whose corrupted inputs fit `inputs_length` and targets `targets_length`
    tokens, EOS included (T5's `random_spans_helper`, computed exactly)."""
    def sizes(n):
        noise, spans = num_noise(n, noise_density, mean_span_length)
        return n - noise + spans + 1, noise + spans + 1

    n = 2
    while all(s <= limit for s, limit in zip(sizes(n + 1), (inputs_length, targets_length))):
        n += 1
    if any(s > limit for s, limit in zip(sizes(n), (inputs_length, targets_length))):
        raise ValueError(f"rows of {inputs_length} input / {targets_length} target tokens are "
                         "too short for span corruption; lengthen data.max_length or "
                         "seq2seq.max_target_length")
    return n


@dataclasses.dataclass
class Corrupt:
    """A chunk of token ids → {"inputs", "targets"}, each ending in EOS (a random map)."""

    vocab_size: int
    eos_id: int
    noise_density: float
    mean_span_length: float

    def __call__(self, element: dict[str, np.ndarray], rng: np.random.Generator):
        tokens = element["tokens"]
        mask = noise_mask(len(tokens), self.noise_density, self.mean_span_length, rng)
        inputs, targets = corrupt(tokens, mask, self.vocab_size)
        eos = np.asarray([self.eos_id], np.int32)
        return {"inputs": np.concatenate([inputs, eos]), "targets": np.concatenate([targets, eos])}


def check_vocab(model_vocab: int, tokenizer: Tokenizer, num_sentinels: int) -> None:
    if model_vocab - num_sentinels < tokenizer.vocab_size:
        raise ValueError(
            f"span corruption takes its {num_sentinels} sentinels from the top of the model's "
            f"vocabulary, but model.vocab_size={model_vocab} leaves only "
            f"{model_vocab - tokenizer.vocab_size} ids above the tokenizer's {tokenizer.vocab_size}"
            f"; set --config.model.vocab_size={tokenizer.vocab_size + num_sentinels} or more")


def create_span_corruption_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    tokenizer: Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
) -> grain.IterDataset:
    """Packed (inputs, targets) rows of span-corrupted text, in the seq2seq batch format: the
    pretraining corpus (`data.dataset` or local text), tokenized, cut into chunks sized to fit,
    corrupted, and packed as whole pairs. `train=False` reads the split once, in order, the
    last batch padded with weight-0 rows."""
    tok = tokenizer or load_tokenizer(config.data.tokenizer)
    sc = config.span_corruption
    check_vocab(config.model.vocab_size, tok, sc.num_sentinels)
    length = chunk_length(config.data.max_length, config.seq2seq.max_target_length,
                          sc.noise_density, sc.mean_span_length)
    batch = pipeline.per_process_batch(config.data, process_count)
    ds = pipeline._records(config.data, split, process_index, process_count, train, "text")
    ds = ds.map(pipeline.TokenizeDocument(tok, config.data.text_key, "causal", add_eos=False))
    chunks = pipeline.packing.PackIterDataset(ds.to_iter_dataset(), length)  # Cuts documents.
    chunks = chunks.map(_first_segment)
    pairs = chunks.random_map(Corrupt(config.model.vocab_size, tok.eos_id, sc.noise_density,
                                      sc.mean_span_length), seed=config.data.seed)
    rows = seq2seq.PairPackIterDataset(pairs, config.data.max_length,
                                       config.seq2seq.max_target_length)
    rows = rows.batch(batch, drop_remainder=train)
    if not train:
        rows = rows.map(functools.partial(pipeline.pad_batch, size=batch))
    out = rows.map(functools.partial(seq2seq.teacher_forcing,
                                     decoder_start_token_id=config.model.decoder_start_token_id))
    return pipeline._finish(out, config.data)


def _first_segment(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """A packed row's tokens as one chunk (segments of short documents joined, as T5 does)."""
    return {"tokens": row["tokens"][row["segment_ids"] > 0]}
