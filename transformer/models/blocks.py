"""Transformer blocks (pre-LN or post-LN) and the layer stack, scanned or unrolled, with remat."""

from __future__ import annotations

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

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.attention_norm = Norm(config, rngs=rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.mlp_norm = Norm(config, rngs=rngs)
        self.mlp = MoEMLP(config, rngs=rngs) if config.num_experts else MLP(config, rngs=rngs)

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
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None, dict | None]:
        """Returns the output, the updated cache, attention weights and (MoE) router statistics
        over the tokens where `token_mask` [batch, length] is 1."""
        rate = self.config.dropout_rate
        attn_rng, residual1_rng, residual2_rng = split_rng(dropout_rng, 3)
        mlp_rng = residual2_rng  # Only LoRA's input dropout reads it, through keys folded from it.
        attend = lambda h: self.attention(
            h, mask=mask, positions=positions, cache=cache, cache_index=cache_index,
            dropout_rng=attn_rng, return_weights=return_weights,
        )
        stats = []

        def feed_forward(h: jax.Array) -> jax.Array:
            if not self.config.num_experts:
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
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = create(rngs)

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
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None, dict | None]:
        """Returns the output, the stacked updated cache, stacked weights and stacked router
        statistics [layers, ...]."""
        cfg = self.config
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x: jax.Array, per_layer: tuple[Any, Any, Any]) -> tuple[jax.Array, Any]:
            params, layer_cache, rng = per_layer
            block = nnx.merge(graphdef, params)
            x, layer_cache, weights, stats = block(
                x, mask=mask, positions=positions, cache=layer_cache, cache_index=cache_index,
                dropout_rng=rng, return_weights=return_weights, token_mask=token_mask,
            )
            return x, (layer_cache, weights, stats)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(
                layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers)
        per_layer = (stacked, cache, rngs)
        if cfg.scan_layers:
            x, (cache, weights, stats) = jax.lax.scan(layer, x, per_layer)
        else:
            outputs = []
            for i in range(cfg.num_layers):
                x, out = layer(x, jax.tree.map(lambda a, i=i: a[i], per_layer))
                outputs.append(out)
            cache, weights, stats = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
        return x, cache, weights, stats

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
        graphdef, stacked = nnx.split(stack.blocks)
        self.blocks = nnx.List([
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
            for i in range(stack.config.num_layers)
        ])

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
    ) -> tuple[jax.Array, list[KVCache] | None, jax.Array | None, dict | None]:
        rngs = split_rng(dropout_rng, len(self.blocks))
        caches, weights, stats = [], [], []
        for i, block in enumerate(self.blocks):
            x, layer_cache, layer_weights, layer_stats = block(
                x, mask=mask, positions=positions, cache=None if cache is None else cache[i],
                cache_index=cache_index, dropout_rng=rngs[i], return_weights=return_weights,
                token_mask=token_mask,
            )
            caches.append(layer_cache)
            weights.append(layer_weights)
            stats.append(layer_stats)
        weights = jnp.stack(weights) if return_weights else None
        stats = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats[0] is not None else None
        return x, None if cache is None else caches, weights, stats

    def init_cache(self, batch: int, max_length: int) -> list[KVCache]:
        return [KVCache.zeros(self.config, batch, max_length) for _ in self.blocks]
