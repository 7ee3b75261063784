"""Pretraining pipelines: determinism, checkpoint/restore, per-process sharding, eval padding."""

import gzip

import numpy as np
import pytest

from transformer.data import pipeline, readers

KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fixtures):
    d = tmp_path_factory.mktemp("corpus")
    with gzip.open(fixtures.parent.parent / "data" / "shakespeare" / "train.txt.gz", "rt",
                   encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(3000)]
    path = d / "shakespeare_head.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture()
def config(corpus, tmp_path_factory, tokenizer_dir):
    c = pipeline.default_config()
    c.tokenizer = str(tokenizer_dir / "encoder.json")
    c.local_format = "text"
    c.local_files.train = str(corpus)
    c.local_options.document = "blank_line"
    c.cache_dir = str(tmp_path_factory.getbasetemp() / "cache")
    c.max_length = 64
    c.global_batch_size = 4
    c.prefetch_buffer_size = 0
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batch_format_and_determinism(config, gpt2):
    first = _take(iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2)), 5)
    again = _take(iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2)), 5)
    _same(first, again)
    b = first[0]
    assert tuple(b) == KEYS
    for k in KEYS:
        assert b[k].shape == (4, 64)
        assert b[k].dtype == (np.float32 if k == "weights" else np.int32)
    config.seed = 1
    other = _take(iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2)), 5)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, other))


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_restore_mid_epoch(config, gpt2, bert, objective):
    config.objective = objective
    config.prefetch_buffer_size = 2
    tok = gpt2 if objective == "causal" else bert
    ds = pipeline.create_pretraining_dataset(config, "train", tokenizer=tok)
    it = iter(ds)
    _take(it, 7)
    state = it.get_state()
    want = _take(it, 50)
    restored = iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=tok))
    restored.set_state(state)
    _same(_take(restored, 50), want)


def test_restore_with_orbax_checkpoint_manager(config, gpt2, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2))
    _take(it, 11)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(item=it)))
        manager.wait_until_finished()
    want = _take(it, 50)
    fresh = iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.restore(11, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(item=fresh)))
    _same(_take(fresh, 50), want)


def test_processes_read_disjoint_parts_covering_the_split(config, gpt2):
    config.num_epochs = 1
    config.shuffle = False
    tokens = []
    for index in range(2):
        ds = pipeline.create_pretraining_dataset(
            config, "train", tokenizer=gpt2, process_index=index, process_count=2, train=False)
        batches = list(iter(ds))
        assert all(b["inputs"].shape == (2, 64) for b in batches)
        tokens.append(np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches]))
    whole = list(iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2,
                                                          train=False)))
    everything = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in whole])
    # contiguous parts in order: process 0's tokens then process 1's are the whole split
    np.testing.assert_array_equal(np.concatenate(tokens), everything)
    assert len(tokens[0]) > 0 and len(tokens[1]) > 0
    # evaluation: every token of every document once; the last batch padded with empty rows
    docs = readers.read_records(config.local_files.train, "text", document="blank_line")
    expected = sum(len(gpt2.encode(d["text"])) + 1 for d in docs)  # + EOS
    assert len(everything) == expected
    last = whole[-1]
    assert last["inputs"].shape == (4, 64)
    empty = (last["segment_ids"] == 0).all(axis=1)
    assert empty.any() and last["weights"][empty].sum() == 0


def test_mlm_batches(config, bert):
    config.objective = "mlm"
    b = next(iter(pipeline.create_pretraining_dataset(config, "train", tokenizer=bert)))
    selected = b["weights"] > 0
    assert selected.any()
    special = np.isin(b["targets"], list(bert.special_ids.values()))
    assert not (selected & special).any()
    assert not (selected & (b["segment_ids"] == 0)).any()
    assert ((b["inputs"] == b["targets"]) | selected).all()
    assert (b["targets"][b["positions"] == 0][b["segment_ids"][b["positions"] == 0] > 0] ==
            bert.cls_id).mean() > 0.5  # segments start with [CLS] (except continued documents)


def test_bad_config(config, gpt2):
    config.global_batch_size = 5
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.create_pretraining_dataset(config, "train", tokenizer=gpt2, process_count=2)
    config.global_batch_size = 4
    with pytest.raises(KeyError, match="no split 'validation'"):
        pipeline.create_pretraining_dataset(config, "validation", tokenizer=gpt2)
