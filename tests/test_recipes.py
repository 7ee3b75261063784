"""Every recipe variant builds a valid config; the masked-LM recipe trains end to end."""

import importlib.util
import json
import pathlib

import pytest

from tests.train.test_main import assert_ok, main
from transformer.models import ModelConfig, count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
    "demo": [""],
    "bert_pretrain": ["tiny", "base", "large"],
    "gpt2_pretrain": ["tiny", "small", "medium", "large", "xl"],
    "llama_pretrain": ["tiny", "1b", "7b"],
    "moe_pretrain": ["tiny", "8x7b"],
    "long_context": ["tiny", "32k", "128k"],
    "sft": ["squad", "ci"],
}


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe, variant", [(r, v) for r, vs in VARIANTS.items() for v in vs])
def test_recipe_variants_build_valid_configs(recipe, variant):
    module = load(recipe)
    assert "python -m transformer.main --config=configs/" in module.__doc__
    config = module.get_config(variant) if variant else module.get_config()
    model = ModelConfig.from_dict(config.model.to_dict())
    assert config.data.max_length <= model.max_length or model.position != "learned"
    assert config.data.objective == ("mlm" if recipe.startswith("bert") else "causal")
    if variant in ("base", "small", "7b"):
        published = {"base": 110e6, "small": 124e6, "7b": 6.74e9}[variant]
        assert abs(count_params(model) - published) / published < 0.01


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown variant 'huge'; choose one of \['1b', '7b'"):
        load("llama_pretrain").get_config("huge")


def test_masked_lm_recipe_trains_end_to_end(tmp_path):
    workdir = tmp_path / "bert"
    result = main(["--config=configs/bert_pretrain.py:tiny", f"--workdir={workdir}",
                   "--config.num_train_steps=6", "--config.eval_every=6", "--config.eval_steps=2",
                   "--config.log_every=2", "--config.model.num_layers=1"])
    assert_ok(result)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # Masked LM: only ~15% of the tokens carry a weight.
    assert all(0.1 < r["tokens"] / (16 * 128) < 0.2 for r in train)
    assert "eval_accuracy" in rows[-1] and (workdir / "model" / "model_config.json").exists()
