"""Classification metrics against scikit-learn on fixed random inputs."""

import csv
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from transformer.metrics import (
    accuracy,
    binary_f1,
    confusion_matrix,
    precision_recall_f1,
    save_confusion_matrix,
)

NUM_CLASSES = 7


def _case(seed: int, weighted: bool):
    """Labels use classes 0-5; predictions never use class 5 but sometimes class 6 (no label)."""
    rng = np.random.default_rng(seed)
    n = 300
    y_true = rng.integers(0, 6, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 4, n))
    y_pred = np.where(y_pred == 5, 3, y_pred)
    y_pred = np.where(rng.random(n) < 0.05, 6, y_pred)
    w = rng.choice([0.0, 0.5, 1.0, 2.0], size=n) if weighted else None
    return y_true, y_pred, w


def _sk_prf(y_true, y_pred, w, average, labels=None):
    return skm.precision_recall_fscore_support(
        y_true, y_pred, average=average, sample_weight=w, labels=labels, zero_division=0
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_sklearn(seed, weighted):
    y_true, y_pred, w = _case(seed, weighted)
    assert 5 not in y_pred and 6 in y_pred and 6 not in y_true
    assert accuracy(y_true, y_pred, w) == pytest.approx(
        skm.accuracy_score(y_true, y_pred, sample_weight=w), abs=1e-12
    )
    for average in ("micro", "macro"):
        ours = precision_recall_f1(y_true, y_pred, average=average, weights=w)
        p, r, f, _ = _sk_prf(y_true, y_pred, w, average)
        got = (ours["precision"], ours["recall"], ours["f1"])
        assert got == pytest.approx((p, r, f), abs=1e-12)
    ours = precision_recall_f1(y_true, y_pred, average=None, weights=w)
    p, r, f, s = _sk_prf(y_true, y_pred, w, None)
    for key, ref in zip(("precision", "recall", "f1", "support"), (p, r, f, s)):
        np.testing.assert_allclose(ours[key], ref, atol=1e-12)
    assert list(ours["classes"]) == list(range(NUM_CLASSES))
    assert ours["f1"][5] == 0.0 and ours["precision"][6] == 0.0  # zero-division convention
    np.testing.assert_allclose(
        confusion_matrix(y_true, y_pred, num_classes=NUM_CLASSES, weights=w),
        skm.confusion_matrix(y_true, y_pred, labels=range(NUM_CLASSES), sample_weight=w),
    )


def test_classes_absent_from_labels_and_predictions():
    y_true, y_pred, _ = _case(7, False)
    keep = (y_true != 5) & (y_pred != 6)  # classes 5 and 6 now absent from both
    y_true, y_pred = y_true[keep], y_pred[keep]
    classes = list(range(NUM_CLASSES + 1))
    for average in ("micro", "macro", None):
        ours = precision_recall_f1(y_true, y_pred, average=average, classes=classes)
        p, r, f, _ = _sk_prf(y_true, y_pred, None, average, labels=classes)
        np.testing.assert_allclose(ours["precision"], p, atol=1e-12)
        np.testing.assert_allclose(ours["recall"], r, atol=1e-12)
        np.testing.assert_allclose(ours["f1"], f, atol=1e-12)
    default = precision_recall_f1(y_true, y_pred, average="macro")
    assert list(default["classes"]) == [0, 1, 2, 3, 4]
    assert default["f1"] != pytest.approx(
        precision_recall_f1(y_true, y_pred, average="macro", classes=classes)["f1"]
    )


def test_token_level_ignore_index_and_example_weights():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, (8, 20))
    preds = np.where(rng.random((8, 20)) < 0.5, labels, rng.integers(0, 4, (8, 20)))
    labels[rng.random((8, 20)) < 0.2] = -100
    example_w = np.array([1, 1, 0, 1, 1, 0, 1, 1], dtype=float)  # two padding examples
    keep = (labels != -100) & (example_w[:, None] > 0)
    yt, yp = labels[keep], preds[keep]
    assert accuracy(labels, preds, example_w) == pytest.approx(skm.accuracy_score(yt, yp))
    ours = precision_recall_f1(labels, preds, average="macro", weights=example_w)
    p, r, f, _ = _sk_prf(yt, yp, None, "macro")
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))
    np.testing.assert_array_equal(
        confusion_matrix(labels, preds, num_classes=4, weights=example_w),
        skm.confusion_matrix(yt, yp, labels=range(4)),
    )
    assert confusion_matrix(labels, preds).dtype == np.int64


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_f1(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, 1 - y_true)
    w = rng.random(200)
    for pos in (0, 1):
        ours = binary_f1(y_true, y_pred, pos_label=pos, weights=w)
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, average="binary", pos_label=pos, sample_weight=w
        )
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))
    assert binary_f1([0, 0, 1], [0, 0, 0])["f1"] == 0.0


def test_confusion_matrix_hand_example_and_errors():
    got = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    np.testing.assert_array_equal(got, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        accuracy([0, 1], [0, 1, 1])


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_save_confusion_matrix_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    matrix = np.array([[3, 1], [0, 4]])
    out = save_confusion_matrix(matrix, tmp_path / "cm", class_names=["neg", "pos"])
    assert out["png"] is None and "matplotlib" in out["note"]
    assert not (tmp_path / "cm.png").exists()
    assert _read_csv(out["csv"]) == [["true\\pred", "neg", "pos"], ["neg", "3", "1"],
                                     ["pos", "0", "4"]]


def test_save_confusion_matrix_png(tmp_path):
    matrix = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], num_classes=3)
    out = save_confusion_matrix(matrix, tmp_path / "sub" / "cm.png")
    assert out["note"] is None and out["csv"].endswith("cm.csv")
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert _read_csv(out["csv"])[3] == ["2", "0", "1", "1"]
