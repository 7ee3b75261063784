"""Evaluation covers every example exactly once (padded last batch, several processes), and bad
input fails or is counted with a message that names the place."""

import json

import numpy as np
import pytest

from tests.finetune.conftest import slice_config
from transformer.data import pipeline, sources
from transformer.data.tokenizer import load_tokenizer
from transformer.train import task_eval


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def evaluator(config, tokenizer, tmp_path=None):
    return task_eval.TaskEvaluator(config, tokenizer, None, None, None,
                                   split=config.data.eval_split, out_dir=tmp_path)


def fake_outputs(ev, num_labels=2, seed=0):
    rng = np.random.default_rng(seed)
    n, t = ev.rows["input_ids"].shape
    kind = ev.task.kind
    if kind == "qa":
        return {"start_logits": rng.normal(size=(n, t)), "end_logits": rng.normal(size=(n, t))}
    if kind == "token_classification":
        return {"predictions": rng.integers(0, num_labels, (n, t))}
    return {"logits": rng.normal(size=(n, num_labels))}


def test_classification_eval_counts_every_example_once(slices, cache_dir, tokenizer, tmp_path):
    config = slice_config("glue", "sst2,ci", slices["sst2"], cache_dir)
    ev = evaluator(config, tokenizer, tmp_path)
    assert len(ev.batches) == 3  # 19 examples in batches of 8: the last holds 3 and 5 padding.
    assert ev.rows["weights"].sum() == 19 and len(ev.rows["weights"]) == 24
    metrics = ev.score(fake_outputs(ev), step=0)
    assert metrics["eval_examples"] == 19
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 19 and [json.loads(x)["index"] for x in lines] == list(range(19))
    matrix = np.loadtxt(tmp_path / "confusion_matrix.csv", delimiter=",", skiprows=1,
                        usecols=(1, 2))
    assert matrix.sum() == 19
    expected = [int(x.rsplit("\t", 1)[1]) for x in
                slices["sst2"]["validation"].read_text().splitlines()[1:]]
    assert [json.loads(x)["label"] for x in lines] == [str(e) for e in expected]


@pytest.mark.parametrize("task, recipe, variant, count", [
    ("sst2", "glue", "sst2,ci", 19), ("squad", "squad", "ci", 10)])
def test_several_processes_together_cover_the_split_once(slices, cache_dir, tokenizer, task,
                                                         recipe, variant, count):
    """Four processes' parts of the split, laid out as the global batches: the same examples as
    one process, each once."""
    config = slice_config(recipe, variant, slices[task], cache_dir)
    split = config.data.eval_split
    one = pipeline.create_eval_batches(config.data, split, tokenizer=tokenizer)
    parts = [pipeline.create_eval_batches(config.data, split, tokenizer=tokenizer,
                                          process_index=p, process_count=4) for p in range(4)]
    rows = task_eval._global_rows(parts, max(len(p.batches) for p in parts))
    real = rows["weights"] > 0
    assert real.sum() == one.num_features
    ids = [i for i, r in zip(rows["example_ids"], real) if r]
    assert sorted(ids) == sorted(one.example_ids)
    if task == "squad":
        assert len(set(ids)) == count
    else:
        assert sorted(rows["labels"][real]) == sorted(np.concatenate(
            [b["labels"][b["weights"] > 0] for b in one.batches]))


def test_qa_eval_answers_every_question(slices, cache_dir, tokenizer, tmp_path):
    config = slice_config("squad", "ci", slices["squad"], cache_dir)
    ev = evaluator(config, tokenizer, tmp_path)
    metrics = ev.score(fake_outputs(ev), step=0)
    assert metrics["eval_questions"] == 10 and metrics["eval_unanswered"] == 0
    assert len(json.loads((tmp_path / "predictions.json").read_text())) == 10


