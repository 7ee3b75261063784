"""Seq2seq data: packed encoder/decoder rows against a per-example reference, teacher forcing,
multi-reference records, resumable iteration, and bad input counted or refused by name."""

import json

import ml_collections
import numpy as np
import pytest

from transformer.data import pipeline, seq2seq
from transformer.data.sentencepiece_tokenizer import train_sentencepiece
from transformer.data.sources import DataError

START = 0


@pytest.fixture(scope="module")
def tok(fixtures):
    m = fixtures / "multi30k"
    return train_sentencepiece([m / "train.de", m / "train.en"], vocab_size=300)


def config(tmp_path, **files):
    c = ml_collections.ConfigDict({"data": pipeline.default_config(),
                                   "seq2seq": seq2seq.default_config(),
                                   "model": {"decoder_start_token_id": START}})
    c.data.update(max_length=48, global_batch_size=4, prefetch_buffer_size=0,
                  cache_dir=str(tmp_path / "cache"))
    c.data.local_files = ml_collections.ConfigDict(files)
    c.seq2seq.max_target_length = 40
    return c


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_packed_rows_hold_each_pair_whole_with_shifted_decoder_inputs(tmp_path, fixtures, tok):
    c = config(tmp_path, train=str(fixtures / "multi30k" / "train"))
    c.data.local_format, c.data.shuffle, c.data.num_epochs = "parallel", False, 1
    c.data.global_batch_size = 1
    rows = list(seq2seq.create_seq2seq_dataset(c, "train", tokenizer=tok))
    # The pipeline's rows equal the plain packing loop over the examples in file order.
    records = seq2seq.read_records(c.data, c.seq2seq, "train")
    encode = seq2seq.encoder_for(c, tok)
    examples = [e for r in records for e in encode(r)]
    reference = seq2seq.pack_pairs_reference(examples, 48, 40)
    assert len(rows) == len(reference) < len(examples)  # Packing saves rows.
    seen = []
    for batch, ref in zip(rows, reference, strict=True):
        for key in ref:
            np.testing.assert_array_equal(batch[key][0], ref[key])
        for k in range(1, batch["segment_ids"].max() + 1):
            src = batch["inputs"][0][batch["segment_ids"][0] == k]
            on = batch["decoder_segment_ids"][0] == k
            tgt, dec = batch["targets"][0][on], batch["decoder_inputs"][0][on]
            np.testing.assert_array_equal(batch["positions"][0][batch["segment_ids"][0] == k],
                                          np.arange(len(src)))
            np.testing.assert_array_equal(batch["decoder_positions"][0][on], np.arange(len(tgt)))
            np.testing.assert_array_equal(dec, np.concatenate([[START], tgt[:-1]]))
            assert np.all(batch["weights"][0][on] == 1)
            seen.append((tok.decode(src.tolist()), tok.decode(tgt.tolist())))
        assert np.all(batch["weights"][0][batch["decoder_segment_ids"][0] == 0] == 0)
    # Every pair once, in order, and both sides end in EOS.
    assert seen == [(tok.decode(e["inputs"].tolist()), tok.decode(e["targets"].tolist()))
                    for e in examples]
    assert all(e["inputs"][-1] == tok.eos_id and e["targets"][-1] == tok.eos_id for e in examples)
    assert seen[0] == (tok.decode(tok.encode(records[0]["source"])),
                       tok.decode(tok.encode(records[0]["target"])))


def test_iteration_resumes_from_its_state(tmp_path, fixtures, tok):
    c = config(tmp_path, train=str(fixtures / "multi30k" / "train"))
    c.data.local_format = "parallel"
    it = iter(seq2seq.create_seq2seq_dataset(c, "train", tokenizer=tok))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = iter(seq2seq.create_seq2seq_dataset(c, "train", tokenizer=tok))
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_references_and_eval_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"input": "ein Hund", "target": ["a dog", "one dog"]},
        {"input": "eine Katze", "target": ["a cat"]}])
    c = config(tmp_path, validation=path)
    c.data.local_format = "jsonl"
    records = seq2seq.read_records(c.data, c.seq2seq, "validation")
    # Training: one example per reference.
    examples = [e for r in records for e in seq2seq.encoder_for(c, tok)(r)]
    assert [tok.decode(e["targets"].tolist()) for e in examples] == ["a dog", "one dog", "a cat"]
    ev = seq2seq.eval_examples(c, "validation", tok)
    assert ev.references == [["a dog", "one dog"], ["a cat"]]
    assert tok.decode(ev.inputs[1, : ev.lengths[1]].tolist()) == "eine Katze"
    # Several columns as references (CSV).
    csv = tmp_path / "d.csv"
    csv.write_text("input,r1,r2\nein Hund,a dog,one dog\n", encoding="utf-8")
    c = config(tmp_path, validation=str(csv))
    c.data.local_format, c.seq2seq.target_key = "csv", "r1,r2"
    assert seq2seq.eval_examples(c, "validation", tok).references == [["a dog", "one dog"]]


def test_bad_input_is_refused_or_counted(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"input": "ein Hund", "target": "a dog"}, {"input": " ", "target": "nothing"},
        {"input": "eine Katze", "target": ""},
        {"input": "ein langer Satz", "target": "a very long sentence " * 20}])
    c = config(tmp_path, train=path)
    c.data.local_format = "jsonl"
    with pytest.raises(DataError, match=r"bad.jsonl:2: empty source text"):
        seq2seq.create_seq2seq_dataset(c, "train", tokenizer=tok)
    c.data.on_error = "skip"
    with caplog.at_level("INFO"):
        ds = seq2seq.create_seq2seq_dataset(c, "train", tokenizer=tok)
    assert "empty_source: 1" in caplog.text and "empty_target: 1" in caplog.text
    assert "truncated_target: 1" in caplog.text
    batch = next(iter(ds))
    # The long target is cut to the row, its EOS kept; the bad records never appear.
    segments = batch["decoder_segment_ids"]
    lengths = {int((segments[r] == k).sum()) for r in range(4) for k in range(1, segments[r].max() + 1)}
    assert lengths == {40, len(tok.encode("a dog")) + 1}
    long_row = int(np.argmax((segments == 1).sum(1)))
    assert batch["targets"][long_row][39] == tok.eos_id
    c.seq2seq.source_key = "text"
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\].*\['input', 'target'\]"):
        seq2seq.read_records(c.data, c.seq2seq, "train")
    c.seq2seq.source_key = "source"
    with pytest.raises(ValueError, match="keep that name"):
        seq2seq.read_records(c.data, c.seq2seq, "train")


def test_parallel_files_must_align(tmp_path):
    (tmp_path / "x.de").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "x.en").write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError, match="has 2 lines but .* has 1"):
        seq2seq.parallel_records(str(tmp_path / "x"), "de", "en")
    with pytest.raises(FileNotFoundError):
        seq2seq.parallel_records(str(tmp_path / "x"), "de", "fr")
