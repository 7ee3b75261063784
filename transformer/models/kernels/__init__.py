"""Fused attention kernels behind `ModelConfig.attention_impl`: one dispatcher, one file a backend.

  splash            TPU: the Pallas splash-attention kernel (`splash.py`); causal, sliding-window,
                    padding and packed-segment masks, grouped-query heads; memory linear in length.
  splash_interpret  the same kernel in Pallas interpret mode, on any backend (slow: tests).
  cudnn             NVIDIA GPU: cuDNN flash attention through `jax.nn.dot_product_attention`
                    (`cudnn.py`); causal, sliding-window and padding masks, one sequence a row.

The kernels take what the mask is made of (segment ids, causal flag, window), never a dense
mask. A kernel requested on a backend it does not run on, or for attention it does not do
(a position bias, attention dropout, returned weights, a dense mask), is an error that names the
fallback: `attention_impl='xla'` (or 'einsum', the reference), which does all of them.
"""

from __future__ import annotations

import jax

from transformer.models.kernels import cudnn, splash

FUSED_IMPLS = ("splash", "splash_interpret", "cudnn")
_PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
_DEVICES = {"splash": "a TPU", "cudnn": "an NVIDIA GPU"}


def is_fused(impl: str) -> bool:
    """Whether `impl` is one of the fused kernels (they take segment ids, not a dense mask)."""
    return impl in FUSED_IMPLS


def target_platform() -> str:
    """The platform the traced program is for: the active mesh's devices (which, compiling ahead
    of time for a TPU topology, are not the default backend's), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def check_supported(impl: str, *, bias: bool = False, dropout: bool = False,
                    return_weights: bool = False, dense_mask: bool = False) -> None:
    """Raises ValueError naming the fallback when kernel `impl` cannot do what is asked here."""
    fallback = "set model.attention_impl='xla' (or 'einsum', the reference)"
    unsupported = [what for what, asked in (
        ("a position bias (T5's relative attention bias)", bias),
        ("attention dropout (attention_dropout_rate > 0)", dropout),
        ("returned attention weights (output_attentions)", return_weights),
        ("attention without segment ids (a dense mask or none: encoder-decoder models, or a "
         "direct call of dot_product_attention)", dense_mask),
    ) if asked]
    if unsupported:
        raise ValueError(f"attention_impl={impl!r} (a fused kernel) does not support "
                         f"{unsupported[0]}; {fallback}, which does")
    platform = target_platform()
    if impl in _PLATFORMS and platform not in _PLATFORMS[impl]:
        interpret = (" ('splash_interpret' runs the TPU kernel in Pallas interpret mode on any "
                     "backend, slowly, for tests)") if impl == "splash" else ""
        raise ValueError(f"attention_impl={impl!r} needs {_DEVICES[impl]}, but this program is "
                         f"for {platform!r}; {fallback}{interpret}")


def check_rows(impl: str, segment_ids: jax.Array) -> None:
    """Once per forward pass, not once per layer: the rows' form a kernel needs (cuDNN: one
    sequence a row, right-padded; checked at run time). Nothing for the other kernels."""
    if impl == "cudnn":
        cudnn.check_one_sequence_a_row(segment_ids)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *,
              causal: bool, window: int | None, scale: float, impl: str) -> jax.Array:
    """Self-attention of query [B,T,H,D] over key/value [B,T,K,D] (K dividing H) with kernel
    `impl`; `segment_ids` [B,T] (0 = padding) give padding and packing, `causal` and `window`
    the rest of the mask (by sequence index, as `attention.make_attention_mask`)."""
    check_supported(impl)
    if impl == "cudnn":
        return cudnn.attention(query, key, value, segment_ids, causal=causal, window=window,
                               scale=scale)
    return splash.attention(query, key, value, segment_ids, causal=causal, window=window,
                            scale=scale, interpret=impl == "splash_interpret")
