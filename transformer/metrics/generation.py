"""Metrics of generated text, computed by the libraries papers report them with: BLEU and chrF
by sacreBLEU (its default 13a tokenizer and settings, so figures compare with published ones),
ROUGE-1/2/L/Lsum by Google's `rouge-score` (Porter stemming on, as in the T5 and BART papers).

Every function takes one prediction per example and, per example, one reference or a list of
them (their number may differ from example to example).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
References = Sequence[str | Sequence[str]]


def reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Each example's references as a list, checked against the predictions."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference entries: "
                         "give one entry (a string or a list of strings) per prediction")
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in lists):
        empty = next(i for i, refs in enumerate(lists) if not refs)
        raise ValueError(f"example {empty} has no reference: every prediction needs at least one")
    return lists


def _reference_streams(lists: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: one stream per reference index, None where an example has fewer."""
    width = max(len(refs) for refs in lists)
    return [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]


def bleu(predictions: Sequence[str], references: References) -> dict[str, float | str]:
    """Corpus BLEU (0–100) with its precisions, brevity penalty and sacreBLEU signature."""
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(list(predictions),
                                _reference_streams(reference_lists(predictions, references)))
    return {"bleu": score.score, **{f"bleu_precision_{n + 1}": p
                                    for n, p in enumerate(score.precisions)},
            "bleu_brevity_penalty": score.bp, "bleu_signature": str(metric.get_signature())}


def chrf(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Corpus chrF (0–100): character n-grams up to 6, β = 2 (sacreBLEU's defaults)."""
    score = sacrebleu.CHRF().corpus_score(
        list(predictions), _reference_streams(reference_lists(predictions, references)))
    return {"chrf": score.score}


def rouge(predictions: Sequence[str], references: References,
          types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean F-measure (0–100) over the examples of each ROUGE type; with several references an
    example scores its best one (`RougeScorer.score_multi`). ROUGE-Lsum splits sentences at
    newlines: put each sentence of a multi-sentence text on its own line."""
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score_multi(refs, prediction) for prediction, refs in
              zip(predictions, reference_lists(predictions, references), strict=True)]
    if not scores:
        raise ValueError("no predictions to score")
    return {t: 100.0 * float(np.mean([s[t].fmeasure for s in scores])) for t in types}


def generation_metrics(predictions: Sequence[str], references: References,
                       names: Sequence[str]) -> dict[str, float | str]:
    """The metrics `names` ('bleu', 'chrf', 'rouge') of the predictions, in one dict."""
    functions = {"bleu": bleu, "chrf": chrf, "rouge": rouge}
    unknown = [n for n in names if n not in functions]
    if unknown:
        raise ValueError(f"unknown generation metric(s) {unknown}; known: {sorted(functions)}")
    out: dict[str, float | str] = {}
    for name in names:
        out.update(functions[name](predictions, references))
    return out
