"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # Finite, so that a fully masked row never produces NaN.


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen; hashable, so it is a static argument of the jitted loops."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits / temperature.
    top_k: int = 0  # Keep the k most likely tokens (0 = all).
    top_p: float = 1.0  # Keep the smallest set of tokens whose probability reaches p (1 = all).
    stop_tokens: tuple[int, ...] = ()  # A sequence ends after emitting any of these.
    pad_id: int = 0  # Written after a sequence has stopped.

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise ValueError(
                f"top_k={self.top_k} / top_p={self.top_p} have no effect with temperature=0 "
                "(greedy decoding): set a temperature > 0 to sample, or leave top_k and top_p out")


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Logits [..., vocab] with all but the k largest set to NEG_INF (ties at the k-th kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the nucleus: the most likely tokens, in order, until their probability reaches p.

    A token is kept when the probability of the tokens ranked before it is below p, so the most
    likely token always stays.
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, NEG_INF)


def sample(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]."""
    logits = logits.astype(jnp.float32)
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    logits = top_k_mask(logits, config.top_k)
    logits = top_p_mask(logits, config.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
