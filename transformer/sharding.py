"""Mesh construction and logical-axis rules: the only module that knows mesh axes.

Models name the axes of their parameters and activations with logical names (`'embed'`, `'heads'`,
`'batch'`, ...). A list of rules, held in the config, maps each logical name to mesh axes
(`'data'`, `'fsdp'`, `'tensor'`) or to None (replicated). Changing the parallelism is a change of
the mesh shape or of the rules, never of a model.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# A mesh has the 'expert' axis (MoE expert parallelism) and the 'context' axis (context
# parallelism: the sequence split over devices) only when its shape names them; the shapes of
# configs that don't are unchanged.
BASE_MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axis that splits the sequence; attention under context parallelism
# (transformer/models/context_parallel.py) passes keys and values over it.
CONTEXT_AXIS = "context"
# Mesh axes that split the batch.
BATCH_MESH_AXES = ("data", "fsdp", "expert")

# Logical names of parameter axes.
PARAM_AXES = ("vocab", "embed", "heads", "kv", "mlp", "layers", "expert")
# Logical names of activation axes.
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_mlp", "act_vocab")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Data parallelism over 'data', ZeRO-3 style sharding of parameters over 'fsdp' (whose devices
# also split the batch), Megatron-style tensor parallelism over 'tensor', the experts of MoE
# blocks over 'expert' (whose devices also split the batch: each holds E / n experts), the
# sequence over 'context' (whose devices also hold a share of the parameters, as fsdp's do).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_MESH_AXES),
    ("length", CONTEXT_AXIS),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", CONTEXT_AXIS)),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("expert", "expert"),
)

_active_rules: contextvars.ContextVar[dict[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "logical_axis_rules", default=None
)


def data_parallel_size(shape: Mapping[str, int], device_count: int | None = None) -> int:
    """Devices the batch is split over (data × fsdp × expert) in the mesh `shape`."""
    count = jax.device_count() if device_count is None else device_count
    sizes = dict(zip(mesh_axes(shape), mesh_sizes(shape, count)))
    return math.prod(sizes.get(a, 1) for a in BATCH_MESH_AXES)


def batch_devices(mesh: Mesh) -> int:
    """Devices of `mesh` the batch is split over."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_MESH_AXES)


def mesh_axes(shape: Mapping[str, int] | Sequence[int]) -> tuple[str, ...]:
    """The axes of a mesh of `shape`: with 'expert' and 'context' when a mapping names them; a
    sequence of sizes has 3 (data, fsdp, tensor), 4 (+ expert) or 5 (all) of them."""
    if isinstance(shape, Mapping):
        return tuple(a for a in MESH_AXES if a in BASE_MESH_AXES or a in shape)
    if len(shape) == 4:
        return ("data", "fsdp", "expert", "tensor")
    return MESH_AXES if len(shape) == len(MESH_AXES) else BASE_MESH_AXES


