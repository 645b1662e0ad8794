"""The inspector's recording and HTML page, on tiny random models exported by the real exporter."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from charrnn import modelfile as mf
from charrnn.inspector.features import SYNTAXES, features_for
from charrnn.inspector.page import SCALE, PageSource, render_page
from charrnn.inspector.ranking import rank_cells
from charrnn.inspector.sweep import sweep
from charrnn.inspector.trace import encode, open_model, softmax, trace_text, zero_state
from testkit.browser import BROWSER, MISSING, chromium, open_page
from testkit.modelfactory import make_model_file

VOCAB = "\n !\"#'(),-./:;<>?&ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz{}"
TEXT = 'ROMEO:\nSay "what (is) it" & <go>.\n\nJULIET:\n(a [b] {c}) "d"\n' * 3


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / mf.MODEL_FILE
    make_model_file(path, cell=request.param, layers=2, hidden=8, vocab=VOCAB, seed=3)
    return open_model(path)


@pytest.fixture(scope="module")
def page(model):
    text, ids = encode(TEXT, model.meta)
    trace = trace_text(model, text, ids)
    rankings = rank_cells(trace, features_for(SYNTAXES["prose"]))
    samples = sweep(model, "ROMEO:", (0.5, 1.0), seed=1, chars=40)
    html = render_page(model, trace, rankings, PageSource("t.txt", 0, "prose"), samples, "ROMEO:")
    return html, trace


class PageParser(HTMLParser):
    """Collects the text spans of <div id="text">, the JSON data and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.spans: list[str] = []
        self.links: list[tuple[str, str]] = []
        self.json = ""
        self._stack: list[str] = []
        self._in_text = 0  # depth inside <div id="text">
        self._span: list[str] | None = None
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [(tag, v) for k, v in attrs if k in ("src", "href")]
        if self._in_text:
            self._in_text += 1
            if tag == "span":
                assert self._span is None, "a text span holds another element"
                self._span = []
        elif tag == "div" and a.get("id") == "text":
            self._in_text = 1
        self._in_data = tag == "script" and a.get("id") == "charrnn-data"

    def handle_endtag(self, tag):
        if self._in_text:
            self._in_text -= 1
            if tag == "span":
                self.spans.append("".join(self._span))
                self._span = None
        self._in_data = False

    def handle_data(self, data):
        if self._span is not None:
            self._span.append(data)
        if self._in_data:
            self.json += data


def parse(html: str) -> PageParser:
    p = PageParser()
    p.feed(html)
    p.close()
    return p


def test_each_character_of_the_text_is_one_span_in_order(page):
    html, trace = page
    spans = parse(html).spans
    assert spans == list(TEXT)  # every character, exactly once, one per span, in order
    assert trace.text == TEXT


def test_page_needs_no_server_or_network(page):
    html, _ = page
    assert parse(html).links == []  # no external script, style, image or font
    assert "<link" not in html and "@import" not in html and "url(" not in html


def _states(data) -> dict[str, np.ndarray]:
    out = {}
    for s in data["states"]:
        raw = np.frombuffer(base64.b64decode(s["data"]), np.int8).astype(np.float64) / data["scale"]
        out[s["name"]] = raw.reshape(len(data["text"]), s["layers"], s["hidden"])
    return out


def test_embedded_activations_are_the_state_after_each_character(page, model):
    """Checked against separate runs of the graph over each prefix in one call (steps = prefix length)."""
    html, _ = page
    data = json.loads(parse(html).json)
    states = _states(data)
    assert set(states) == ({"c", "h"} if model.meta.cell == "lstm" else {"h"})
    _, ids = encode(TEXT, model.meta)
    names = [mf.OUTPUT_LOGITS, *(o for _, o in model.meta.state_names())]
    for k in (1, 7, 40, len(TEXT)):
        feeds = {**zero_state(model.meta, 1), mf.INPUT_TOKENS: ids[:k].reshape(1, k)}
        out = dict(zip(names, model.session.run(names, feeds)))
        assert states["h"][k - 1] == pytest.approx(out[mf.OUTPUT_H][:, 0], abs=0.5 / SCALE + 1e-5)
        if "c" in states:
            assert states["c"][k - 1] == pytest.approx(np.tanh(out[mf.OUTPUT_C][:, 0]), abs=0.5 / SCALE + 1e-5)
    for values in states.values():
        assert values.min() >= -1 and values.max() <= 1
        assert values.std() > 0.01  # the cells really move: the page is not all zeros


