"""Language-model losses with per-token weights, returned as sums so batches combine exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted token cross-entropy: sums over tokens, not means.

    Causal LM: `weights` is 1 where a next token exists in the same segment. Masked LM: 1 only at
    the masked positions. Padding is 0 in both. Dividing the sums by `weight_sum` gives the mean,
    identical however the batch is split into microbatches or over devices.

    Label smoothing mixes the one-hot target with the uniform distribution; z-loss (PaLM) adds
    z_loss · log(Z)² to keep the softmax normalizer near 1 in low precision.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # log p(target) = logit(target) - log Z: no [batch, length, vocab] array of log-probabilities.
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - logits.mean(axis=-1))
    z_term = z_loss * jnp.square(log_z)
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum((loss + z_term) * weights),
        "nll_sum": jnp.sum(nll * weights),
        "z_loss_sum": jnp.sum(z_term * weights),
        "correct_sum": jnp.sum(correct * weights),
        "weight_sum": jnp.sum(weights),
    }
