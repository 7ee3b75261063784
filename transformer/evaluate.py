"""Evaluate a fine-tuned checkpoint on a split: prints the metrics and writes them, with the
predictions file (and the confusion matrix for classification tasks), to --output.

    python -m transformer.evaluate --config=configs/glue.py:sst2 --checkpoint=/tmp/sst2/best \
        [--split=validation] [--output=DIR] [--quantize=int8|int4] \
        [--config.data.local_files.validation=other.tsv]
    python -m transformer.evaluate --config=configs/summarization.py --checkpoint=/tmp/debian/best \
        [--split=test] [--num_beams=4] [--quantize=int8]

--checkpoint is a directory the trainer wrote (WORKDIR/best or WORKDIR/model): our model
checkpoint format, plus head_config.json for a task model. Its architecture (and head) come from
it; the recipe gives the task, the data and the mesh. A seq2seq recipe (objective 'seq2seq':
translation, summarization) generates every example of the split once, greedily or with
--num_beams > 1 beam search, writes predictions.jsonl (each prediction with its references) and
metrics.json, and scores them with `seq2seq.metrics` (sacreBLEU BLEU and chrF, rouge-score
ROUGE-1/2/L/Lsum; `--config.seq2seq.metrics=bleu,chrf,rouge` for all). --output defaults to
<checkpoint>/eval_<split>. --quantize evaluates the model with weight-only quantized weights
(`transformer.quantize`), to measure what quantization costs on the task.
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
    num_beams: int = 0,
) -> dict[str, float]:
    """The task metrics of a fine-tuned checkpoint on `split` (each example counted once), with
    its weights quantized (`quantize`: 'int8' or 'int4') or as trained. A seq2seq checkpoint is
    scored on its generations: greedy, or beam search with `num_beams` > 1 (0 = the recipe's
    `seq2seq.num_beams`)."""
    from transformer import model_io
    from transformer import quantize as quantization
    from transformer.models import MODELS, ModelConfig
    from transformer.models.heads import HeadConfig, TaskModel
    from transformer.train import best, objectives, trainer

    if quantize is not None:
        quantization.check_mode(quantize)  # Before anything is loaded.
    path = pathlib.Path(checkpoint).expanduser().resolve()
    config = ml_collections.ConfigDict(config.to_dict())
    generates = config.objective == "seq2seq"
    if num_beams:
        if not generates:
            raise ValueError(f"--num_beams={num_beams} applies to seq2seq recipes (objective "
                             f"'seq2seq'); this recipe's objective is {config.objective!r}")
        if num_beams < 1:
            raise ValueError(f"--num_beams={num_beams} must be at least 1 (1 = greedy)")
        config.seq2seq.num_beams = num_beams
    head_file = path / best.HEAD_FILE
    if not generates and not head_file.is_file():
        raise FileNotFoundError(f"{path} has no {best.HEAD_FILE}: not a fine-tuned checkpoint "
                                "(pass WORKDIR/best or WORKDIR/model of a fine-tuning run)")
    if not (path / model_io.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no model checkpoint (model_config.json): pass "
                                "WORKDIR/best or WORKDIR/model of a training run")
    config.init_from = str(path)  # Architecture and tokenizer from the checkpoint.
    config = trainer.resolve_config(config)
    model_config = ModelConfig.from_dict(config.model.to_dict())
    if generates:
        if model_config.architecture != "encoder_decoder":
            raise ValueError(f"{path} holds an {model_config.architecture}; the seq2seq recipe "
                             "evaluates encoder-decoders (T5, BART)")

        def build(rngs: nnx.Rngs) -> Any:
            return MODELS["encoder_decoder"](model_config, rngs=rngs)
    else:
        head = HeadConfig(**json.loads(head_file.read_text()))
        task = objectives.task_of(config)
        if head.kind != task.kind or (task.kind != "qa" and head.num_labels != task.num_labels):
            raise ValueError(f"{path} holds a {head.kind!r} head with {head.num_labels} labels; "
                             f"the recipe's task {task.name!r} is {task.kind!r} with "
                             f"{task.num_labels}")

        def build(rngs: nnx.Rngs) -> Any:
            return TaskModel(model_config, head, rngs=rngs)

    split = split or config.data.eval_split
    out_dir = pathlib.Path(output) if output else path / f"eval_{split}"
    return _run_evaluator(config, path, model_config, build, quantize, split, out_dir)


def _run_evaluator(config: ml_collections.ConfigDict, path: pathlib.Path, model_config: Any,
                   build: Any, quantize: str | None, split: str,
                   out_dir: pathlib.Path) -> dict[str, float]:
    """Loads the checkpoint's parameters into their shardings (quantized if asked) and runs the
    objective's evaluator on `split` once."""
    from transformer import model_io, sharding
    from transformer import quantize as quantization
    from transformer.train import objectives, trainer
    from transformer.train import state as train_state

    objective = objectives.get_objective(config.objective)
    rules = [tuple(r) for r in config.logical_axis_rules]
    mesh = sharding.make_mesh(config.mesh.to_dict())
    trainer.check_batch(config, mesh)
    tokenizer = trainer.get_tokenizer(config)
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
    evaluator = objective.evaluator(config, tokenizer, graphdef, params_sharding,
                                    batch_sharding, split=split, out_dir=out_dir)
    with sharding.use_mesh(mesh, rules):
        return evaluator(params, 0)


def main(argv: list[str]) -> None:
    del argv
    enable_compilation_cache()
    f = flags.FLAGS
    results = evaluate_checkpoint(f.config, f.checkpoint, f.split, f.output, f.quantize,
                                  f.num_beams)
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
    flags.DEFINE_integer("num_beams", 0, "seq2seq recipes: 1 = greedy, more = beam search "
                         "(default: the recipe's seq2seq.num_beams)")
    flags.mark_flags_as_required(["config", "checkpoint"])
    cli.run(main)