def test_top5_are_the_likeliest_next_characters_sorted_and_summing_to_at_most_one(page, model):
    html, _ = page
    data = json.loads(parse(html).json)
    _, ids = encode(TEXT, model.meta)
    feeds = {**zero_state(model.meta, 1), mf.INPUT_TOKENS: ids.reshape(1, -1)}
    p = softmax(model.session.run([mf.OUTPUT_LOGITS], feeds)[0][0])  # [T, V] from one call over the whole text
    index = {ch: i for i, ch in enumerate(model.meta.vocab)}
    assert len(data["top5_chars"]) == len(data["top5_probs"]) == len(TEXT)
    for t, (chars, probs) in enumerate(zip(data["top5_chars"], data["top5_probs"])):
        assert len(chars) == len(probs) == 5
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1
        assert [p[t, index[ch]] for ch in chars] == pytest.approx(probs, abs=1.01e-3)
        assert p[t, index[chars[0]]] == pytest.approx(p[t].max(), abs=1e-5)
    assert data["next_prob"][-1] is None
    assert data["next_prob"][5] == pytest.approx(p[5, index[TEXT[6]]], abs=1e-4)


def test_ranking_on_the_page_names_real_units_with_correlations(page, model):
    html, _ = page
    data = json.loads(parse(html).json)
    by_name = {r["feature"]: r for r in data["ranking"]}
    assert set(by_name) == {"quotes", "brackets", "line_position", "after_newline", "speaker"}
    for r in by_name.values():
        assert r["present"] and len(r["best"]) == 3
        rs = [abs(b["r"]) for b in r["best"]]
        assert rs == sorted(rs, reverse=True) and all(0 < v <= 1 for v in rs)
        for b in r["best"]:
            assert 0 <= b["layer"] < model.meta.layers and 0 <= b["cell"] < model.meta.hidden
            assert f'r = {b["r"]:+.3f}' in html  # the figure is printed, not only embedded
        a, e = r["window"]
        assert len(r["values"]) == e - a and max(r["values"]) == 1.0


def test_sweep_section_shows_each_temperature(page):
    html, _ = page
    assert "temperature 0.5" in html and "temperature 1</h3>" in html
    data = json.loads(parse(html).json)
    assert [s["temperature"] for s in data["sweep"]["samples"]] == [0.5, 1.0]


def test_json_cannot_close_its_script_element(model):
    text, ids = encode("a</script><!--b", model.meta)
    trace = trace_text(model, text, ids)
    html = render_page(model, trace, (), PageSource("x", 0, "prose"))
    data = json.loads(parse(html).json)
    assert data["text"] == text and parse(html).spans == list(text)


@pytest.mark.skipif(BROWSER is None, reason=MISSING)
def test_page_script_runs_in_a_browser_and_fills_the_page(page, tmp_path):
    """The DOM after the page's script ran: every character coloured, every snippet filled, the panel written."""
    html, _ = page
    path = tmp_path / "page.html"
    path.write_text(html, encoding="utf-8")
    with chromium() as browser:
        dom = open_page(browser, path.as_uri()).content()
    text_div = dom[dom.index('<div id="text"'):dom.index('<aside id="panel"')]
    coloured = re.findall(r'<span[^>]*style="background-color: rgba\(', text_div)
    assert len(coloured) == len(TEXT)
    snippets = re.findall(r'<div class="snippet[^"]*"[^>]*>(.*?)</div>', dom, flags=re.S)
    assert len(snippets) == 5 * 4  # five features, each: the feature itself and three cells
    assert all(s.count("<span") > 20 for s in snippets)
    assert "five likeliest next characters" in dom and '<tr class="input">' in dom  # panel and strip
    assert dom.count("<option") >= 2  # the state and layer menus were filled
