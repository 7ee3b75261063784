"""Attention with the sequence split over the 'context' mesh axis (context parallelism).

Every activation is split along its length over the n devices of the 'context' axis; only
attention needs tokens of other devices. Two strategies (`ModelConfig.context_parallel`):

  all_gather  each device gathers all keys and values (with their segment ids and positions)
              and attends its own queries over them: one collective; scores T/n × T a head.
  ring        keys and values travel around the ring of devices (`lax.ppermute`, n - 1 hops)
              while each device attends its queries to the block it holds; the blocks combine
              by the online softmax (running max and sum, float32): scores T/n × T/n a head.

Scores are materialized a block at a time (no fused kernel here) and recomputed in the backward
pass (`jax.checkpoint` per block); the backward pass keeps each hop's key/value block.

Causal load balancing (`ModelConfig.context_load_balance`): with the tokens in order, device i
would attend to i + 1 blocks and the last device would do n times the first's work. The batch
is instead laid out zig-zag (`load_balance_order`): the sequence in 2n chunks, device i holding
chunks i and 2n-1-i, so at every ring step each device attends over half a block — the first
half of the keys it received, or its second half of the queries. The train step reorders the
batch (`reorder_batch`); the loss is a sum over tokens, unaffected by the order.

Masks travel with the tokens: segment ids (packing, padding) and positions (RoPE, causality
and sliding windows within a segment: positions increase by one along a segment). Padding
queries' outputs (never used) may differ from the unsplit model's.
The shard_map wiring lives here; the mesh axes come from the active rules (`sharding`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from transformer import sharding
from transformer.models.config import ModelConfig
from transformer.models.masks import segment_mask

AXIS = sharding.CONTEXT_AXIS
_MASKED = jnp.finfo(jnp.float32).min  # As the einsum reference: fully masked rows stay finite.


@struct.dataclass
class TokenLayout:
    """What attention needs of the tokens in place of a dense mask: segment ids and positions,
    [batch, length] each, in the order the tokens are laid out (zig-zag when load balanced)."""

    segment_ids: jax.Array
    positions: jax.Array
    causal: bool = struct.field(pytree_node=False)
    window: int | None = struct.field(pytree_node=False, default=None)
    load_balanced: bool = struct.field(pytree_node=False, default=False)


def active() -> bool:
    """Whether the active mesh splits the sequence (a 'context' axis of more than one device)."""
    return sharding.context_size() > 1


def layout(config: ModelConfig, segment_ids: jax.Array, positions: jax.Array, *,
           causal: bool) -> TokenLayout:
    """The token layout a model passes to its attention layers under context parallelism (or
    to a fused kernel, `transformer.models.kernels`, on one device: never load balanced)."""
    balanced = causal and config.context_load_balance and active()
    check_length(segment_ids.shape[1], sharding.context_size(), balanced)
    window = config.sliding_window if causal else None
    return TokenLayout(segment_ids, positions, causal, window, balanced)


def check_length(length: int, context: int, load_balanced: bool) -> None:
    """The sequence must split into equal blocks (2 chunks a device when load balanced)."""
    chunks = 2 * context if load_balanced else context
    if length % chunks:
        fix = ("or set model.context_load_balance=False (then a multiple of "
               f"{context} will do)" if load_balanced else "or change mesh.context")
        raise ValueError(
            f"sequence length {length} does not split over context parallelism: "
            f"{'load balancing needs 2 × ' if load_balanced else 'it must be a multiple of '}"
            f"mesh.context={context}{' = ' + str(chunks) if load_balanced else ''} equal chunks; "
            f"use a data.max_length that is a multiple of {chunks}, {fix}")


def check_supported(return_weights: bool, attention_dropout: bool) -> None:
    """Attention weights and attention dropout need the full score matrix on one device."""
    if return_weights or attention_dropout:
        what = "output_attentions" if return_weights else "attention_dropout_rate > 0"
        raise ValueError(
            f"{what} is not supported under context parallelism (the 'context' mesh axis "
            "splits the scores); use a mesh without a context axis (mesh.context=1) for it, or "
            f"{'drop output_attentions' if return_weights else 'set attention_dropout_rate=0'}")


def load_balance_order(length: int, context: int) -> np.ndarray:
    """The zig-zag permutation: laid-out token j is original token `order[j]`; device i (of
    `context`) holds chunks i and 2·context-1-i of the 2·context chunks of the sequence."""
    check_length(length, context, True)
    chunks = np.arange(length).reshape(2 * context, -1)
    return np.concatenate([chunks[c] for i in range(context) for c in (i, 2 * context - 1 - i)])


def reorder_batch(batch: dict[str, jax.Array], context: int) -> dict[str, jax.Array]:
    """Every [batch, length, ...] array of `batch` in the zig-zag order; the other arrays as
    they are. The batch must carry its positions and segment ids (they travel with the tokens)."""
    if missing := [k for k in ("positions", "segment_ids") if k not in batch]:
        raise ValueError(
            f"causal load balancing reorders the tokens, so the batch needs {missing} (the "
            "language-model and SFT batches have them); set model.context_load_balance=False")
    length = batch["segment_ids"].shape[1]
    order = jnp.asarray(load_balance_order(length, context))
    along_length = lambda x: x.ndim >= 2 and x.shape[1] == length
    return {k: jnp.take(v, order, axis=1) if along_length(v) else v for k, v in batch.items()}


def prepare_batch(batch: dict[str, jax.Array], *, causal: bool,
                  load_balance: bool) -> dict[str, jax.Array]:
    """A training batch as the model wants it: zig-zag ordered when the active mesh splits the
    sequence of a causal model with load balancing on; as it is otherwise."""
    if causal and load_balance and active():
        return reorder_batch(batch, sharding.context_size())
    return batch


def attention(query: jax.Array, key: jax.Array, value: jax.Array, tokens: TokenLayout,
              strategy: str) -> jax.Array:
    """Attention of query [B,T,H,D] over key/value [B,T,K,D] (K dividing H), the length split
    over the 'context' axis of the active mesh; `strategy` is 'ring' or 'all_gather'."""
    rules, mesh = sharding.active_rules(), jax.sharding.get_abstract_mesh()
    context = dict(mesh.shape)[AXIS]
    check_length(query.shape[1], context, tokens.load_balanced)
    if rules.get("length") != (AXIS,):
        raise ValueError(
            f"context parallelism needs the logical axis 'length' mapped to the mesh axis {AXIS!r} "
            f"alone; the rules map it to {rules.get('length')}: use ('length', {AXIS!r})")
    q_spec, key, value = split_like_queries(query, key, value, rules, mesh)
    kv_spec = q_spec
    token_spec = PartitionSpec(q_spec[0], q_spec[1])
    body = {"ring": _ring, "all_gather": _all_gather}[strategy]
    attend = functools.partial(body, context=context, causal=tokens.causal, window=tokens.window,
                               load_balanced=tokens.load_balanced)
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec),
        out_specs=q_spec, check_vma=False,
    )(query, key, value, tokens.segment_ids, tokens.positions)


def split_like_queries(query: jax.Array, key: jax.Array, value: jax.Array, rules, mesh
                       ) -> tuple[PartitionSpec, jax.Array, jax.Array]:
    """(the spec of query [B,T,H,D] under `rules`, key, value [B,T,K,D]) such that the key and
    value split with that spec too: for shard_map bodies that attend a device's query heads."""
    names = ("batch", "length", "act_heads", None)
    q_spec = sharding.logical_to_spec(names, rules, query.shape, mesh)
    if sharding.logical_to_spec(names, rules, key.shape, mesh)[2] != q_spec[2]:
        # Key/value heads that do not split like the query heads (fewer than the tensor axis):
        # each query head gets its own copy, so every device holds the keys of its queries.
        groups = query.shape[2] // key.shape[2]
        key, value = (jnp.repeat(x, groups, axis=2) for x in (key, value))
    return q_spec, key, value


