"""Attention masks from segment ids and token indices, shared by every attention path."""

from __future__ import annotations

import jax


def segment_mask(
    query_segment_ids: jax.Array,
    key_segment_ids: jax.Array,
    query_index: jax.Array,
    key_index: jax.Array,
    *,
    causal: bool,
    window: int | None = None,
) -> jax.Array:
    """Boolean mask [batch, 1, queries, keys]; True where a query may attend to a key.

    Segment ids give padding (0) and packing (a token attends only inside its own segment);
    padding queries attend to every real key (see `attention.make_attention_mask`). With
    `causal`, a query sees the keys whose index is at most its own; with a `window` too, only
    the last `window` of them. The indices [batch, queries] / [batch, keys] are sequence
    indices, or positions within a segment (context parallelism: they travel with the tokens).
    """
    same_segment = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    padding_query = query_segment_ids[:, :, None] == 0
    mask = (same_segment | padding_query) & (key_segment_ids[:, None, :] != 0)
    if causal:
        q_index, k_index = query_index[:, :, None], key_index[:, None, :]
        mask = mask & (k_index <= q_index)
        if window is not None:
            mask = mask & (k_index > q_index - window)
    return mask[:, None, :, :]
