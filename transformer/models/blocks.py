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
        self.mlp = MLP(config, rngs=rngs)

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
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        rate = self.config.dropout_rate
        attn_rng, residual1_rng, residual2_rng = split_rng(dropout_rng, 3)
        mlp_rng = residual2_rng  # Only LoRA's input dropout reads it, through keys folded from it.
        attend = lambda h: self.attention(
            h, mask=mask, positions=positions, cache=cache, cache_index=cache_index,
            dropout_rng=attn_rng, return_weights=return_weights,
        )
        if self.config.pre_norm:
            h, cache, weights = attend(self.attention_norm(x))
            x = x + dropout(h, rate, residual1_rng)
            x = x + dropout(self.mlp(self.mlp_norm(x), mlp_rng), rate, residual2_rng)
        else:
            h, cache, weights = attend(x)
            x = self.attention_norm(x + dropout(h, rate, residual1_rng))
            x = self.mlp_norm(x + dropout(self.mlp(x, mlp_rng), rate, residual2_rng))
        return x, cache, weights


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
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        """Returns the output, the stacked updated cache and stacked weights [layers, ...]."""
        cfg = self.config
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x: jax.Array, per_layer: tuple[Any, Any, Any]) -> tuple[jax.Array, Any]:
            params, layer_cache, rng = per_layer
            block = nnx.merge(graphdef, params)
            x, layer_cache, weights = block(
                x, mask=mask, positions=positions, cache=layer_cache, cache_index=cache_index,
                dropout_rng=rng, return_weights=return_weights,
            )
            return x, (layer_cache, weights)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(
                layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers)
        per_layer = (stacked, cache, rngs)
        if cfg.scan_layers:
            x, (cache, weights) = jax.lax.scan(layer, x, per_layer)
        else:
            outputs = []
            for i in range(cfg.num_layers):
                x, out = layer(x, jax.tree.map(lambda a, i=i: a[i], per_layer))
                outputs.append(out)
            cache, weights = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
        return x, cache, weights

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
    ) -> tuple[jax.Array, list[KVCache] | None, jax.Array | None]:
        rngs = split_rng(dropout_rng, len(self.blocks))
        caches, weights = [], []
        for i, block in enumerate(self.blocks):
            x, layer_cache, layer_weights = block(
                x, mask=mask, positions=positions, cache=None if cache is None else cache[i],
                cache_index=cache_index, dropout_rng=rngs[i], return_weights=return_weights,
            )
            caches.append(layer_cache)
            weights.append(layer_weights)
        weights = jnp.stack(weights) if return_weights else None
        return x, None if cache is None else caches, weights

    def init_cache(self, batch: int, max_length: int) -> list[KVCache]:
        return [KVCache.zeros(self.config, batch, max_length) for _ in self.blocks]
