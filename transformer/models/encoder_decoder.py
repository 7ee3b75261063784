"""Encoder-decoder Transformers (T5 v1.0 / v1.1 / flan-T5, BART) on the shared layer code.

The encoder reads the source bidirectionally; the decoder reads the target causally and attends to
the encoder's final states through cross-attention. Both stacks share the token-embedding table.
Positions are either T5's relative position bias (one table of buckets × heads per stack, shared
by its layers; bidirectional buckets in the encoder, causal ones in the decoder) or BART's learned
absolute positions (one table per stack, looked up at position + `position_offset`).

Packing: segment ids (0 = padding, k > 0 = the k-th example of a row) on both sides; decoder
segment k attends causally to its own earlier tokens and across only to encoder segment k, and
positions restart at 0 per segment (relative buckets and learned positions both read them).

Decoding keeps, per decoder layer, the self-attention keys and values of the targets so far and
the cross-attention keys and values of the encoder's states, computed once per input by
`init_cache`. Cache slot i holds target position i (targets start at slot 0).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from transformer.models import positions as pos
from transformer.models.attention import KVCache, MultiHeadAttention, make_attention_mask
from transformer.models.blocks import Block, LayerList, LayerStack
from transformer.models.common import dropout, dtype_of, param, split_rng
from transformer.models.config import ModelConfig
from transformer.models.layers import MLP, Embeddings, Norm, _lookup
from transformer.models.transformer import ModelOutput, _segments_and_positions
from transformer.sharding import constrain


@struct.dataclass
class EncoderDecoderCache:
    """What one decoder layer keeps while decoding (stacked on a leading 'layers' axis in a
    `LayerStack`, a list of these in a `LayerList`)."""

    self_attention: KVCache  # The targets so far: [batch, kv_heads, max_length, head_dim].
    cross_attention: KVCache  # The encoder's states: [batch, kv_heads, source_len, head_dim].


class CrossAttentionBlock(nnx.Module):
    """Self-attention, cross-attention over the encoder's states, feed-forward; each a residual
    sublayer, pre-LN (T5) or post-LN (BART) as the config says."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, moe: bool | None = None):
        if moe:
            raise ValueError("encoder-decoder blocks have no mixture-of-experts variant")
        self.config = config
        self.attention_norm = Norm(config, rngs=rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.cross_attention_norm = Norm(config, rngs=rngs)
        self.cross_attention = MultiHeadAttention(config, rngs=rngs)
        self.mlp_norm = Norm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None,
        positions: jax.Array,
        cache: EncoderDecoderCache | None = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        return_weights: bool = False,
        token_mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        memory: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, EncoderDecoderCache | None, jax.Array | None, None]:
        """As `Block`, plus `memory` [batch, source_len, hidden] (the encoder's states; read
        only without a cache, whose cross-attention keys and values stand in for it) and
        `cross_mask` [batch, 1, target_len, source_len]. Weights are the self-attention's."""
        rate = self.config.dropout_rate
        attn_rng, residual1_rng, cross_rng, residual2_rng, residual3_rng = split_rng(dropout_rng, 5)
        if cache is None:
            self_cache, cross_kv = None, self.cross_attention.project_memory(memory)
        else:
            self_cache, cross_kv = cache.self_attention, cache.cross_attention

        def attend(h: jax.Array) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
            return self.attention(h, mask=mask, positions=positions, cache=self_cache,
                                  cache_index=cache_index, dropout_rng=attn_rng,
                                  return_weights=return_weights, bias=bias)

        def attend_source(h: jax.Array) -> jax.Array:
            return self.cross_attention(h, mask=cross_mask, positions=positions, memory=cross_kv,
                                        dropout_rng=cross_rng)[0]

        if self.config.pre_norm:
            h, self_cache, weights = attend(self.attention_norm(x))
            x = x + dropout(h, rate, residual1_rng)
            x = x + dropout(attend_source(self.cross_attention_norm(x)), rate, residual2_rng)
            x = x + dropout(self.mlp(self.mlp_norm(x)), rate, residual3_rng)
        else:
            h, self_cache, weights = attend(x)
            x = self.attention_norm(x + dropout(h, rate, residual1_rng))
            x = self.cross_attention_norm(x + dropout(attend_source(x), rate, residual2_rng))
            x = self.mlp_norm(x + dropout(self.mlp(x), rate, residual3_rng))
        new_cache = None if cache is None else EncoderDecoderCache(self_cache, cross_kv)
        return x, new_cache, weights, None


