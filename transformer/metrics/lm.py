"""Language-model metrics: perplexity from summed negative log-likelihood; masked-LM accuracy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def perplexity(nll_sum: Any, token_count: Any) -> float:
    """exp(total NLL / total tokens), NLL in nats.

    Both arguments may be scalars or per-batch arrays of sums and counts (they are summed first),
    so the result is the corpus-level perplexity, not a mean of per-batch perplexities.
    """
    nll = float(np.sum(np.asarray(nll_sum, dtype=np.float64)))
    count = float(np.sum(np.asarray(token_count, dtype=np.float64)))
    if count <= 0:
        raise ValueError(f"perplexity needs a positive token count, got {count}")
    return math.exp(nll / count)


def masked_lm_accuracy(predictions: Any, labels: Any, weights: Any | None = None) -> float:
    """Weighted accuracy of the predicted token ids at the masked positions.

    `predictions` are token ids with the shape of `labels`, or logits with one more trailing
    (vocabulary) axis, from which the argmax is taken. Positions whose label is -100 or whose
    weight is 0 (BERT's `masked_lm_weights`) are ignored: sum(w * correct) / sum(w).
    Returns 0.0 when no position counts.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
    w = np.ones(labels.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.broadcast_to(w.reshape(w.shape + (1,) * (labels.ndim - w.ndim)), labels.shape)
    w = np.where(labels == IGNORE_INDEX, 0.0, w)
    total = w.sum()
    return float((w * (predictions == labels)).sum() / total) if total else 0.0
