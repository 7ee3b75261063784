"""SemEval-2010 Task 8 official score: hand examples and the real test keys vs a corrupted copy."""

import numpy as np
import pytest

from transformer.metrics import semeval2010_task8_score
from transformer.metrics.relation import LABELS, RELATIONS


def test_hand_example():
    gold = [
        "Cause-Effect(e1,e2)",  # correct
        "Cause-Effect(e1,e2)",  # right relation, wrong direction
        "Cause-Effect(e2,e1)",  # missed (Other)
        "Other",  # spurious Cause-Effect
        "Component-Whole(e1,e2)",  # correct
        "Other",  # correct Other
        "Member-Collection(e2,e1)",  # predicted as Component-Whole
    ]
    pred = [
        "Cause-Effect(e1,e2)",
        "Cause-Effect(e2,e1)",
        "Other",
        "Cause-Effect(e2,e1)",
        "Component-Whole(e1,e2)",
        "Other",
        "Component-Whole(e1,e2)",
    ]
    res = semeval2010_task8_score(gold, pred)
    ce = res["per_relation"]["Cause-Effect"]
    # Cause-Effect: 1 correct; predicted 3 (incl. the wrong direction); gold 3.
    assert (ce["correct"], ce["predicted"], ce["support"], ce["wrong_direction"]) == (1, 3, 3, 1)
    assert (ce["precision"], ce["recall"], ce["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    cw = res["per_relation"]["Component-Whole"]
    assert (cw["precision"], cw["recall"], cw["f1"]) == pytest.approx((1 / 2, 1, 2 / 3))
    mc = res["per_relation"]["Member-Collection"]
    assert (mc["precision"], mc["recall"], mc["f1"]) == (0.0, 0.0, 0.0)
    assert res["macro_f1"] == pytest.approx((1 / 3 + 2 / 3) / 9)
    assert res["macro_precision"] == pytest.approx((1 / 3 + 1 / 2) / 9)
    assert res["macro_recall"] == pytest.approx((1 / 3 + 1) / 9)
    assert (res["micro_precision"], res["micro_recall"], res["micro_f1"]) == pytest.approx(
        (2 / 5, 2 / 5, 2 / 5)
    )
    assert res["accuracy"] == pytest.approx(3 / 7)
    # A padding example (weight 0) changes nothing.
    padded = semeval2010_task8_score([*gold, "Other"], [*pred, "Cause-Effect(e1,e2)"],
                                     weights=[1] * 7 + [0])
    assert padded == res


def test_direction_matters_and_other_is_excluded():
    gold = [f"{r}(e1,e2)" for r in RELATIONS] + ["Other"] * 3
    flipped = [f"{r}(e2,e1)" for r in RELATIONS] + ["Other"] * 3
    assert semeval2010_task8_score(gold, gold)["macro_f1"] == 1.0
    res = semeval2010_task8_score(gold, flipped)
    assert res["macro_f1"] == 0.0 and res["accuracy"] == pytest.approx(3 / 12)
    # Getting only Other right scores 0; Other predicted for everything scores 0.
    assert semeval2010_task8_score(gold, ["Other"] * 12)["macro_f1"] == 0.0
    with pytest.raises(ValueError, match="not a SemEval"):
        semeval2010_task8_score(["Other"], ["Cause-Effect(e1,e3)"])


def _read_test_labels(path):
    lines = path.read_bytes().decode("ascii").split("\r\n")
    labels = [lines[i + 1] for i in range(0, len(lines) - 1, 4) if lines[i].strip()]
    return labels


def _scorer_reference(gold, pred):
    """Straight from the official scorer's (9+1)-way directional evaluation: a confusion matrix
    over the 10 direction-less types in which a prediction of the right type but the wrong
    direction goes to a separate xDIRx column of its gold row; P = diag / (column sum + xDIRx),
    R = diag / (row sum + xDIRx); official score = mean F1 over the 9 relations."""
    types = [*RELATIONS, "Other"]
    index = {t: i for i, t in enumerate(types)}
    matrix = np.zeros((10, 10))
    wrong_dir = np.zeros(10)
    for g, p in zip(gold, pred):
        gi, pi = index[g.split("(")[0]], index[p.split("(")[0]]
        if gi == pi and g != p:
            wrong_dir[gi] += 1
        else:
            matrix[gi, pi] += 1
    f1s = []
    for i in range(9):
        den_p = matrix[:, i].sum() + wrong_dir[i]
        den_r = matrix[i, :].sum() + wrong_dir[i]
        p = matrix[i, i] / den_p if den_p else 0.0
        r = matrix[i, i] / den_r if den_r else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(f1s) / 9, f1s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_test_keys_against_scorer_definition(fixtures, seed):
    gold = _read_test_labels(fixtures / "semeval" / "TEST_FILE_FULL.TXT")
    assert len(gold) == 401 and set(gold) == set(LABELS)
    rng = np.random.default_rng(seed)
    pred = []
    for g in gold:
        u = rng.random()
        if u < 0.1 and g != "Other":  # wrong direction
            d = "(e2,e1)" if g.endswith("(e1,e2)") else "(e1,e2)"
            pred.append(g.split("(")[0] + d)
        elif u < 0.2:
            pred.append("Other")
        elif u < 0.3:
            pred.append(LABELS[rng.integers(len(LABELS))])
        else:
            pred.append(g)
    res = semeval2010_task8_score(gold, pred)
    want_macro, want_f1s = _scorer_reference(gold, pred)
    assert res["macro_f1"] == pytest.approx(want_macro, abs=1e-12)
    assert [res["per_relation"][r]["f1"] for r in RELATIONS] == pytest.approx(want_f1s, abs=1e-12)
    assert 0.5 < res["macro_f1"] < 0.9
    assert res["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, pred)]))
    assert sum(v["support"] for v in res["per_relation"].values()) == 401 - gold.count("Other")
