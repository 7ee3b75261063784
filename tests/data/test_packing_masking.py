"""Packing against a plain loop; causal targets; masked-LM statistics."""

import numpy as np
import pytest

from transformer.data import masking, packing


def _docs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 1000, rng.integers(0, 70)).astype(np.int32) for _ in range(n)]


def test_packing_matches_reference_and_restores():
    docs = _docs()
    want = packing.pack_reference(docs, 32)
    it = packing.iterate_packed(docs, 32)
    got = list(it)
    assert len(got) == len(want) == int(np.ceil(sum(map(len, docs)) / 32))
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    # every token lands once, in order
    flat = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in got])
    np.testing.assert_array_equal(flat, np.concatenate(docs))
    for stop in (0, 3, 7, len(got) - 1):
        it = packing.iterate_packed(docs, 32)
        for _ in range(stop):
            next(it)
        state = it.get_state()
        fresh = packing.iterate_packed(docs, 32)
        fresh.set_state(state)
        for g, w in zip(fresh, want[stop:], strict=True):
            np.testing.assert_array_equal(g["tokens"], w["tokens"])
            np.testing.assert_array_equal(g["segment_ids"], w["segment_ids"])


def test_causal_targets_and_weights():
    rows = packing.pack_reference(_docs(1), 16)
    batch = packing.causal_lm_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    for b in range(len(rows)):
        seg, tok = batch["segment_ids"][b], batch["inputs"][b]
        for t in range(16):
            nxt = t + 1 < 16 and seg[t] > 0 and seg[t + 1] == seg[t]
            assert batch["weights"][b, t] == float(nxt)
            assert batch["targets"][b, t] == (tok[t + 1] if nxt else 0)
        # positions restart at each segment
        for s in set(seg[seg > 0]):
            np.testing.assert_array_equal(batch["positions"][b][seg == s], np.arange((seg == s).sum()))
    assert batch["weights"].dtype == np.float32 and batch["targets"].dtype == np.int32


def _mlm_config(whole_word=False):
    vocab = 1000
    candidates = np.ones(vocab, bool)
    candidates[[0, 1, 2, 3]] = False  # pad, cls, sep, mask
    starts = np.arange(vocab) % 3 != 0 if whole_word else None
    return masking.MaskingConfig(3, vocab, candidates, word_starts=starts)


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics(whole_word):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 1000, (256, 512))
    ids[:, 0], ids[:, 255], ids[:, 256], ids[:, -1] = 1, 2, 1, 2  # [CLS]/[SEP] of two segments
    segment_ids = np.ones_like(ids)
    segment_ids[:, 256:] = 2
    ids[:, 500:], segment_ids[:, 500:] = 0, 0  # padding
    config = _mlm_config(whole_word)
    out = masking.mask_tokens(ids, segment_ids, config, np.random.default_rng(1))
    selected = out["weights"] > 0
    eligible = config.candidates[ids] & (segment_ids > 0)
    assert not selected[~eligible].any()  # never pad or special
    rate = selected.sum() / eligible.sum()
    assert abs(rate - 0.15) < 0.005, rate
    masked = (out["inputs"] == 3) & selected
    kept = (out["inputs"] == ids) & selected
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01  # a random replacement may equal the original: rare
    assert abs((n - masked.sum() - kept.sum()) / n - 0.1) < 0.01
    assert config.candidates[out["inputs"][selected & ~masked]].all()  # random ids are not special
    np.testing.assert_array_equal(out["targets"], ids)
    if whole_word:  # a continuation piece is selected iff its word start is
        words = masking._word_ids(ids, segment_ids, config.word_starts)
        for b in range(4):
            for w in np.unique(words[b][eligible[b]]):
                sel = selected[b][(words[b] == w) & eligible[b]]
                assert sel.all() or not sel.any()
