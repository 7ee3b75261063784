"""Generation with encoder-decoders (T5, BART): encode once, then the cached decoder loop.

Inputs of different lengths are right-padded; their padding has segment id 0, which masks it in
the encoder and in cross-attention. Every target starts from `config.decoder_start_token_id` in
cache slot 0; new token n goes to slot n at position n, the same for every row, so ragged batches
need no target padding. The encoder runs once per input and `EncoderDecoder.init_cache` computes
each decoder layer's cross-attention keys and values once.

Greedy decoding and sampling run `decode.sample_loop`, and beam search `beam.beam_search`, over
`TargetDecoder`, a view of the model that calls like a decoder-only `Decoder`. For beam search the
encoder and the start token run once per input, then their cache is repeated over the beams; only
the self-attention keys and values of the new tokens are reordered, never the cross-attention
ones (every beam of an input shares them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from transformer.inference.beam import (
    BeamConfig,
    BeamGeneration,
    ReorderFn,
    StepFn,
    reorder_new_slots,
    run_beam_search,
)
from transformer.inference.decode import (
    DecodeState,
    Generation,
    decoding_model,
    run_on_mesh,
    sample_loop,
    token_forward,
)
from transformer.inference.sampling import SamplingConfig
from transformer.models import EncoderDecoder, ModelOutput
from transformer.sharding import Rules


def right_pad(inputs: Sequence[Sequence[int]], pad_id: int = 0,
              width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), both [batch, width] (default: the longest input), the inputs
    flush left. A fixed `width` keeps one compiled program for batches of any lengths."""
    if not inputs or any(len(x) == 0 for x in inputs):
        raise ValueError("every input needs at least one token (e.g. the tokenizer's EOS)")
    longest = max(len(x) for x in inputs)
    if width is not None and width < longest:
        raise ValueError(f"an input of {longest} tokens does not fit width={width}")
    width = longest if width is None else width
    ids = np.full((len(inputs), width), pad_id, np.int32)
    mask = np.zeros((len(inputs), width), np.int32)
    for row, x in enumerate(inputs):
        ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
    return ids, mask


class TargetDecoder:
    """An encoder-decoder's decoder, given the inputs' segment ids, called like a `Decoder`
    with a cache (whose cross-attention keys and values stand for the encoded inputs)."""

    def __init__(self, model: EncoderDecoder, encoder_segment_ids: jax.Array):
        self.model, self.encoder_segment_ids = model, encoder_segment_ids

    def __call__(self, ids: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
                 cache: Any, cache_index: jax.Array | int, cache_segment_ids: jax.Array,
                 compute_logits: bool = True) -> ModelOutput:
        return self.model.decode(
            ids, None, self.encoder_segment_ids, decoder_segment_ids=segment_ids,
            decoder_positions=positions, cache=cache, cache_index=cache_index,
            cache_segment_ids=cache_segment_ids, compute_logits=compute_logits)


def start(model: EncoderDecoder, ids: jax.Array, mask: jax.Array,
          cache_length: int) -> tuple[jax.Array, Any, jax.Array]:
    """Encodes the inputs and runs the start token into a fresh cache of `cache_length` slots.
    Returns the first new token's logits [batch, vocab], the cache and the slots' segment ids."""
    batch = ids.shape[0]
    encoded = model.encode(ids, segment_ids=mask)
    cache = model.init_cache(batch, cache_length, encoded, mask)
    slots = jnp.zeros((batch, cache_length), jnp.int32).at[:, 0].set(1)
    first = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
    out = TargetDecoder(model, mask)(first, segment_ids=jnp.ones_like(first),
                                     positions=jnp.zeros_like(first), cache=cache, cache_index=0,
                                     cache_segment_ids=slots)
    return out.logits[:, 0], out.cache, slots


