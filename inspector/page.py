"""One self-contained HTML page: the text coloured by any cell, next-character guesses, the feature ranking.

Everything the page needs is inside it (CSS, JavaScript, data), so it opens
from disk with no server and no network. The data travels as JSON in a
``<script type="application/json" id="charrnn-data">`` element:

- ``states[k].data``: base64 of int8 ``[T, layers, hidden]`` (C order); the
  activation is ``byte / 127``, in [-1, 1] (tanh(c) for the LSTM cell state, h
  for the hidden state). 8 bits keep a 3000-character page of a 2x256 LSTM
  near 4 MB; 1/254 is below what a colour shows.
- ``top5_chars[i]`` / ``top5_probs[i]``: the five likeliest characters after
  character ``i`` and their probabilities, most likely first, rounded down to
  1e-3 (so they stay sorted and sum to at most 1). ``next_prob[i]``: the
  probability the model gave to the character that really came next (null at
  the end).
- ``ranking``: per feature, its window of text, its values there and the best
  units with their Pearson r.

The text itself is one ``<span>`` per character inside ``<div id="text">``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn.inspector.ranking import FeatureRanking, feature_window
from charrnn.inspector.sweep import Sample
from charrnn.inspector.trace import STATE_LABELS, InspectedModel, Trace, softmax, top_k

_HERE = Path(__file__).parent
SCALE = 127  # int8 step: activation = byte / SCALE
WINDOW = 600  # characters of text shown for each feature's top cells


@dataclass(frozen=True)
class PageSource:
    """Where the text came from, for the page's header."""

    path: str  # the text file as given
    start: int  # offset of the first character shown, in characters of the file
    syntax: str  # the Syntax name used for quotes, comments and brackets
    dropped: int = 0  # characters left out because the model does not know them


def quantize(values: np.ndarray) -> str:
    """float [..] in [-1, 1] -> base64 of int8 round(v * 127), C order."""
    q = np.clip(np.rint(values.astype(np.float64) * SCALE), -SCALE, SCALE).astype(np.int8)
    return base64.b64encode(q.tobytes()).decode("ascii")


def page_data(
    model: InspectedModel,
    trace: Trace,
    rankings: tuple[FeatureRanking, ...],
    source: PageSource,
    samples: tuple[Sample, ...] = (),
    prime: str = "",
) -> dict:
    """The JSON the page's script reads (layout in the module docstring)."""
    meta = model.meta
    ids, probs = top_k(trace.logits, 5)  # [T, 5]
    probs = np.floor(probs * 1000) / 1000  # rounded down: sorted order and sum <= 1 survive
    index = {ch: i for i, ch in enumerate(meta.vocab)}
    p = softmax(trace.logits)  # [T, V]
    following = [index[ch] for ch in trace.text[1:]]
    next_prob = [round(float(p[i, j]), 4) for i, j in enumerate(following)] + [None]
    states = []
    for name, values in trace.states.items():
        T, L, H = values.shape
        states.append({"name": name, "label": STATE_LABELS[name], "layers": L, "hidden": H, "data": quantize(values)})
    ranking = []
    for r in rankings:
        start, end = feature_window(r.values, trace.text, WINDOW)
        window = r.values[start:end]
        top = float(np.max(np.abs(window))) or 1.0
        ranking.append(
            {
                "feature": r.feature.name,
                "label": r.feature.label,
                "present": r.present,
                "window": [start, end],
                "values": [round(float(v) / top, 3) for v in window],  # scaled to [0, 1] for shading
                "best": [
                    {"state": u.state, "layer": u.layer, "cell": u.cell, "r": round(rv, 4)} for u, rv in r.best
                ],
            }
        )
    return {
        "model": {
            "label": model.label,
            "path": str(model.path),
            "cell": meta.cell,
            "layers": meta.layers,
            "hidden": meta.hidden,
            "vocab_size": meta.vocab_size,
            "val_loss": None if math.isnan(meta.val_loss) else meta.val_loss,
            "train_steps": meta.train_steps,
        },
        "source": {"path": source.path, "start": source.start, "syntax": source.syntax, "dropped": source.dropped},
        "text": trace.text,
        "scale": SCALE,
        "states": states,
        "top5_chars": ["".join(meta.vocab[j] for j in row) for row in ids],
        "top5_probs": probs.tolist(),
        "next_prob": next_prob,
        "ranking": ranking,
        "sweep": {"prime": prime, "samples": [{"temperature": s.temperature, "text": s.text} for s in samples]},
    }


def _script_json(data: dict) -> str:
    """JSON safe inside <script>: with every '<' escaped, no '</script' or '<!--' can upset the HTML parser."""
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")


