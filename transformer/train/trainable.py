"""Which parameters a run trains: all of them, or (with LoRA) the adapters and named extras.

The step differentiates the trainable part only and the optimizer holds state for it only, so a
frozen base costs neither gradients nor optimizer moments. Both parts are nested dicts of the
same layout as the whole parameter tree, split and joined by path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from transformer.models import lora

Predicate = Callable[[tuple[str, ...]], bool]


def predicate(config: ml_collections.ConfigDict) -> Predicate | None:
    """None when everything trains; else whether a parameter path trains: LoRA adapters, and
    parameters whose dotted path matches a regex of `finetune.train_also` (e.g. a task head)."""
    if config.model.get("lora_rank", 0) <= 0:
        return None
    extras = [re.compile(p) for p in _patterns(config.finetune.get("train_also", ""))]
    return lambda path: lora.is_adapter_path(path) or any(
        p.search(".".join(path)) for p in extras)


def _patterns(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in items if p.strip()]


def split(params: Any, trains: Predicate | None) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a nested params dict."""
    if trains is None:
        return params, {}
    flat = traverse_util.flatten_dict(params)
    keys = {path: tuple(str(k) for k in path) for path in flat}
    train = {p: v for p, v in flat.items() if trains(keys[p])}
    frozen = {p: v for p, v in flat.items() if not trains(keys[p])}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def join(trainable: Any, frozen: Any) -> Any:
    if not frozen:
        return trainable
    flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
    return traverse_util.unflatten_dict(flat)


def check(params: Any, trains: Predicate | None) -> None:
    """A run that trains nothing is a configuration error, not a silent no-op."""
    if trains is None:
        return
    trainable, _ = split(params, trains)
    if not jax.tree.leaves(trainable):
        raise ValueError("no parameter is trainable: LoRA (model.lora_rank > 0) trains only the "
                         "adapters and finetune.train_also, and the model has neither")


def cast_frozen(params: Any, trains: Predicate | None, dtype: str) -> Any:
    """The frozen part stored in `dtype` (e.g. 'bfloat16' halves a LoRA run's base weights)."""
    if trains is None or not dtype:
        return params
    trainable, frozen = split(params, trains)
    return join(trainable, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), frozen))


def count(params: Any, trains: Predicate | None) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    return size(split(params, trains)[0]), size(params)
