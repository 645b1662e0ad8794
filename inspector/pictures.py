"""PNG pictures of text coloured by one cell, for documents where the HTML page cannot go.

Drawn on a bare matplotlib ``Figure`` (its Agg canvas: no display, no pyplot
and no global backend switch), then reduced to a 64-colour palette with
Pillow, which keeps a picture at a few tens of KB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from charrnn.inspector.ranking import FeatureRanking, feature_window
from charrnn.inspector.trace import Trace

NEGATIVE = np.array([33, 102, 172]) / 255  # the page's colours: blue below zero,
POSITIVE = np.array([214, 47, 39]) / 255  # red above, white at zero
STRENGTH = 0.8  # the colour at |v| = 1 is 80% of the way from white: dark glyphs stay readable
LIGHT_GLYPH = 0.75  # from this |v| on, glyphs are drawn white


def _colours(values: np.ndarray) -> np.ndarray:
    """[n] in [-1, 1] -> RGB [n, 3]: white blended toward blue or red by |v|."""
    v = np.clip(values, -1, 1)[:, None]
    target = np.where(v < 0, NEGATIVE, POSITIVE)
    return 1 - STRENGTH * np.abs(v) * (1 - target)


def _grid(text: str, cols: int, rows: int) -> list[list[int]]:
    """Character offsets laid out as lines of at most ``cols``; a newline is the last cell of its line."""
    lines: list[list[int]] = [[]]
    for i, ch in enumerate(text):
        if len(lines[-1]) == cols:
            lines.append([])
        lines[-1].append(i)
        if ch == "\n":
            lines.append([])
    while lines and not lines[-1]:
        lines.pop()
    return lines[:rows]


def draw_text(text: str, values: np.ndarray, title: str, path: Path, *, cols: int = 80, rows: int = 12) -> Path:
    """Writes ``text`` (its first ``rows`` lines) with each character on its activation colour."""
    grid = _grid(text, cols, rows)
    # Wide enough for the title too (8.5 pt DejaVu Sans averages about 0.85 of a monospace cell).
    width = max(max((len(line) for line in grid), default=1), int(0.85 * len(title)) + 2)
    image = np.ones((len(grid), width, 3))
    for r, line in enumerate(grid):
        if line:
            image[r, : len(line)] = _colours(values[line])
    cell_w, cell_h, pad, head = 0.078, 0.19, 0.12, 0.3  # inches; a cell fits an 8.5 pt DejaVu Sans Mono glyph
    fig_w, fig_h = 2 * pad + width * cell_w, head + len(grid) * cell_h + pad
    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.add_axes((pad / fig_w, pad / fig_h, width * cell_w / fig_w, len(grid) * cell_h / fig_h))
    ax.imshow(image, aspect="auto", interpolation="nearest", extent=(-0.5, width - 0.5, len(grid) - 0.5, -0.5))
    for r, line in enumerate(grid):
        for c, i in enumerate(line):
            if text[i] == "\n":  # a faint arrow, as on the page, so the newline's activation has a cell
                ax.text(c, r, "\u21b5", ha="center", va="center", family="DejaVu Sans Mono", fontsize=7,
                        color="#8c959f")
            elif not text[i].isspace():
                ink = "white" if abs(values[i]) >= LIGHT_GLYPH else "#1f2328"
                ax.text(c, r, text[i], ha="center", va="center", family="DejaVu Sans Mono", fontsize=8.5, color=ink)
    ax.set_axis_off()
    fig.text(pad / fig_w, 1 - 0.07 / fig_h, title, ha="left", va="top", fontsize=8.5, family="DejaVu Sans")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)
    return path


def draw_rankings(
    trace: Trace, rankings: tuple[FeatureRanking, ...], folder: Path, *, model_label: str, window: int = 700
) -> list[Path]:
    """One picture per feature present: its best cell on the window of text where the feature changes most."""
    written = []
    for r in rankings:
        if not r.best:
            continue
        unit, rv = r.best[0]
        start, end = feature_window(r.values, trace.text, window)
        while start < end - 1 and trace.text[start] == "\n":
            start += 1  # a picture starts with text, not with blank lines
        acts = trace.states[unit.state][start:end, unit.layer, unit.cell]
        title = f"{r.feature.label}: {unit.describe()} of {model_label}, r = {rv:+.2f}"
        written.append(draw_text(trace.text[start:end], acts, title, folder / f"{r.feature.name}.png"))
    return written
