"""T5's initialization from scratch (initializer='t5'): every weight's std is T5's formula per
weight kind, and equals the std transformers' own T5PreTrainedModel._init_weights draws for the
same tensor (exported under its Hugging Face name), for T5 v1.0 and v1.1.

The checks are statistical but tight: a sample variance s² of n normal draws has relative
standard deviation sqrt(2/n), so |s²/σ² - 1| ≤ 5·sqrt(2/n) holds for every seed in practice,
while a wrong rule (0.02 instead of d^-1/2, d instead of d·d_kv) is off by far more."""

import math

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from transformer.hf import exporter, families
from transformer.models import MODELS, get_preset

FACTOR = 0.5  # Not 1, so that the factor is seen to scale every std.
SHAPE = dict(vocab_size=128, hidden_size=128, num_heads=8, head_dim=16, num_layers=2,
             num_decoder_layers=2, relative_buckets=64, relative_max_distance=128,
             initializer_factor=FACTOR, dropout_rate=0.0)
CONFIGS = {"t5-v1.0": get_preset("t5-tiny", mlp_dim=256, **SHAPE),
           "t5-v1.1": get_preset("t5-v1_1-tiny", mlp_dim=192, **SHAPE)}


def expected_std(name, c):
    """T5's rule, written out from modeling_t5.py: the reference the model is checked against."""
    d, inner = c.hidden_size, c.num_heads * c.dim_per_head
    return FACTOR * {"tokens": 1.0, "lm_head": 1.0, "relative_bias": d ** -0.5,
                     "query": (d * c.dim_per_head) ** -0.5, "key": d ** -0.5,
                     "value": d ** -0.5, "out": inner ** -0.5, "wi": d ** -0.5,
                     "wi_gate": d ** -0.5, "wo": c.mlp_dim ** -0.5}[name]


def assert_normal(values, std, what):
    values = np.asarray(values, np.float64).ravel()
    n = values.size
    ratio = values.var() / std ** 2
    assert abs(ratio - 1) <= 5 * math.sqrt(2 / n), f"{what}: variance ratio {ratio:.4f} (n={n})"
    assert abs(values.mean()) <= 5 * std / math.sqrt(n), f"{what}: mean {values.mean():.3g}"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    config = CONFIGS[request.param]
    ours = MODELS["encoder_decoder"](config, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    hf_config = transformers.T5Config(**families.T5.config_to_hf(config))
    theirs = transformers.T5ForConditionalGeneration(hf_config)
    return config, ours, theirs


def test_each_weight_has_t5s_std(models):
    config, ours, _ = models
    kinds = set()
    for path, variable in nnx.iter_graph(ours):
        if not isinstance(variable, nnx.Param):
            continue
        name, value = str(path[-1]), np.asarray(variable[...])
        if name == "scale":  # RMSNorm scales: the constant factor, as T5LayerNorm's.
            np.testing.assert_array_equal(value, FACTOR)
        else:
            assert_normal(value, expected_std(name, config), ".".join(map(str, path)))
        kinds.add(name)
    gated = {"wi_gate"} if config.gated_mlp else set()
    head = set() if config.tie_embeddings else {"lm_head"}
    assert kinds == {"scale", "tokens", "relative_bias", "query", "key", "value", "out", "wi",
                     "wo"} | gated | head


def test_stds_equal_transformers_init_tensor_by_tensor(models):
    config, ours, theirs = models
    _, exported = exporter.hf_tensors(ours)
    reference = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    compared = 0
    for name, value in exported.items():
        hf = reference[name]
        assert hf.shape == value.shape, name
        if name.endswith("layer_norm.weight"):
            np.testing.assert_array_equal(value, hf)
            continue
        # Both are samples: the ratio of their variances has relative std sqrt(2/n + 2/n).
        ratio = value.var(dtype=np.float64) / hf.var(dtype=np.float64)
        assert abs(ratio - 1) <= 5 * math.sqrt(4 / value.size), f"{name}: ratio {ratio:.4f}"
        compared += 1
    assert compared >= 2 + 2 * 4 + 2 * 4 + 2 * 4 + 2 * 2  # Embeddings, biases, q/k/v/o, MLPs.


def test_normal_initializer_unchanged_and_t5_rule_refused_elsewhere():
    plain = MODELS["encoder_decoder"](CONFIGS["t5-v1.0"].replace(initializer="normal"),
                                      rngs=nnx.Rngs(0))
    assert_normal(plain.encoder.layers.blocks.attention.query[...], 0.02, "normal init")
    with pytest.raises(ValueError, match="initializer='t5' initializes T5 models"):
        get_preset("bart-tiny", initializer="t5")
    with pytest.raises(ValueError, match="initializer=.xavier. is not one of"):
        get_preset("t5-tiny", initializer="xavier")
