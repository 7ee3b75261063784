"""NVIDIA GPU: cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')`.

cuDNN's fused path takes the mask as a causal flag, a left window and per-row sequence lengths;
an explicit boolean mask would send it to a slower path, so none is built. The lengths come from
the segment ids, which must therefore hold one sequence a row, padded on the right
(1 … 1 0 … 0): packed rows (several segments) have no such form in this API, and are refused at
run time with an error (use attention_impl='xla', or batches without packing). Query rows past a
row's length (padding) are not computed as the reference computes them (as with splash.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mask_arguments(segment_ids: jax.Array, *, causal: bool,
                   window: int | None) -> dict[str, jax.Array | bool | tuple[int, int] | None]:
    """The keyword arguments of `jax.nn.dot_product_attention` that give the mask of
    `segment_ids` [B,T] (one sequence a row, right-padded), `causal` and `window`."""
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
    return dict(is_causal=causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                local_window_size=None if window is None else (window - 1, 0))


def one_sequence_a_row(segment_ids: jax.Array) -> jax.Array:
    """[B] bool: whether each row is one sequence padded on the right (what lengths can say)."""
    lengths = jnp.sum(segment_ids != 0, axis=1)
    first = jnp.where(lengths > 0, segment_ids[:, 0], 0)
    expected = jnp.where(jnp.arange(segment_ids.shape[1])[None] < lengths[:, None],
                         first[:, None], 0)
    return jnp.all(segment_ids == expected, axis=1)


def _refuse_packed(representable: np.ndarray) -> None:
    if not np.all(representable):
        rows = np.flatnonzero(~np.asarray(representable)).tolist()
        raise ValueError(
            f"attention_impl='cudnn' takes one sequence a row padded on the right, but batch rows "
            f"{rows[:8]} hold packed segments (or left padding): cuDNN's flash path here has no "
            "segment ids. Set model.attention_impl='xla', or train on unpacked batches")


def check_one_sequence_a_row(segment_ids: jax.Array) -> None:
    """At run time (a host callback), ValueError when a row is packed or left-padded."""
    jax.debug.callback(_refuse_packed, one_sequence_a_row(segment_ids))


def attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
              causal: bool, window: int | None, scale: float) -> jax.Array:
    """Attention of query [B,T,H,D] over key/value [B,T,K,D] (K dividing H) on cuDNN; the model
    checks its rows once a forward pass (`kernels.check_rows`)."""
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation="cudnn",
        **mask_arguments(segment_ids, causal=causal, window=window))
