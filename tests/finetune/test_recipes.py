"""Each recipe's tiny variant, end to end on a slice of its real data: training, evaluation
every k steps and at the end, the best model, predictions and confusion matrix; and the
`transformer.evaluate` command on the kept model."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.finetune.conftest import REPO, slice_config
from transformer import evaluate
from transformer.train import run

RECIPES = {  # recipe: (variant, data slice, eval examples, best metric, predictions file)
    # (SQuAD counts questions; its evaluated rows are windows, several per question.)
    "glue": ("sst2,ci", "sst2", 19, "eval_accuracy", "predictions.jsonl"),
    "text_classification": ("ci", "sst2", 19, "eval_accuracy", "predictions.jsonl"),
    "ner": ("ci", "wnut17", 13, "eval_entity_f1", "predictions.jsonl"),
    "squad": ("ci", "squad", 10, "eval_f1", "predictions.json"),
    "relation": ("ci", "semeval", 13, "eval_macro_f1", "predictions.jsonl"),
}


@pytest.fixture(scope="module")
def runs(slices, cache_dir, tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            variant, data, *_ = RECIPES[name]
            workdir = tmp_path_factory.mktemp(name)
            config = slice_config(name, variant, slices[data], cache_dir)
            done[name] = (config, workdir, run.run(config, str(workdir)))
        return done[name]

    return get


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_tiny_variant_end_to_end(runs, name):
    _, _, examples, metric, predictions = RECIPES[name]
    config, workdir, result = runs(name)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if metric in r and "loss" not in r]  # The eval lines.
    assert [r["step"] for r in evals] == [3, 6]  # Every eval_every steps and at the end.
    counted = "eval_questions" if name == "squad" else "eval_examples"
    assert all(r[counted] == examples for r in evals)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    # Rates count real tokens; packing leaves less padding, and compiles few shapes.
    timed = [r for r in rows if "tokens_per_s" in r]
    assert timed and all(0 < r["tokens_per_s"] <= r["slot_tokens_per_s"] for r in timed)
    shapes = [r["compiled_shapes"] for r in rows if "compiled_shapes" in r]
    assert 1 <= shapes[-1] <= (1 if name == "squad" else 8)
    record = json.loads((workdir / "best" / "best.json").read_text())
    assert record["metric"] == metric
    assert record["value"] == max(r[metric] for r in evals)
    assert record["step"] == next(r["step"] for r in evals if r[metric] == record["value"])
    out = (workdir / "eval" / predictions).read_text()
    count = len(json.loads(out)) if predictions.endswith(".json") else len(out.splitlines())
    assert count == examples  # Every example of the split predicted once.
    if name != "squad":
        assert (workdir / "eval" / "confusion_matrix.csv").is_file()
        assert (workdir / "best" / "confusion_matrix.csv").is_file()
    assert (workdir / "model" / "head_config.json").is_file()


def test_evaluate_command_reproduces_the_best_metric(runs, slices, cache_dir):
    config, workdir, _ = runs("glue")
    overrides = [f"--config.data.local_files.{k}={v}" for k, v in slices["sst2"].items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "transformer.evaluate", "--config=configs/glue.py:sst2,ci",
         f"--checkpoint={workdir / 'best'}", f"--config.data.cache_dir={cache_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    record = json.loads((workdir / "best" / "best.json").read_text())
    assert metrics["eval_accuracy"] == pytest.approx(record["value"])
    assert metrics["eval_examples"] == 19
    assert (workdir / "best" / "eval_validation" / "predictions.jsonl").is_file()

    # The same checkpoint with int8 weights: every example again, nearly the float probabilities.
    quantized = evaluate.evaluate_checkpoint(config, workdir / "best", output=workdir / "int8",
                                             quantize="int8")
    assert quantized["eval_examples"] == 19
    read = lambda d: [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    floats, int8 = read(workdir / "best" / "eval_validation"), read(workdir / "int8")
    assert [r["index"] for r in int8] == [r["index"] for r in floats]
    assert int8 != floats  # The weights really changed.
    # Where the prediction agrees, its probability moves by little; a flip needs a near-tie.
    for f, q in zip(floats, int8):
        p = q["probability"] if q["prediction"] == f["prediction"] else 1 - q["probability"]
        assert abs(p - f["probability"]) < 0.02, (f, q)
