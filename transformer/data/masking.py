"""BERT masked-LM corruption: select 15% of tokens; of those 80% [MASK], 10% random, 10% kept."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """What to corrupt and how; `candidates` is bool[vocab]: ids that may ever be selected."""

    mask_id: int
    vocab_size: int
    candidates: np.ndarray  # False for pad, CLS, SEP, BOS, EOS... never selected, never sampled
    select_probability: float = 0.15
    mask_fraction: float = 0.8  # of the selected: replaced by [MASK]
    random_fraction: float = 0.1  # of the selected: replaced by a random non-special token
    word_starts: np.ndarray | None = None  # bool[vocab] for whole-word masking, else None

    @classmethod
    def for_tokenizer(cls, tokenizer, whole_word: bool = False, **kwargs) -> MaskingConfig:
        if tokenizer.mask_id is None:
            raise ValueError("masked-LM needs a tokenizer with a mask token")
        candidates = np.ones(tokenizer.vocab_size, bool)
        special = [i for i in tokenizer.special_ids.values() if i < tokenizer.vocab_size]
        candidates[special] = False
        starts = tokenizer.word_start_table() if whole_word else None
        return cls(tokenizer.mask_id, tokenizer.vocab_size, candidates, word_starts=starts,
                   **kwargs)


def _word_ids(ids: np.ndarray, segment_ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """A running word number per token; a new word at each word start and each segment start."""
    new = starts[ids].copy()
    new[..., 0] = True
    new[..., 1:] |= segment_ids[..., 1:] != segment_ids[..., :-1]
    flat = np.cumsum(new.reshape(-1))
    return flat.reshape(ids.shape)


def mask_tokens(
    ids: np.ndarray, segment_ids: np.ndarray, config: MaskingConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """inputs (corrupted ids), targets (original ids) and weights (1 at selected positions).

    `segment_ids` is 0 at padding. Selection is per token, or per word when `word_starts` is set
    (all pieces of a selected word are selected together).
    """
    ids = np.asarray(ids)
    eligible = config.candidates[ids] & (segment_ids > 0)
    if config.word_starts is None:
        selected = eligible & (rng.random(ids.shape) < config.select_probability)
    else:
        words = _word_ids(ids, segment_ids, config.word_starts)
        pick = rng.random(words.max() + 1) < config.select_probability
        selected = eligible & pick[words]
    action = rng.random(ids.shape)
    to_mask = selected & (action < config.mask_fraction)
    to_random = selected & (action >= config.mask_fraction) & (
        action < config.mask_fraction + config.random_fraction
    )
    allowed = np.flatnonzero(config.candidates)
    random_ids = allowed[rng.integers(0, len(allowed), ids.shape)]
    inputs = np.where(to_mask, config.mask_id, np.where(to_random, random_ids, ids))
    return {
        "inputs": inputs.astype(np.int32),
        "targets": ids.astype(np.int32),
        "weights": selected.astype(np.float32),
    }
