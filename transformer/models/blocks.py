"""Transformer blocks (pre-LN or post-LN) and the layer stack, scanned or unrolled, with remat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.models.attention import KVCache, MultiHeadAttention
from transformer.models.common import dropout, split_rng
from transformer.models.config import ModelConfig
from transformer.models.layers import MLP, Norm
from transformer.models.moe import MoEMLP
from transformer.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # Save nothing; recompute the whole layer in the backward pass.
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Self-attention and feed-forward sublayers, each with a residual connection.

    Pre-LN (GPT-2, Llama): x + f(norm(x)). Post-LN (BERT, the original Transformer): norm(x + f(x)).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, moe: bool | None = None):
        """`moe`: a mixture-of-experts feed-forward block (default: when the config has experts)."""
        self.config = config
        self.attention_norm = Norm(config, rngs=rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.mlp_norm = Norm(config, rngs=rngs)
        moe = bool(config.num_experts) if moe is None else moe
        self.mlp = MoEMLP(config, rngs=rngs) if moe else MLP(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None,
        positions: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        return_weights: bool = False,
        token_mask: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None, dict | None]:
        """Returns the output, the updated cache, attention weights and (MoE) router statistics
        over the tokens where `token_mask` [batch, length] is 1. `bias` is added to the
        attention logits (T5's relative position bias)."""
        rate = self.config.dropout_rate
        attn_rng, residual1_rng, residual2_rng = split_rng(dropout_rng, 3)
        mlp_rng = residual2_rng  # Only LoRA's input dropout reads it, through keys folded from it.
        attend = lambda h: self.attention(
            h, mask=mask, positions=positions, cache=cache, cache_index=cache_index,
            dropout_rng=attn_rng, return_weights=return_weights, bias=bias,
        )
        stats = []

        def feed_forward(h: jax.Array) -> jax.Array:
            if not isinstance(self.mlp, MoEMLP):
                return self.mlp(h, mlp_rng)
            y, layer_stats = self.mlp(h, token_mask)
            stats.append(layer_stats)
            return y

        if self.config.pre_norm:
            h, cache, weights = attend(self.attention_norm(x))
            x = x + dropout(h, rate, residual1_rng)
            x = x + dropout(feed_forward(self.mlp_norm(x)), rate, residual2_rng)
        else:
            h, cache, weights = attend(x)
            x = self.attention_norm(x + dropout(h, rate, residual1_rng))
            x = self.mlp_norm(x + dropout(feed_forward(x), rate, residual2_rng))
        return x, cache, weights, stats[0] if stats else None


class LayerStack(nnx.Module):
    """`num_layers` blocks whose parameters are stacked on a leading 'layers' axis.

    The stacked layout is the same whether the stack runs as one `lax.scan` (compiles one layer,
    the default) or unrolled in Python (lets XLA fuse across layers), so checkpoints work with both.
    With MoE on every k-th layer (`moe_every` = k > 1), the k - 1 dense blocks of each group of k
    are stacked in `blocks` and the MoE blocks in `moe_blocks`; the scan runs over the groups.
    `block` makes one layer (default `Block`; the encoder-decoder's decoder stacks its
    cross-attention blocks); keyword arguments the call does not name go to every layer.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
                 block: Callable[..., nnx.Module] = Block):
        self.config = config
        self.group = config.moe_every if config.num_experts else 1

        def stack(count: int, moe: bool | None) -> Block:
            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs: nnx.Rngs) -> Block:
                return block(config, rngs=rngs, moe=moe)

            return create(rngs)

        if self.group == 1:
            self.blocks = stack(config.num_layers, None)
        else:
            groups = config.num_layers // self.group
            self.blocks = stack(config.num_layers - groups, False)
            self.moe_blocks = stack(groups, True)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None,
        positions: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        return_weights: bool = False,
        token_mask: jax.Array | None = None,
        **block_kwargs: Any,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None, dict | None]:
        """Returns the output, the stacked updated cache, stacked weights and stacked router
        statistics [layers, ...] (MoE layers only)."""
        cfg = self.config
        k, groups = self.group, cfg.num_layers // self.group
        members = [nnx.split(self.blocks)]  # (graphdef, stacked params) of each kind of block.
        if k > 1:
            members.append(nnx.split(self.moe_blocks))
        # Group g is layers g·k ... g·k + k - 1: the dense ones, then (k > 1) the MoE one.
        by_group = lambda a, n: a.reshape(groups, n, *a.shape[1:])
        dense = jax.tree.map(lambda a: by_group(a, max(k - 1, 1)), members[0][1])
        moe_params = members[1][1] if k > 1 else None

        def group(x: jax.Array, per_group: tuple[Any, ...]) -> tuple[jax.Array, Any]:
            dense_params, moe_group, group_cache, rng = per_group
            caches, weights, stats = [], [], None
            for j in range(k):
                take = lambda tree, j=j: jax.tree.map(lambda a: a[j], tree)
                if k > 1 and j == k - 1:
                    graphdef, params = members[1][0], moe_group
                else:
                    graphdef, params = members[0][0], take(dense_params)
                x, layer_cache, layer_weights, layer_stats = nnx.merge(graphdef, params)(
                    x, mask=mask, positions=positions, cache=take(group_cache),
                    cache_index=cache_index, dropout_rng=take(rng), return_weights=return_weights,
                    token_mask=token_mask, **block_kwargs,
                )
                caches.append(layer_cache)
                weights.append(layer_weights)
                stats = layer_stats if layer_stats is not None else stats
            stack = lambda items: jax.tree.map(lambda *a: jnp.stack(a), *items)
            return x, (stack(caches), stack(weights), stats)

        if cfg.remat_policy != "none":
            group = jax.checkpoint(
                group, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers)
        per_group = (dense, moe_params, jax.tree.map(lambda a: by_group(a, k), cache),
                     None if rngs is None else by_group(rngs, k))
        if cfg.scan_layers:
            x, (cache, weights, stats) = jax.lax.scan(group, x, per_group)
        else:
            outputs = []
            for g in range(groups):
                x, out = group(x, jax.tree.map(lambda a, g=g: a[g], per_group))
                outputs.append(out)
            cache, weights, stats = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
        by_layer = lambda a: a.reshape(cfg.num_layers, *a.shape[2:])
        return x, jax.tree.map(by_layer, cache), jax.tree.map(by_layer, weights), stats

    def layer_blocks(self) -> list[Block]:
        """Each layer's block, in order, as separate modules (copies of the stacked slices)."""
        def unstack(blocks: Block) -> list[Block]:
            graphdef, stacked = nnx.split(blocks)
            count = jax.tree.leaves(stacked)[0].shape[0]
            return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
                    for i in range(count)]

        dense = unstack(self.blocks)
        if self.group == 1:
            return dense
        moe = unstack(self.moe_blocks)
        k = self.group
        return [moe[i // k] if (i + 1) % k == 0 else dense[i - (i + 1) // k]
                for i in range(self.config.num_layers)]

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty cache for every layer: [layers, batch, kv_heads, max_length, head_dim]."""
        one = KVCache.zeros(self.config, batch, max_length)
        stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.config.num_layers, *a.shape)), one)
        return jax.tree.map(lambda a: constrain(a, (None, *KVCache.AXES)), stacked)


class LayerList(nnx.Module):
    """The blocks of a `LayerStack` as separate modules: one buffer per layer and parameter.

    For decoding. Inside a loop over tokens, taking a layer out of a stacked parameter (or out of
    a stacked cache) copies it on CPU hosts, for every token; separate buffers are read in place.
    The call matches `LayerStack`; the cache is a list of per-layer caches.
    """

    def __init__(self, stack: LayerStack):
        self.config = stack.config
        self.blocks = nnx.List(stack.layer_blocks())

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None,
        positions: jax.Array,
        cache: list[KVCache] | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        return_weights: bool = False,
        token_mask: jax.Array | None = None,
        **block_kwargs: Any,
    ) -> tuple[jax.Array, list[KVCache] | None, jax.Array | None, dict | None]:
        rngs = split_rng(dropout_rng, len(self.blocks))
        caches, weights, stats = [], [], []
        for i, block in enumerate(self.blocks):
            x, layer_cache, layer_weights, layer_stats = block(
                x, mask=mask, positions=positions, cache=None if cache is None else cache[i],
                cache_index=cache_index, dropout_rng=rngs[i], return_weights=return_weights,
                token_mask=token_mask, **block_kwargs,
            )
            caches.append(layer_cache)
            weights.append(layer_weights)
            stats.append(layer_stats)
        weights = jnp.stack(weights) if return_weights else None
        stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats[0] is not None else None
        return x, None if cache is None else caches, weights, stats

    def init_cache(self, batch: int, max_length: int) -> list[KVCache]:
        return [KVCache.zeros(self.config, batch, max_length) for _ in self.blocks]
