"""The playground page at GET /: self-contained, and in a headless Chromium against a real server it shows the
same seeded sample and the same scores as the HTTP API, one shaded span per character.

The browser is Debian's Chromium driven by Playwright (testkit/browser.py).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from testkit.browser import (
    BROWSER,
    MISSING,
    char_spans,
    chromium,
    open_page,
    wait_state,
)
from testkit.serve_process import ServeProcess

needs_browser = pytest.mark.skipif(BROWSER is None, reason=MISSING)


@pytest.fixture(scope="module")
def server(model_repo, no_torch_env):
    with ServeProcess(model_repo, "--http-port", "0", env=no_torch_env) as proc:
        yield proc


def post(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None:
        pytest.skip(MISSING)
    with chromium() as b:
        yield b


def test_page_is_self_contained_and_needs_no_network(server):
    with urllib.request.urlopen(server.http_url + "/", timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
        html = resp.read().decode()
    assert 'id="output"' in html and 'id="score-output"' in html and "<script>" in html
    assert re.search(r"https?://", html) is None  # no script, style, font, image or link from elsewhere
    assert re.search(r"""(src|href)\s*=\s*["']?//""", html) is None  # nor a protocol-relative one
    assert "@import" not in html and "url(" not in html and "<link" not in html and "<script src" not in html


@needs_browser
def test_seeded_link_streams_the_apis_sample_one_shaded_span_per_character(server, browser):
    page = open_page(browser, server.http_url + "/?prime=A&max_chars=40&temperature=0.8&seed=7")
    assert wait_state(page) == "done"
    model = page.evaluate("document.getElementById('output').dataset.model")
    status, api = post(server, "/v1/completions", {"model": model, "prompt": "A", "max_tokens": 40, "temperature": 0.8,
                                                   "top_k": 0, "top_p": 1, "seed": 7, "logprobs": 5})
    assert status == 200
    choice = api["choices"][0]
    spans = char_spans(page)
    assert len(choice["text"]) == 40
    assert "".join(s["char"] for s in spans) == choice["text"]
    assert [s["char"] for s in spans] == choice["logprobs"]["tokens"]
    for s, lp in zip(spans, choice["logprobs"]["token_logprobs"]):
        assert s["lp"] == pytest.approx(lp, abs=1e-3)
        assert s["p"] == pytest.approx(math.exp(lp), abs=1e-3)
        assert s["bg"].startswith("rgb")  # shaded
    assert page.evaluate("document.querySelector('#output .prime').textContent") == "A"  # the prime, unshaded
    query = urllib.parse.parse_qs(page.evaluate("location.search")[1:])
    assert query["prime"] == ["A"] and query["seed"] == ["7"] and query["max_chars"] == ["40"]

    page.hover("#output .ch:nth-of-type(4)")  # the third generated character (the prime's span is first)
    tip = page.evaluate("(() => { const t = document.getElementById('tip'); return {hidden: t.hidden,"
                        " rows: [...t.querySelectorAll('.row')].map(r => r.textContent)}; })()")
    top = sorted(choice["logprobs"]["top_logprobs"][2].items(), key=lambda kv: -kv[1])
    assert not tip["hidden"] and len(tip["rows"]) == 5
    for row, (char, lp) in zip(tip["rows"], top):
        assert row.endswith(f"{math.exp(lp) * 100:.1f}%")


@needs_browser
def test_a_random_seed_is_written_into_the_link_so_it_reproduces_the_sample(server, browser):
    page = open_page(browser, server.http_url + "/?prime=AB&max_chars=12")
    assert wait_state(page) == "done"
    query = urllib.parse.parse_qs(page.evaluate("location.search")[1:])
    seed = int(query["seed"][0])
    _, api = post(server, "/v1/completions", {"prompt": "AB", "max_tokens": 12, "temperature": 0.8, "seed": seed,
                                              "top_p": 1})
    assert "".join(s["char"] for s in char_spans(page)) == api["choices"][0]["text"]


@needs_browser
def test_text_streams_in_and_stop_aborts_it(server, browser):
    page = open_page(browser, server.http_url + "/?prime=A&max_chars=10000&seed=1")
    # the first characters are shown before the stream ends
    page.wait_for_function("document.querySelectorAll('#output .ch').length > 0", timeout=20_000)
    assert page.evaluate("document.getElementById('output').dataset.state") == "running"
    page.click("#stop")
    assert wait_state(page) == "stopped"
    shown = page.evaluate("document.querySelectorAll('#output .ch').length")
    time.sleep(0.3)
    assert page.evaluate("document.querySelectorAll('#output .ch').length") == shown < 10000  # nothing after the stop


@needs_browser
def test_a_server_error_is_shown_with_its_message(server, browser):
    page = open_page(browser, server.http_url + "/?prime=A&model=nope@9")
    assert wait_state(page) == "error"
    status, api = post(server, "/v1/completions", {"prompt": "A", "model": "nope@9"})
    assert status == 404
    shown = page.evaluate("(() => { const e = document.getElementById('error');"
                          " return [e.hidden, e.textContent]; })()")
    assert shown == [False, api["error"]["message"]]


@needs_browser
def test_score_link_shows_the_apis_bits_per_character(server, browser):
    prime, text = "RO", "MEO:\nBut, soft!"
    q = urllib.parse.urlencode({"tab": "score", "prime": prime, "text": text})
    page = open_page(browser, f"{server.http_url}/?{q}")
    assert wait_state(page, "score-output") == "done"
    model = page.evaluate("document.getElementById('score-output').dataset.model")
    status, api = post(server, "/v1/score", {"model": model, "prime": prime, "text": text, "top_logprobs": 5})
    assert status == 200
    bpc = page.evaluate("(() => { const e = document.getElementById('score-bpc');"
                        " return [e.textContent, e.dataset.bpc]; })()")
    assert bpc[0] == f"{api['bits_per_char']:.3f}"
    assert float(bpc[1]) == pytest.approx(api["bits_per_char"], rel=1e-9)
    spans = char_spans(page, "score-output")
    assert "".join(s["char"] for s in spans) == text
    assert [s["lp"] for s in spans] == pytest.approx([e["logprob"] for e in api["logprobs"]], abs=1e-6)
    assert all(s["bg"].startswith("rgb") for s in spans)
