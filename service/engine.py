"""A front-end's side of one engine core: streams go in, the core's ids come back as text.

``EngineClient.submit`` runs on the asyncio loop: it refuses at once what the
core would refuse (draining, engine down, every slot and queue place taken by
its last count), gives the stream a row of this front-end and hands the
admission to the client's I/O thread. That thread owns the ZeroMQ socket: it
sends the admissions and cancels gathered since its last turn as one message,
and applies the core's per-step messages to a few arrays over this front-end's
rows: ids collect per row ([rows, PENDING]) and become text, one numpy call for
all rows, when the loop is due a delivery (the flush interval), when a stream
starts or ends, or when a row's buffer is full. Rows with stop sequences hold
back the characters that could still begin one (the core says how many).

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
from charrnn.service.requests import (FinishReason, GenerationRequest, GenerationResult, GenerationStats,
                                      ScoreJob)
from charrnn.service.streams import Mailbox, Stream

log = logging.getLogger("charrnn.service.engine")

PENDING = 128  # characters a row collects before they are handed over anyway (> the longest stop sequence)
POLL_MS = 100
SHUTDOWN_MESSAGE = "server shutting down"
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


def error_for(code: str, reason: str, message: str) -> errors.CharrnnError:
    """The exception a stream that the core ended with ``code`` raises to its reader."""
    if code == "RESOURCE_EXHAUSTED":
        return errors.Overloaded(reason, message)
    if code == "DEADLINE_EXCEEDED":
        return errors.DeadlineExceeded(message)
    if code == "CANCELLED":
        return errors.Cancelled(message or "cancelled")
    if code == "UNAVAILABLE":
        return errors.Unavailable(message, reason)
    return errors.CharrnnError(message or "internal error in the engine")


class EngineClient:
    def __init__(self, label: str, name: str, metadata: ModelMetadata, *, ctx: zmq.Context, address: str,
                 fe: int = 0, primary: bool = True, metrics: Metrics | None = None, max_active: int = 256,
                 max_queue: int = 1024, flush_interval: float = 0.05):
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
        self.set_metadata(metadata)
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
        self._streams: dict[int, Stream] = {}  # row -> stream
        self._lps: dict[int, list] = {}  # row -> log-probabilities not yet handed over (rows that asked)
        self._free_rows: list[int] = []
        self._cap = 0
        self._held = np.zeros((0, PENDING), np.int32)  # [rows, PENDING] ids not yet handed over
        self._pending = np.zeros(0, np.int64)  # [rows] how many of them
        self._hold = np.zeros(0, np.int64)  # [rows] of those, how many to keep back (they may begin a stop)
        self._got = np.zeros(0, np.int64)  # [rows] characters received
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
        self._codes = np.array([ord(c) for c in metadata.vocab], np.uint32) if "\x00" not in metadata.vocab else None

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
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
            self._free_rows.extend(row for row, _ in streams)
        for _, s in streams:
            s.fail(error)
        self._post([s for _, s in streams])
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
        return len(self._streams)

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
            seen = max(len(self._streams), used + queued + self._sent_since_report)
            if seen + n > self.max_active + self.max_queue:
                raise errors.Overloaded(
                    "queue_full",
                    f"model {self.label} is at capacity: all {self.max_active} batch slots are busy and "
                    f"{max(0, seen - self.max_active)} requests are queued (--max-queue {self.max_queue}); "
                    f"retry later, or raise --max-queue / --max-active-streams")
            streams = []
            for i in range(n):
                sample = request if i == 0 else dataclasses.replace(
                    request, sampling=dataclasses.replace(request.sampling, seed=request.sampling.seed + i))
                stream = Stream(sample, box, self._cancel)
                stream.row = row = self._take_row()
                stream.index = i
                self._streams[row] = stream
                self._adds.append(self._admission(sample, row))
                if not isinstance(sample, ScoreJob) and sample.logprobs:
                    self._lps[row] = []
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
            controls=None if c is None else protocol.Controls(
                bias=c.bias, regex=c.regex, allowed=c.allowed, presence=c.presence, frequency=c.frequency,
                repetition=c.repetition))

    def _cancel(self, stream: Stream) -> None:
        with self._lock:
            if self._streams.get(stream.row) is stream:
                self._cancels.append((stream.row, stream))
        self._wake()

    def _take_row(self) -> int:
        if not self._free_rows:
            old, self._cap = self._cap, max(64, 2 * self._cap)
            self._held = np.concatenate([self._held, np.zeros((self._cap - old, PENDING), np.int32)])
            for name in ("_pending", "_hold", "_got"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(self._cap - old, np.int64)]))
            self._free_rows = list(range(self._cap - 1, old - 1, -1))
        row = self._free_rows.pop()
        self._pending[row] = self._hold[row] = self._got[row] = 0
        return row

    # ---- the I/O thread ----

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug here must not leave streams waiting: they end, the engine restarts
            if self._closed:
                return
            log.exception("engine client of %s failed", self.label)
            self.refuse(errors.Unavailable(f"model {self.label} is not running; retry in a moment", "engine"))
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
            cancels = [row for row, s in self._cancels if self._streams.get(row) is s]
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
        fresh: list[int] = []
        for step in m.steps:
            rows, ids, hold, lp = step.rows, step.ids, step.hold, step.logprobs
            full = rows[self._pending[rows] >= PENDING]
            if len(full):
                self._hand_over(full)
            fresh += rows[self._got[rows] == 0].tolist()
            self._held[rows, self._pending[rows]] = ids
            self._pending[rows] += 1
            self._got[rows] += 1
            if hold is not None:  # at most what is here: a resumed stream's first holds may reach into resume_text
                self._hold[rows] = np.minimum(hold, self._pending[rows])
            if lp is not None and self._lps:
                self._collect_logprobs(rows, ids, lp)
        urgent = [self._streams[r] for r in fresh if r in self._streams]
        for s in urgent:
            s.first_char_at = now
        if now - self._last_flush >= self.flush_interval:
            self._last_flush = now
            self._hand_over(np.flatnonzero(self._pending > self._hold))
            self._post(None)
        elif fresh:
            self._hand_over(np.array(fresh, np.int64))
        ended = [self._end(e) for e in m.ends]
        self._post(urgent + [s for s in ended if s is not None])
        with self._lock:
            if m.load is not None:
                self._core_load, self._sent_since_report = tuple(m.load), 0
        if self._metrics is not None:
            if m.stats is not None:
                apply_core_stats(self._metrics, self.name, m.stats)
            self._show_load(*self._core_load)
        if m.failed and self.on_failed is not None:
            self.on_failed(m.failed)

    def _hand_over(self, rows: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Gives ``rows`` their collected text, one string each, all but the last ``keep`` (default: hold)."""
        keep = self._hold[rows] if keep is None else keep
        counts = self._pending[rows] - keep
        sel = counts > 0
        rows, counts, keep = rows[sel], counts[sel], keep[sel]
        if not len(rows):
            return
        width = int(counts.max())
        ids = self._held[rows, :width]  # [m, width]
        if self._codes is not None:
            codes = self._codes[ids]
            codes[np.arange(width)[None, :] >= counts[:, None]] = 0  # NULs past each row's end: dropped
            texts = codes.view(f"U{width}").ravel().tolist()
        else:  # a vocabulary with NUL in it: character by character
            vocab = self.metadata.vocab
            texts = ["".join(vocab[t] for t in r[:c]) for r, c in zip(ids.tolist(), counts.tolist())]
        streams, lps = self._streams, self._lps
        for r, text, c in zip(rows.tolist(), texts, counts.tolist()):
            s = streams.get(r)
            if s is not None:
                entries = lps.get(r)
                if entries is None:
                    s.deliver(text)
                else:
                    s.deliver(text, entries[:c])
                    del entries[:c]
        for r, c, k in zip(rows[keep > 0].tolist(), counts[keep > 0].tolist(), keep[keep > 0].tolist()):
            self._held[r, :k] = self._held[r, c:c + k]  # the held-back tail moves to the front
        self._pending[rows] = keep

    def _collect_logprobs(self, rows: np.ndarray, ids: np.ndarray, lp: protocol.Logprobs) -> None:
        """Keeps each logprobs row's (char, logprob, [(char, logprob)] of its N best) until its text goes out."""
        vocab = self.metadata.vocab
        chosen, top_ids, top_lp = lp.chosen, lp.top_ids, lp.top_lp
        for i, r in enumerate(rows.tolist()):
            entries = self._lps.get(r)
            if entries is None:
                continue
            k = self._streams[r].request.logprobs
            entries.append((vocab[ids[i]], float(chosen[i]),
                            [(vocab[t], float(v)) for t, v in zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist())]))

    def _end(self, end: protocol.End) -> Stream | None:
        row, code, reason, stop, generated = end.row, end.code, end.reason, end.stop, end.generated
        admitted, first, last = end.admitted, end.first, end.last
        stream = self._streams.get(row)
        if stream is None:
            return None
        stream.steps_after_cancel = end.steps_after_cancel
        score = end.score
        req = stream.request
        stop_text = req.stop[stop] if code == "OK" and stop >= 0 else ""
        keep = len(stop_text) if stop_text else (0 if code == "OK" else int(self._hold[row]))
        self._hand_over(np.array([row], np.int64), np.array([min(keep, int(self._pending[row]))], np.int64))
        with self._lock:
            self._streams.pop(row, None)
            self._lps.pop(row, None)
        if code == "OK":
            arrived = req.arrived or admitted
            stats = GenerationStats(model=self.label, prime_chars=len(req.prime), generated_chars=generated,
                                    queue_seconds=admitted - arrived, prefill_seconds=first - admitted,
                                    decode_seconds=last - first, total_seconds=last - arrived,
                                    stop_sequence=stop_text, seed=0 if isinstance(req, ScoreJob) else req.sampling.seed,
                                    resumed_chars=_resumed_chars(req))
            reason_ = (FinishReason.STOP_SEQUENCE if stop_text else
                       FinishReason.MATCH_COMPLETE if reason == "match" else FinishReason.LENGTH)
            stream.finish(GenerationResult(finish_reason=reason_, stats=stats, score=score))
        else:
            stream.fail(error_for(code, reason, end.message))
        with self._lock:
            self._free_rows.append(row)
        return stream

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


def _resumed_chars(request) -> int:
    resumed = getattr(request, "resume_ids", None)  # a ScoreJob has none
    return 0 if resumed is None else len(resumed)
