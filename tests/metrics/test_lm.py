"""Perplexity and masked-LM accuracy; the metric registry."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from transformer.metrics import METRICS, get_metric, masked_lm_accuracy, perplexity


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_perplexity_uniform_distribution_is_vocab_size():
    vocab, tokens = 50, 37
    assert perplexity(tokens * math.log(vocab), tokens) == pytest.approx(vocab)


def test_perplexity_from_batches_equals_corpus_level():
    rng = np.random.default_rng(0)
    batches, nll_sums, counts, all_nll = 4, [], [], []
    for _ in range(batches):
        logits = rng.normal(size=(3, 16, 11)) * 2
        targets = rng.integers(0, 11, (3, 16))
        mask = rng.random((3, 16)) < 0.8
        nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
        nll_sums.append((nll * mask).sum())
        counts.append(mask.sum())
        all_nll.extend(nll[mask].tolist())
    want = math.exp(sum(all_nll) / len(all_nll))
    assert perplexity(np.array(nll_sums), np.array(counts)) == pytest.approx(want, rel=1e-12)
    # Not the mean of the per-batch perplexities.
    mean_ppl = np.mean([math.exp(s / c) for s, c in zip(nll_sums, counts)])
    assert perplexity(nll_sums, counts) != pytest.approx(mean_ppl, rel=1e-6)
    with pytest.raises(ValueError, match="token count"):
        perplexity(1.0, 0)


def test_masked_lm_accuracy_hand_example():
    labels = np.array([[5, -100, 7, 2], [-100, 3, -100, 4]])
    preds = np.array([[5, 0, 1, 2], [9, 3, 3, 0]])
    weights = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # Counted positions: (0,0) ok, (0,2) wrong, (1,1) ok, (1,3) wrong; (0,3) has weight 0.
    assert masked_lm_accuracy(preds, labels, weights) == pytest.approx(2 / 4)
    assert masked_lm_accuracy(preds, labels) == pytest.approx(3 / 5)
    # Per-example weights: the second example is padding.
    assert masked_lm_accuracy(preds, labels, np.array([1.0, 0.0])) == pytest.approx(2 / 3)
    assert masked_lm_accuracy(preds, np.full_like(labels, -100)) == 0.0


def test_masked_lm_accuracy_from_logits_matches_sklearn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 12, 9))
    labels = np.where(rng.random((4, 12)) < 0.5, logits.argmax(-1), rng.integers(0, 9, (4, 12)))
    labels[rng.random((4, 12)) < 0.3] = -100
    weights = rng.random((4, 12))
    keep = labels != -100
    want = accuracy_score(labels[keep], logits.argmax(-1)[keep], sample_weight=weights[keep])
    assert masked_lm_accuracy(logits, labels, weights) == pytest.approx(want, rel=1e-12)


def test_registry():
    assert get_metric("accuracy")([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)
    assert get_metric("precision_recall_f1_micro")([0, 1, 1], [0, 1, 0])["f1"] == pytest.approx(
        2 / 3
    )
    for name in ("entity_f1", "squad", "semeval2010_task8", "perplexity", "masked_lm_accuracy",
                 "confusion_matrix", "binary_f1"):
        assert callable(METRICS[name]) and get_metric(name) is METRICS[name]
    with pytest.raises(KeyError, match="known metrics"):
        get_metric("bleu")
