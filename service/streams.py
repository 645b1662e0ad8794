"""One generation stream as its asyncio handler sees it, and how text crosses from the engine thread.

The engine thread appends characters to a stream's deque and, after each step,
posts to the ``Mailbox`` of each asyncio loop that has streams in the batch:
at most one ``call_soon_threadsafe`` per loop per step (and ordinary text at
most once per flush interval), never one per stream per character. The
callback wakes the waiting readers. A reader takes everything produced since
its previous read as one chunk, so a slow reader gets several characters per
chunk and the engine never waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from typing import TYPE_CHECKING

from charrnn.service import errors
from charrnn.service.requests import FinishReason, GenerationRequest, GenerationResult, GenerationStats

if TYPE_CHECKING:  # pragma: no cover
    from charrnn.service.engine import Engine


_CANCELS = itertools.count(1)  # serial number of each cancel, for the engine's cancel mark


class Mailbox:
    """Hands the engine's output to one asyncio loop: at most one pending callback at a time.

    Ordinary text is delivered at most once per ``interval`` seconds (every
    waiting reader then gets all characters since its last chunk); streams
    named ``urgent`` (a first character, an end) are woken at once, and only
    they. This bounds the loop's wake-ups and the messages on the wire when
    steps are fast, without touching time to first character.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.loop = loop
        self.interval = interval  # seconds between deliveries of ordinary text
        self.waiting: set[Stream] = set()  # streams whose reader awaits (touched on the loop thread only)
        self._lock = threading.Lock()  # guards the three fields below (engine and pool threads post)
        self._urgent: list[Stream] = []  # to wake with the next callback
        self._everyone = False  # the next callback wakes every waiting reader
        self._scheduled = False  # a callback is pending on the loop
        self._last = 0.0  # time.monotonic() of the last delivery to everyone

    def due(self, now: float) -> bool:
        """Whether ordinary text posted at ``now`` would be delivered (the flush interval has passed)."""
        return now - self._last >= self.interval

    def post(self, urgent: list[Stream] | tuple = ()) -> None:
        """Engine side, after a step: new text for this loop's streams; ``urgent`` ones are woken at once."""
        now = time.monotonic()
        due = now - self._last >= self.interval
        if not (due or urgent):
            return  # the engine posts again after its next step; the text waits in the deques
        with self._lock:
            if due:
                self._everyone = True
                self._last = now
            self._urgent.extend(urgent)
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
            everyone, urgent = self._everyone, self._urgent
            self._everyone, self._urgent, self._scheduled = False, [], False
        candidates = list(self.waiting) if everyone else [s for s in urgent if s in self.waiting]
        for s in candidates:
            if s._chunks or s._done:
                self.waiting.discard(s)
                w = s._waiter
                if w is not None and not w.done():
                    w.set_result(None)


