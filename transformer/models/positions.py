"""Position information: sinusoidal encodings and rotary embeddings (RoPE) with scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer.models.config import ModelConfig


def sinusoidal(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d))."""
    inv_freq = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*positions.shape, -1)[..., :dim]


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """θ_i = base^(-2i/d), adjusted by Llama-3 scaling when configured (float64 → float32)."""
    dim = config.dim_per_head
    inv_freq = 1.0 / config.rope_base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling == "llama3":
        inv_freq = _llama3_scaling(inv_freq, config)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_length = config.rope_original_max_length
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength, high_freq_wavelength = old_length / low, old_length / high
    smooth = (old_length / wavelength - low) / (high - low)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(medium, ramp, scaled)


def rope_position_scale(config: ModelConfig) -> float:
    """Linear ("position interpolation") scaling divides positions by the factor."""
    return 1.0 / config.rope_factor if config.rope_scaling == "linear" else 1.0


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, position_scale: float = 1.0
) -> jax.Array:
    """Rotate x [B,T,H,D] by angle position·θ_i in the (i, i + D/2) planes ("rotate half").

    The half-split layout is the one of the Hugging Face Llama checkpoints, so imported weights
    need no permutation. Computed in float32.
    """
    angles = positions[..., None].astype(jnp.float32) * position_scale * jnp.asarray(inv_freq)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def relative_position_bucket(
    relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative position (key position - query position), int32.

    Half the buckets (all of them when causal, where later keys are masked anyway) hold exact
    distances 0..n/2-1; the rest grow logarithmically up to `max_distance`, beyond which all
    share the last. Bidirectional: keys after the query take the upper half of the buckets.
    The logarithm runs in float32, as in the reference implementations.
    """
    relative = relative.astype(jnp.int32)
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)