# --- Per device (inside shard_map): q [b, t, h, d], k/v [b, t, k, d], tokens [b, t]. ---------


def _block(q, k, v, q_seg, q_pos, k_seg, k_pos, *, causal, window):
    """One block of the online softmax: (unnormalized output [b,t,h,d], row max [b,h,t], row sum
    [b,h,t]), float32. Remat: the backward pass recomputes the block's scores, never stores them."""
    batch, length, heads, depth = q.shape
    kv_heads, kv_len = k.shape[2], k.shape[1]
    groups = heads // kv_heads
    grouped = q.reshape(batch, length, kv_heads, groups, depth)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, heads, length, kv_len) / math.sqrt(depth)
    mask = segment_mask(q_seg, k_seg, q_pos, k_pos, causal=causal, window=window)
    scores = jnp.where(mask, scores, _MASKED)
    # The output does not depend on the shift: no gradient flows through the running max.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
    probs = jnp.exp(scores - row_max[..., None])
    row_sum = jnp.sum(probs, axis=-1)
    probs = probs.reshape(batch, kv_heads, groups, length, kv_len).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, depth), row_max, row_sum


def _remat_block(causal: bool, window: int | None):
    return jax.checkpoint(functools.partial(_block, causal=causal, window=window))


def _by_token(x: jax.Array) -> jax.Array:
    """[b, h, t] row statistics → [b, t, h, 1], to scale outputs [b, t, h, d]."""
    return jnp.swapaxes(x, 1, 2)[..., None]


