"""docs/img/playground.png: the playground serving the bundled model, one seeded sample, one character hovered.

    python -m bench.playground_screenshot                 # writes docs/img/playground.png
    python -m bench.playground_screenshot --out /tmp/p.png --seed 5

A real `charrnn-serve` on models/ with --http-port, Debian's headless Chromium driven by Playwright
(testkit/browser.py) on a seeded link, so the picture is the same sample every time for the same model file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.parse
from pathlib import Path

from testkit.browser import BROWSER, MISSING, chromium, open_page, wait_state
from testkit.serve_process import ServeProcess, blocked_env

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=str(ROOT / "models"))
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "playground.png"))
    p.add_argument("--prime", default="ROMEO:")
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--hover", type=int, default=0,
                   help="which generated character to hover (1-based); 0: the least likely of the first 150")
    a = p.parse_args(argv)
    if BROWSER is None:
        print(MISSING, file=sys.stderr)
        return 2
    with (tempfile.TemporaryDirectory() as tmp,
          ServeProcess(Path(a.models), "--http-port", "0", env=blocked_env(Path(tmp))) as server,
          chromium() as browser):
        query = urllib.parse.urlencode({"prime": a.prime, "max_chars": a.max_chars, "temperature": 0.8,
                                        "seed": a.seed})
        page = open_page(browser, f"{server.http_url}/?{query}")
        state = wait_state(page, timeout=60)
        if state != "done":
            print(f"the playground ended in state {state!r}", file=sys.stderr)
            return 1
        hover = a.hover or 1 + page.evaluate(
            "(() => { const p = [...document.querySelectorAll('#output .ch')].slice(0, 150)"
            ".map(s => Number(s.dataset.p)); return p.indexOf(Math.min(...p)); })()")
        page.hover(f"#output .ch:nth-of-type({hover + 1})")  # the prime's span comes first
        if page.evaluate("document.getElementById('tip').hidden"):  # the page shows it as it handles the event
            print(f"hovering character {hover} showed no tooltip", file=sys.stderr)
            return 1
        Path(a.out).write_bytes(page.screenshot())
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