def test_an_eval_label_unseen_in_training_names_file_and_line(tmp_path, cache_dir, tokenizer):
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\nfine\tpos\n")
    dev.write_text("text\tlabel\ngreat\tpos\nso-so\tneutral\n")
    config = slice_config("text_classification", "ci", {"train": train, "validation": dev},
                          cache_dir, **{"finetune": {"text_keys": "text", "labels": ""}})
    with pytest.raises(sources.DataError, match=rf"{dev}:3: label 'neutral' is not one of "
                                                r"\['neg', 'pos'\].*finetune.labels"):
        evaluator(config, tokenizer)
    config.finetune.labels = "neg,neutral,pos"  # A configured label set covers it.
    ev = evaluator(config, tokenizer)
    assert ev.task.label_names == ("neg", "neutral", "pos")
    assert list(ev.rows["labels"][ev.rows["weights"] > 0]) == [2, 1]


def test_a_squad_answer_missing_from_its_context_is_counted_and_reported(
        slices, cache_dir, tokenizer, tmp_path, caplog):
    data = json.loads(slices["squad"]["validation"].read_text())
    qa = data["data"][0]["paragraphs"][0]["qas"][1]
    qa["answers"][0]["text"] = "words that are nowhere in the context"
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps(data))
    files = {"train": slices["squad"]["train"], "validation": bad}
    config = slice_config("squad", "ci", files, cache_dir)
    assert config.data.on_error == "skip"  # The recipe's policy: count, report, go on.
    ev = evaluator(config, tokenizer)
    assert ev.report.counts["bad_squad_question"] == 1
    assert "bad_squad_question: 1" in caplog.text and qa["id"] in caplog.text
    metrics = ev.score(fake_outputs(ev), step=0)
    assert metrics["eval_count_bad_squad_question"] == 1 and metrics["eval_questions"] == 9
    config.data.on_error = "raise"
    with pytest.raises(sources.DataError, match=rf"question {qa['id']}: answer .* does not match"):
        evaluator(config, tokenizer)


def test_a_relation_sentence_without_a_marker_names_file_and_line(slices, cache_dir, tokenizer,
                                                                  tmp_path):
    lines = slices["semeval"]["test"].read_bytes().split(b"\r\n")
    line = next(i for i, x in enumerate(lines) if x.startswith(b"8003\t"))
    lines[line] = lines[line].replace(b"</e2>", b"")
    bad = tmp_path / "TEST_FILE_FULL.TXT"
    bad.write_bytes(b"\r\n".join(lines))
    files = {"train": slices["semeval"]["train"], "test": bad}
    config = slice_config("relation", "ci", files, cache_dir)
    with pytest.raises(sources.DataError, match=rf"{bad}:{line + 1}: expected one </e2>"):
        evaluator(config, tokenizer)


@pytest.mark.parametrize("task, recipe, variant, count", [
    ("sst2", "glue", "sst2,ci", 19), ("wnut17", "ner", "ci", 13),
    ("semeval", "relation", "ci", 13)])
def test_packed_evaluation_gives_the_padded_metrics(slices, cache_dir, tokenizer, task, recipe,
                                                    variant, count):
    """The same model scored on packed and on padded batches: identical metrics, every example."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from transformer import sharding
    from transformer.models import ModelConfig
    from transformer.models.heads import TaskModel
    from transformer.train import objectives

    results = []
    for pack in (True, False):
        config = slice_config(recipe, variant, slices[task], cache_dir)
        config.data.pack_examples = pack
        config.data.max_length = 128  # Rows long enough for several examples each.
        config.mesh = {"data": 1, "fsdp": 1, "tensor": -1}  # Rows split over one device.
        model = TaskModel(ModelConfig.from_dict(config.model.to_dict()),
                          objectives.head_config(config), rngs=nnx.Rngs(3))
        graphdef, params = nnx.split(model)
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        replicated = NamedSharding(mesh, PartitionSpec())
        ev = task_eval.TaskEvaluator(config, tokenizer, graphdef,
                                     jax.tree.map(lambda _, r=replicated: r, params), replicated,
                                     split=config.data.eval_split)
        if pack:
            packed_rows = {b["input_ids"].shape[0] for b in ev.device_batches}
            assert len(packed_rows) == 1  # One compiled shape for the split.
            assert packed_rows.pop() < len(ev.batches[0]["weights"])
        results.append(ev(params, step=0))
    assert results[0] == results[1]
    assert results[0]["eval_examples"] == count
