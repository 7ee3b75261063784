"""Beam search with Hugging Face `generate`'s semantics, as one jitted `lax.while_loop`.

Each input keeps `num_beams` running hypotheses and a fixed-size buffer of the `num_beams` best
finished ones. A step scores every (beam, token) continuation by its summed log-probability, keeps
the best `candidates` of them (enough that `num_beams` do not end even when every beam's best token
is a stop token), continues the best `num_beams` that did not stop, and offers those that stopped
among the first `num_beams` candidates to the buffer, scored `sum logprob / new_tokens **
length_penalty` (the stop token counted, the prompt not). `early_stopping` decides when an input
is done, as in transformers: True = once its buffer is full; False = once the best running beam,
at its current length, cannot beat the worst finished one; "never" = as False, but with a positive
length penalty the running beam is credited with `max_new_tokens`.

The loop knows no model: `beam_search` takes the first logits, a cache (any pytree), a step
function (cache, tokens, step) -> (logits, cache) and a reorder function (cache, parents) ->
cache. Rows are input-major ([batch * num_beams], beam b of input i at row i * num_beams + b), so
a reorder gathers within each input's rows (`gather_beams`): sharded over the batch, that stays
on each device. Decoder-only models plug in through `decoder_step` (prompts run once per input,
their cache then repeated over the beams); an encoder-decoder passes its cross-attention keys and
values through the reorder untouched, since every beam of an input shares them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from transformer.inference.decode import (
    check_fits,
    decoding_model,
    left_pad,
    prompt_forward,
    run_on_mesh,
    token_forward,
)
from transformer.models import Decoder
from transformer.sharding import Rules, constrain

NO_TOKEN = np.iinfo(np.int32).max  # A stop-token slot that matches no token.
DROPPED = -1.0e9  # Transformers' penalty for a candidate that may not be kept (finite, no NaN).
EARLY_STOPPING = (True, False, "never")

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Beam search settings, named and meant as in transformers' `GenerationConfig`; hashable,
    so it is a static argument of the jitted loop."""

    num_beams: int = 4
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # Stop tokens are forbidden before this many new tokens.
    length_penalty: float = 1.0  # Finished score = sum logprob / new_tokens ** length_penalty.
    early_stopping: bool | str = False  # True, False or "never" (see the module docstring).
    num_return_sequences: int = 1  # The best this many finished hypotheses of each input.
    stop_tokens: tuple[int, ...] = ()  # A hypothesis ends after emitting any of these (EOS).
    pad_id: int = 0  # Written after a hypothesis' end.

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if not any(self.early_stopping is v for v in EARLY_STOPPING):
            raise ValueError(f"early_stopping must be True, False or 'never', got "
                             f"{self.early_stopping!r}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got "
                             f"{self.num_return_sequences}; raise num_beams or return fewer")

    @property
    def candidates(self) -> int:
        """Continuations kept per step: at least `num_beams` of them did not stop."""
        return max(2, 1 + len(self.stop_tokens)) * self.num_beams

    def layout(self) -> BeamConfig:
        """The settings that shape the compiled loop; the others (`scoring`) are traced values,
        so that one compilation serves every length penalty, early stopping and stop token."""
        return dataclasses.replace(self, min_new_tokens=0, length_penalty=1.0,
                                   early_stopping=False, stop_tokens=(0,) * self._stop_slots)

    @property
    def _stop_slots(self) -> int:
        # No stop token keeps as many candidates as one: both compile alike, an unused slot
        # holding NO_TOKEN.
        return max(1, len(self.stop_tokens))

    def scoring(self) -> BeamScoring:
        n = np.arange(1, self.max_new_tokens + 1, dtype=np.float64)
        # Powers in float64, then float32: PyTorch divides float32 scores by the Python float.
        divisors = n ** self.length_penalty
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            hoped = np.full_like(divisors, divisors[-1])  # The best a running beam may reach.
        else:
            hoped = divisors  # The running beam judged at its current length.
        return BeamScoring(
            stop_tokens=jnp.asarray(self.stop_tokens or (NO_TOKEN,), jnp.int32),
            min_new_tokens=jnp.int32(self.min_new_tokens),
            divisors=jnp.asarray(divisors, jnp.float32), hoped_divisors=jnp.asarray(hoped, jnp.float32),
            stop_when_full=jnp.bool_(self.early_stopping is True))


