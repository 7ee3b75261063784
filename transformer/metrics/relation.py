"""SemEval-2010 Task 8 official score: (9+1)-way macro-F1 with directionality taken into account.

Labels are the 19 strings `Rel(e1,e2)`, `Rel(e2,e1)` for the 9 relations in `RELATIONS`, and
`Other`. This reproduces the official scorer (`semeval2010_task8_scorer-v1.2.pl`, section
"(9+1)-way evaluation with directionality taken into account", its "official score"):

For each relation type R (both directions pooled, Other excluded):
    TP_R    = #{examples with gold label == predicted label and relation type R}
              (a prediction of the right type with the wrong direction is not a true positive)
    PRED_R  = #{examples predicted as type R, either direction}
              (= the scorer's column sum + its "xDIRx" wrong-direction count)
    GOLD_R  = #{examples whose gold label has type R, either direction}
    P_R = TP_R / PRED_R,  R_R = TP_R / GOLD_R,  F1_R = 2 P_R R_R / (P_R + R_R)   (0 if 0/0)
Official score = macro F1 = (1/9) sum_R F1_R (the mean of the 9 per-type F1s, not the F1 of the
mean P and R). Macro P and R are the means of P_R and R_R; micro P/R/F1 (excluding Other) pool
TP, PRED and GOLD over the 9 types. Accuracy is the fraction of exactly correct labels
(direction included, Other counted like any label). Scores are fractions in [0, 1]; the scorer
prints them ×100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RELATIONS = (
    "Cause-Effect",
    "Component-Whole",
    "Content-Container",
    "Entity-Destination",
    "Entity-Origin",
    "Instrument-Agency",
    "Member-Collection",
    "Message-Topic",
    "Product-Producer",
)
OTHER = "Other"
LABELS = tuple(f"{r}({d})" for r in RELATIONS for d in ("e1,e2", "e2,e1")) + (OTHER,)
_VALID = frozenset(LABELS)


def relation_type(label: str) -> str:
    """The relation without its direction: `Cause-Effect(e2,e1)` -> `Cause-Effect`."""
    if label not in _VALID:
        raise ValueError(f"{label!r} is not a SemEval-2010 Task 8 label (one of {LABELS})")
    return label.split("(", 1)[0]


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def semeval2010_task8_score(
    gold: Sequence[str], predicted: Sequence[str], weights: Sequence[float] | None = None
) -> dict[str, Any]:
    """Official SemEval-2010 Task 8 scores (see the module docstring for the formulas).

    Examples with weight 0 in `weights` (padding) are skipped; other weights must be 1.
    Returns {"macro_f1" (the official score), "macro_precision", "macro_recall",
    "micro_precision", "micro_recall", "micro_f1", "accuracy", "per_relation": {R: {"precision",
    "recall", "f1", "support" (GOLD_R), "predicted" (PRED_R), "correct" (TP_R),
    "wrong_direction"}}}.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    stats = {r: dict.fromkeys(("correct", "predicted", "support", "wrong_direction"), 0)
             for r in RELATIONS}
    total = exact = 0
    for n, (g, p) in enumerate(zip(gold, predicted)):
        if weights is not None:
            if weights[n] == 0:
                continue
            if weights[n] != 1:
                raise ValueError(f"example weights must be 0 or 1, got {weights[n]} at {n}")
        g_type, p_type = relation_type(g), relation_type(p)
        total += 1
        exact += g == p
        if g_type != OTHER:
            stats[g_type]["support"] += 1
            stats[g_type]["correct"] += g == p
        if p_type != OTHER:
            stats[p_type]["predicted"] += 1
        if g_type == p_type != OTHER and g != p:
            stats[g_type]["wrong_direction"] += 1
    per_relation = {}
    for r, s in stats.items():
        p, rec, f = _prf(s["correct"], s["predicted"], s["support"])
        per_relation[r] = {"precision": p, "recall": rec, "f1": f, **s}
    micro = _prf(*(sum(s[k] for s in stats.values())
                   for k in ("correct", "predicted", "support")))
    k = len(RELATIONS)
    return {
        "macro_f1": sum(v["f1"] for v in per_relation.values()) / k,
        "macro_precision": sum(v["precision"] for v in per_relation.values()) / k,
        "macro_recall": sum(v["recall"] for v in per_relation.values()) / k,
        "micro_precision": micro[0],
        "micro_recall": micro[1],
        "micro_f1": micro[2],
        "accuracy": exact / total if total else 0.0,
        "per_relation": per_relation,
    }
