"""Fine-tuning tasks on slices of the real files: formats, alignments, evaluation padding."""

import gzip
import json

import numpy as np
import pytest

from tests.data.conftest import head_lines
from transformer.data import pipeline, tasks


@pytest.fixture()
def config(tmp_path, minilm_dir):
    c = pipeline.default_config()
    c.tokenizer = str(minilm_dir)
    c.cache_dir = str(tmp_path / "cache")
    c.max_length = 64
    c.global_batch_size = 8
    c.prefetch_buffer_size = 0
    return c


def test_sst2(config, fixtures, tmp_path, bert):
    config.task = "sst2"
    config.local_files.validation = str(head_lines(fixtures / "sst2" / "dev.tsv",
                                                   tmp_path / "dev.tsv", 21))
    evalset = pipeline.create_eval_batches(config, "validation", tokenizer=bert)
    assert evalset.num_features == 20 and len(evalset.batches) == 3
    last = evalset.batches[-1]
    np.testing.assert_array_equal(last["weights"], [1, 1, 1, 1, 0, 0, 0, 0])
    first = evalset.batches[0]
    assert first["labels"][:2].tolist() == [1, 0]  # "it 's a charming ..." 1, "unflinchingly ..." 0
    want = bert("it 's a charming and often affecting journey . ", max_length=64,
                padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(first["input_ids"][0], want["input_ids"][0])
    # every example scored once over two simulated processes
    parts = [pipeline.create_eval_batches(config, "validation", tokenizer=bert, process_index=i,
                                          process_count=2) for i in range(2)]
    assert [len(p.batches) for p in parts] == [3, 3]
    assert sum(float(b["weights"].sum()) for p in parts for b in p.batches) == 20
    config.local_files.train = config.local_files.validation
    batch = next(iter(pipeline.create_task_dataset(config, "train", tokenizer=bert)))
    assert batch["input_ids"].shape == (8, 64) and batch["labels"].shape == (8,)


def test_conll_first_subword_labels(config, fixtures, tmp_path, bert):
    config.task = "wnut17"
    src = fixtures / "wnut17" / "dev.conll"
    config.local_files.validation = str(head_lines(src, tmp_path / "valid.txt", 12, blocks=True))
    evalset = pipeline.create_eval_batches(config, "validation", tokenizer=bert)
    assert evalset.num_features == 12
    names = tasks.get_task("wnut17").label_names
    blocks = src.read_text(encoding="utf-8").split("\n\n")[:12]
    sentences = [[line.split() for line in block.splitlines()] for block in blocks]
    split_words = 0
    for n, words in enumerate(sentences):
        ids = evalset.batches[n // 8]["input_ids"][n % 8]
        labels = evalset.batches[n // 8]["labels"][n % 8]
        scored = np.flatnonzero(labels != -100)
        assert [names[i] for i in labels[scored]] == [w[-1] for w in words]
        for position, word in zip(scored, words):  # the label sits on the word's first subword
            pieces = bert.encode(word[0])
            assert ids[position] == pieces[0]
            assert (labels[position + 1 : position + len(pieces)] == -100).all()
            split_words += len(pieces) > 1
    assert split_words > 5
    first = [bert.id_to_token(i) for i in evalset.batches[0]["input_ids"][0][:5]]
    assert first == ["[CLS]", "stabilized", "approach", "or", "not"]
    second = evalset.batches[0]
    location = [names[i] for i in second["labels"][1] if i != -100]
    assert location[6:9] == ["B-location", "I-location", "I-location"]  # Redondo Beach Blvd


def test_squad_answer_spans_decode_to_answers(config, squad_dev, tmp_path, bert):
    config.task = "squad"
    config.max_length = 96
    config.doc_stride = 32
    small = {"data": [{**squad_dev["data"][0], "paragraphs": squad_dev["data"][0]["paragraphs"][:2]}],
             "version": "1.1"}
    path = tmp_path / "dev.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(small, fh)
    config.local_files.validation = str(path)
    evalset = pipeline.create_eval_batches(config, "validation", tokenizer=bert)
    questions = {q["id"]: (p["context"], q) for p in small["data"][0]["paragraphs"]
                 for q in p["qas"]}
    assert set(evalset.example_ids) == set(questions)
    assert evalset.num_features > len(questions)  # long contexts give several windows
    found = exact = 0
    for i, example_id in enumerate(evalset.example_ids):
        batch = evalset.batches[i // 8]
        s, e = batch["start_positions"][i % 8], batch["end_positions"][i % 8]
        context, qa = questions[example_id]
        if s == 0:
            assert e == 0
            continue
        offsets = evalset.offset_mapping[i]
        text = context[offsets[s][0]:offsets[e][1]]
        answer = qa["answers"][0]
        # the tokens span the answer: exactly, or whole tokens around it ("gold" in "golden")
        assert answer["text"] in text and len(text) <= len(answer["text"]) + 8
        assert offsets[s][0] <= answer["answer_start"] < offsets[s][1]
        decoded = bert.decode(batch["input_ids"][i % 8][s:e + 1])
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
        exact += text == answer["text"]
        found += 1
    assert found >= len(questions) and exact >= 0.9 * found


def test_semeval_entity_markers(config, fixtures, tmp_path, bert):
    config.task = "semeval2010_task8"
    src = fixtures / "semeval" / "TRAIN_FILE.TXT"
    config.local_files.train = str(head_lines(src, tmp_path / "TRAIN.TXT", 20, blocks=True))
    evalset = pipeline.create_eval_batches(config, "train", tokenizer=bert)
    assert evalset.num_features == 20
    b = evalset.batches[0]
    markers = tasks.relation_marker_ids(bert)
    assert markers["<e1>"] == bert.token_to_id("[unused0]")
    for row in range(8):
        e1, e2 = b["entity_positions"][row]
        assert b["input_ids"][row, e1] == markers["<e1>"]
        assert b["input_ids"][row, e2] == markers["<e2>"]
    labels = tasks.get_task("semeval2010_task8").label_names
    assert [labels[i] for i in b["labels"][:3]] == [
        "Component-Whole(e2,e1)", "Other", "Instrument-Agency(e2,e1)"]
    # "configuration" follows the first marker
    e1 = b["entity_positions"][0, 0]
    assert bert.id_to_token(b["input_ids"][0, e1 + 1]) == "configuration"
    # markers past the vocabulary for tokenizers without them (inside the padded table)
    gpt2_markers = tasks.relation_marker_ids(pipeline.load_tokenizer(config.tokenizer))
    assert set(gpt2_markers.values()) <= set(range(30592))


def test_task_registry():
    assert tasks.get_task("sst2").metric == "accuracy"
    assert len(tasks.get_task("semeval2010_task8").label_names) == 19
    assert len(tasks.get_task("conll2003").label_names) == 9
    with pytest.raises(KeyError, match="unknown task"):
        tasks.get_task("nope")
