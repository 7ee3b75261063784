"""Meshes and logical-axis rules: sharded forward == one device, and parameters sharded as ruled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from transformer import sharding
from transformer.models import build_model, get_preset

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, mlp_dim=128,
            max_length=32, dropout_rate=0.0, attention_dropout_rate=0.0)
FAMILIES = {
    "bert": get_preset("bert-tiny", **TINY),
    "gpt2": get_preset("gpt2-tiny", **TINY),
    "llama": get_preset("llama-tiny", **TINY, num_kv_heads=2),
}
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]


def forward(model, ids, mask):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        out = nnx.merge(graphdef, state)(ids, mask)
        return out.last_hidden_state, out.logits

    return run(state, ids, mask)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 128, (8, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None] < rng.integers(8, 17, (8, 1)), jnp.int32)
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_forward_equals_single_device(family, batch):
    config = FAMILIES[family]
    ids, mask = batch
    expected = forward(build_model(config, seed=0), ids, mask)
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        model = sharding.create_sharded(lambda: build_model(config, seed=0), mesh,
                                        sharding.DEFAULT_RULES)
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            hidden, logits = forward(model, ids, mask)
        np.testing.assert_allclose(hidden, expected[0], atol=2e-5, err_msg=f"mesh {shape}")
        np.testing.assert_allclose(logits, expected[1], atol=2e-5, err_msg=f"mesh {shape}")
        check_parameter_shardings(model, mesh)


def check_parameter_shardings(model, mesh):
    """Every parameter is laid out as its logical axes and the rules say (not only the values)."""
    table = sharding.normalize_rules(sharding.DEFAULT_RULES)
    sharded_any = False
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = variable[...]
        names = sharding.variable_axes(variable)
        expected = []
        for dim, name in enumerate(names):
            axes = tuple(a for a in (table[name] if name else ()) if mesh.shape.get(a, 1) > 1)
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if not axes or array.shape[dim] % size or any(a in sum(expected, ()) for a in axes):
                axes = ()
            expected.append(axes)
        spec = P(*[None if not a else a[0] if len(a) == 1 else a for a in expected])
        assert array.sharding.spec == spec, f"{path}: {array.sharding.spec} != {spec}"
        assert array.sharding.mesh.shape == mesh.shape
        # Each device holds exactly its shard.
        shard_shape = array.sharding.shard_shape(array.shape)
        assert all(s.data.shape == shard_shape for s in array.addressable_shards)
        sharded_any |= shard_shape != array.shape
    # Pure data parallelism replicates parameters; fsdp or tensor parallelism must shard some.
    assert sharded_any == (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1)


def test_layout_of_key_parameters_on_a_2x2x2_mesh():
    mesh = sharding.make_mesh((2, 2, 2))
    config = FAMILIES["llama"]
    model = sharding.create_sharded(lambda: build_model(config), mesh, sharding.DEFAULT_RULES)
    blocks = model.layers.blocks
    assert blocks.attention.query[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks.attention.key[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert blocks.mlp.wi[...].sharding.spec == P(None, "fsdp", "tensor")
    assert blocks.mlp.wo[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.embeddings.tokens[...].sharding.spec == P("tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
    # Two key/value heads do not divide over 8 tensor devices: replicated on that axis instead.
    mesh8 = sharding.make_mesh((1, 1, 8))
    model8 = sharding.create_sharded(lambda: build_model(config), mesh8, sharding.DEFAULT_RULES)
    assert model8.layers.blocks.attention.key[...].sharding.spec == P(None, None, None, None)
    assert model8.layers.blocks.attention.query[...].sharding.spec == P(None, None, "tensor", None)


def test_changing_the_rules_changes_the_layout_not_the_model():
    mesh = sharding.make_mesh((1, 8, 1))
    rules = [("embed", None), ("mlp", "fsdp"), *sharding.DEFAULT_RULES]
    model = sharding.create_sharded(lambda: build_model(FAMILIES["gpt2"]), mesh, rules)
    assert model.layers.blocks.mlp.wi[...].sharding.spec == P(None, None, "fsdp")
    assert model.embeddings.tokens[...].sharding.spec == P(None, None)


def test_missing_rule_fails_naming_the_axis():
    rules = [r for r in sharding.DEFAULT_RULES if r[0] != "mlp"]
    with pytest.raises(ValueError, match=r"logical axes \['mlp'\] have no sharding rule"):
        sharding.create_sharded(lambda: build_model(FAMILIES["gpt2"]), sharding.make_mesh((8, 1, 1)),
                                rules)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.normalize_rules([("embed", "model")])


def test_make_mesh_sizes_and_errors():
    assert dict(sharding.make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh({"tensor": 2, "data": -1}).shape) == {
        "data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        sharding.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})


def test_constrain_is_a_no_op_outside_a_mesh():
    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x
