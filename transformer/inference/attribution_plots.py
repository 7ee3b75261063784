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


def _ink(shade: float) -> str:
    """Black text on light backgrounds, white on the dark ends of the colour map."""
    return "white" if abs(shade - 0.5) > 0.32 else "black"


def plot_token_attributions(tokens: Sequence[str], scores: Sequence[float],
                            path: str | os.PathLike, title: str = "") -> None:
    """The tokens as wrapped text, each on a background coloured by its score, and a colour bar;
    the figure is as tall as the lines of text need."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    cmap, norm, scores = _colours(scores)
    width, text_width, line, top = 9.0, 7.6, 0.34, 0.55  # Inches.
    style = dict(fontsize=11, va="top", ha="left", family="monospace")
    measure = Figure(figsize=(width, 2), dpi=120)
    renderer = FigureCanvasAgg(measure).get_renderer()
    widths = [measure.text(0, 0, token, **style).get_window_extent(renderer).width / 120 + 0.12
              for token in tokens]
    places, x, row = [], 0.0, 0
    for w in widths:
        if x > 0 and x + w > text_width:  # Wrap: this token starts a new line.
            x, row = 0.0, row + 1
        places.append((x, row))
        x += w
    height = max(1.6, top + (row + 1) * line + 0.3)
    figure = Figure(figsize=(width, height), dpi=120)
    for token, score, (x, row) in zip(tokens, scores, places):
        shade = norm(score)
        box = dict(boxstyle="round,pad=0.2", facecolor=cmap(shade), edgecolor="none")
        figure.text((0.2 + x) / width, 1 - (top + row * line) / height, token,
                    color=_ink(shade), bbox=box, **style)
    bar = figure.add_axes((0.9, 0.3 / height, 0.015, 1 - (top + 0.3) / height))
    figure.colorbar(ScalarMappable(norm, cmap), cax=bar, label="attribution")
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    paths.save_figure(figure, path)


def token_attributions_html(tokens: Sequence[str], scores: Sequence[float], title: str = "") -> str:
    """The same picture as an HTML page: one <span> per token, its score in the tooltip."""
    from matplotlib.colors import to_hex

    cmap, norm, scores = _colours(scores)
    spans = "".join(
        f'<span title="{score:+.4g}" style="background:{to_hex(cmap(norm(score)))};'
        f'color:{_ink(norm(score))};'
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
