"""SQuAD v1.1 evaluation (the official `evaluate-v1.1.py` logic) and answer-span decoding.

Scores: an answer is normalized (lowercase; punctuation removed; the words a/an/the removed; runs of
whitespace collapsed). Exact match is 1 if the normalized prediction equals a normalized ground
truth; token F1 is the F1 of the bag-of-tokens overlap of the normalized strings (0 if no token is
shared). Each question takes the maximum over its ground truths; both scores are averaged over all
questions and multiplied by 100. A question without a prediction scores 0.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from transformer import paths

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace (official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def token_f1(prediction: str, ground_truth: str) -> float:
    """F1 of the multiset overlap of normalized tokens (0.0 if nothing overlaps)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _max_over(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    return max(metric(prediction, t) for t in truths)


def squad_em_f1(
    predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """{"exact_match", "f1"} (×100) over the questions in `answers` ({id: ground-truth texts}).

    Also returns "total" (questions) and "missing" (questions without a prediction, scored 0).
    """
    em = f1 = 0.0
    missing = 0
    for qid, truths in answers.items():
        if qid not in predictions:
            missing += 1
            continue
        if not truths:
            raise ValueError(f"question {qid} has no ground-truth answer")
        em += _max_over(exact_match, predictions[qid], truths)
        f1 += _max_over(token_f1, predictions[qid], truths)
    total = len(answers)
    return {
        "exact_match": 100.0 * em / total if total else 0.0,
        "f1": 100.0 * f1 / total if total else 0.0,
        "total": total,
        "missing": missing,
    }


def answers_from_dataset(dataset: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """{question id: ground-truth answer texts} from the SQuAD JSON `data` list."""
    return {
        qa["id"]: [a["text"] for a in qa["answers"]]
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }


def evaluate_squad(
    dataset: Sequence[Mapping[str, Any]], predictions: Mapping[str, str]
) -> dict[str, float]:
    """The official v1.1 `evaluate(dataset, predictions)` on the SQuAD JSON `data` list."""
    return squad_em_f1(predictions, answers_from_dataset(dataset))


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_mask: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[int, int, float] | None:
    """Best `(start, end, score)` token span of one window, or None if no span is valid.

    Candidates are the `n_best` highest start logits and `n_best` highest end logits among
    context tokens; a pair is valid if `start <= end < start + max_answer_length`. The score is
    `start_logit + end_logit`; ties go to the higher-ranked start, then end.
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    ctx = np.flatnonzero(np.asarray(context_mask, dtype=bool))
    if ctx.size == 0:
        return None
    starts = ctx[np.argsort(-start_logits[ctx], kind="stable")[:n_best]]
    ends = ctx[np.argsort(-end_logits[ctx], kind="stable")[:n_best]]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None] + 1
    scores = np.where((length >= 1) & (length <= max_answer_length), scores, -np.inf)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    if not np.isfinite(scores[i, j]):
        return None
    return int(starts[i]), int(ends[j]), float(scores[i, j])


def decode_predictions(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    context_mask: np.ndarray,
    example_ids: Sequence[str | None],
    contexts: Mapping[str, str],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """{question id: answer text} from the logits of all windows of an evaluation split.

    Arrays are `(num_windows, length)` (`offsets`: `(num_windows, length, 2)` character
    `[start, end)` offsets of each token in its question's context). Window `w` belongs to
    question `example_ids[w]` (None marks a padding window, which is skipped); a question may have
    several windows. Each window's best span (see `best_span`) competes on its score (ties: the
    earlier window); the winner is cut out of `contexts[question id]` from its start token's start
    offset to its end token's end offset. Questions whose windows hold no valid span get "".
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    offsets, context_mask = np.asarray(offsets), np.asarray(context_mask, dtype=bool)
    if not (start_logits.shape == end_logits.shape == context_mask.shape == offsets.shape[:2]):
        raise ValueError(
            f"shapes differ: start {start_logits.shape}, end {end_logits.shape}, "
            f"mask {context_mask.shape}, offsets {offsets.shape}"
        )
    if len(example_ids) != start_logits.shape[0]:
        raise ValueError(f"{len(example_ids)} example ids for {start_logits.shape[0]} windows")
    best: dict[str, tuple[float, str]] = {}
    for w, qid in enumerate(example_ids):
        if qid is None:
            continue
        span = best_span(start_logits[w], end_logits[w], context_mask[w], n_best,
                         max_answer_length)
        if span is None:
            best.setdefault(qid, (-np.inf, ""))
            continue
        start, end, score = span
        if qid not in best or score > best[qid][0]:
            text = contexts[qid][int(offsets[w, start, 0]) : int(offsets[w, end, 1])]
            best[qid] = (score, text)
    return {qid: text for qid, (_, text) in best.items()}


def write_predictions(predictions: Mapping[str, str], path: str | os.PathLike) -> epath.Path:
    """Write {question id: answer text} as JSON (the official evaluation script's input)."""
    path = paths.as_path(path)  # Local or gs://.
    path.parent.mkdir(parents=True, exist_ok=True)
    # Bytes: epath's write_text ignores `encoding`, and answers are often not ASCII.
    path.write_bytes((json.dumps(dict(predictions), ensure_ascii=False, indent=1) + "\n").encode())
    return path
