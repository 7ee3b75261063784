"""Import straight into a sharded layout on 8 simulated devices, mesh (2, 2, 2)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.hf.tiny_models import random_ids
from transformer import model_io
from transformer.hf import load_hf_model
from transformer.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, use_mesh, variable_axes


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh((2, 2, 2))


def expected_sharding(variable, mesh):
    spec = logical_to_spec(variable_axes(variable), DEFAULT_RULES, variable.shape, mesh)
    return NamedSharding(mesh, spec)


@pytest.mark.parametrize("name", ["llama_untied", "bert_mlm", "gpt2"])
def test_sharded_import_equals_unsharded(tiny, mesh, name):
    folder, _ = tiny(name)
    plain = load_hf_model(folder)
    sharded = load_hf_model(folder, mesh=mesh, rules=DEFAULT_RULES)
    plain_params = model_io.flat_params(nnx.state(plain, nnx.Param))
    some_split = False
    for path, variable in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        key = ".".join(str(p) for p in path)
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected_sharding(variable, mesh), value.ndim), key
        some_split |= not value.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_params[key]), err_msg=key)
    assert some_split  # The rules did shard something (e.g. 'embed' over fsdp, heads over tensor).
    ids = random_ids(4, 8)
    with use_mesh(mesh, DEFAULT_RULES):
        sharded_out = jax.jit(lambda m, x: m(x).logits)(sharded, ids)
    np.testing.assert_allclose(sharded_out, plain(ids).logits, atol=1e-5)


def test_query_weight_is_split_over_heads_and_embed(tiny, mesh):
    model = load_hf_model(tiny("llama_untied")[0], mesh=mesh)
    query = model.layers.blocks.attention.query[...]  # [layers, embed, heads, head_dim]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    shard = query.addressable_shards[0]
    assert shard.data.shape == (2, 16, 2, 8)


def test_load_model_restores_into_the_sharded_layout(tiny, mesh, tmp_path):
    plain = load_hf_model(tiny("llama_untied")[0])
    model_io.save_model(tmp_path / "ckpt", plain)
    sharded = model_io.load_model(tmp_path / "ckpt", mesh, DEFAULT_RULES)
    for path, variable in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected_sharding(variable, mesh), value.ndim), path
    np.testing.assert_array_equal(sharded.lm_head[...], plain.lm_head[...])


def test_from_pretrained_with_mesh_and_compute_dtype(tiny, mesh):
    import jax.numpy as jnp

    from transformer.pretrained import from_pretrained

    tokenizer, model = from_pretrained(tiny("gpt2")[0], mesh=mesh, dtype="bfloat16")
    assert tokenizer is None  # The tiny folder has no tokenizer files.
    assert model.config.dtype == "bfloat16"
    assert model.embeddings.tokens[...].dtype == jnp.float32  # Parameters stay float32.
    assert not model.layers.blocks.mlp.wi[...].is_fully_replicated
    with use_mesh(mesh, DEFAULT_RULES):
        out = jax.jit(lambda m, x: m(x))(model, random_ids(4, 8))
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.logits.dtype == jnp.float32
