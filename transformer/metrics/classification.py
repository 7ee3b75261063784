"""Classification metrics over a whole evaluation split: accuracy, P/R/F1, confusion matrix.

Definitions follow scikit-learn (`accuracy_score`, `precision_recall_fscore_support`,
`confusion_matrix`) with its zero-division convention: a ratio whose denominator is 0 is 0, and
F1 is 0 when precision + recall is 0 or when a class has no true, no predicted and no correct
examples.

Inputs are integer class ids of any shape (sequence-level `(batch,)` or token-level
`(batch, length)`). Positions whose label is `IGNORE_INDEX` (-100) are dropped. `weights` are
per-example (or per-position) weights broadcast against the labels from the leading axes; a
weight of 0 removes a (padding) example, other weights scale its counts like scikit-learn's
`sample_weight`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformer import paths

IGNORE_INDEX = -100


def _flatten(
    labels: Any, predictions: Any, weights: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (labels, predictions, weights) with ignored and zero-weight positions removed."""
    y_true = np.asarray(labels)
    y_pred = np.asarray(predictions)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    if weights is None:
        w = np.ones(y_true.shape, dtype=np.float64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != y_true.shape[: w.ndim]:
            raise ValueError(
                f"weights {w.shape} must equal the leading axes of labels {y_true.shape}"
            )
        w = np.broadcast_to(w.reshape(w.shape + (1,) * (y_true.ndim - w.ndim)), y_true.shape)
    keep = (y_true != IGNORE_INDEX) & (w != 0)
    return y_true[keep].astype(np.int64), y_pred[keep].astype(np.int64), w[keep]


def _label_set(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.union1d(y_true, y_pred)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def accuracy(labels: Any, predictions: Any, weights: Any | None = None) -> float:
    """Weighted fraction of positions where the prediction equals the label (0.0 if none)."""
    y_true, y_pred, w = _flatten(labels, predictions, weights)
    total = w.sum()
    return float((w * (y_true == y_pred)).sum() / total) if total else 0.0


def _counts(
    y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (true positives, predicted count, true count), weighted."""
    tp = np.array([w[(y_true == c) & (y_pred == c)].sum() for c in classes], dtype=np.float64)
    pred = np.array([w[y_pred == c].sum() for c in classes], dtype=np.float64)
    true = np.array([w[y_true == c].sum() for c in classes], dtype=np.float64)
    return tp, pred, true


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _safe_div(2 * p * r, p + r)


def precision_recall_f1(
    labels: Any,
    predictions: Any,
    *,
    average: str | None = "macro",
    classes: Sequence[int] | None = None,
    weights: Any | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1 and support like `sklearn.metrics.precision_recall_fscore_support`.

    `average`: "micro" (pool counts over `classes`), "macro" (unweighted mean of per-class scores)
    or None (per-class arrays). `classes` defaults to the sorted union of the ids in labels and
    predictions (scikit-learn's default); pass `range(num_classes)` to include absent classes.
    Returns a dict with "precision", "recall", "f1" and "support" (the weighted true count per
    class; summed for averaged results) and "classes".
    """
    y_true, y_pred, w = _flatten(labels, predictions, weights)
    cls = _label_set(y_true, y_pred, classes)
    tp, pred, true = _counts(y_true, y_pred, w, cls)
    if average == "micro":
        p = _safe_div(tp.sum(), pred.sum())
        r = _safe_div(tp.sum(), true.sum())
        return {
            "precision": float(p),
            "recall": float(r),
            "f1": float(_f1(p, r)),
            "support": float(true.sum()),
            "classes": cls,
        }
    p, r = _safe_div(tp, pred), _safe_div(tp, true)
    f = _f1(p, r)
    if average is None:
        return {"precision": p, "recall": r, "f1": f, "support": true, "classes": cls}
    if average == "macro":
        return {
            "precision": float(p.mean()) if p.size else 0.0,
            "recall": float(r.mean()) if r.size else 0.0,
            "f1": float(f.mean()) if f.size else 0.0,
            "support": float(true.sum()),
            "classes": cls,
        }
    raise ValueError(f"average must be 'micro', 'macro' or None, got {average!r}")


def binary_f1(
    labels: Any, predictions: Any, *, pos_label: int = 1, weights: Any | None = None
) -> dict[str, float]:
    """Precision, recall and F1 of the class `pos_label` (scikit-learn `average="binary"`)."""
    res = precision_recall_f1(labels, predictions, average=None, classes=[pos_label],
                              weights=weights)
    return {k: float(res[k][0]) for k in ("precision", "recall", "f1", "support")}


def confusion_matrix(
    labels: Any,
    predictions: Any,
    *,
    num_classes: int | None = None,
    weights: Any | None = None,
) -> np.ndarray:
    """Confusion matrix `C[i, j]` = (weighted) count of examples with label i predicted as j.

    Rows are true classes, columns predicted classes, for class ids `0 .. num_classes - 1`
    (default: the largest id seen + 1). Integer counts without weights, float64 with weights.
    """
    y_true, y_pred, w = _flatten(labels, predictions, weights)
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    bad = (y_true < 0) | (y_true >= num_classes) | (y_pred < 0) | (y_pred >= num_classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} labels/predictions outside 0..{num_classes - 1}; pass num_classes"
        )
    matrix = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(matrix, (y_true, y_pred), w)
    return matrix.astype(np.int64) if weights is None else matrix


def save_confusion_matrix(
    matrix: np.ndarray,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    title: str = "Confusion matrix",
) -> dict[str, str | None]:
    """Write `matrix` as `<path>.csv` and, if matplotlib is installed, as a `<path>.png` heatmap.

    The CSV has a header row `true\\pred,<names...>` and one row per true class. `path` is taken
    without suffix (a `.csv`/`.png` suffix is stripped). Returns {"csv": path, "png": path or None,
    "note": why no PNG was written, or None}.
    """
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    if matrix.shape != (n, n):
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    names = [str(c) for c in (class_names if class_names is not None else range(n))]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    base = paths.as_path(path)  # Local or gs://.
    if base.suffix in (".csv", ".png"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    csv_path = base.with_suffix(".csv")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["true\\pred", *names])
    for name, row in zip(names, matrix):
        writer.writerow([name, *(v.item() for v in row)])
    csv_path.write_bytes(text.getvalue().encode())
    result: dict[str, str | None] = {"csv": str(csv_path), "png": None, "note": None}
    try:
        from matplotlib.figure import Figure  # optional; Figure needs no GUI backend
    except ImportError:
        result["note"] = "matplotlib is not installed: wrote the CSV only, no PNG heatmap"
        return result
    size = max(4.0, 0.6 * n + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    threshold = matrix.max() / 2 if matrix.size else 0
    integral = np.issubdtype(matrix.dtype, np.integer)
    for i in range(n):
        for j in range(n):
            text = f"{matrix[i, j]:d}" if integral else f"{matrix[i, j]:.3g}"
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    png_path = base.with_suffix(".png")
    paths.save_figure(fig, png_path, dpi=100)
    result["png"] = str(png_path)
    return result
