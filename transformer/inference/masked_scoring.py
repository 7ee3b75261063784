"""Scoring with a masked LM: the log-probability of a token when it alone is masked.

Summed over the tokens of a sentence this is its pseudo-log-likelihood (Salazar et al., 2020), the
score CrowS-Pairs compares (Nangia et al., 2020). Each (sentence, position) is one row: the sentence
with that position replaced by the mask token. Rows are grouped by padded length and run in batches
of a fixed size, so a few compiled shapes serve any set of sentences; the masked-LM head is applied
at the masked position only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.models import Encoder


def check_masked_lm(model: Any, mask_id: int | None) -> None:
    """Raises, naming the fix, unless `model` is an encoder with a masked-LM head and the
    tokenizer has a mask token."""
    config = model.config
    if config.architecture != "encoder":
        raise ValueError("masked-LM scoring needs an encoder (BERT-style) model; this one is a "
                         "causal decoder: score it by sentence log-likelihood instead")
    if not config.mlm_head:
        raise ValueError(
            "masked-LM scoring needs a model with its masked-LM head (BERT's cls.predictions "
            "transform and output bias, as in BertForMaskedLM); this encoder has none, so its "
            "token predictions are meaningless (e.g. a BertModel or sentence-transformers export "
            "such as all-MiniLM-L6-v2). Use a checkpoint trained with the masked-LM objective "
            "(configs/bert_pretrain.py) or a BertForMaskedLM folder")
    if mask_id is None:
        raise ValueError("masked-LM scoring needs a tokenizer with a mask token ([MASK] or <mask>); "
                         "this one has none")


@functools.partial(jax.jit, static_argnums=0)
def _masked_logprobs(graphdef: Any, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                     positions: jax.Array, targets: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    hidden = model(input_ids, attention_mask, compute_logits=False).last_hidden_state
    at_mask = jnp.take_along_axis(hidden, positions[:, None, None], axis=1)  # [batch, 1, hidden]
    logp = jax.nn.log_softmax(model.mlm_logits(at_mask)[:, 0], axis=-1)
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def masked_token_logprobs(
    model: Encoder, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
    mask_id: int, *, batch_size: int = 64, pad_to_multiple: int = 16, progress: Any = None,
) -> list[np.ndarray]:
    """For each sequence, log p(token at p | the sequence with p masked) at each of its `positions`,
    in float32 (sequences carry their special tokens). `progress` (a tqdm bar) advances by rows."""
    check_masked_lm(model, mask_id)
    if len(sequences) != len(positions):
        raise ValueError(f"{len(sequences)} sequences but {len(positions)} position lists")
    limit = model.config.max_length if model.config.position == "learned" else None
    buckets: dict[int, list[tuple[int, int, int]]] = {}  # padded length -> (sequence, k, position)
    for s, (seq, ps) in enumerate(zip(sequences, positions)):
        if limit is not None and len(seq) > limit:
            raise ValueError(f"sequence {s} has {len(seq)} tokens, more than the model's {limit} "
                             "positions; shorten it")
        for k, p in enumerate(ps):
            if not 0 <= p < len(seq):
                raise ValueError(f"position {p} is outside sequence {s} of {len(seq)} tokens")
            width = -(-len(seq) // pad_to_multiple) * pad_to_multiple
            buckets.setdefault(width if limit is None else min(width, limit), []).append((s, k, p))
    graphdef, params = nnx.split(model)
    out = [np.zeros(len(ps), np.float32) for ps in positions]
    for width, bucket in sorted(buckets.items()):
        for start in range(0, len(bucket), batch_size):
            chunk = bucket[start:start + batch_size]
            # A fixed batch shape (rows past the chunk are padding, dropped): one program a width.
            ids = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            where = np.zeros(batch_size, np.int32)
            targets = np.zeros(batch_size, np.int32)
            for i, (s, _, p) in enumerate(chunk):
                seq = sequences[s]
                ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
                ids[i, p], where[i], targets[i] = mask_id, p, seq[p]
            logp = np.asarray(_masked_logprobs(
                graphdef, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(where),
                jnp.asarray(targets)))
            for i, (s, k, _) in enumerate(chunk):
                out[s][k] = logp[i]
            if progress is not None:
                progress.update(len(chunk))
    return out
