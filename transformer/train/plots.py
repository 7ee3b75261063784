"""Loss curves from WORKDIR/metrics.jsonl, as a PNG beside it."""

from __future__ import annotations

import json
import os

from etils import epath

from transformer import paths


def plot_loss_curves(workdir: str | os.PathLike) -> epath.Path | None:
    """Train and eval loss against step → WORKDIR/loss.png (None when nothing was logged)."""
    workdir = paths.as_path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=120)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(workdir.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = workdir / "loss.png"
    paths.save_figure(figure, out)
    return out
