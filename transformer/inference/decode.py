"""Autoregressive generation with a KV cache: one prefill, then one token per step.

Prompts of different lengths are left-padded to a common length P, so every sequence's next token
goes to the same cache slot (P + step). Pad slots carry segment id 0 in `cache_segment_ids`, which
masks them out, and positions count from each prompt's first real token, so a padded prompt gives
the same tokens as the prompt alone. `generate` runs the whole loop as one jitted
`lax.while_loop`; `stream` runs a jitted step per token for printing text as it comes.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from transformer.inference.sampling import SamplingConfig, sample
from transformer.models import Decoder, KVCache
from transformer.models.blocks import LayerList, LayerStack
from transformer.sharding import DEFAULT_RULES, Rules, logical_to_spec, use_mesh


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # [batch, max_new_tokens]; pad_id after a stop token.
    lengths: np.ndarray  # [batch]: tokens generated, the stop token included.

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@struct.dataclass
class DecodeState:
    step: jax.Array  # Tokens generated so far (the same for every sequence).
    logits: jax.Array  # [batch, vocab]: the distribution of the next token.
    cache: KVCache
    slots: jax.Array  # [batch, cache_length] segment ids of the cache slots (0 = empty or pad).
    tokens: jax.Array  # [batch, max_new_tokens]
    done: jax.Array  # [batch] bool: the sequence has emitted a stop token.
    rng: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), both [batch, longest prompt], the prompts flush right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's BOS)")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def prompt_forward(
    model: Decoder, ids: jax.Array, mask: jax.Array, cache_length: int
) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """Runs left-padded prompts into a fresh cache of `cache_length` slots.

    Returns the next-token logits [batch, vocab], the cache, the slots' segment ids [batch,
    cache_length] (1 = a real prompt token) and the prompt lengths [batch]. Shared by every
    decoding strategy (sampling here, beam search in `beam.py`).
    """
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, cache_length)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    slots = jnp.zeros((batch, cache_length), jnp.int32).at[:, :prompt_len].set(mask)
    out = model(ids, segment_ids=mask, positions=positions, cache=cache, cache_index=0,
                cache_segment_ids=slots, compute_logits=False)
    logits = model.lm_logits(out.last_hidden_state[:, -1:])[:, 0]  # Left padding: last is real.
    return logits, out.cache, slots, jnp.sum(mask, axis=1)


def token_forward(
    model: Decoder, token: jax.Array, cache: Any, slots: jax.Array, slot: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, Any, jax.Array]:
    """Runs one new token per row [batch] into cache slot `slot` (the same for every row, left
    padding makes it so) at `positions` [batch]; returns the next logits, the cache and the slots."""
    batch = token.shape[0]
    slots = jax.lax.dynamic_update_slice(slots, jnp.ones((batch, 1), jnp.int32), (0, slot))
    out = model(token[:, None], segment_ids=jnp.ones((batch, 1), jnp.int32),
                positions=positions[:, None], cache=cache, cache_index=slot,
                cache_segment_ids=slots)
    return out.logits[:, 0], out.cache, slots


def prefill(
    model: Decoder, ids: jax.Array, mask: jax.Array, rng: jax.Array, config: SamplingConfig
) -> tuple[DecodeState, jax.Array]:
    """Runs the prompts through the model, filling the cache; returns the state and the lengths."""
    batch, prompt_len = ids.shape
    logits, cache, slots, lengths = prompt_forward(model, ids, mask,
                                                   prompt_len + config.max_new_tokens)
    tokens = jnp.full((batch, config.max_new_tokens), config.pad_id, jnp.int32)
    state = DecodeState(jnp.int32(0), logits, cache, slots, tokens, jnp.zeros((batch,), bool), rng)
    return state, lengths


def decode_step(
    model: Decoder, state: DecodeState, lengths: jax.Array, prompt_len: int, config: SamplingConfig
) -> DecodeState:
    """Chooses each sequence's next token and runs it through the model into the cache."""
    rng, key = jax.random.split(state.rng)
    token = sample(state.logits, key, config)
    token = jnp.where(state.done, config.pad_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    done = state.done | jnp.isin(token, jnp.asarray(config.stop_tokens, jnp.int32))
    logits, cache, slots = token_forward(model, token, state.cache, state.slots,
                                         prompt_len + state.step, lengths + state.step)
    return DecodeState(state.step + 1, logits, cache, slots, tokens, done, rng)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef: Any, params: Any, ids: jax.Array, mask: jax.Array, rng: jax.Array,
              config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    state, lengths = prefill(model, ids, mask, rng, config)
    return sample_loop(model, state, lengths, ids.shape[1], config)


def sample_loop(model: Any, state: DecodeState, lengths: jax.Array, prompt_len: int,
                config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Decodes until every sequence stopped or `max_new_tokens`; returns the tokens [batch,
    max_new_tokens] and each sequence's length (its stop token included). `model` is called as a
    `Decoder` with a cache (an encoder-decoder through `seq2seq.TargetDecoder`)."""
    step = lambda s: decode_step(model, s, lengths, prompt_len, config)
    keep_going = lambda s: (s.step < config.max_new_tokens) & ~jnp.all(s.done)
    state = jax.lax.while_loop(keep_going, step, state)
    stopped = jnp.isin(state.tokens, jnp.asarray(config.stop_tokens, jnp.int32))
    first_stop = jnp.where(stopped.any(1), jnp.argmax(stopped, axis=1) + 1, config.max_new_tokens)
    return state.tokens, first_stop


_DECODING_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoding_model(model: Decoder) -> Decoder:
    """The model with its layers as a `LayerList`, sharing every other parameter.

    Made once per model and kept while its stacked layer parameters are the same arrays (an
    update of the model's weights replaces them, which makes a fresh one).
    """
    owner = getattr(model, "decoder", model)  # An encoder-decoder decodes with its decoder.
    if not isinstance(owner.layers, LayerStack):
        return model
    stacked = jax.tree.leaves(nnx.state(owner.layers))
    kept = _DECODING_MODELS.get(model)
    if kept is not None and len(kept[0]) == len(stacked) and all(
            a is b for a, b in zip(kept[0], stacked)):
        return kept[1]
    graphdef, state = nnx.split(model)
    unstacked = nnx.merge(graphdef, state)  # A second module over the same arrays.
    getattr(unstacked, "decoder", unstacked).layers = LayerList(owner.layers)
    _DECODING_MODELS[model] = (stacked, unstacked)
    return unstacked


def check_fits(model: Decoder, prompt_len: int, config: Any) -> None:
    """Raises unless the model is a decoder whose positions reach prompt + `config.max_new_tokens`."""
    if model.config.architecture == "encoder_decoder":
        raise ValueError("this is an encoder-decoder: generate from inputs with "
                         "transformer.inference.seq2seq_generate / seq2seq_beam_generate")
    if not model.config.causal:
        raise ValueError("generation needs a decoder (causal) model; this one is an encoder")
    too_long = prompt_len + config.max_new_tokens > model.config.max_length
    if model.config.position == "learned" and too_long:  # No position embedding beyond the table.
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
            f"model's max_length {model.config.max_length}; shorten one of them"
        )


def place_batch(arrays: Sequence[np.ndarray], mesh: Mesh | None, rules: Rules) -> list[jax.Array]:
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    spec = lambda a: logical_to_spec(("batch",) + (None,) * (a.ndim - 1), rules, a.shape, mesh)
    return [jax.device_put(a, NamedSharding(mesh, spec(a))) for a in arrays]


def run_on_mesh(fn: Any, arrays: Sequence[np.ndarray], mesh: Mesh | None,
                rules: Rules | None) -> Any:
    """`fn(*arrays)`, the arrays split over the mesh by the 'batch' rule (unplaced without one)."""
    if mesh is None:
        return fn(*place_batch(arrays, None, ()))
    rules = rules or DEFAULT_RULES
    with use_mesh(mesh, rules):
        return fn(*place_batch(arrays, mesh, rules))


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    rng: jax.Array | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> Generation:
    """New tokens for a batch of prompts (token-id lists of any lengths).

    With a mesh, the model's parameters should already be sharded over it (e.g. from
    `from_pretrained(..., mesh=mesh)`); the batch is split by the 'batch' rule.
    """
    config = config or SamplingConfig()
    ids, mask = left_pad(prompts, config.pad_id)
    check_fits(model, ids.shape[1], config)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, params = nnx.split(decoding_model(model))
    run = lambda ids, mask: _generate(graphdef, params, ids, mask, rng, config)
    tokens, lengths = run_on_mesh(run, [ids, mask], mesh, rules)
    return Generation(np.asarray(tokens), np.asarray(lengths))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_jit(graphdef, params, ids, mask, rng, config):
    return prefill(nnx.merge(graphdef, params), ids, mask, rng, config)


@functools.lru_cache(maxsize=16)
def _stepper(graphdef: Any, prompt_len: int, config: SamplingConfig):
    """The jitted one-token step for this model structure (hashed once per `stream`, not per
    token: hashing a graphdef costs milliseconds)."""
    def step(params, state, lengths):
        return decode_step(nnx.merge(graphdef, params), state, lengths, prompt_len, config)
    return jax.jit(step, donate_argnums=(1,))


def stream(
    model: Decoder, prompt: Sequence[int], config: SamplingConfig | None = None,
    *, rng: jax.Array | None = None,
) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are chosen (stops after a stop token)."""
    config = config or SamplingConfig()
    ids, mask = left_pad([prompt], config.pad_id)
    check_fits(model, ids.shape[1], config)
    graphdef, params = nnx.split(decoding_model(model))
    rng = jax.random.key(0) if rng is None else rng
    state, lengths = _prefill_jit(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), rng, config)
    step_fn = _stepper(graphdef, ids.shape[1], config)
    for step in range(config.max_new_tokens):
        state = step_fn(params, state, lengths)
        token = int(state.tokens[0, step])
        yield token
        if token in config.stop_tokens:
            return
