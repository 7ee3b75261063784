"""Evaluation metrics (pure NumPy/Python), each computed once over a whole evaluation split.

`METRICS` maps a name (as used in configs) to the metric function; `get_metric(name)` looks one up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from transformer.metrics.classification import (
    accuracy,
    binary_f1,
    confusion_matrix,
    precision_recall_f1,
    save_confusion_matrix,
)
from transformer.metrics.lm import masked_lm_accuracy, perplexity
from transformer.metrics.ner import (
    entity_f1,
    get_entities,
    subword_to_word_tags,
    tags_from_label_ids,
)
from transformer.metrics.relation import semeval2010_task8_score
from transformer.metrics.squad import (
    answers_from_dataset,
    best_span,
    decode_predictions,
    evaluate_squad,
    exact_match,
    normalize_answer,
    squad_em_f1,
    token_f1,
    write_predictions,
)

METRICS: dict[str, Callable[..., Any]] = {
    "accuracy": accuracy,
    "precision_recall_f1": precision_recall_f1,
    "precision_recall_f1_micro": functools.partial(precision_recall_f1, average="micro"),
    "precision_recall_f1_macro": functools.partial(precision_recall_f1, average="macro"),
    "precision_recall_f1_per_class": functools.partial(precision_recall_f1, average=None),
    "binary_f1": binary_f1,
    "confusion_matrix": confusion_matrix,
    "entity_f1": entity_f1,
    "squad": squad_em_f1,
    "semeval2010_task8": semeval2010_task8_score,
    "perplexity": perplexity,
    "masked_lm_accuracy": masked_lm_accuracy,
}


def get_metric(name: str) -> Callable[..., Any]:
    """The metric function registered under `name`."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: {sorted(METRICS)}") from None


__all__ = [
    "METRICS",
    "accuracy",
    "answers_from_dataset",
    "best_span",
    "binary_f1",
    "confusion_matrix",
    "decode_predictions",
    "entity_f1",
    "evaluate_squad",
    "exact_match",
    "get_entities",
    "get_metric",
    "masked_lm_accuracy",
    "normalize_answer",
    "perplexity",
    "precision_recall_f1",
    "save_confusion_matrix",
    "semeval2010_task8_score",
    "squad_em_f1",
    "subword_to_word_tags",
    "tags_from_label_ids",
    "token_f1",
    "write_predictions",
]