class Stream:
    """Async iterator of text chunks for one request; see Engine.submit."""

    def __init__(self, request: GenerationRequest, engine: "Engine", mailbox: Mailbox, label: str):
        self.request = request
        self.result: GenerationResult | None = None  # set when iteration ends normally
        self.first_char_at: float | None = None  # time.monotonic() of the first generated character
        self._engine = engine
        self._mailbox = mailbox
        self._chunks: collections.deque[str] = collections.deque()  # engine appends, reader pops
        self._done = False  # engine: no more text will come
        self._error: errors.CharrnnError | None = None
        self._waiter: asyncio.Future | None = None
        self._cancelled = False
        # Engine-thread bookkeeping.
        self.arrived = request.arrived or time.monotonic()
        self.admitted_at: float | None = None
        self.last_char_at: float | None = None
        self.generated = 0
        self._stats = GenerationStats(model=label, prime_chars=len(request.prime), seed=request.sampling.seed)
        self.queued_at = self.arrived  # engine.submit sets the time it entered the queue
        self._stops = tuple(sorted(request.stop, key=len, reverse=True))  # longest first: it is the one cut
        self._longest_stop = max((len(s) for s in request.stop), default=0)
        self._held = ""  # text that might still begin a stop sequence (held back from the reader)
        self.matched_stop = ""  # the stop sequence that ended the stream, once one has

    # ---- reader side (asyncio loop thread) ----

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> str:
        while True:
            if self._chunks:
                return self._take()
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = self._mailbox.loop.create_future()
            self._mailbox.waiting.add(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._mailbox.waiting.discard(self)

    def _take(self) -> str:
        parts = []
        chunks = self._chunks
        while chunks:
            parts.append(chunks.popleft())
        return "".join(parts)

    def cancel(self) -> None:
        """Thread-safe: the engine frees this stream's slot at its next step."""
        if not self._done:
            self._cancelled = True
            self._engine.cancel_mark = next(_CANCELS)  # after the flag: the engine scans its rows when this moved
            self._engine._wake.set()

    @property
    def done(self) -> bool:
        return self._done

    # ---- engine side (engine thread) ----

    def push(self, ch: str) -> str | None:
        """Adds one generated character; returns the stop sequence it completes, if any."""
        self.generated += 1
        if not self._stops:
            self._chunks.append(ch)
            return None
        held = self._held + ch
        for stop in self._stops:
            if held.endswith(stop):
                if len(held) > len(stop):
                    self._chunks.append(held[: len(held) - len(stop)])
                self._held = ""
                self.matched_stop = stop
                return stop
        # Keep the longest tail that could still grow into a stop sequence; release the rest.
        keep = 0
        for k in range(min(len(held), self._longest_stop - 1), 0, -1):
            tail = held[-k:]
            if any(s.startswith(tail) for s in self._stops):
                keep = k
                break
        if len(held) > keep:
            self._chunks.append(held[: len(held) - keep])
        self._held = held[len(held) - keep :] if keep else ""
        return None

    def advance(self, ch: str, now: float):
        """Adds one generated character and says whether the stream ends here.

        Returns None (go on), a stop sequence (str) that matched, FinishReason.LENGTH,
        or the error that ends it (cancelled, deadline passed). Pass the result to ``end``.
        """
        stop = self.push(ch)
        if stop is not None:
            return stop
        if self.generated >= self.request.max_chars:
            return FinishReason.LENGTH
        return self.gone(now)

    def end(self, why, now: float) -> None:
        """Ends the stream for the reason ``advance`` (or the engine) gave."""
        self.last_char_at = now
        if why is FinishReason.LENGTH:
            self.finish(FinishReason.LENGTH, now)
        elif isinstance(why, str):
            self.finish(FinishReason.STOP_SEQUENCE, now, stop=why)
        else:
            self.fail(why, now)

    def gone(self, now: float) -> errors.CharrnnError | None:
        """Cancelled or past its deadline (checked before any work is spent on the stream)."""
        if self._cancelled:
            return errors.Cancelled("cancelled")
        deadline = self.request.deadline
        if deadline is not None and deadline <= now:
            return errors.DeadlineExceeded(
                f"deadline passed after {self.generated} of {self.request.max_chars} characters")
        return None

    def finish(self, reason: FinishReason, now: float, stop: str = "") -> None:
        """Ends the stream normally: held text is real output unless a stop sequence matched."""
        if self._held:
            self._chunks.append(self._held)
            self._held = ""
        st = self._stats
        st.generated_chars = self.generated
        st.stop_sequence = stop
        self._fill_times(now)
        self.result = GenerationResult(finish_reason=reason, stats=st)
        self._done = True

    def fail(self, error: errors.CharrnnError, now: float) -> None:
        """Ends the stream with an error; text already produced is still delivered first."""
        self._held = ""
        self._stats.generated_chars = self.generated
        self._fill_times(now)
        self._error = error
        self._done = True

    def _fill_times(self, now: float) -> None:
        st = self._stats
        admitted = self.admitted_at if self.admitted_at is not None else now
        st.queue_seconds = admitted - self.arrived
        first = self.first_char_at if self.first_char_at is not None else now
        st.prefill_seconds = first - admitted
        st.decode_seconds = (self.last_char_at or first) - first
        st.total_seconds = (self.last_char_at or now) - self.arrived