def make_mesh(
    shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over `devices` (default: all) with axes ('data', 'fsdp', 'tensor'), and 'expert'
    and 'context' before 'tensor' when `shape` names them (see `mesh_axes`).

    `shape` gives each axis size; one may be -1 for "the rest of the devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = mesh_axes(shape)
    device_grid = np.asarray(devices).reshape(mesh_sizes(shape, len(devices)))
    return Mesh(device_grid, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def mesh_sizes(shape: Mapping[str, int] | Sequence[int], device_count: int) -> list[int]:
    """Each mesh axis's size (in `mesh_axes(shape)` order) for `device_count` devices, -1 ("the
    rest") resolved; checked."""
    axes = mesh_axes(shape)
    sizes = [shape.get(a, 1) for a in axes] if isinstance(shape, Mapping) else list(shape)
    if isinstance(shape, Mapping) and (extra := set(shape) - set(MESH_AXES)):
        raise ValueError(f"unknown mesh axes {sorted(extra)}; the mesh axes are {MESH_AXES}")
    if len(sizes) != len(axes):
        raise ValueError(f"mesh shape {sizes} needs one size per axis {BASE_MESH_AXES} "
                         f"(or {MESH_AXES}, or name them in a mapping)")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or device_count % known:
            raise ValueError(
                f"mesh shape {sizes}: {device_count} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(
            f"mesh shape {dict(zip(axes, sizes))} has {math.prod(sizes)} devices but "
            f"{device_count} are available; make the product equal the device count "
            "(or use -1 on one axis)"
        )
    return sizes


def normalize_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """Rules as {logical name: tuple of mesh axes}, validated against the mesh axis names."""
    table: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        name, axes = entry
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if bad := [a for a in axes if a not in MESH_AXES]:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; use {MESH_AXES}")
        table.setdefault(name, axes)  # The first rule for a name wins, as in Flax.
    return table


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules | Mapping[str, tuple[str, ...]],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array whose axes have logical `names`.

    A dimension that the mesh axes do not divide evenly stays replicated (e.g. 2 key/value heads
    on 8 tensor-parallel devices); a mesh axis already used by an earlier dimension is not reused.
    """
    table = rules if isinstance(rules, Mapping) else normalize_rules(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; add ({name!r}, <mesh axes or None>) "
                f"to the rules (mesh axes: {MESH_AXES}); rules cover {sorted(table)}"
            )
        axes = tuple(a for a in table[name] if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a model gave a variable (empty if none)."""
    return tuple(variable.get_metadata().get("out_sharding") or ())


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every variable of an (abstract) NNX state, from its logical axes."""
    table = normalize_rules(rules)

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        names = variable_axes(variable)
        value = variable.get_value()
        if len(names) != len(value.shape):
            names = (None,) * len(value.shape)
        _check_experts_divide(names, value.shape, table, mesh)
        spec = logical_to_spec(names, table, value.shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _check_experts_divide(names: Sequence[str | None], shape: Sequence[int],
                          table: Mapping[str, tuple[str, ...]], mesh: Mesh) -> None:
    """Experts are split over their mesh axes, never silently replicated: each device holds
    E / n whole experts."""
    if "expert" not in names:
        return
    experts = shape[list(names).index("expert")]
    devices = math.prod(mesh.shape.get(a, 1) for a in table.get("expert", ()))
    if experts % devices:
        raise ValueError(
            f"{experts} experts do not split over the {devices} devices of mesh axes "
            f"{table['expert']} (mesh {dict(mesh.shape)}); use an expert axis size that divides "
            f"num_experts={experts}")


def check_rules(model_or_state: Any, rules: Rules) -> None:
    """Fail early, naming the axis, if any variable or activation axis lacks a rule."""
    table = normalize_rules(rules)
    names = set(ACTIVATION_AXES)
    for _, variable in nnx.to_flat_state(_as_state(model_or_state)):
        names.update(n for n in variable_axes(variable) if n is not None)
    if missing := sorted(names - set(table)):
        raise ValueError(
            f"logical axes {missing} have no sharding rule; add them to the rules "
            f"(each maps to one of {MESH_AXES}, a tuple of them, or None)"
        )


def _as_state(model_or_state: Any) -> Any:
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state)
    return model_or_state


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
    """Activate `mesh` and the logical rules for activation constraints traced inside."""
    token = _active_rules.set(normalize_rules(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _active_rules.reset(token)


def active_rules() -> dict[str, tuple[str, ...]] | None:
    """The logical rules of the enclosing `use_mesh` (None outside one)."""
    return _active_rules.get()


def context_size() -> int:
    """Devices of the active mesh's 'context' axis (1 outside `use_mesh` or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if _active_rules.get() is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(CONTEXT_AXIS, 1)


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec of an array of `shape` with logical axes `names` under the active mesh
    and rules; None outside `use_mesh`."""
    table = _active_rules.get()
    mesh = jax.sharding.get_abstract_mesh()
    if table is None or mesh.empty:
        return None
    return logical_to_spec(names, table, shape, mesh)


def active_mesh_axes(name: str) -> dict[str, int]:
    """{mesh axis: size} of the active mesh's axes (size > 1) that logical axis `name` maps to
    under the active rules, whatever the array's shape; empty outside `use_mesh`."""
    table = _active_rules.get()
    mesh = jax.sharding.get_abstract_mesh()
    if table is None or mesh.empty:
        return {}
    return {a: mesh.shape[a] for a in table.get(name, ()) if mesh.shape.get(a, 1) > 1}


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `use_mesh`."""
    spec = active_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def create_sharded(
    init_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules
) -> nnx.Module:
    """Build a model directly in its sharded layout: no host ever holds the full parameters.

    `jax.eval_shape` of the init gives the shapes; the logical rules give the shardings; the init
    then runs under `jax.jit` with those output shardings.
    """
    abstract = nnx.eval_shape(init_fn)
    check_rules(abstract, rules)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init() -> Any:
        return nnx.split(init_fn())[1]

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
