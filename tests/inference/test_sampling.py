"""Top-k and top-p masks on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.inference.sampling import NEG_INF, SamplingConfig, sample, top_k_mask, top_p_mask

# Probabilities 0.05, 0.5, 0.15, 0.3 at ids 0..3 (not in sorted order, so the un-sorting is tested).
PROBS = np.array([0.05, 0.5, 0.15, 0.3])
LOGITS = jnp.log(jnp.asarray([PROBS, PROBS[::-1]]))


@pytest.mark.parametrize("p, kept", [(0.5, {1}), (0.8, {1, 3}), (0.81, {1, 2, 3}), (0.96, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus(p, kept):
    masked = np.asarray(top_p_mask(LOGITS, p))
    assert set(np.flatnonzero(masked[0] > NEG_INF / 2)) == kept
    assert set(np.flatnonzero(masked[1] > NEG_INF / 2)) == {3 - i for i in kept}
    np.testing.assert_array_equal(masked[0][list(kept)], np.asarray(LOGITS[0])[list(kept)])


def test_top_k_keeps_the_k_largest():
    masked = np.asarray(top_k_mask(LOGITS, 2))
    assert set(np.flatnonzero(masked[0] > NEG_INF / 2)) == {1, 3}


def test_samples_come_from_the_nucleus_only():
    config = SamplingConfig(temperature=1.0, top_p=0.8)
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample(LOGITS[:1], k, config))(keys))[:, 0]
    assert set(draws) == {1, 3}
    # Renormalized nucleus: 0.5 / 0.8 and 0.3 / 0.8.
    assert abs(np.mean(draws == 1) - 0.625) < 0.08


def test_greedy_is_argmax():
    assert np.asarray(sample(LOGITS, jax.random.key(0), SamplingConfig())).tolist() == [1, 2]


def test_bad_sampling_settings_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        SamplingConfig(max_new_tokens=0)
