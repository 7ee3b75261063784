"""Entity-level precision/recall/F1 for NER with the conlleval / seqeval (default mode) definition.

An entity is a chunk `(type, start, end)` (inclusive token indices within a sentence). A predicted
entity is correct only if a gold entity has the same type, start and end. Micro P/R/F1 pool the
counts of all types; per-type scores use that type's counts; ratios with a 0 denominator are 0.

Chunks are extracted as `seqeval.metrics.sequence_labeling.get_entities` does (the lenient default
mode, not `mode="strict"`), which reads IOB1, IOB2 and IOBES tags alike:
- a chunk ends before a `B-`/`S-`/`O` after a `B-`/`I-`, after an `E-`/`S-`, and wherever the type
  changes;
- a chunk starts at a `B-`/`S-`, at an `I-`/`E-` after `O`, `E-` or `S-`, and wherever the type
  changes (so `I-X` after `O` or after `I-Y` opens a new entity — the IOB1 reading, where `B-` only
  separates adjacent entities of the same type).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
_TAGS = ("O", "B", "I", "E", "S")


def _split(chunk: str) -> tuple[str, str]:
    if chunk not in _TAGS and not chunk.startswith(("B-", "I-", "E-", "S-")):
        raise ValueError(f"{chunk!r} is not an IOB1/IOB2/IOBES tag (O, B-X, I-X, E-X, S-X)")
    return chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks `(type, start, end)` (end inclusive) of one tag sequence, seqeval default mode."""
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _prf(tp: float, n_pred: float, n_true: float) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def entity_f1(
    true_tags: Sequence[Sequence[str]],
    pred_tags: Sequence[Sequence[str]],
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Entity-level micro P/R/F1, macro F1 and per-type P/R/F1/support over all sentences.

    `true_tags`/`pred_tags` are lists of tag sequences, one per sentence, of equal lengths.
    Sentences with weight 0 in `weights` (padding) are skipped; other weights must be 1.
    Returns {"precision", "recall", "f1", "macro_f1", "support", "per_type": {type: {"precision",
    "recall", "f1", "support"}}} where support counts gold entities. Types are sorted by name.
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} gold sentences but {len(pred_tags)} predicted")
    gold: dict[str, set] = defaultdict(set)
    pred: dict[str, set] = defaultdict(set)
    for n, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if weights is not None:
            if weights[n] == 0:
                continue
            if weights[n] != 1:
                raise ValueError(f"sentence weights must be 0 or 1, got {weights[n]} at {n}")
        if len(t) != len(p):
            raise ValueError(f"sentence {n}: {len(t)} gold tags but {len(p)} predicted tags")
        for type_, start, end in get_entities(list(t)):
            gold[type_].add((n, start, end))
        for type_, start, end in get_entities(list(p)):
            pred[type_].add((n, start, end))
    per_type = {}
    for type_ in sorted(set(gold) | set(pred)):
        tp = len(gold[type_] & pred[type_])
        per_type[type_] = {**_prf(tp, len(pred[type_]), len(gold[type_])),
                           "support": len(gold[type_])}
    tp = sum(len(gold[k] & pred[k]) for k in per_type)
    n_pred = sum(len(v) for v in pred.values())
    n_true = sum(len(v) for v in gold.values())
    macro = float(np.mean([v["f1"] for v in per_type.values()])) if per_type else 0.0
    return {**_prf(tp, n_pred, n_true), "macro_f1": macro, "support": n_true,
            "per_type": per_type}


def subword_to_word_tags(
    predictions: Sequence[Any],
    word_ids: Sequence[int | None],
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    num_words: int | None = None,
    missing_tag: str | None = "O",
) -> list[str]:
    """Word-level tags from token-level predictions: each word takes its first subword's label.

    `word_ids[i]` is the index of the word that token i belongs to, or None for special and padding
    tokens (the Hugging Face `BatchEncoding.word_ids()` convention). `predictions[i]` is a tag
    string or a class id mapped through `id2label`. `num_words` defaults to the largest word index
    + 1; words with no token (cut off by truncation) get `missing_tag`, or raise if it is None.
    """
    if len(predictions) != len(word_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(word_ids)} word ids")
    seen = [w for w in word_ids if w is not None]
    if num_words is None:
        num_words = max(seen) + 1 if seen else 0
    tags: list[str | None] = [None] * num_words
    for pred, word in zip(predictions, word_ids):
        if word is None or tags[word] is not None:
            continue
        tag = id2label[int(pred)] if id2label is not None else pred
        tags[word] = str(tag)
    missing = [i for i, t in enumerate(tags) if t is None]
    if missing and missing_tag is None:
        raise ValueError(f"words {missing[:10]} have no token (truncated?); set missing_tag")
    return [missing_tag if t is None else t for t in tags]


def tags_from_label_ids(
    predictions: Any, label_ids: Any, id2label: Mapping[int, str] | Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(gold tags, predicted tags) per sentence from `(batch, length)` id arrays.

    Positions whose gold id is -100 (special tokens, padding, non-first subwords) are dropped from
    both, so the remaining positions are the labelled words.
    """
    predictions, label_ids = np.asarray(predictions), np.asarray(label_ids)
    if predictions.shape != label_ids.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {label_ids.shape} differ")
    gold, pred = [], []
    for p_row, l_row in zip(predictions, label_ids):
        keep = l_row != IGNORE_INDEX
        gold.append([id2label[int(i)] for i in l_row[keep]])
        pred.append([id2label[int(i)] for i in p_row[keep]])
    return gold, pred
