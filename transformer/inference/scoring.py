"""Scoring texts with a causal LM: per-token log-probabilities, log-likelihood and perplexity.

Token t is scored by the model's distribution after tokens 0..t-1, so the first token of each
text (BOS, where the tokenizer adds one) is context only. Perplexity = exp(mean negative
log-likelihood per scored token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.models import Decoder


@dataclasses.dataclass(frozen=True)
class TextScore:
    text: str
    tokens: list[int]  # All token ids of the text (with the tokenizer's special tokens).
    logprobs: list[float]  # log p(tokens[t] | tokens[:t]) for t = 1 .. len(tokens) - 1.

    @property
    def log_likelihood(self) -> float:
        return float(sum(self.logprobs))

    @property
    def num_scored(self) -> int:
        return len(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood / self.num_scored) if self.logprobs else float("nan")


def next_token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log_softmax(logits)[b, t, input_ids[b, t + 1]]: [batch, length - 1], in float32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef: Any, params: Any, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(input_ids, mask).logits
    return next_token_logprobs(logits, input_ids) * mask[:, 1:]


def token_logprobs(
    model: Decoder, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> np.ndarray:
    """[batch, length - 1]: the log-probability of each next token (0 where it is padding).

    Padding must be on the right (as tokenizers pad), so scored positions are contiguous.
    """
    if not model.config.causal:
        raise ValueError("scoring needs a decoder (causal) model; this one is an encoder")
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    graphdef, params = nnx.split(model)
    return np.asarray(_token_logprobs(graphdef, params, jnp.asarray(input_ids, jnp.int32),
                                      jnp.asarray(mask, jnp.int32)))


def perplexity(logprobs: np.ndarray, mask: np.ndarray) -> float:
    """exp of the mean negative log-likelihood over the positions where mask is 1."""
    return float(np.exp(-np.sum(logprobs * mask) / np.sum(mask)))


def score_texts(
    tokenizer: Any, model: Decoder, texts: Sequence[str], *, batch_size: int = 8,
    pad_to_multiple: int = 32,
) -> list[TextScore]:
    """Per-token log-probabilities of each text; batches are padded to a multiple of
    `pad_to_multiple` tokens so a few compiled shapes serve texts of any length."""
    rows = [tokenizer(t, padding=False)["input_ids"] for t in texts]
    logprobs = sequence_logprobs(model, rows, batch_size=batch_size, pad_to_multiple=pad_to_multiple)
    return [TextScore(text, list(r), lp) for text, r, lp in zip(texts, rows, logprobs)]


def sequence_logprobs(
    model: Decoder, rows: Sequence[Sequence[int]], *, batch_size: int = 8, pad_to_multiple: int = 32,
    progress: Any = None,
) -> list[list[float]]:
    """log p(row[t] | row[:t]) for t = 1 .. len(row) - 1 of each row of token ids, in batches padded
    to a multiple of `pad_to_multiple` tokens; `progress` (a tqdm bar) advances by rows."""
    out = []
    height = min(batch_size, len(rows))  # Every batch this many rows: a last short one adds no shape.
    for start in range(0, len(rows), batch_size):
        batch = [list(r) for r in rows[start:start + batch_size]]
        width = max(len(r) for r in batch)
        width = -(-width // pad_to_multiple) * pad_to_multiple
        if model.config.position == "learned":
            width = min(width, model.config.max_length)
        if any(len(r) > width for r in batch):
            raise ValueError(f"a text has more than the model's {width} positions; split it")
        ids = np.zeros((height, width), np.int32)
        mask = np.zeros((height, width), np.int32)
        for i, r in enumerate(batch):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        logprobs = token_logprobs(model, ids, mask)
        out += [lp[:len(r) - 1].tolist() for r, lp in zip(batch, logprobs)]
        if progress is not None:
            progress.update(len(batch))
    return out
