"""Poisson-sampled DP batches (transformer/data/poisson.py): inclusion rate, fixed shape with
weight-0 padding, resumable iterator, and disjoint per-process parts."""

import numpy as np
import pytest
import scipy.stats

from transformer.data import pipeline, poisson

N, RATE, ROWS = 200, 0.05, 24  # The fixture's 200 training sentences; 10 a step on average.


@pytest.fixture(scope="module")
def config(fixtures, minilm_dir, tmp_path_factory):
    c = pipeline.default_config()
    c.task, c.tokenizer, c.local_format = "sst2", str(minilm_dir), "tsv"
    c.local_files = {"train": str(fixtures / "sst2" / "train.tsv")}
    c.cache_dir = str(tmp_path_factory.mktemp("poisson_cache"))
    c.max_length, c.global_batch_size, c.prefetch_buffer_size, c.seed = 32, ROWS, 0, 3
    return c


@pytest.fixture(scope="module")
def features(config, bert):
    """Reference: every training example's feature, in file order, by the plain pipeline."""
    pre = pipeline._preprocessor(config, bert)
    rows = [f for record in pipeline._records(config, "train", 0, 1, False, "tsv")
            for f in pre(record)]
    return np.stack([f["input_ids"] for f in rows])


def sampled(batch, features):
    """Indices of the examples in the batch's real rows (each row must be one of them)."""
    real = batch["input_ids"][batch["weights"] > 0]
    out = []
    for row in real:
        match = np.flatnonzero((features == row).all(1))
        assert len(match) >= 1
        out.append(int(match[0]))
    return out


def test_each_example_is_included_with_the_sampling_rate(config, bert, features):
    assert poisson.count_examples(config, "train", "tsv") == N == len(features)
    it = iter(poisson.create_poisson_dataset(config, "train", RATE, tokenizer=bert))
    counts, sizes = np.zeros(N), []
    for _ in range(150):
        batch = next(it)
        assert {k: v.shape[0] for k, v in batch.items()} == dict.fromkeys(batch, ROWS)
        chosen = sampled(batch, features)
        sizes.append(len(chosen))
        np.add.at(counts, chosen, 1)
        pad = batch["weights"] == 0
        assert (batch["weights"][~pad] == 1).all() and (batch["input_ids"][pad] == 0).all()
    total = counts.sum()  # Binomial(150 N, q): a two-sided test at 1e-3.
    assert scipy.stats.binomtest(int(total), 150 * N, RATE).pvalue > 1e-3
    # Batch sizes vary as Binomial(N, q), not a fixed batch: variance N q (1 - q).
    assert 0.5 < np.var(sizes) / (N * RATE * (1 - RATE)) < 1.6
    assert counts.max() < 25  # No example is favoured (mean 7.5 per example).


def test_the_iterator_resumes_and_processes_take_disjoint_parts(config, bert, features):
    it = iter(poisson.create_poisson_dataset(config, "train", RATE, tokenizer=bert))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(poisson.create_poisson_dataset(config, "train", RATE, tokenizer=bert))
    resumed.set_state(state)
    for batch in expected:
        again = next(resumed)
        assert all(np.array_equal(batch[k], again[k]) for k in batch)
    parts = [iter(poisson.create_poisson_dataset(config, "train", RATE, tokenizer=bert,
                                                 process_index=p, process_count=2))
             for p in range(2)]
    whole = iter(poisson.create_poisson_dataset(config, "train", RATE, tokenizer=bert))
    for _ in range(3):
        a, b = (sampled(next(p), features) for p in parts)
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(sampled(next(whole), features))
