"""Pictures of attributions and attention: tokens coloured by their score (PNG and HTML), a
layer × head grid of attention maps, and the attention rollout."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformer import paths

_MAX_TICK_LABELS = 32  # Beyond that, token names on the axes overlap into a grey band.


def _colours(scores: Sequence[float]) -> tuple[Any, Any, np.ndarray]:
    """A diverging colour map centred on 0 (red positive, blue negative), its normaliser, and
    the scores as an array."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    scores = np.asarray(scores, np.float64)
    limit = float(np.abs(scores).max()) if scores.size else 0.0
    return colormaps["RdBu_r"], Normalize(-limit or -1.0, limit or 1.0), scores


def plot_token_attributions(tokens: Sequence[str], scores: Sequence[float],
                            path: str | os.PathLike, title: str = "") -> None:
    """The tokens as wrapped text, each on a background coloured by its score, and a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    cmap, norm, scores = _colours(scores)
    figure = Figure(figsize=(9, 3), dpi=120)
    renderer = FigureCanvasAgg(figure).get_renderer()
    axes = figure.add_axes((0.02, 0.05, 0.84, 0.8))
    axes.set_axis_off()
    width = axes.get_window_extent(renderer).width
    x, y, line = 0.0, 0.95, 0.12
    for token, score in zip(tokens, scores):
        text = axes.text(x, y, token, fontsize=11, va="top", ha="left", family="monospace",
                         bbox=dict(boxstyle="round,pad=0.2", facecolor=cmap(norm(score)),
                                   edgecolor="none"))
        advance = text.get_window_extent(renderer).width / width + 0.012
        if x > 0 and x + advance > 1.0:  # Wrap: move this token to the start of a new line.
            x, y = 0.0, y - line
            text.set_position((x, y))
        x += advance
    axes.set_ylim(min(0.0, y - line), 1.0)
    bar = figure.add_axes((0.89, 0.1, 0.02, 0.7))
    figure.colorbar(ScalarMappable(norm, cmap), cax=bar, label="attribution")
    if title:
        figure.suptitle(title, fontsize=10)
    paths.save_figure(figure, path)


def token_attributions_html(tokens: Sequence[str], scores: Sequence[float], title: str = "") -> str:
    """The same picture as an HTML page: one <span> per token, its score in the tooltip."""
    from matplotlib.colors import to_hex

    cmap, norm, scores = _colours(scores)
    spans = "".join(
        f'<span title="{score:+.4g}" style="background:{to_hex(cmap(norm(score)))};'
        f'padding:1px 3px;margin:1px;border-radius:3px;font-family:monospace">'
        f"{html.escape(token)}</span> " for token, score in zip(tokens, scores))
    heading = f"<h3>{html.escape(title)}</h3>\n" if title else ""
    return (f"<!doctype html>\n<meta charset='utf-8'>\n{heading}<p style='line-height:2'>{spans}"
            "</p>\n<p>red: raises the explained output; blue: lowers it</p>\n")


def _label_axes(axes: Any, tokens: Sequence[str], rows: bool, columns: bool) -> None:
    n = len(tokens)
    show = n <= _MAX_TICK_LABELS
    axes.set_xticks(range(n) if show and columns else [])
    axes.set_yticks(range(n) if show and rows else [])
    if show and columns:
        axes.set_xticklabels(tokens, rotation=90, fontsize=6)
    if show and rows:
        axes.set_yticklabels(tokens, fontsize=6)


def plot_attention_grid(weights: Any, tokens: Sequence[str], path: str | os.PathLike,
                        title: str = "") -> None:
    """One input's attention maps [layers, heads, queries, keys]: a row per layer, a column per
    head; queries down, keys across."""
    from matplotlib.figure import Figure

    weights = np.asarray(weights)
    layers, heads = weights.shape[:2]
    figure = Figure(figsize=(1.9 * heads + 1, 1.9 * layers + 1), dpi=110)
    grid = figure.subplots(layers, heads, squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            axes = grid[layer, head]
            axes.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            _label_axes(axes, tokens, rows=head == 0, columns=layer == layers - 1)
            if layer == 0:
                axes.set_title(f"head {head}", fontsize=8)
            if head == 0:
                axes.set_ylabel(f"layer {layer}", fontsize=8)
    figure.suptitle(title or "attention weights (rows: queries, columns: keys)", fontsize=10)
    figure.tight_layout()
    paths.save_figure(figure, path)


def plot_rollout(rollout: Any, tokens: Sequence[str], path: str | os.PathLike,
                 title: str = "") -> None:
    """An attention-rollout matrix [tokens, tokens] with a colour bar."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.2), dpi=120)
    axes = figure.add_subplot()
    image = axes.imshow(np.asarray(rollout), cmap="viridis")
    _label_axes(axes, tokens, rows=True, columns=True)
    axes.set_xlabel("input token")
    axes.set_ylabel("position in the last layer")
    figure.colorbar(image, ax=axes)
    axes.set_title(title or "attention rollout", fontsize=10)
    figure.tight_layout()
    paths.save_figure(figure, path)
