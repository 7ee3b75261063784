"""TPU: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).

Block-sparse flash attention: scores are computed a (block_q × block_kv) tile at a time in VMEM
and never stored; tiles the mask empties (above the causal diagonal, outside a sliding window)
are skipped. The static part of the mask (causal, local window) is a lazy mask object; padding
and packing are the segment ids (a query attends to keys of its own segment). Grouped-query heads
are native (query heads a multiple of key/value heads). The backward pass is the kernel's own
(custom VJP: dq and dk/dv kernels over the same tiles).

Under a mesh the kernel runs per device in `shard_map` (a Pallas call is not partitioned by XLA's
SPMD partitioner): batch and heads split as the activations are, the whole sequence on each.
Padding queries (segment 0) attend to the other padding tokens, not to every real key as in the
reference: their outputs differ. Losses weigh them 0, except extractive QA's softmax over all
positions of an encoder (padding included): use attention_impl='xla' there for parity with the
Hugging Face models.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from transformer import sharding
from transformer.models import context_parallel

# Tile sizes tried largest first: 512 suits the v5p MXU and VMEM at head dim 128; the smallest,
# 128, is the TPU lane width and so the kernel's minimum.
BLOCK_SIZES = (512, 256, 128)


def block_size(length: int) -> int:
    """The largest tile of BLOCK_SIZES that divides `length`; ValueError if none does."""
    for block in BLOCK_SIZES:
        if length % block == 0:
            return block
    raise ValueError(
        f"attention_impl='splash' tiles the sequence in blocks of {BLOCK_SIZES[-1]} tokens, and "
        f"the length {length} is not a multiple of {BLOCK_SIZES[-1]}: use a data.max_length that "
        "is, or model.attention_impl='xla'")


def static_mask(length: int, heads: int, *, causal: bool,
                window: int | None) -> mask_lib.MultiHeadMask:
    """The mask that does not depend on the tokens, one per head: full, causal, or causal within
    a window of `window` keys (the query and the `window` - 1 before it)."""
    shape = (length, length)
    if not causal:
        head = mask_lib.FullMask(shape)
    elif window is None:
        head = mask_lib.CausalMask(shape)
    else:
        head = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    return mask_lib.MultiHeadMask([head] * heads)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
              causal: bool, window: int | None, scale: float, interpret: bool) -> jax.Array:
    """Attention of query [B,T,H,D] over key/value [B,T,K,D] (K dividing H); `interpret` runs
    the kernel in Pallas interpret mode (any backend)."""
    rules, mesh = sharding.active_rules(), jax.sharding.get_abstract_mesh()
    attend = functools.partial(_attend, causal=causal, window=window, scale=scale,
                               interpret=interpret)
    if rules is None or mesh.empty:
        return attend(query, key, value, segment_ids)
    q_spec, key, value = context_parallel.split_like_queries(query, key, value, rules, mesh)
    if q_spec[1] is not None:
        raise ValueError(
            f"attention_impl='splash' needs the whole sequence on each device, but the rules "
            f"split 'length' over {q_spec[1]!r}; under context parallelism attention is "
            "context_parallel's, so set model.attention_impl='xla' with a 'context' mesh axis")
    token_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, q_spec, q_spec, token_spec),
                         out_specs=q_spec, check_vma=False)(query, key, value, segment_ids)


def _attend(query, key, value, segment_ids, *, causal, window, scale, interpret):
    """On one device: the kernel over [heads, length, depth], mapped over the batch."""
    _, length, heads, depth = query.shape
    block = block_size(length)
    blocks = kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    kernel = kernel_lib.make_splash_mha(
        static_mask(length, heads, causal=causal, window=window), block_sizes=blocks,
        head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = lambda x: x.swapaxes(1, 2)
    # The kernel takes no scale: it goes on the queries (one rounding in their dtype).
    query = query * jnp.asarray(scale, query.dtype)
    segments = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(heads_first(query), heads_first(key), heads_first(value), segments)
    return heads_first(out)
