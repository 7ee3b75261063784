"""Evaluate a fine-tuned checkpoint on a split: prints the metrics and writes them, with the
predictions file (and the confusion matrix for classification tasks), to --output.

    python -m transformer.evaluate --config=configs/glue.py:sst2 --checkpoint=/tmp/sst2/best \
        [--split=validation] [--output=DIR] [--quantize=int8|int4] \
        [--config.data.local_files.validation=other.tsv]

--checkpoint is a directory the trainer wrote (WORKDIR/best or WORKDIR/model): our model
checkpoint format plus head_config.json. Its architecture and head come from it; the recipe gives
the task, the data and the mesh. --output defaults to <checkpoint>/eval_<split>. --quantize
evaluates the model with weight-only quantized weights (`transformer.quantize`), to measure what
quantization costs on the task.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from transformer import cli  # noqa: E402
from transformer.locations import enable_compilation_cache  # noqa: E402


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    checkpoint: str | os.PathLike,
    split: str = "",
    output: str | os.PathLike = "",
    quantize: str | None = None,
) -> dict[str, float]:
    """The task metrics of a fine-tuned checkpoint on `split` (each example counted once), with
    its weights quantized (`quantize`: 'int8' or 'int4') or as trained."""
    from transformer import model_io, sharding
    from transformer import quantize as quantization
    from transformer.models import ModelConfig
    from transformer.models.heads import HeadConfig, TaskModel
    from transformer.train import best, objectives, trainer
    from transformer.train import state as train_state

    if quantize is not None:
        quantization.check_mode(quantize)  # Before anything is loaded.
    path = pathlib.Path(checkpoint).expanduser().resolve()
    head_file = path / best.HEAD_FILE
    if not head_file.is_file():
        raise FileNotFoundError(f"{path} has no {best.HEAD_FILE}: not a fine-tuned checkpoint "
                                "(pass WORKDIR/best or WORKDIR/model of a fine-tuning run)")
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = str(path)  # Architecture and tokenizer from the checkpoint.
    config = trainer.resolve_config(config)
    head = HeadConfig(**json.loads(head_file.read_text()))
    task = objectives.task_of(config)
    if head.kind != task.kind or (task.kind != "qa" and head.num_labels != task.num_labels):
        raise ValueError(f"{path} holds a {head.kind!r} head with {head.num_labels} labels; the "
                         f"recipe's task {task.name!r} is {task.kind!r} with {task.num_labels}")
    objective = objectives.get_objective(config.objective)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    rules = [tuple(r) for r in config.logical_axis_rules]
    mesh = sharding.make_mesh(config.mesh.to_dict())
    trainer.check_batch(config, mesh)
    tokenizer = trainer.get_tokenizer(config)

    def build(rngs: nnx.Rngs) -> Any:
        return TaskModel(model_config, head, rngs=rngs)

    abstract = train_state.abstract_model(model_config, build)
    params_sharding = train_state.param_shardings(model_config, mesh, rules, build)
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    params = model_io.load_params(path, shapes, params_sharding)
    graphdef = nnx.graphdef(abstract)
    if quantize is not None:
        graphdef, params = nnx.split(quantization.quantize(nnx.merge(graphdef, params), quantize))
        params_sharding = jax.tree.map(lambda x: x.sharding, params)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
        objective.batch_axes, rules, (config.data.global_batch_size,), mesh))
    split = split or config.data.eval_split
    out_dir = pathlib.Path(output) if output else path / f"eval_{split}"
    evaluator = objective.evaluator(config, tokenizer, graphdef, params_sharding,
                                    batch_sharding, split=split, out_dir=out_dir)
    with sharding.use_mesh(mesh, rules):
        return evaluator(params, 0)


def main(argv: list[str]) -> None:
    del argv
    enable_compilation_cache()
    f = flags.FLAGS
    results = evaluate_checkpoint(f.config, f.checkpoint, f.split, f.output, f.quantize)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    # Defined here, not on import, so that Python code can import evaluate_checkpoint beside the
    # other command lines (each defines --config).
    config_flags.DEFINE_config_file("config", None, "The recipe the model was trained with.")
    flags.DEFINE_string("checkpoint", None, "WORKDIR/best, WORKDIR/model, or a copy.")
    flags.DEFINE_string("split", "", "Split to evaluate (default: data.eval_split).")
    flags.DEFINE_string("output", "", "Where to write (default: <checkpoint>/eval_<split>).")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                      "weight-only quantization of the model (transformer.quantize)")
    flags.mark_flags_as_required(["config", "checkpoint"])
    cli.run(main)