@struct.dataclass
class BeamScoring:
    """The traced part of a `BeamConfig`."""

    stop_tokens: jax.Array  # [stop tokens] int32
    min_new_tokens: jax.Array  # int32
    divisors: jax.Array  # [max_new_tokens]: n ** length_penalty for a hypothesis of n new tokens.
    hoped_divisors: jax.Array  # [max_new_tokens]: the same for the early-stopping estimate.
    stop_when_full: jax.Array  # bool: early_stopping is True.


@dataclasses.dataclass(frozen=True)
class BeamGeneration:
    tokens: np.ndarray  # [batch, num_return_sequences, max_new_tokens]; pad_id after the end.
    lengths: np.ndarray  # [batch, num_return_sequences]: new tokens, a stop token included.
    scores: np.ndarray  # [batch, num_return_sequences]: transformers' `sequences_scores`.

    def sequences(self) -> list[list[list[int]]]:
        """Per input, its hypotheses (best first) as token lists."""
        return [[row[:n].tolist() for row, n in zip(rows, ns)]
                for rows, ns in zip(self.tokens, self.lengths)]


@struct.dataclass
class BeamState:
    step: jax.Array  # New tokens chosen so far (the same for every hypothesis).
    more: jax.Array  # bool: the loop goes on.
    logits: jax.Array  # [batch * beams, vocab]: the next token of each running beam.
    cache: Any
    running: jax.Array  # [batch, beams, max_new_tokens] tokens of the running beams.
    running_scores: jax.Array  # [batch, beams] summed log-probabilities, best first.
    finished: jax.Array  # [batch, beams, max_new_tokens] the buffer of finished hypotheses.
    finished_scores: jax.Array  # [batch, beams], length-penalized, best first.
    finished_lengths: jax.Array  # [batch, beams]
    is_finished: jax.Array  # [batch, beams] bool: the buffer slot holds a hypothesis.
    improvable: jax.Array  # [batch] bool: running beams may still beat the buffer.


def gather_beams(tree: Any, parents: jax.Array) -> Any:
    """Rows [batch * beams, ...] of every leaf, taken from each input's beams `parents` [batch,
    beams]; the gather stays within an input's rows."""
    batch, beams = parents.shape

    def take(x):
        grouped = x.reshape(batch, beams, *x.shape[1:])
        index = parents.reshape(batch, beams, *(1,) * (x.ndim - 1))
        out = jnp.take_along_axis(grouped, index, axis=1).reshape(x.shape)
        return constrain(out, ("batch",) + (None,) * (x.ndim - 1))

    return jax.tree.map(take, tree)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [batch, n, ...] at index [batch, m] along axis 1."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def _choose(state: BeamState, config: BeamConfig,
            scoring: BeamScoring) -> tuple[BeamState, jax.Array, jax.Array]:
    """One step of selection: the new running beams, their parents and the updated buffer."""
    batch, beams, n_new = state.running.shape
    vocab = state.logits.shape[-1]
    step = state.step
    logprobs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1)
    stop = scoring.stop_tokens
    is_stop = jnp.zeros((vocab,), bool).at[stop].set(True, mode="drop")  # NO_TOKEN: none.
    logprobs = jnp.where(is_stop & (step < scoring.min_new_tokens), -jnp.inf, logprobs)
    total = logprobs.reshape(batch, beams, vocab) + state.running_scores[..., None]
    top_scores, top = jax.lax.top_k(total.reshape(batch, beams * vocab), config.candidates)
    parents, tokens = top // vocab, top % vocab
    new_column = jnp.arange(n_new) == step
    sequences = jnp.where(new_column, tokens[..., None], _gather(state.running, parents))
    hits = jnp.isin(tokens, stop) | (step + 1 >= n_new)

    # The best `beams` candidates that go on.
    going_scores = top_scores + hits.astype(jnp.float32) * DROPPED
    running_scores, keep = jax.lax.top_k(going_scores, beams)
    running, parents = _gather(sequences, keep), jnp.take_along_axis(parents, keep, axis=1)

    # Candidates that stopped, among the first `beams`, offered to the buffer.
    stopped = hits & (jnp.arange(config.candidates) < beams)
    offered = top_scores / scoring.divisors[step]
    full = jnp.all(state.is_finished, axis=-1, keepdims=True) & scoring.stop_when_full
    offered = offered + full.astype(jnp.float32) * DROPPED
    offered = offered + (~state.improvable[:, None]).astype(jnp.float32) * DROPPED
    offered = offered + (~stopped).astype(jnp.float32) * DROPPED
    merged_scores = jnp.concatenate([state.finished_scores, offered], axis=1)
    finished_scores, best = jax.lax.top_k(merged_scores, beams)
    merge = lambda old, new: _gather(jnp.concatenate([old, new], axis=1), best)
    lengths = jnp.full((batch, config.candidates), step + 1, jnp.int32)
    state = state.replace(
        running=running, running_scores=running_scores,
        finished=merge(state.finished, sequences), finished_scores=finished_scores,
        finished_lengths=merge(state.finished_lengths, lengths),
        is_finished=merge(state.is_finished, stopped))
    return state, parents, hits


