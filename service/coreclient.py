"""A front-end's side of one engine core: streams go in, the core's ids come back as text.

``CoreClient.submit`` runs on the asyncio loop: it refuses at once what the
core would refuse (draining, engine down, every slot and queue place taken by
its last count), gives the stream a row of this front-end and hands the
admission to the client's I/O thread. That thread owns the ZeroMQ socket and
only moves messages: it sends the admissions and cancels gathered since its
last turn as one ``protocol.Work``, and hands each ``protocol.Out`` of the core
to the ``OutputProcessor`` (output.py), which turns ids into the streams'
text, holds back what may begin a stop sequence and ends streams; the thread
then wakes the readers it names, and all of them when a delivery is due (the
flush interval).

The primary front-end (the server's own process) also applies the core's
metric deltas and its load to the registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Callable

import numpy as np
import zmq

from charrnn.modelfile import ModelMetadata
from charrnn.service import errors, protocol
from charrnn.service.metrics import Metrics, apply_core_stats
from charrnn.service.core import MAX_ACTIVE, MAX_QUEUE
from charrnn.service.output import OutputProcessor
from charrnn.service.requests import GenerationRequest, ScoreJob
from charrnn.service.streams import Mailbox, Stream

log = logging.getLogger("charrnn.service.coreclient")

POLL_MS = 100
_CLIENTS = itertools.count()


class Wake:
    """A pipe the event loop writes to so the I/O thread sends the new admissions and cancels at once."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._pending = False

    def __call__(self) -> None:
        if not self._pending:
            self._pending = True
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        self._pending = False
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass


class CoreClient:
    def __init__(self, label: str, name: str, metadata: ModelMetadata, *, ctx: zmq.Context, address: str,
                 fe: int = 0, primary: bool = True, metrics: Metrics | None = None, max_active: int = MAX_ACTIVE,
                 max_queue: int = MAX_QUEUE, flush_interval: float = 0.05):
        self.label, self.name, self.metadata = label, name, metadata
        self.max_active, self.max_queue = max_active, max_queue
        # Seconds between deliveries of ordinary text (first characters and ends go at once): 20
        # updates a second per stream still reads as smooth streaming, and it saves the loop, the
        # wire and the client a message per character (bench: a third less client CPU).
        self.flush_interval = flush_interval
        self._metrics = metrics if primary else None
        if self._metrics is not None:  # the series the core's figures land in exist from the start, at 0
            m = self._metrics
            for family in (m.step, m.batch_size, m.queue_wait, m.inter_char, m.active_streams, m.queued_streams):
                family.labels(name)
        self._index = metadata.index
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, f"fe-{fe}-{os.getpid()}-{next(_CLIENTS)}".encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._sock.send(protocol.encode(protocol.Hello(fe=fe, primary=primary)))
        self._lock = threading.Lock()  # guards the outgoing lists, the rows and the counts below
        self._adds: list[protocol.Admit] = []
        self._cancels: list[tuple[int, Stream]] = []
        self._controls: list[protocol.Drain | protocol.Stop | protocol.Gone] = []
        self._wake = Wake()
        self.output = OutputProcessor(label, metadata)  # ids into text, holds, ends (output.py)
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> Mailbox
        self._down: errors.CharrnnError | None = None  # set: submit refuses with it
        self._core_load = (0, 0)  # the core's last report: (slots taken, queued), all front-ends
        self._sent_since_report = 0
        self._last_flush = 0.0
        self._shown = [0, 0]  # what this client added to the active / queued gauges (primary)
        self.last_heard = time.monotonic()  # when the core last said anything (the watchdog reads it)
        self.core_busy = False
        self.on_failed: Callable[[str], None] | None = None  # the core reported its engine failure
        self.on_broken: Callable[[str], None] | None = None  # this client's I/O thread failed (a bug)
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----

    def set_metadata(self, metadata: ModelMetadata) -> None:
        """The model's metadata, once the core has reported it (before the first submit)."""
        self.metadata = metadata
        self._index = metadata.index
        self.output.set_metadata(metadata)

    def receive_first(self, timeout: float) -> protocol.Loaded | protocol.Up | protocol.Refused | None:
        """The core's next start-up message before the I/O thread runs, or None."""
        if self._sock.poll(int(timeout * 1000)):
            return protocol.decode_to_frontend(self._sock.recv())
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-io-{self.label}", daemon=True)
        self._thread.start()

    def control(self, message: protocol.Drain | protocol.Stop | protocol.Gone) -> None:
        """Sends a control message to the core, in order with the streams' messages."""
        with self._lock:
            self._controls.append(message)
        self._wake()

    def refuse(self, error: errors.CharrnnError | None) -> None:
        """From now on submit raises ``error`` (None: takes streams again)."""
        self._down = error

    def fail_all(self, error: errors.CharrnnError) -> None:
        """Ends every stream of this client with ``error`` (its core died without saying so)."""
        self._post(self.output.fail_all(error))
        self._show_load(0, 0)

    def close(self) -> None:
        self._closed = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._sock.close()

    @property
    def live(self) -> int:
        """Streams of this client not yet ended."""
        return self.output.live

    @property
    def core_load(self) -> tuple[int, int]:
        return self._core_load

    # ---- submit (asyncio loop) ----

    def submit(self, request: GenerationRequest) -> Stream:
        """Queues a validated request of one sample; call from the asyncio loop thread that will read it."""
        return self.submit_all(request)[0]

    def submit_all(self, request) -> list[Stream]:
        """Queues a validated request's n samples (sample i seeded seed + i) as n streams, in one message: the
        core reads their prime once, for one row, and copies its state to the n rows; or a ScoreJob as one stream whose result holds the scores."""
        if self._down is not None:
            raise self._down
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop)
        n = 1 if isinstance(request, ScoreJob) else request.n
        with self._lock:
            used, queued = self._core_load
            seen = max(self.output.live, used + queued + self._sent_since_report)
            if seen + n > self.max_active + self.max_queue:
                raise errors.at_capacity(self.label, self.max_active, max(0, seen - self.max_active), self.max_queue)
            streams = []
            for i in range(n):
                sample = request if i == 0 else dataclasses.replace(
                    request, sampling=dataclasses.replace(request.sampling, seed=request.sampling.seed + i))
                stream = Stream(sample, box, self._cancel)
                stream.index = i
                with self.output.lock:
                    stream.row = row = self.output.add(stream)
                self._adds.append(self._admission(sample, row))
                streams.append(stream)
            self._sent_since_report += n
        self._wake()
        return streams

    def _admission(self, request: GenerationRequest | ScoreJob, row: int) -> protocol.Admit:
        """The core's view of a stream: a Generate sample, or a Score request."""
        arrived = request.arrived or time.monotonic()
        if isinstance(request, ScoreJob):
            return protocol.Admit(kind="score", row=row, prime=request.tokens, text_chars=len(request.text),
                                  top=request.top, temperature=0.0, deadline=request.deadline, arrived=arrived)
        p, c = request.sampling, request.controls
        prime = request.prime_ids if request.resume_ids is None else np.concatenate([request.prime_ids,
                                                                                     request.resume_ids])
        return protocol.Admit(
            kind="generate", row=row, prime=prime, max_chars=request.max_chars,
            resumed=0 if request.resume_ids is None else len(request.resume_ids),
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
            stops=[[self._index.get(ch, -1) for ch in stop] for stop in request.stop],
            deadline=request.deadline, arrived=arrived, logprobs=request.logprobs,
            controls=c)

    def _cancel(self, stream: Stream) -> None:
        with self._lock, self.output.lock:
            if self.output.owns(stream):
                self._cancels.append((stream.row, stream))
        self._wake()

    # ---- the I/O thread ----

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug here must not leave streams waiting: they end, the engine restarts
            if self._closed:
                return
            log.exception("engine client of %s failed", self.label)
            self.refuse(errors.not_running(self.label))
            self.fail_all(errors.engine_failed(self.label, e))
            if self.on_broken is not None:
                self.on_broken(f"its front-end I/O thread failed: {errors.reason_of(e)}")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        while not self._closed:
            events = dict(poller.poll(POLL_MS))
            if self._wake.read_fd in events:
                self._wake.clear()
            self._send_work()
            if self._sock in events:
                while True:
                    try:
                        data = self._sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(protocol.decode_to_frontend(data))

    def _send_work(self) -> None:
        with self._lock:
            adds, controls = self._adds, self._controls
            # A row is reused once its stream ended here: a cancel that waited past that is dropped.
            with self.output.lock:
                cancels = [row for row, s in self._cancels if self.output.owns(s)]
            self._adds, self._cancels, self._controls = [], [], []
        if adds or cancels:
            self._sock.send(protocol.encode(protocol.Work(add=adds, cancel=cancels)))
        for c in controls:
            self._sock.send(protocol.encode(c))

    def _handle(self, m: protocol.Loaded | protocol.Up | protocol.Refused | protocol.Out) -> None:
        now = self.last_heard = time.monotonic()
        if not isinstance(m, protocol.Out):
            return
        if m.busy is not None:
            self.core_busy = m.busy
        flush = now - self._last_flush >= self.flush_interval
        if flush:
            self._last_flush = now
        wake = self.output.apply(m, now, flush)
        if flush:
            self._post(None)
        self._post(wake)
        with self._lock:
            if m.load is not None:
                self._core_load, self._sent_since_report = tuple(m.load), 0
        if self._metrics is not None:
            if m.stats is not None:
                apply_core_stats(self._metrics, self.name, m.stats)
            self._show_load(*self._core_load)
        if m.failed and self.on_failed is not None:
            self.on_failed(m.failed)

    def _post(self, streams: list[Stream] | None) -> None:
        """Wakes readers: ``streams`` (at once), or with None every waiting reader of every loop."""
        if streams is None:
            for box in list(self._mailboxes.values()):
                box.post(None)
            return
        by_box: dict[Mailbox, list[Stream]] = {}
        for s in streams:
            by_box.setdefault(s.mailbox, []).append(s)
        for box, group in by_box.items():
            box.post(group)

    def _show_load(self, active: int, queued: int) -> None:
        """Adds the core's change to the shared gauges (several versions of a model share the label)."""
        if self._metrics is None:
            return
        m = self._metrics
        for i, (value, gauge) in enumerate(((active, m.active_streams), (queued, m.queued_streams))):
            if value != self._shown[i]:
                gauge.labels(self.name).inc(value - self._shown[i])
                self._shown[i] = value