def check_inputs(model: Any, source_len: int, max_new_tokens: int) -> None:
    """Raises unless the model is an encoder-decoder whose positions reach the lengths."""
    cfg = model.config
    if cfg.architecture != "encoder_decoder":
        raise ValueError(f"seq2seq generation needs an encoder-decoder model, got "
                         f"architecture={cfg.architecture!r} (use transformer.inference.generate)")
    if cfg.position == "learned":  # No position embedding beyond the tables.
        for what, length in (("input", source_len), ("target (1 + max_new_tokens)",
                                                     1 + max_new_tokens)):
            if length > cfg.max_length:
                raise ValueError(f"the {what} is {length} tokens, beyond the model's max_length "
                                 f"{cfg.max_length}; shorten it")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef: Any, params: Any, ids: jax.Array, mask: jax.Array, rng: jax.Array,
              config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    batch = ids.shape[0]
    logits, cache, slots = start(model, ids, mask, 1 + config.max_new_tokens)
    tokens = jnp.full((batch, config.max_new_tokens), config.pad_id, jnp.int32)
    state = DecodeState(jnp.int32(0), logits, cache, slots, tokens, jnp.zeros((batch,), bool), rng)
    lengths = jnp.ones((batch,), jnp.int32)  # The start token.
    return sample_loop(TargetDecoder(model, mask), state, lengths, 1, config)


def seq2seq_generate(
    model: EncoderDecoder,
    inputs: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    rng: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> Generation:
    """The targets of a batch of inputs (token-id lists of any lengths): greedy (as
    transformers' `generate(do_sample=False, num_beams=1)`) or sampled, per `config`. The
    tokens are the new ones, without the start token."""
    config = config or SamplingConfig()
    ids, mask = right_pad(inputs, config.pad_id)
    check_inputs(model, ids.shape[1], config.max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, params = nnx.split(decoding_model(model))
    run = lambda ids, mask: _generate(graphdef, params, ids, mask, rng, config)
    tokens, lengths = run_on_mesh(run, [ids, mask], mesh, rules)
    return Generation(np.asarray(tokens), np.asarray(lengths))


def encoder_decoder_step(model: EncoderDecoder, ids: jax.Array, mask: jax.Array,
                         config: BeamConfig) -> tuple[jax.Array, Any, StepFn, ReorderFn]:
    """The first logits, cache, step and reorder functions of an encoder-decoder for
    `beam.beam_search` (rows input-major: beam b of input i is row i * num_beams + b)."""
    beams = config.num_beams
    logits, cache, slots = start(model, ids, mask, 1 + config.max_new_tokens)
    repeat = lambda x: jnp.repeat(x, beams, axis=0)
    logits, cache, slots, mask = jax.tree.map(repeat, (logits, cache, slots, mask))
    decoder = TargetDecoder(model, mask)
    lengths = jnp.ones((ids.shape[0] * beams,), jnp.int32)  # The start token.

    def step_fn(carry, tokens, step):
        kv, slots = carry
        logits, kv, slots = token_forward(decoder, tokens, kv, slots, 1 + step, lengths + step)
        return logits, (kv, slots)

    def reorder(carry, parents):
        layers, slots = carry  # A list of per-layer caches (`decoding_model`'s layout).
        moved = [c.replace(self_attention=reorder_new_slots(c.self_attention, parents, 1))
                 for c in layers]
        return moved, slots

    return logits, (cache, slots), step_fn, reorder


def seq2seq_beam_generate(
    model: EncoderDecoder,
    inputs: Sequence[Sequence[int]],
    config: BeamConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    width: int | None = None,
) -> BeamGeneration:
    """The best hypotheses of beam search for a batch of inputs (token-id lists of any lengths,
    right-padded to `width`, default the longest), equal to transformers' `generate(num_beams=...)`
    on the same right-padded inputs with their attention mask. Tokens are the new ones, without
    the start token."""
    config = config or BeamConfig()
    ids, mask = right_pad(inputs, config.pad_id, width)
    check_inputs(model, ids.shape[1], config.max_new_tokens)
    return run_beam_search(model, ids, mask, config, mesh, rules, encoder_decoder_step)
