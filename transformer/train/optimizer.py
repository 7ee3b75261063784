"""AdamW with a weight-decay mask, global-norm clipping and learning-rate schedules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
BIAS_NAMES = ("bias", "bi", "bo")


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine / linear decay to
    `learning_rate · end_lr_fraction`, inverse square root, or constant."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.num_train_steps
    end = peak * config.end_lr_fraction
    decay_steps = max(total - warmup, 1)
    if config.schedule not in SCHEDULES:
        raise ValueError(f"config.schedule={config.schedule!r} is not one of {list(SCHEDULES)}")
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif config.schedule == "rsqrt":
        after = lambda step: peak * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any, config: ml_collections.ConfigDict) -> Any:
    """True for the parameters weight decay applies to: by default matrices only — not norm
    scales, biases or embedding tables (each configurable)."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = [str(getattr(p, "key", p)) for p in path]
        leaf = names[-1]
        if not config.decay_norms and any("norm" in n for n in names):
            return False
        if not config.decay_biases and (leaf.endswith("_bias") or leaf in BIAS_NAMES):
            return False
        # A task model holds the embeddings under 'backbone'.
        embeddings = names[0] == "embeddings" or names[:2] == ["backbone", "embeddings"]
        return not (not config.decay_embeddings and embeddings)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation (clip → AdamW) and its schedule, from the trainer config."""
    schedule = make_schedule(config)
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=lambda params: decay_mask(params, config),
        )
    )
    return optax.chain(*parts), schedule


def applied_steps(opt_state: Any) -> jax.Array:
    """Number of updates applied so far (the schedule's step), from AdamW's counter."""
    has_count = lambda s: "count" in getattr(s, "_fields", ())
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=has_count) if has_count(s)]
    return counts[0] if counts else jnp.zeros((), jnp.int32)
