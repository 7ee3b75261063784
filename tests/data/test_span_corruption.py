"""T5 span corruption: the noise mask against a NumPy re-implementation of T5's
`random_spans_noise_mask` (from the paper's description: a random segmentation of the noise and
non-noise token counts into equally many spans, interleaved, non-noise first), the measured noise
density and mean span length over a corpus, and that inputs + targets give back every token once."""

import gzip

import ml_collections
import numpy as np
import pytest

from configs.bundled_corpus import CORPUS
from transformer.data import pipeline, seq2seq, span_corruption
from transformer.data.sentencepiece_tokenizer import train_sentencepiece

DENSITY, MEAN_SPAN = 0.15, 3.0


def reference_mask(length: int, rng: np.random.Generator) -> np.ndarray:
    """T5's algorithm: counts by rounding, segment starts by shuffling a 0/1 indicator."""
    noise = min(max(int(round(length * DENSITY)), 1), length - 1)
    spans = max(int(round(noise / MEAN_SPAN)), 1)

    def segmentation(items, segments):
        first = np.zeros(items - 1, int)
        first[: segments - 1] = 1
        rng.shuffle(first)
        ids = np.cumsum(np.concatenate([[0], first]))
        return np.bincount(ids, minlength=segments)

    lengths = np.stack([segmentation(length - noise, spans), segmentation(noise, spans)], 1)
    span_starts = np.cumsum(lengths.reshape(-1))[:-1]
    indicator = np.zeros(length, int)
    indicator[span_starts] = 1
    return np.cumsum(indicator) % 2 == 1


def spans_of(mask: np.ndarray) -> list[int]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(edges[1::2] - edges[::2])


def test_noise_mask_matches_the_t5_algorithm():
    ours, theirs = np.random.default_rng(0), np.random.default_rng(1)
    lengths = {"ours": [], "theirs": []}
    for length in range(4, 600, 7):
        a = span_corruption.noise_mask(length, DENSITY, MEAN_SPAN, ours)
        b = reference_mask(length, theirs)
        # Counts are deterministic: the same noise tokens and spans; non-noise first, noise last.
        assert a.sum() == b.sum() and len(spans_of(a)) == len(spans_of(b)), length
        assert not a[0] and a[-1]
        lengths["ours"] += spans_of(a)
        lengths["theirs"] += spans_of(b)
    # Span lengths: the same distribution (both uniform compositions of the same totals).
    for stat in (np.mean, np.std, lambda x: np.mean(np.asarray(x) == 1)):
        assert stat(lengths["ours"]) == pytest.approx(stat(lengths["theirs"]), rel=0.1)


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory):
    # A slice of the bundled corpus: its first 400 documents (blank-line blocks).
    folder = tmp_path_factory.mktemp("sc")
    text = gzip.decompress((CORPUS / "validation.txt.gz").read_bytes()).decode("utf-8")
    (folder / "plays.txt").write_text("\n\n".join(text.split("\n\n")[:400]), encoding="utf-8")
    tok = train_sentencepiece([folder / "plays.txt"], vocab_size=500)
    path = folder / "sp.model"
    tok.save(path)
    c = ml_collections.ConfigDict({
        "data": pipeline.default_config(), "seq2seq": seq2seq.default_config(),
        "span_corruption": span_corruption.default_config(),
        "model": {"vocab_size": 640, "decoder_start_token_id": 0}})
    c.data.update(tokenizer=str(path), local_format="text", max_length=128, global_batch_size=8,
                  prefetch_buffer_size=0, cache_dir=str(tmp_path_factory.mktemp("cache")))
    c.data.local_options.document = "blank_line"
    c.data.local_files.validation = str(folder / "plays.txt")
    c.seq2seq.max_target_length = 32
    return c, tok


def test_corpus_density_span_length_and_every_token_once(corpus_config):
    c, tok = corpus_config
    batches = list(span_corruption.create_span_corruption_dataset(
        c, "validation", tokenizer=tok, train=False))
    vocab, first_sentinel = c.model.vocab_size, c.model.vocab_size - 100
    # The corpus' own tokens, in order, to compare with.
    ds = pipeline._records(c.data, "validation", 0, 1, False, "text")
    corpus = np.concatenate([pipeline.TokenizeDocument(tok, "text", "causal", False)(r)["tokens"]
                             for r in ds])
    rebuilt, noise, kept, spans = [], 0, 0, 0
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            for k in range(1, b["segment_ids"][row].max() + 1):
                inputs = b["inputs"][row][b["segment_ids"][row] == k]
                targets = b["targets"][row][b["decoder_segment_ids"][row] == k]
                assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
                inputs, targets = inputs[:-1], targets[:-1]
                # Sentinels count down from the top of the vocabulary, in order, on both sides.
                sentinels_in = inputs[inputs >= first_sentinel]
                assert list(sentinels_in) == list(range(vocab - 1, vocab - 1 - len(sentinels_in), -1))
                assert list(targets[targets >= first_sentinel]) == list(sentinels_in)
                fill = {}
                for t in targets:
                    if t >= first_sentinel:
                        fill[int(t)] = []
                        current = fill[int(t)]
                    else:
                        current.append(int(t))
                rebuilt += [x for t in inputs for x in (fill[int(t)] if t >= first_sentinel else [t])]
                noise += sum(len(v) for v in fill.values())
                kept += int((inputs < first_sentinel).sum())
                spans += len(fill)
    # Every corpus token exactly once, in order, across inputs and targets (sentinels aside).
    np.testing.assert_array_equal(np.asarray(rebuilt), corpus)
    assert noise / (noise + kept) == pytest.approx(DENSITY, abs=0.01)
    assert noise / spans == pytest.approx(MEAN_SPAN, abs=0.15)
    assert len(corpus) > 8_000


def test_rows_fit_and_too_small_a_vocabulary_is_refused(corpus_config):
    c, tok = corpus_config
    length = span_corruption.chunk_length(512, 114, DENSITY, MEAN_SPAN)
    assert length == 568  # T5's inputs_length=512 → 568 raw tokens, targets 114.
    small = ml_collections.ConfigDict(c.to_dict())
    small.model.vocab_size = tok.vocab_size + 10
    with pytest.raises(ValueError, match="model.vocab_size=600 or more"):
        span_corruption.create_span_corruption_dataset(small, "validation", tokenizer=tok)