def _still_open(state: BeamState, hits: jax.Array, scoring: BeamScoring) -> BeamState:
    """Transformers' stopping rule, checked after `state.step` new tokens."""
    best_running = state.running_scores[:, :1] / scoring.hoped_divisors[state.step - 1]
    worst_finished = jnp.where(state.is_finished,
                               jnp.min(state.finished_scores, axis=1, keepdims=True), DROPPED)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=-1)
    all_full = jnp.all(state.is_finished) & scoring.stop_when_full
    more = jnp.any(improvable) & ~all_full & ~jnp.all(hits)
    return state.replace(improvable=improvable, more=more)


def beam_search(
    logits: jax.Array, cache: Any, step_fn: StepFn, reorder: ReorderFn, config: BeamConfig,
    scoring: BeamScoring,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The beam search loop over a model's step function (traced; call it inside `jax.jit`).

    `logits` [batch * beams, vocab] are the first next-token logits of every beam row (all beams
    of an input alike), `cache` what `step_fn(cache, tokens [batch * beams], step)` needs to
    return the next logits; `reorder(cache, parents [batch, beams])` moves each beam's cache rows
    to its children. `config` is a `BeamConfig.layout()` (static), `scoring` its
    `BeamConfig.scoring()` (traced). Returns the buffer's best `num_return_sequences` per input:
    tokens [batch, n, max_new_tokens], lengths [batch, n] and scores [batch, n].
    """
    beams, n_new = config.num_beams, config.max_new_tokens
    batch = logits.shape[0] // beams
    # Only the first beam is live at the start: the others are copies of it.
    first = jnp.where(jnp.arange(beams) == 0, 0.0, DROPPED).astype(jnp.float32)
    empty = jnp.full((batch, beams, n_new), config.pad_id, jnp.int32)
    state = BeamState(
        step=jnp.int32(0), more=jnp.bool_(True), logits=logits, cache=cache, running=empty,
        running_scores=jnp.broadcast_to(first, (batch, beams)), finished=empty,
        finished_scores=jnp.full((batch, beams), DROPPED, jnp.float32),
        finished_lengths=jnp.zeros((batch, beams), jnp.int32),
        is_finished=jnp.zeros((batch, beams), bool), improvable=jnp.ones((batch,), bool))

    def body(state: BeamState) -> BeamState:
        state, parents, hits = _choose(state, config, scoring)
        state = _still_open(state.replace(step=state.step + 1), hits, scoring)

        def forward(state: BeamState) -> tuple[jax.Array, Any]:
            tokens = state.running[:, :, state.step - 1].reshape(-1)
            return step_fn(reorder(state.cache, parents), tokens, state.step - 1)

        # The last step's forward pass would be thrown away: skip it.
        logits, cache = jax.lax.cond(state.more, forward, lambda s: (s.logits, s.cache), state)
        return state.replace(logits=logits, cache=cache)

    state = jax.lax.while_loop(lambda s: s.more, body, state)
    n = config.num_return_sequences
    return state.finished[:, :n], state.finished_lengths[:, :n], state.finished_scores[:, :n]


def decoder_step(model: Decoder, ids: jax.Array, mask: jax.Array,
                 config: BeamConfig) -> tuple[jax.Array, Any, StepFn, ReorderFn]:
    """Prefill of a decoder-only model and its step and reorder functions for `beam_search`.

    The prompts run once per input; their cache, logits and slots are then repeated over the
    beams. The slots' segment ids are the same for every beam of an input (left padding puts each
    new token in the same slot), and so are the prompt's keys and values: only the keys and
    values of the new tokens' slots are reordered (the cache layout is [rows, kv_heads, slots,
    head_dim], see `KVCache`).
    """
    beams, prompt_len = config.num_beams, ids.shape[1]
    logits, cache, slots, lengths = prompt_forward(model, ids, mask,
                                                   prompt_len + config.max_new_tokens)
    repeat = lambda x: jnp.repeat(x, beams, axis=0)
    logits, cache, slots, lengths = jax.tree.map(repeat, (logits, cache, slots, lengths))

    def step_fn(carry, tokens, step):
        kv, slots = carry
        logits, kv, slots = token_forward(model, tokens, kv, slots, prompt_len + step,
                                          lengths + step)
        return logits, (kv, slots)

    def reorder(carry, parents):
        kv, slots = carry
        return reorder_new_slots(kv, parents, prompt_len), slots

    return logits, (cache, slots), step_fn, reorder


def reorder_new_slots(kv: Any, parents: jax.Array, first_new: int) -> Any:
    """Caches [rows, kv_heads, slots, head_dim] with slots `first_new`.. gathered from each beam's
    parent. Every beam of an input holds the same prompt keys and values: only the new slots move."""
    new = lambda x: jax.lax.dynamic_update_slice_in_dim(
        x, gather_beams(x[:, :, first_new:], parents), first_new, axis=2)
    return jax.tree.map(new, kv)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _beam_generate(graphdef: Any, params: Any, ids: jax.Array, mask: jax.Array, layout: BeamConfig,
                   scoring: BeamScoring, prepare: Callable) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits, cache, step_fn, reorder = prepare(nnx.merge(graphdef, params), ids, mask, layout)
    return beam_search(logits, cache, step_fn, reorder, layout, scoring)


def run_beam_search(model: Any, ids: np.ndarray, mask: np.ndarray, config: BeamConfig,
                    mesh: Mesh | None, rules: Rules | None,
                    prepare: Callable = decoder_step) -> BeamGeneration:
    """Beam search over a batch of padded inputs, as one jitted loop; `prepare(model, ids, mask,
    layout)` gives the first logits, the cache and the step and reorder functions
    (`decoder_step`, or `seq2seq.encoder_decoder_step`)."""
    check_beams(model, config)
    graphdef, params = nnx.split(decoding_model(model))
    layout, scoring = config.layout(), config.scoring()
    run = lambda ids, mask: _beam_generate(graphdef, params, ids, mask, layout, scoring, prepare)
    tokens, lengths, scores = run_on_mesh(run, [ids, mask], mesh, rules)
    return BeamGeneration(np.asarray(tokens), np.asarray(lengths), np.asarray(scores))


def check_beams(model: Decoder, config: BeamConfig) -> None:
    """Raises unless `config.candidates` continuations exist among num_beams x vocab."""
    vocab = model.config.vocab_size
    if config.candidates > config.num_beams * vocab:
        raise ValueError(
            f"beam search keeps {config.candidates} continuations a step (num_beams "
            f"{config.num_beams} x (1 + {len(config.stop_tokens)} stop tokens, at least 2)) but "
            f"there are only num_beams x vocab_size = {config.num_beams * vocab}; pass fewer "
            f"stop tokens")


def beam_generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    config: BeamConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> BeamGeneration:
    """The best hypotheses of beam search for a batch of prompts (token-id lists of any lengths).

    Equal to transformers' `generate(num_beams=..., do_sample=False)` on the same left-padded
    prompts with their attention mask. With a mesh (parameters already sharded over it), the
    batch x beam rows are split by the 'batch' rule.
    """
    config = config or BeamConfig()
    ids, mask = left_pad(prompts, config.pad_id)
    check_fits(model, ids.shape[1], config)
    return run_beam_search(model, ids, mask, config, mesh, rules)
