"""One generation stream as its asyncio handler sees it, and how text reaches the handler's event loop.

The core client's I/O thread (coreclient.py) turns the core's ids into text and
hands each stream its new text; after each message it posts once to the
``Mailbox`` of each asyncio loop with streams to wake: at most one
``call_soon_threadsafe`` per loop per message, never one per stream per
character. A reader takes everything produced since its previous read as one
chunk, so a slow reader gets several characters per chunk and nothing ever
waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Callable

from charrnn.service import errors
from charrnn.service.requests import GenerationRequest, GenerationResult


class Mailbox:
    """Wakes the readers of one asyncio loop: at most one pending callback at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiting: set[Stream] = set()  # streams whose reader awaits (touched on the loop thread only)
        self._lock = threading.Lock()  # guards the two fields below (the I/O thread posts)
        self._wake: set[Stream] | None = set()  # to wake with the next callback; None: every waiting one
        self._scheduled = False

    def post(self, streams: list["Stream"] | None) -> None:
        """I/O thread: ``streams`` have news (None: every stream of this loop may have)."""
        with self._lock:
            if streams is None:
                self._wake = None
            elif self._wake is not None:
                self._wake.update(streams)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to read
            with self._lock:
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:  # taken before the scan: what is posted after this gets a new callback
            wake, self._wake, self._scheduled = self._wake, set(), False
        candidates = list(self.waiting) if wake is None else [s for s in wake if s in self.waiting]
        for s in candidates:
            if s.ready:
                self.waiting.discard(s)
                s.wake()


class Stream:
    """Async iterator of text chunks for one request; see CoreClient.submit."""

    def __init__(self, request: GenerationRequest, mailbox: Mailbox, cancel: Callable[["Stream"], None]):
        self.request = request
        self.result: GenerationResult | None = None  # set when iteration ends normally
        self.first_char_at: float | None = None  # time.monotonic() its first character reached this process
        self.mailbox = mailbox
        self.row = -1  # the stream's row at its engine client (set by CoreClient.submit)
        self.index = 0  # which of its request's n samples it is
        self.steps_after_cancel = 0  # decode steps the core ran for it after its cancel arrived (at most 1)
        self.told = False  # its first message, which carries its seed and model version, was sent
        self._cancel = cancel
        # (text, log-probabilities or None): the I/O thread appends, the reader pops
        self._chunks: collections.deque[tuple[str, list | None]] = collections.deque()
        self.logprobs: list = []  # with the request's logprobs: one (char, logprob, [(char, logprob)]) per
        # character of the text the last pop_all() returned
        self._done = False  # no more text will come
        self._error: errors.CharrnnError | None = None
        self._waiter: asyncio.Future | None = None

    # ---- reader side (asyncio loop thread) ----

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> str:
        while True:
            if self._chunks:
                return self.pop_all()
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = self.mailbox.loop.create_future()
            self.mailbox.waiting.add(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self.mailbox.waiting.discard(self)

    def pop_all(self) -> str:
        """Every character delivered since the last pop_all."""
        parts, lps = [], []
        chunks = self._chunks
        while chunks:
            text, entries = chunks.popleft()
            parts.append(text)
            if entries:
                lps.extend(entries)
        self.logprobs = lps
        return "".join(parts)

    def cancel(self) -> None:
        """Thread-safe: the core frees this stream's slot at its next step."""
        if not self._done:
            self._cancel(self)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def ready(self) -> bool:
        """There is text to read, or the end."""
        return bool(self._chunks) or self._done

    def wake(self) -> None:
        """Loop thread (Mailbox): the reader's wait is over."""
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- I/O thread side ----

    def deliver(self, text: str, logprobs: list | None = None) -> None:
        self._chunks.append((text, logprobs))

    def finish(self, result: GenerationResult) -> None:
        self.result = result
        self._done = True

    def fail(self, error: errors.CharrnnError) -> None:
        self._error = error
        self._done = True
