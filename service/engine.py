"""The generation engine of one model version: admission, continuous batching, its own thread.

Requests wait in a FIFO queue for one of ``max_active`` batch slots. A stream
that gets a slot is handed to the ``scheduler.Scheduler``: it reads its prime
(prefill), grouped with other new streams, and joins the running batch, which
one onnxruntime call per step advances by one character for every stream.
Streams that finish, are cancelled or pass their deadline leave at the end of
the step that saw it.

With ``batching=False`` the same admission and streams run the naive way
(naive.py): each stream in its own pool thread, one onnxruntime call per stream
per character. That is the baseline the benchmark compares against.

Threading: ``submit`` runs on the asyncio loop; everything else here runs on
the engine thread (or, naive, the pool threads). The two sides share only the
inbox deque, the slot counters (under ``_lock``) and each stream's output
deque; text crosses to the loop through ``streams.Mailbox``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from charrnn.service import errors, naive
from charrnn.service.metrics import Metrics
from charrnn.service.requests import GenerationRequest
from charrnn.service.batch import sample_next
from charrnn.service.runtime import LoadedModel
from charrnn.service.scheduler import Scheduler
from charrnn.service.streams import Mailbox, Stream

log = logging.getLogger("charrnn.service.engine")

QUEUE_SCAN_SECONDS = 0.01  # how often queued streams are checked for cancels and deadlines
SHUTDOWN_MESSAGE = "server shutting down"


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        metrics: Metrics,
        max_active: int = 256,
        max_queue: int = 1024,
        max_queue_wait: float = 30.0,
        batching: bool = True,
        flush_interval: float = 0.05,
        prime_cache: int = 1024,
    ):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not max_queue_wait > 0:
            raise ValueError(f"max_queue_wait must be > 0 seconds, got {max_queue_wait}")
        self.model = model
        self.max_active = max_active  # batch slots (--max-active-streams)
        self.max_queue = max_queue  # requests that may wait for a slot (--max-queue)
        self.max_queue_wait = max_queue_wait  # seconds a request may wait (--max-queue-wait)
        self.batching = batching
        self.label = model.name  # value of the `model` metric label
        # Seconds between deliveries of ordinary text to a loop (first characters and ends go at
        # once): 20 updates a second per stream still reads as smooth streaming, and it saves the
        # loop, the wire and the client a message per character (bench: a third less client CPU).
        self.flush_interval = flush_interval
        self._vocab = list(model.metadata.vocab)
        self._lock = threading.Lock()  # guards the two counters below
        self._n_active = 0  # slots taken: prefilling + decoding streams
        self._n_waiting = 0  # submitted, not yet in a slot (inbox + queue)
        self._inbox: collections.deque[Stream] = collections.deque()  # loop -> engine thread
        self._ready: collections.deque = collections.deque()  # loop -> engine: (stream, state, first token)
        self._queue: collections.deque[Stream] = collections.deque()  # engine thread only, FIFO
        self._wake = threading.Event()
        self._draining = False  # no new submits; the thread ends once idle
        self._closed = False  # the thread has ended or is ending: nothing more is handed to it
        self._stopping = False  # end everything now
        self._abandoned = False  # given up on after a hang (see abandon): the thread must touch nothing
        self._on_failure: Callable[[Exception], None] | None = None  # see start()
        self.progress_at = time.monotonic()  # time.monotonic() at the end of the last round (the watchdog reads it)
        self._thread: threading.Thread | None = None
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> Mailbox
        self._pool: ThreadPoolExecutor | None = None
        self._last_scan = 0.0
        self._halt: errors.CharrnnError | None = None  # set when the thread ends: streams still running end with it
        self._worker_failure: Exception | None = None  # set by a pool thread (batching off); raised on this thread
        self.cancel_mark = 0  # set by Stream.cancel (any thread) to a new number each time
        self._shown = [0, 0]  # what this engine has added to the active / queued gauges
        self._m_step = metrics.step.labels(self.label)
        self._m_batch = metrics.batch_size.labels(self.label)
        self._m_queue_wait = metrics.queue_wait.labels(self.label)
        self._m_inter = metrics.inter_char.labels(self.label)
        self._m_active = metrics.active_streams.labels(self.label)
        self._m_queued = metrics.queued_streams.labels(self.label)
        self.scheduler = Scheduler(model, prime_cache=prime_cache, release=self._release,
                                   cancel_mark=lambda: self.cancel_mark, step_hist=self._m_step,
                                   batch_hist=self._m_batch, inter_hist=self._m_inter,
                                   cache_counters=(metrics.prime_cache.labels(self.label, "hit"),
                                                   metrics.prime_cache.labels(self.label, "miss")))
        self.prime_cache = self.scheduler.prime_cache  # primes read before (prime_cache=0 turns it off)

    # ---- API (asyncio loop thread) ----

    def start(self, on_failure: Callable[[Exception], None] | None = None) -> None:
        """Starts the engine thread; ``on_failure(error)`` is called on it after a failure ended every stream."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._on_failure = on_failure
        if not self.batching:
            self._pool = ThreadPoolExecutor(self.max_active, thread_name_prefix=f"naive-{self.model.label}")
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model.label}", daemon=True)
        self._thread.start()
        log.info("engine %s started: %s, %d slots, queue %d", self.model.label,
                 "continuous batching" if self.batching else "one stream per thread (batching off)",
                 self.max_active, self.max_queue)

    def submit(self, request: GenerationRequest) -> Stream:
        """Queues a validated request; call from the asyncio loop thread that will read the stream."""
        if self._thread is None:
            raise RuntimeError("Engine.submit before Engine.start")
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop, self.flush_interval)
        stream = Stream(request, self, box, self.model.label)
        cached = self.prime_cache.get(stream, count=False) if self.batching else None
        with self._lock:  # the check, the count and the hand-over are one step against drain/stop
            if self._draining:
                raise errors.Unavailable(f"{SHUTDOWN_MESSAGE}: model {self.model.label} takes no new streams")
            if self._closed:  # failed or abandoned: the supervisor refuses for it until a new engine runs
                raise errors.Unavailable(f"model {self.model.label} is not running; retry in a moment", "engine")
            if self._n_active + self._n_waiting >= self.max_active + self.max_queue:
                raise errors.Overloaded(
                    "queue_full",
                    f"model {self.model.label} is at capacity: all {self.max_active} batch slots are busy and "
                    f"{self._n_waiting} requests are queued (--max-queue {self.max_queue}); retry later, "
                    f"or raise --max-queue / --max-active-streams",
                )
            # A prime read before, a free slot and nobody queued ahead: the first character now.
            fast = cached is not None and self._n_waiting == 0 and self._n_active < self.max_active
            stream.queued_at = time.monotonic()
            if fast:
                self._n_active += 1
            else:
                self._n_waiting += 1
                self._inbox.append(stream)
        if fast:
            self._start_cached(stream, *cached)
        self._wake.set()
        return stream

    def _start_cached(self, stream: Stream, state, logits: np.ndarray) -> None:
        """Event loop: samples the first character from a cached prime's logits; the engine thread joins it.

        Time to first character then does not wait for the batch step in flight.
        """
        self.prime_cache.count_hit()
        now = stream.admitted_at = time.monotonic()
        self._m_queue_wait.observe(0.0)
        token = int(sample_next(logits[None, :], [stream])[0])
        stream.first_char_at = now
        why = stream.advance(self._vocab[token], now)
        if why is None:
            with self._lock:
                if not self._closed:
                    self._ready.append((stream, state, token))
                    return
            why = errors.Unavailable(f"{SHUTDOWN_MESSAGE}: model {self.model.label} stopped")
        stream.end(why, now)  # max_chars 1, a one-character stop sequence, or the engine just stopped
        self._release(1)

    def drain(self) -> None:
        """Refuses new submits; queued and active streams run to the end, then the thread exits."""
        self._draining = True
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Ends every remaining stream with Unavailable and joins the thread (up to ``timeout`` s)."""
        self._draining = True
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return self._n_active

    @property
    def queued(self) -> int:
        return self._n_waiting

    @property
    def idle(self) -> bool:
        return self._n_active == 0 and self._n_waiting == 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._abandoned

    def stalled(self, now: float) -> float:
        """Seconds the engine has held work without finishing a round (0 when idle): the watchdog's measure."""
        if self._closed or (self.idle and not self.scheduler.busy):
            return 0.0
        return max(0.0, now - self.progress_at)

    def abandon(self, error: errors.CharrnnError) -> None:
        """Gives up on a hung engine thread: ends every stream it holds with ``error``; the thread, if it ever
        returns, ends without touching anything. A thread cannot be killed: it stays blocked where it is."""
        with self._lock:
            self._closed = True
            self._abandoned = True
        self._halt = error
        self._end_all(error)
        self._show_gauges()

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()  # before looking: a submit after this line wakes the wait below
                if self._stopping:
                    break
                now = time.monotonic()
                self._take_ready()
                self._take_inbox()
                self._check_queue(now)
                self._admit(now)
                self._show_gauges()
                if self._worker_failure is not None:
                    raise self._worker_failure
                if not self.scheduler.busy:
                    self.progress_at = now
                    with self._lock:  # decided under the lock: a submit either came first or is refused
                        self._closed = self._draining and self._n_active == 0 and self._n_waiting == 0
                    if self._closed:
                        break
                    self._wake.wait(QUEUE_SCAN_SECONDS if self._queue else 1.0)
                    continue
                self.scheduler.work()
                if self._abandoned:
                    return
                self.progress_at = time.monotonic()
                if self._worker_failure is not None:
                    raise self._worker_failure
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types; any is an engine failure
            if self._abandoned:
                return
            log.exception("engine %s failed; ending its streams", self.model.label)
            failure = e
        else:
            failure = None
        finally:
            if not self._abandoned:
                with self._lock:
                    self._closed = True  # from here on submit hands nothing over
        if failure is not None:
            self._halt = errors.engine_failed(self.model.label, failure)
            self._end_all(self._halt)
        self._halt = self._halt or errors.Unavailable(f"{SHUTDOWN_MESSAGE}: model {self.model.label} stopped")
        self._end_all(self._halt)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._show_gauges()
        log.info("engine %s stopped", self.model.label)
        if failure is not None and self._on_failure is not None:
            self._on_failure(failure)

    @property
    def halt(self) -> errors.CharrnnError | None:
        """The error that streams still running in pool threads (batching off) end with, once the engine stops."""
        return self._halt

    def fail_from_worker(self, error: Exception) -> None:
        """A pool thread (batching off) hit an engine failure: the engine thread ends everything and reports it."""
        if self._worker_failure is None:
            self._worker_failure = error
        self._wake.set()

    def _take_ready(self) -> None:
        """Streams that already have their first character (cached prime) join the batch."""
        ready = []
        while self._ready:
            ready.append(self._ready.popleft())
        if ready:
            self.scheduler.join_started([r[0] for r in ready], [r[1] for r in ready], [r[2] for r in ready])

    def _take_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            self._queue.append(inbox.popleft())

    def _check_queue(self, now: float) -> None:
        """Ends queued streams that waited too long, passed their deadline or were cancelled."""
        q = self._queue
        while q and now - q[0].queued_at > self.max_queue_wait:
            s = q.popleft()
            self._end_waiting(s, now, errors.Overloaded(
                "queue_wait",
                f"waited {now - s.queued_at:.1f}s for a batch slot of model {self.model.label} "
                f"(limit --max-queue-wait {self.max_queue_wait:g}s; all {self.max_active} slots busy); "
                f"retry later or raise --max-active-streams",
            ))
        if not q or now - self._last_scan < QUEUE_SCAN_SECONDS:
            return
        self._last_scan = now
        for s, err in [(s, err) for s in q if (err := s.gone(now)) is not None]:
            q.remove(s)
            self._end_waiting(s, now, err)

    def _end_waiting(self, s: Stream, now: float, err: errors.CharrnnError) -> None:
        with self._lock:
            self._n_waiting -= 1
        s.fail(err, now)
        s._mailbox.post([s])

    def _admit(self, now: float) -> None:
        new: list[Stream] = []
        while self._queue and self._n_active + len(new) < self.max_active:
            s = self._queue.popleft()
            s.admitted_at = now
            self._m_queue_wait.observe(now - s.queued_at)
            new.append(s)
        if not new:
            return
        with self._lock:
            self._n_waiting -= len(new)
            self._n_active += len(new)
        if not self.batching:
            for s in new:
                self._pool.submit(naive.run_alone, self, s)
        else:
            self.scheduler.add(new)

    def _release(self, n: int) -> None:
        """n streams left their slots."""
        with self._lock:
            self._n_active -= n

    def _end_all(self, err: errors.CharrnnError) -> None:
        """Ends every stream the engine thread still holds (queued, prefilling, decoding)."""
        now = time.monotonic()
        self._take_inbox()
        ready = []
        while self._ready:
            ready.append(self._ready.popleft()[0])
        held = list(self._queue) + self.scheduler.held() + ready
        n_queued = len(self._queue)
        self._queue.clear()
        self.scheduler.clear()
        with self._lock:
            self._n_waiting -= n_queued
            self._n_active -= len(held) - n_queued
        for s in held:
            if not s.done:
                s.fail(err, now)
            s._mailbox.post([s])

    def _show_gauges(self) -> None:
        """Adds this engine's change to the shared gauges (several versions of a model share the label)."""
        active, queued = self._n_active, self._n_waiting
        if active != self._shown[0]:
            self._m_active.inc(active - self._shown[0])
            self._shown[0] = active
        if queued != self._shown[1]:
            self._m_queued.inc(queued - self._shown[1])
            self._shown[1] = queued