def _ranking_html(rankings: tuple[FeatureRanking, ...]) -> str:
    parts = []
    for r in rankings:
        name = html.escape(r.feature.name)
        parts.append(f'<div class="feature" id="feature-{name}">')
        parts.append(f"<h3>{html.escape(r.feature.label)}</h3>")
        if not r.present:
            parts.append('<p class="absent">Not present in this text: the feature never changes, so no cell can '
                         "be scored against it.</p></div>")
            continue
        parts.append('<div class="cards"><div class="card"><div class="unit">the feature itself</div>'
                     f'<div class="snippet feature-track" data-feature="{name}" data-rank="feature"></div></div>')
        for rank, (unit, rv) in enumerate(r.best):
            parts.append(
                f'<div class="card"><div class="unit"><button class="pick" data-state="{unit.state}" '
                f'data-layer="{unit.layer}" data-cell="{unit.cell}" title="show this cell in the viewer above">'
                f"{html.escape(unit.describe())}</button> "
                f'<span class="r">r = {rv:+.3f}</span></div>'
                f'<div class="snippet" data-feature="{name}" data-rank="{rank}"></div></div>'
            )
        parts.append("</div>")
        parts.append("</div>")
    return "\n".join(parts)


def _sweep_html(samples: tuple[Sample, ...], prime: str) -> str:
    if not samples:
        return ""
    parts = ['<section id="sweep"><h2>Samples at several temperatures</h2>',
             f"<p>Prime {html.escape(repr(prime or chr(10)))}; every temperature draws from the same seed.</p>"]
    for s in samples:
        name = "greedy (0)" if s.temperature == 0 else f"{s.temperature:g}"
        parts.append(f'<h3>temperature {name}</h3><pre class="sample">'
                     f'<span class="prime">{html.escape(prime)}</span>{html.escape(s.text)}</pre>')
    parts.append("</section>")
    return "\n".join(parts)


def render_page(
    model: InspectedModel,
    trace: Trace,
    rankings: tuple[FeatureRanking, ...],
    source: PageSource,
    samples: tuple[Sample, ...] = (),
    prime: str = "",
) -> str:
    data = page_data(model, trace, rankings, source, samples, prime)
    css = (_HERE / "page.css").read_text(encoding="utf-8")
    js = (_HERE / "page.js").read_text(encoding="utf-8")
    # A newline's span shows a faint arrow (CSS ::before, not text), so its activation has a place to show.
    spans = "".join(
        '<span class="nl">\n</span>' if ch == "\n" else f"<span>{html.escape(ch)}</span>" for ch in trace.text
    )
    shown = f"{len(trace.text)} characters of {source.path}, from character {source.start}"
    if source.dropped:
        shown += f" ({source.dropped} unknown characters left out)"
    summary = html.escape(model.describe())
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>charrnn-inspect: {html.escape(model.label)}</title>
<style>
{css}
</style>
</head>
<body>
<header>
<h1>What the cells of <code>{html.escape(model.label)}</code> do</h1>
<p class="meta">{summary}<br>{html.escape(shown)}; syntax: {html.escape(source.syntax)}</p>
</header>
<section id="viewer">
<div class="controls">
<label>state <select id="state"></select></label>
<label>layer <select id="layer"></select></label>
<label>cell <input id="cell" type="number" min="0" value="0"></label>
<button id="prev" title="previous cell (key: left arrow)">&#9664;</button>
<button id="next" title="next cell (key: right arrow)">&#9654;</button>
<span class="legend"><span class="swatch neg"></span>&minus;1 <span class="swatch zero"></span>0
<span class="swatch pos"></span>+1</span>
<span id="unit-note"></span>
</div>
<div class="main">
<div id="text" class="text">{spans}</div>
<aside id="panel"><p class="hint">Point at a character to see the five characters the model
expected next.</p></aside>
</div>
<div id="strip" class="strip"></div>
</section>
<section id="ranking">
<h2>Cells that track simple features</h2>
<p class="explain">Each feature is a number per character, taken after reading that character
(an opening quote is inside, the closing quote outside). Every cell of every layer, in both
states, is scored by the Pearson correlation <i>r</i> of its activation with the feature over the
whole text; the best three by |<i>r</i>| are shown on the part of the text where the feature
changes most, beside the feature itself (green). Click a cell's name to colour the whole
text by it.</p>
{_ranking_html(rankings)}
</section>
{_sweep_html(samples, prime)}
<script type="application/json" id="charrnn-data">{_script_json(data)}</script>
<script>
{js}
</script>
</body>
</html>
"""