class Stack(nnx.Module):
    """One side of an encoder-decoder: its positions, blocks and norms (tokens come embedded)."""

    def __init__(self, config: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
        self.config, self.causal = config, causal
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        if config.position == "relative":
            shape = (config.relative_buckets, config.num_heads)
            self.relative_bias = param(rngs, shape, (None, "heads"), std=std, dtype=pd)
        else:
            shape = (config.max_length + config.position_offset, d)
            self.positions = param(rngs, shape, (None, "embed"), std=std, dtype=pd)
        if config.embedding_norm:
            self.embedding_norm = Norm(config, rngs=rngs)
        self.layers = LayerStack(config, rngs=rngs, block=CrossAttentionBlock if causal else Block)
        if config.final_norm:
            self.final_norm = Norm(config, rngs=rngs)

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """T5's relative position bias [batch, heads, queries, keys] (float32)."""
        cfg = self.config
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = pos.relative_position_bucket(
            relative, bidirectional=not self.causal, num_buckets=cfg.relative_buckets,
            max_distance=cfg.relative_max_distance)
        bias = jnp.take(self.relative_bias[...].astype(jnp.float32), buckets, axis=0)
        return constrain(bias.transpose(0, 3, 1, 2), ("batch", "act_heads", None, None))

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        mask: jax.Array,
        key_positions: jax.Array,
        cache: Any = None,
        cache_index: jax.Array | int = 0,
        dropout_rng: jax.Array | None = None,
        **block_kwargs: Any,
    ) -> tuple[jax.Array, Any]:
        """Token embeddings x [batch, length, hidden] → final states and the updated cache.
        `key_positions` [batch, keys] are the positions of what the queries attend to (the
        tokens themselves, or the cache slots)."""
        cfg = self.config
        embed_rng, stack_rng, out_rng = split_rng(dropout_rng, 3)
        bias = None
        if cfg.position == "learned":
            table = self.positions[...].astype(dtype_of(cfg.dtype))
            x = x + _lookup(table, positions + cfg.position_offset)
        else:
            bias = self.position_bias(positions, key_positions)
        if cfg.embedding_norm:
            x = self.embedding_norm(x)
        x = dropout(x, cfg.dropout_rate, embed_rng)
        x, cache, _, _ = self.layers(x, mask=mask, positions=positions, cache=cache,
                                     cache_index=cache_index, dropout_rng=stack_rng, bias=bias,
                                     **block_kwargs)
        if cfg.final_norm:
            x = dropout(self.final_norm(x), cfg.dropout_rate, out_rng)
        return x, cache


def t5_init_std(name: str, config: ModelConfig) -> float:
    """T5's initial std of a weight named `name` (transformers' T5PreTrainedModel._init_weights):
    each projection by its fan-in, the query by d_model·d_kv so that the unscaled logits start
    at unit variance, the embeddings (tied output included) at 1 — the d_model^-1/2 output scale
    of T5 v1.0 brings their logits back to unit size. Norm scales are constants, not stds."""
    d, heads, kv = config.hidden_size, config.num_heads, config.dim_per_head
    fan_in = {"tokens": 1.0, "lm_head": 1.0, "relative_bias": d, "query": d * kv, "key": d,
              "value": d, "out": heads * kv, "wi": d, "wi_gate": d, "wo": config.mlp_dim}
    if name not in fan_in:
        raise ValueError(f"initializer='t5' has no rule for the weight {name!r}: it covers T5 "
                         "models (relative positions, no biases); use initializer='normal'")
    return config.initializer_factor * fan_in[name] ** -0.5


