"""The train state, its shardings (derived before anything is allocated), and its creation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer import sharding
from transformer.models import MODELS, ModelConfig
from transformer.train import trainable


@struct.dataclass
class TrainState:
    """Everything a step changes; one pytree, so it can be jitted, donated and checkpointed."""

    step: jax.Array  # Steps taken, including skipped ones (= batches consumed).
    params: Any  # Nested dict of float32 arrays (`nnx.to_pure_dict` of the model's Params).
    opt_state: Any  # optax state; its moment trees mirror `params` and share their shardings.
    rng: jax.Array  # uint32[2] base key; each step folds in its step number.
    skipped: jax.Array  # Total updates skipped for a non-finite loss or gradient.
    bad_streak: jax.Array  # Consecutive skipped updates (the run stops when it gets too long).


Builder = Callable[[nnx.Rngs], nnx.Module]


def model_builder(model_config: ModelConfig, build: Builder | None = None) -> Builder:
    """`build` (e.g. a backbone with a task head), or the plain model of `model_config`."""
    if build is not None:
        return build
    return lambda rngs: MODELS[model_config.architecture](model_config, rngs=rngs)


def abstract_model(model_config: ModelConfig, build: Builder | None = None) -> nnx.Module:
    return nnx.eval_shape(lambda: model_builder(model_config, build)(nnx.Rngs(0)))


def param_shardings(
    model_config: ModelConfig, mesh: Mesh, rules: sharding.Rules, build: Builder | None = None
) -> Any:
    """NamedShardings of the parameters (nested dict), from their logical axes and the rules."""
    abstract = abstract_model(model_config, build)
    sharding.check_rules(abstract, rules)
    state = nnx.state(abstract, nnx.Param)
    return nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def state_shardings(
    abstract_state: TrainState, params_sharding: Any, mesh: Mesh
) -> TrainState:
    """Shardings for every leaf: a parameter's own; an optimizer moment shares the sharding of the
    parameter whose path it ends with (same shape); everything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {
        _path_names(path): s
        for path, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]
    }
    param_shapes = {
        _path_names(path): x.shape
        for path, x in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    }

    def opt_leaf(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = _path_names(path)
        for start in range(len(names)):
            suffix = names[start:]
            if suffix in by_path and param_shapes[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    return TrainState(
        step=replicated,
        params=params_sharding,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
        rng=replicated,
        skipped=replicated,
        bad_streak=replicated,
    )


def make_init_fn(
    model_config: ModelConfig, tx: optax.GradientTransformation, seed: int,
    build: Builder | None = None, trains: trainable.Predicate | None = None,
    frozen_dtype: str = "",
) -> Callable[[], TrainState]:
    """The state's initializer; with `trains` (LoRA), the optimizer holds the trainable part only
    and the frozen part is stored in `frozen_dtype` ('' = as the model makes it)."""
    make = model_builder(model_config, build)

    def init() -> TrainState:
        model = make(nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        trainable.check(params, trains)
        params = trainable.cast_frozen(params, trains, frozen_dtype)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(trainable.split(params, trains)[0]),
            rng=jax.random.key_data(jax.random.key(seed + 1)),
            skipped=jnp.zeros((), jnp.int32),
            bad_streak=jnp.zeros((), jnp.int32),
        )

    return init


def make_run_init_fn(
    config: Any, model_config: ModelConfig, tx: optax.GradientTransformation,
    build: Builder | None = None,
) -> Callable[[], TrainState]:
    """`make_init_fn` as the trainer config says: what trains (LoRA) and how frozen weights are
    stored (`finetune.frozen_dtype`)."""
    return make_init_fn(model_config, tx, config.seed, build, trainable.predicate(config),
                        config.finetune.get("frozen_dtype", ""))


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules,
    seed: int,
    trains: trainable.Predicate | None = None,
    frozen_dtype: str = "",
) -> tuple[TrainState, TrainState, nnx.GraphDef]:
    """(state, its shardings, the model graphdef): created by `jax.jit` directly into its
    sharded layout, so no host ever holds the whole model."""
    init = make_init_fn(model_config, tx, seed, trains=trains, frozen_dtype=frozen_dtype)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, param_shardings(model_config, mesh, rules), mesh)
    with sharding.use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    graphdef = nnx.graphdef(abstract_model(model_config))
    return state, shardings, graphdef


def abstract_state(init_shapes: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto the current mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), init_shapes, shardings
    )
