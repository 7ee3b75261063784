"""Layer-wise learning-rate decay (ELECTRA, BEiT): lower layers of a pretrained backbone move
less. The head (and pooler, final norm) gets the full rate, block i of L gets decay^(L - i), the
embeddings decay^(L + 1).

Applied as a scaling of the final AdamW update, which equals a per-layer learning rate (weight
decay included, as with per-group learning rates in PyTorch). The blocks' parameters are stacked
on a leading 'layers' axis, so one array holds every layer: its scale is a vector over that axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def layer_scales(path_names: tuple[str, ...], shape: tuple[int, ...], decay: float,
                 num_layers: int) -> jax.Array | float:
    """The update scale of one parameter, from its path in the parameter tree."""
    if "layers" in path_names:  # [L, ...]: block i gets decay^(L - i).
        exponents = num_layers - jnp.arange(shape[0], dtype=jnp.float32)
        return (decay ** exponents).reshape((shape[0],) + (1,) * (len(shape) - 1))
    if "embeddings" in path_names or "embedding_norm" in path_names:
        return decay ** (num_layers + 1)
    return 1.0


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None):
        del params

        def scale(path, u):
            names = tuple(str(getattr(p, "key", p)) for p in path)
            return u * layer_scales(names, u.shape, decay, num_layers)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def with_layer_decay(tx: optax.GradientTransformation, decay: float,
                     num_layers: int) -> optax.GradientTransformation:
    """`tx` followed by the layer-wise scaling; `tx` itself when decay is 1."""
    if decay == 1.0:
        return tx
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"finetune.layer_decay must be in (0, 1], got {decay}")
    return optax.chain(tx, scale_by_layer_decay(decay, num_layers))
