"""Local ArrayRecord builder, TFDS catalog errors, and every bad-input case."""

import gzip
import json
import re
import time

import numpy as np
import pytest

from tests.data.conftest import head_lines
from transformer.data import pipeline, readers
from transformer.data.local_builder import build_local_dataset
from transformer.data.sources import DataError, DatasetNotPreparedError, catalog_source


def test_local_builder_writes_array_record(tmp_path, fixtures):
    train = head_lines(fixtures / "sst2" / "train.tsv", tmp_path / "train.tsv", 101)
    dev = head_lines(fixtures / "sst2" / "dev.tsv", tmp_path / "dev.tsv", 51)
    build = build_local_dataset("tsv", {"train": train, "validation": dev}, cache_dir=tmp_path / "c")
    files = sorted(p.name for p in build.builder.data_path.iterdir())
    assert "local_dataset-train.array_record-00000-of-00001" in files
    assert build.splits == {"train": 100, "validation": 50}
    source = build.builder.as_data_source(split="validation")
    assert len(source) == 50
    assert source[0]["sentence"].startswith(b"it 's a charming")
    assert source[49]["source"].endswith(b"dev.tsv:51")  # file order kept, random access
    again = build_local_dataset("tsv", {"train": train, "validation": dev}, cache_dir=tmp_path / "c")
    assert again.builder.data_path == build.builder.data_path  # cached by content
    dev.write_text(dev.read_text() + "one more line \t1\n")
    changed = build_local_dataset("tsv", {"train": train, "validation": dev},
                                  cache_dir=tmp_path / "c")
    assert changed.builder.data_path != build.builder.data_path
    assert changed.splits["validation"] == 51


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond\ndoc\n\n\nthird\n")
    blocks = build_local_dataset("text", {"train": [tmp_path / "a.txt"]}, cache_dir=tmp_path,
                                 document="blank_line")
    assert [blocks.sources["train"][i]["text"] for i in range(3)] == [
        b"first doc", b"second\ndoc", b"third"]
    whole = build_local_dataset("text", {"train": str(tmp_path / "*.txt")}, cache_dir=tmp_path)
    assert whole.splits == {"train": 1}
    (tmp_path / "a.jsonl").write_text('{"text": "x", "n": 3, "tags": ["a"]}\n'
                                      '{"text": "y", "n": 4, "tags": ["b", "c"]}\n')
    jsonl = build_local_dataset("jsonl", {"train": tmp_path / "a.jsonl"}, cache_dir=tmp_path)
    assert jsonl.sources["train"][1]["n"] == 4
    assert list(jsonl.sources["train"][1]["tags"]) == [b"b", b"c"]
    (tmp_path / "a.csv").write_text('q,label\n"a, quoted",1\nplain,0\n')
    csv = build_local_dataset("csv", {"train": tmp_path / "a.csv"}, cache_dir=tmp_path)
    assert csv.sources["train"][0]["q"] == b"a, quoted"


def test_conll_docstart_counted_and_semeval_crlf(fixtures, tmp_path):
    # CoNLL-2003's layout: a -DOCSTART- line opens each document (here around real WNUT-17 sentences).
    sentences = (fixtures / "wnut17" / "dev.conll").read_text(encoding="utf-8").split("\n\n")[:37]
    docstart = "-DOCSTART- -X- -X- O"
    documents = [docstart, *sentences[:20], docstart, *sentences[20:], docstart, ""]
    src = tmp_path / "testb"
    src.write_text("\n\n".join(documents), encoding="utf-8")
    build = build_local_dataset("conll", {"test": src}, cache_dir=tmp_path)
    assert build.reports["test"].counts["docstart_lines"] == 3
    assert build.splits["test"] == 37
    rel = list(readers.read_records(fixtures / "semeval" / "TEST_FILE_FULL.TXT", "semeval"))
    assert len(rel) == 401 and rel[0]["id"] == "8001" and rel[-1]["id"] == "10717"
    assert not any(r["relation"].endswith("\r") or "\r" in r["sentence"] for r in rel)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        build_local_dataset("tsv", {"train": tmp_path / "missing.tsv"}, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no files match"):
        build_local_dataset("tsv", {"train": str(tmp_path / "*.nothing")}, cache_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        list(readers.read_records(tmp_path / "empty.txt", "text"))
    report = readers.Report()
    assert list(readers.read_records(tmp_path / "empty.txt", "text", on_error="skip",
                                     report=report)) == []
    assert report.counts["empty_file"] == 1


@pytest.mark.parametrize("fmt,content,where", [
    ("jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', ":2: malformed JSON"),
    ("tsv", b"sentence\tlabel\na\t1\nb\t0\textra\nc\t1\n", ":3: 3 fields, expected 2"),
    ("tsv", b"sentence\tlabel\na\t1\nb\xff\t0\nc\t1\n", ":3: not valid UTF-8 (byte 0xff"),
    ("conll", b"EU B-ORG\nrejects\n\nx O\n", ":2: expected 'token ... tag'"),
    ("semeval", b'1\t"a <e1>b</e1> c <e2>d</e2>"\r\nOther\r\nComment:\r\n\r\n'
                b'2\t"a <e1>b</e1> c"\r\nOther\r\nComment:\r\n\r\n', ":5: expected one <e2>"),
])
def test_malformed_records_name_file_and_line(tmp_path, fmt, content, where):
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"bad.{fmt}{where}")):
        list(readers.read_records(path, fmt))
    report = readers.Report()
    kept = list(readers.read_records(path, fmt, on_error="skip", report=report))
    assert sum(report.counts.values()) == 1 and len(kept) >= 1
    assert where.split(":")[1] in report.summary()


def test_bad_squad(tmp_path):
    path = tmp_path / "bad.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"data": [{"title": "t", "paragraphs": [{"context": "abc def", "qas": [
            {"id": "q1", "question": "?", "answers": [{"text": "def", "answer_start": 4}]},
            {"id": "q2", "question": "?", "answers": [{"text": "xyz", "answer_start": 0}]},
        ]}]}]}, fh)
    with pytest.raises(DataError, match="question q2"):
        list(readers.read_records(path, "squad"))
    report = readers.Report()
    assert [r["id"] for r in readers.read_records(path, "squad", on_error="skip",
                                                  report=report)] == ["q1"]


def test_label_outside_label_set_and_truncation(tmp_path, bert):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\t7\n" + "long " * 50 + "\t0\n")
    config = pipeline.default_config()
    config.task, config.max_length, config.global_batch_size = "sst2", 16, 4
    config.local_files.validation = str(path)
    config.cache_dir = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"dev.tsv:3: label '7' is not one of \['0', '1'\]"):
        pipeline.create_eval_batches(config, "validation", tokenizer=bert)
    config.on_error = "skip"
    evalset = pipeline.create_eval_batches(config, "validation", tokenizer=bert)
    assert evalset.num_features == 2
    assert evalset.report.counts["bad_classification_example"] == 1
    assert evalset.report.counts["truncated"] == 1
    np.testing.assert_array_equal(evalset.batches[0]["weights"], [1, 1, 0, 0])


def test_catalog_dataset_not_prepared_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(DatasetNotPreparedError,
                       match=f"tfds build mnist --file_format=array_record --data_dir={tmp_path}"):
        catalog_source("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotPreparedError, match="not in the TFDS catalog"):
        catalog_source("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
