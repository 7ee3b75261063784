"""The jitted train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from transformer import sharding
from transformer.models import context_parallel
from transformer.train import dp, trainable
from transformer.train.optimizer import applied_steps
from transformer.train.state import TrainState

Batch = dict[str, jax.Array]


def objective_of(config: ml_collections.ConfigDict, objective: Any = None) -> Any:
    """The objective the caller hands in (the training loop and the objectives' evaluators do),
    else the one `config.objective` names in the registry (tests and benchmarks). The lookup is
    deferred so that this module, which the objectives use, does not import them."""
    if objective is not None:
        return objective
    from transformer.train.objectives import get_objective

    return get_objective(config.objective)


def make_loss_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                 teacher_graphdef: nnx.GraphDef | None = None, objective: Any = None) -> Callable:
    """(params, batch, dropout_rng[, teacher_params]) → (loss_sum, sums): the model on one
    (micro)batch, with the loss of `objective` (default: `config.objective`'s); a frozen teacher
    (distillation) gets no gradient."""
    objective = objective_of(config, objective)
    zig_zag = dict(causal=config.model.architecture == "decoder",
                   load_balance=config.model.get("context_load_balance", True))

    def loss_fn(params: Any, batch: Batch, dropout_rng: jax.Array | None,
                teacher_params: Any = None):
        # Causal load balancing lays the tokens out zig-zag; the loss sums over tokens, so
        # their order does not change it.
        batch = context_parallel.prepare_batch(batch, **zig_zag)
        batch = {k: sharding.constrain(v, _axes(objective.batch_axes, v.ndim))
                 for k, v in batch.items()}
        model = nnx.merge(graphdef, params)
        frozen = {} if teacher_graphdef is None else {"teacher": nnx.merge(
            teacher_graphdef, jax.lax.stop_gradient(teacher_params))}
        sums = objective.loss(model, batch, dropout_rng, config, **frozen)
        return sums["loss_sum"], sums

    return loss_fn


def _axes(leading: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    return (*leading, *(None,) * ndim)[:ndim]


def _split_microbatches(batch: Batch, count: int) -> Batch:
    """[B, ...] → [count, B / count, ...], microbatch i taking rows i, i + count, ...: every device
    keeps its own rows (no data moves), and the union is the whole batch."""

    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    teacher: Any = None,
    objective: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step over `config.grad_accum_steps` microbatches, jitted with the state
    donated. A non-finite loss or gradient norm (a global check: every host agrees) skips the
    update and is counted. A `teacher` (`Objective.teacher`: graphdef, params, shardings) runs in
    the step, its parameters a sharded input of the jitted function."""
    objective = objective_of(config, objective)
    whole_loss_fn = make_loss_fn(graphdef, config, teacher and teacher.graphdef, objective)
    summarize = objective.summarize
    trains = trainable.predicate(config)

    # Differentiated with respect to the trainable part only: a frozen base gets no gradient.
    def loss_fn(train_params, frozen_params, *args):
        return whole_loss_fn(trainable.join(train_params, frozen_params), *args)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def mean_loss_fn(*args):
        loss_sum, sums = loss_fn(*args)
        return loss_sum / jnp.maximum(jax.lax.stop_gradient(sums["weight_sum"]), 1.0), sums

    # One batch: differentiate the mean, so the gradient needs no second pass to divide it.
    mean_grad_fn = jax.value_and_grad(mean_loss_fn, has_aux=True)
    accum = config.grad_accum_steps
    use_dropout = (config.model.dropout_rate > 0 or config.model.attention_dropout_rate > 0
                   or config.model.get("lora_dropout", 0.0) > 0)
    private = config.get("dp") and config.dp.enabled  # DP-SGD (transformer/train/dp.py).
    if private:
        private_gradient = dp.make_private_gradient(
            grad_fn, config, dp.spmd_axes(batch_sharding, config.dp.microbatch_size))

    def train_step(state: TrainState, batch: Batch, teacher_params: Any = None,
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        train_params, frozen = trainable.split(state.params, trains)

        def microbatch(carry: Any, inputs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
            mb, i = inputs
            (_, sums), grads = grad_fn(train_params, frozen, mb, jax.random.fold_in(rng, i)
                                       if use_dropout else None, teacher_params)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        dp_metrics = {}
        if private:
            grads, sums, dp_metrics = private_gradient(
                train_params, frozen, _split_microbatches(
                    batch, batch["weights"].shape[0] // config.dp.microbatch_size),
                rng, use_dropout, teacher_params)
        elif accum == 1:
            (_, sums), grads = mean_grad_fn(train_params, frozen, batch,
                                            rng if use_dropout else None, teacher_params)
        else:
            _, zero_sums = jax.eval_shape(loss_fn, train_params, frozen, jax.tree.map(
                lambda x: x[: x.shape[0] // accum], batch), None, teacher_params)
            zeros = (jax.tree.map(jnp.zeros_like, train_params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums))
            (grads, sums), _ = jax.lax.scan(
                microbatch, zeros, (_split_microbatches(batch, accum), jnp.arange(accum))
            )
            total = jnp.maximum(sums["weight_sum"], 1.0)
            grads = jax.tree.map(lambda g: g / total, grads)  # Mean over every weighted target.
        loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        new_params = optax.apply_updates(train_params, updates)
        keep_if_finite = lambda new, old: jnp.where(finite, new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=trainable.join(jax.tree.map(keep_if_finite, new_params, train_params), frozen),
            opt_state=jax.tree.map(keep_if_finite, opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
        )
        metrics = {
            **summarize(sums),
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(applied_steps(state.opt_state)),
            "skipped": new_state.skipped,
            "bad_streak": new_state.bad_streak,
            **dp_metrics,
        }
        return new_state, metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    frozen = () if teacher is None else (teacher.shardings,)
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, *frozen),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    if teacher is None:
        return jitted
    return lambda state, batch: jitted(state, batch, teacher.params)


def make_eval_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    params_sharding: Any,
    batch_sharding: NamedSharding,
    objective: Any = None,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Loss sums of one batch (weights 0 on padding), to be added up over the whole split."""
    loss_fn = make_loss_fn(graphdef, config, objective=objective)

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        return loss_fn(params, batch, None)[1]

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding),
                   out_shardings=replicated)
