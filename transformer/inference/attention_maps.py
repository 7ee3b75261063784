"""Attention weights of every layer and head for one input, and attention rollout.

Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): per layer, the
heads' mean attention plus the identity (the residual connection), rows renormalised; the layers'
matrices multiplied from the first up, Ã_l = A_l · Ã_{l−1}. Row i of the result says how much
each input token flows into position i of the last layer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from transformer.models.heads import TaskModel


def attention_weights(model: Any, input_ids: Any, attention_mask: Any = None,
                      token_type_ids: Any = None) -> np.ndarray:
    """[layers, batch, heads, queries, keys] (float32) of an Encoder, a Decoder or the backbone of
    a TaskModel; each query's weights over the keys it may see sum to 1."""
    backbone = model.backbone if isinstance(model, TaskModel) else model
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    types = (None if token_type_ids is None or not backbone.config.type_vocab_size
             else jnp.asarray(token_type_ids, jnp.int32))
    out = backbone(ids, mask, types, output_attentions=True, compute_logits=False)
    return np.asarray(out.attentions, np.float32)


def attention_rollout(weights: Any) -> np.ndarray:
    """Rollout [tokens, tokens] of one input's weights [layers, heads, tokens, tokens] (padding
    already cut off); rows sum to 1."""
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"attention_rollout takes one input's weights [layers, heads, tokens, "
                         f"tokens], got shape {weights.shape}")
    identity = jnp.eye(weights.shape[-1], dtype=weights.dtype)
    mixed = weights.mean(1) + identity  # [layers, tokens, tokens]
    mixed = mixed / mixed.sum(-1, keepdims=True)
    rollout = identity
    for layer in mixed:
        rollout = layer @ rollout
    return np.asarray(rollout)
