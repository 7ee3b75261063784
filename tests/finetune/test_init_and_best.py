"""`init_from` loads the backbone and leaves the head fresh; the best-checkpoint rule."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from transformer import model_io
from transformer.models import Encoder, ModelConfig, get_preset
from transformer.models.heads import HeadConfig, TaskModel
from transformer.train import best, objectives, optimizer, trainer
from transformer.train import state as train_state
from transformer.train.config import finetune_config

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=32)


def test_init_from_loads_the_backbone_and_keeps_a_fresh_head(tmp_path):
    pretrained = Encoder(get_preset("bert-tiny", **TINY), rngs=nnx.Rngs(7))
    model_io.save_model(tmp_path / "pretrained", pretrained)
    config = finetune_config("classification", "sst2", preset="bert-base")
    config.init_from = str(tmp_path / "pretrained")
    config.model.dropout_rate = 0.0  # A runtime field: the recipe's value is kept.
    config = trainer.resolve_config(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    # The architecture comes from the checkpoint, not from the recipe's bert-base.
    assert (model_config.hidden_size, model_config.num_layers) == (32, 2)
    assert model_config.dropout_rate == 0.0
    objective = objectives.get_objective(config.objective)
    build = objective.builder(model_config, config)
    tx, _ = optimizer.make_optimizer(config)
    init_fn = train_state.make_init_fn(model_config, tx, config.seed, build)
    state = init_fn()
    params = trainer.load_pretrained_params(config.init_from, state.params,
                                            jax.eval_shape(init_fn).params, None)
    saved = model_io.flat_params(nnx.state(pretrained, nnx.Param))
    loaded = model_io.flat_params(params["backbone"])
    fresh = model_io.flat_params(state.params["backbone"])
    assert saved.keys() == loaded.keys()
    for name in saved:
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(saved[name]))
    assert any(not np.array_equal(fresh[n], saved[n]) for n in saved if n.endswith("query"))
    # The head is the fresh initialization (random kernel, zero bias), not anything loaded.
    np.testing.assert_array_equal(params["head"]["kernel"], state.params["head"]["kernel"])
    assert params["head"]["kernel"].shape == (32, 2) and np.std(params["head"]["kernel"]) > 0.01
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(2))
    # The optimizer is fresh: no step taken, zero moments.
    assert int(optimizer.applied_steps(state.opt_state)) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state)
               if np.asarray(x).dtype == np.float32)


def tiny_task_model(seed):
    return TaskModel(get_preset("bert-tiny", **TINY), HeadConfig("classification", 2),
                     rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("mode, values, best_step", [("max", [0.5, 0.8, 0.7, 0.8], 2),
                                                     ("min", [0.9, 0.4, 0.6, 0.4], 2)])
def test_the_kept_model_is_the_one_with_the_best_metric(tmp_path, mode, values, best_step):
    export = best.BestExport(tmp_path / "best", "eval_metric", mode)
    models = {}
    for step, value in enumerate(values, start=1):
        model = tiny_task_model(step)
        models[step] = model
        export.update(step, {"eval_metric": value}, *nnx.split(model))
        if step == 2:  # A resumed run reads the record and keeps comparing against it.
            export = best.BestExport(tmp_path / "best", "eval_metric", mode)
    record = json.loads((tmp_path / "best" / best.BEST_FILE).read_text())
    assert record["step"] == best_step and record["value"] == values[best_step - 1]
    kept = model_io.flat_params(model_io.load_params(
        tmp_path / "best", nnx.to_pure_dict(nnx.state(models[1], nnx.Param))))
    expected = model_io.flat_params(nnx.state(models[best_step], nnx.Param))
    for name in expected:
        np.testing.assert_array_equal(np.asarray(kept[name]), np.asarray(expected[name]))
    head = json.loads((tmp_path / "best" / best.HEAD_FILE).read_text())
    assert head["kind"] == "classification" and head["num_labels"] == 2
    with pytest.raises(KeyError, match="'eval_metric' is not among the evaluation metrics"):
        export.update(9, {"eval_other": 1.0}, None, None)
