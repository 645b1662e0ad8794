"""A headless Chromium driven over the DevTools protocol on a pipe, for the playground's tests and screenshot.

``--remote-debugging-pipe``: JSON messages ended by a NUL byte on file descriptors 3 and 4, so no port and no
client library. A caller waits for the page's own ``data-state="done"`` rather than for a guessed
virtual-time budget, which a streamed response does not hold open.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class Chromium:
    """A headless Chromium and its DevTools protocol over a pipe: one page target per ``open``."""

    def __init__(self, profile):
        to_child, self._out = os.pipe()  # the browser reads commands on its fd 3
        self._in, from_child = os.pipe()  # and writes answers and events on its fd 4

        def wire():
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={profile}", "--window-size=1200,800", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._next_id = 0
        self._buf = b""

    def call(self, method: str, session: str | None = None, timeout: float = 20.0, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"no answer to {method} in {timeout}s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buf += chunk

    def open(self, url: str) -> "Page":
        target = self.call("Target.createTarget", url=url)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def eval(self, expression: str):
        result = self.browser.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                                   awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_state(self, output: str = "output", timeout: float = 20.0) -> str:
        """Waits until the output's data-state leaves idle and running; returns it."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.eval(f"document.getElementById({output!r})?.dataset.state")
            if state not in (None, "idle", "running"):
                return state
            time.sleep(0.05)
        raise AssertionError(f"#{output} still {state!r} after {timeout}s")

    def spans(self, output: str = "output") -> list[dict]:
        return self.eval(f"""[...document.querySelectorAll('#{output} .ch')].map(s => ({{
            char: s.textContent, lp: Number(s.dataset.lp), p: Number(s.dataset.p), bg: s.style.backgroundColor}}))""")

    def hover(self, selector: str) -> None:
        box = self.eval(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                        " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        self.browser.call("Input.dispatchMouseEvent", self.session, type="mouseMoved", x=box[0], y=box[1])

    def screenshot(self) -> bytes:
        """The page's viewport as PNG bytes."""
        return base64.b64decode(self.browser.call("Page.captureScreenshot", self.session, format="png")["data"])
