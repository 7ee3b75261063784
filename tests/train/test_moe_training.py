"""MoE training: expert-parallel meshes (expert 4 × fsdp 2, expert 8; the partitioner's dispatch
or the explicit all-to-all) equal one device after a few AdamW steps, the experts really are split
over 'expert', and the router losses enter the loss with their config weights."""

import jax
import numpy as np
import pytest

from tests.train.test_steps import make_batches, one_device_mesh, tiny_config
from tests.train.test_steps import train as train_steps
from transformer import sharding

MOE = dict(num_kv_heads=2, num_experts=8, num_experts_per_token=2, moe_mlp_dim=32,
           router_aux_loss_weight=0.02, router_z_loss_weight=0.001)
STEPS = 3


def moe_config(**changes):
    config = tiny_config("mixtral-tiny")
    config.model.update({**MOE, **changes})
    return config


def train(config, mesh, batches):
    """(state, losses, the last step's metrics)."""
    metrics = []
    state, losses = train_steps(config, mesh, batches, metrics)
    return state, losses, metrics[-1] if metrics else {}


@pytest.fixture(scope="module")
def reference_run():
    return train(moe_config(), one_device_mesh(), make_batches(1) * STEPS)


# Tokens reach the experts through the partitioner or the explicit all-to-all (in shard_map,
# inside the layer scan, with full remat); tests/models/test_expert_parallel.py compares the
# partitioner on expert 8 layer by layer.
@pytest.mark.parametrize("shape, changes", [
    (dict(data=1, fsdp=2, expert=4, tensor=1), dict()),
    (dict(data=1, fsdp=2, expert=4, tensor=1), dict(moe_dispatch="all_to_all")),
    (dict(data=1, fsdp=1, expert=8, tensor=1), dict(moe_dispatch="all_to_all",
                                                     remat_policy="full"))],
    ids=["expert4_fsdp2-partitioner", "expert4_fsdp2-all_to_all", "expert8-all_to_all-remat"])
def test_expert_parallel_training_equals_one_device(reference_run, shape, changes):
    state, losses, metrics = train(moe_config(**changes), sharding.make_mesh(shape),
                                   make_batches(1) * STEPS)
    ref_state, ref_losses, _ = reference_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0] and float(metrics["moe_dropped_fraction"]) == 0  # Dropless.
    # Adam divides by √v: on near-zero gradients it magnifies summation-order noise to ~1e-6.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    wi = state.params["layers"]["blocks"]["mlp"]["wi"]
    assert wi.sharding.spec[1] == "expert"  # [layers, experts, embed, mlp]
    assert wi.addressable_shards[0].data.shape[1] == 8 // shape["expert"]


def test_router_losses_enter_the_loss_with_their_weights(reference_run):
    m = {k: float(v) for k, v in reference_run[2].items()}
    expected = m["nll"] + 0.02 * m["router_aux_loss"] + 0.001 * m["router_z_loss"]
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
    assert m["router_aux_loss"] >= 2.0 - 1e-3  # top_k is the minimum (a balanced router).
    loads = [m[f"expert_load/{e}"] for e in range(8)]
    np.testing.assert_allclose(np.mean(loads), 1.0, rtol=1e-6)
    assert m["expert_load_max"] == max(loads) and m["expert_load_min"] == min(loads)


def test_expert_axis_that_does_not_divide_the_experts():
    with pytest.raises(ValueError, match="6 experts do not split over the 4 devices"):
        train(moe_config(num_experts=6), sharding.make_mesh(
            dict(data=1, fsdp=2, expert=4, tensor=1)), [])