def t5_initialize(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Redraws every parameter of `model` as T5 does (`t5_init_std`), norm scales set to
    `initializer_factor`. In place, after construction, so that the shared layers keep one
    initializer; inside a jitted init the first draws are dead code."""
    config = model.config
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        name, shape, dtype = str(path[-1]), variable.shape, variable[...].dtype
        if name == "scale":
            variable[...] = jnp.full(shape, config.initializer_factor, dtype)
        else:
            std = t5_init_std(name, config)
            variable[...] = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)


class EncoderDecoder(nnx.Module):
    """T5 / BART: an encoder and a decoder stack sharing the token embeddings, and the LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if config.architecture != "encoder_decoder":
            raise ValueError(f"EncoderDecoder needs architecture='encoder_decoder', got "
                             f"{config.architecture!r}")
        self.config = config
        d, std, pd = config.hidden_size, config.initializer_range, config.param_dtype
        self.embeddings = Embeddings(config, rngs=rngs, learned_positions=False)
        self.encoder = Stack(config, causal=False, rngs=rngs)
        self.decoder = Stack(config.replace(num_layers=config.decoder_layers), causal=True,
                             rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = param(rngs, (d, config.vocab_size), ("embed", "vocab"), std=std, dtype=pd)
        if config.final_logits_bias:
            self.logits_bias = param(rngs, (1, config.vocab_size), (None, "vocab"), dtype=pd)
        if config.initializer == "t5":
            t5_initialize(self, rngs)

    def embed(self, ids: jax.Array) -> jax.Array:
        x = self.embeddings(ids, jnp.zeros_like(ids))  # Positions are added per stack.
        if self.config.embedding_scale:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        return x

    def encode(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The encoder's final states [batch, source_len, hidden]."""
        segments, positions = _segments_and_positions(input_ids, attention_mask, segment_ids,
                                                      positions)
        mask = make_attention_mask(segments, segments, causal=False)
        x, _ = self.encoder(self.embed(input_ids), positions=positions, mask=mask,
                            key_positions=positions, dropout_rng=dropout_rng)
        return x

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoded: jax.Array | None,
        encoder_segment_ids: jax.Array,
        *,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        cache: Any = None,
        cache_index: jax.Array | int = 0,
        cache_segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Decoder states and logits for `decoder_input_ids` [batch, T] given the encoder's
        states. With a `cache` (from `init_cache`, which holds the cross-attention keys and
        values, so `encoded` may be None), the tokens are written at slot `cache_index`
        and attend to the slots whose `cache_segment_ids` [batch, max_length] match theirs."""
        segments = (jnp.ones_like(decoder_input_ids) if decoder_segment_ids is None
                    else decoder_segment_ids).astype(jnp.int32)
        if decoder_positions is None:
            decoder_positions = cache_index + jnp.arange(decoder_input_ids.shape[1])
            decoder_positions = jnp.broadcast_to(decoder_positions, decoder_input_ids.shape)
        positions = decoder_positions.astype(jnp.int32)
        if cache is None:
            if encoded is None:
                raise ValueError("decoding without a cache needs the encoder's states")
            mask = make_attention_mask(segments, segments, causal=True)
            key_positions = positions
        else:
            if cache_segment_ids is None:
                raise ValueError("decoding with a cache needs cache_segment_ids [batch, max_length]")
            mask = make_attention_mask(segments, cache_segment_ids, causal=True,
                                       query_offset=cache_index)
            key_positions = jnp.broadcast_to(jnp.arange(cache_segment_ids.shape[1]),
                                             cache_segment_ids.shape)
        cross_mask = make_attention_mask(segments, encoder_segment_ids.astype(jnp.int32),
                                         causal=False)
        x, cache = self.decoder(
            self.embed(decoder_input_ids), positions=positions, mask=mask,
            key_positions=key_positions, cache=cache, cache_index=cache_index,
            dropout_rng=dropout_rng, memory=encoded, cross_mask=cross_mask)
        logits = self.lm_logits(x) if compute_logits else None
        return ModelOutput(x, logits=logits, cache=cache)

    def __call__(
        self,
        input_ids: jax.Array,
        decoder_input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> ModelOutput:
        """Teacher forcing: logits [batch, target_len, vocab] (float32) of every target token.
        Padding comes as segment ids or 0/1 attention masks on either side."""
        encoder_rng, decoder_rng = split_rng(dropout_rng, 2)
        source_segments, _ = _segments_and_positions(input_ids, attention_mask, segment_ids,
                                                     positions)
        encoded = self.encode(input_ids, segment_ids=source_segments, positions=positions,
                              dropout_rng=encoder_rng)
        if decoder_segment_ids is None:
            decoder_segment_ids = decoder_attention_mask
        return self.decode(decoder_input_ids, encoded, source_segments,
                           decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions, dropout_rng=decoder_rng)

    def lm_logits(self, x: jax.Array) -> jax.Array:
        """Next-token logits (float32) from the decoder's final states."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        x = x.astype(dtype)
        if cfg.scale_decoder_output:
            x = x * jnp.asarray(cfg.hidden_size ** -0.5, dtype)
        if cfg.tie_embeddings:
            logits = self.embeddings.attend(x)
        else:
            logits = constrain(x @ self.lm_head[...].astype(dtype), ("batch", "length", "act_vocab"))
        if cfg.final_logits_bias:
            logits = logits + self.logits_bias[...][0].astype(dtype)
        return logits.astype(jnp.float32)

    def init_cache(
        self, batch: int, max_length: int, encoded: jax.Array, encoder_segment_ids: jax.Array
    ) -> Any:
        """The decoding cache: empty self-attention slots for `max_length` target tokens and
        each layer's cross-attention keys and values of `encoded` [batch, source_len, hidden],
        in the layout of the decoder's layers (stacked, or a list for a `LayerList`)."""
        if encoded.shape[0] != batch or encoder_segment_ids.shape != encoded.shape[:2]:
            raise ValueError(f"init_cache: encoded {encoded.shape} and encoder_segment_ids "
                             f"{encoder_segment_ids.shape} must both be [batch={batch}, "
                             "source_len, ...]")
        layers, config = self.decoder.layers, self.decoder.config
        if isinstance(layers, LayerList):
            return [EncoderDecoderCache(KVCache.zeros(config, batch, max_length),
                                        block.cross_attention.project_memory(encoded))
                    for block in layers.blocks]
        graphdef, stacked = nnx.split(layers.blocks)
        cross = jax.vmap(
            lambda p: nnx.merge(graphdef, p).cross_attention.project_memory(encoded))(stacked)
        cross = jax.tree.map(lambda a: constrain(a, (None, *KVCache.AXES)), cross)
        return EncoderDecoderCache(layers.init_cache(batch, max_length), cross)