def _merge(acc, block):
    """Combine two partial softmaxes (output, max, sum) over disjoint key sets."""
    out, row_max, row_sum = acc
    block_out, block_max, block_sum = block
    new_max = jnp.maximum(row_max, block_max)
    old_scale, block_scale = jnp.exp(row_max - new_max), jnp.exp(block_max - new_max)
    out = out * _by_token(old_scale) + block_out * _by_token(block_scale)
    return out, new_max, row_sum * old_scale + block_sum * block_scale


def _nothing(q):
    """The partial softmax over no key: the neutral element of `_merge`."""
    batch, length, heads, _ = q.shape
    stats = (batch, heads, length)
    return (jnp.zeros(q.shape, jnp.float32), jnp.full(stats, _MASKED), jnp.zeros(stats))


def _finish(acc, dtype):
    out, _, row_sum = acc
    return (out / _by_token(row_sum)).astype(dtype)


def _all_gather(q, k, v, seg, pos, *, context, causal, window, load_balanced):
    del context, load_balanced  # Positions and segment ids already say who sees whom.
    all_k, all_v, all_seg, all_pos = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
                                      for x in (k, v, seg, pos))
    block = _remat_block(causal, window)(q, all_k, all_v, seg, pos, all_seg, all_pos)
    return _finish(block, q.dtype)


def _ring(q, k, v, seg, pos, *, context, causal, window, load_balanced):
    me = jax.lax.axis_index(AXIS)
    attend = _remat_block(causal, window)
    half = q.shape[1] // 2
    full = lambda kv: attend(q, kv[0], kv[1], seg, pos, kv[2], kv[3])
    # Zig-zag: an earlier device's first chunk precedes both of mine and its second follows
    # both; a later device's chunks both precede my second and follow my first.
    first_keys = lambda kv: attend(q, kv[0][:, :half], kv[1][:, :half], seg, pos,
                                   kv[2][:, :half], kv[3][:, :half])
    second_queries = functools.partial(_second_queries, q, seg, pos, attend, half)

    def step(carry, hops):
        acc, kv = carry
        # Pass the blocks on: after `hops` hops, device i holds device i - hops's block.
        kv = jax.lax.ppermute(kv, AXIS, [(i, (i + 1) % context) for i in range(context)])
        earlier = (me - hops) % context < me
        if not causal:
            block = full(kv)
        elif load_balanced:
            block = jax.lax.cond(earlier, first_keys, second_queries, kv)
        else:  # Keys of an earlier block: all visible (up to the mask); of a later one: none.
            block = jax.lax.cond(earlier, full, lambda kv: _nothing(q), kv)
        return (_merge(acc, block), kv), None

    own = (k, v, seg, pos)
    (acc, _), _ = jax.lax.scan(step, (full(own), own), jnp.arange(1, context))
    return _finish(acc, q.dtype)


def _second_queries(q, seg, pos, attend, half, kv):
    """The second half of my queries over a whole key block; the first half sees none of it."""
    out, row_max, row_sum = attend(q[:, half:], kv[0], kv[1], seg[:, half:], pos[:, half:],
                                   kv[2], kv[3])
    empty_out, empty_max, empty_sum = _nothing(q[:, :half])
    return (jnp.concatenate([empty_out, out], axis=1), jnp.concatenate([empty_max, row_max], -1),
            jnp.concatenate([empty_sum, row_sum], -1))
