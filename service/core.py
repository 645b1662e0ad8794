"""The engine core of one model version: queue, admission, slots, the step, sampling.

It is driven by ``corerun.CoreLoop`` (its own process in the server, a thread
for in-process use) and knows nothing of sockets: messages from the front-ends
come in as method calls (``add``, ``cancel``, ``drop_frontend``), each round
(``round``) does one step of work, and ``outbox.pop_all()`` is what every
front-end must hear. Two schedulers share one interface (add / cancel /
drop_frontend / work / busy / used / end_all):

- ``BatchScheduler``: one ``batch.Batch`` over all slots (continuous batching);
- ``NaiveScheduler`` (``--batching off``, the baseline): every stream is a
  Batch of one slot whose steps run in pool threads, one onnxruntime call per
  stream per character.

The core's figures are counted in ``stats`` (metrics.CoreStats) and travel to
the primary front-end with its messages.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import numpy as np

from charrnn.service import errors, protocol, sampling
from charrnn.service.batch import Admission, Batch, Outbox
from charrnn.service.metrics import CoreStats
from charrnn.service.primecache import PrimeCache
from charrnn.service.runtime import LoadedModel

log = logging.getLogger("charrnn.service.core")

QUEUE_SCAN_SECONDS = 0.01  # how often queued streams are checked for deadlines
# The default limits of one model's engine; charrnn-serve's flags (config.py) and every constructor take these.
MAX_ACTIVE = 256  # batch slots: streams generating at once (--max-active-streams)
MAX_QUEUE = 1024  # streams that may wait for a slot (--max-queue)
DECODE_STEPS = 8  # characters per decode call under steady load (--decode-steps)
# A K-step call runs while the host applies the one before it (--overlap). Off: on a 2-core CPU, where
# onnxruntime's threads already take the cores, it measured a wash, and a cancel takes a call longer
# (docs/engine.md, "Overlap").
OVERLAP = False
# The plain K-step calls on CUDA as captured CUDA graphs (--cuda-graphs). Off until a GPU run measures them
# (bench/gpu_session.sh serving: bench.kstep's "cuda graph" rows; docs/engine.md, "CUDA graphs").
CUDA_GRAPHS = False
MAX_DECODE_STEPS = 64


class BatchScheduler:
    def __init__(self, model: LoadedModel, capacity: int, outbox: Outbox, stats: CoreStats, cache: PrimeCache,
                 decoder=None, overlap: bool = False):
        self.batch = Batch(model, capacity, outbox=outbox, stats=stats, prime_cache=cache, decoder=decoder,
                           overlap=overlap)

    @property
    def free(self) -> int:
        return self.batch.free

    @property
    def used(self) -> int:
        return self.batch.slots.used

    @property
    def busy(self) -> bool:
        return self.batch.busy

    def add(self, entries: list[Admission], now: float) -> None:
        self.batch.add(entries, now)

    def cancel(self, fe: int, row: int) -> None:
        self.batch.cancel(fe, row)

    def drop_frontend(self, fe: int) -> None:
        self.batch.drop_frontend(fe)

    def work(self, joining: bool, flush=None) -> None:
        self.batch.work(joining, flush)

    def prepare(self) -> None:
        self.batch.prepare()

    def end_all(self, code: str, reason: str, message: str, now: float) -> None:
        self.batch.end_all(code, reason, message, now)


class NaiveScheduler:
    """Every stream its own Batch of one slot; each round, every stream's step runs in a pool thread of its
    own, all at once (onnxruntime releases the GIL), and the round ends when all are done: the same code at
    batch 1, one onnxruntime call per stream per character, cancels seen between any two steps."""

    def __init__(self, model: LoadedModel, capacity: int, outbox: Outbox, stats: CoreStats):
        self.model, self.capacity, self.outbox, self.stats = model, capacity, outbox, stats
        self._pool = ThreadPoolExecutor(capacity, thread_name_prefix=f"naive-{model.label}")
        self._running: dict[tuple[int, int], Batch] = {}

    @property
    def free(self) -> int:
        return self.capacity - len(self._running)

    @property
    def used(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def add(self, entries: list[Admission], now: float) -> None:
        for e in entries:
            self._running[(e.fe, e.row)] = batch = Batch(self.model, 1, outbox=self.outbox, stats=self.stats)
            batch.add([e], now)

    def cancel(self, fe: int, row: int) -> None:
        batch = self._running.get((fe, row))
        if batch is not None:
            batch.cancel(fe, row)

    def drop_frontend(self, fe: int) -> None:
        for (f, _), b in self._running.items():
            if f == fe:
                b.drop_frontend(fe)

    def work(self, joining: bool, flush=None) -> None:
        batches = list(self._running.items())
        for future in [self._pool.submit(b.work, False) for _, b in batches]:
            future.result()  # a failed call raises here: a failure of the whole engine
        for key, b in batches:
            if not b.busy:
                del self._running[key]

    def end_all(self, code: str, reason: str, message: str, now: float) -> None:
        for b in self._running.values():
            b.end_all(code, reason, message, now)
        self._running.clear()


class Core:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_active: int = MAX_ACTIVE,
        max_queue: int = MAX_QUEUE,
        max_queue_wait: float = 30.0,
        batching: bool = True,
        prime_cache: int = 1024,
        decode_steps: int = DECODE_STEPS,
        decode_graphs: dict | None = None,
        overlap: bool = OVERLAP,
        cuda_graphs: bool = CUDA_GRAPHS,
    ):
        """``decode_steps``: characters per decode call under steady load (--decode-steps; the K-step graph of
        decode_graph.py, on the CPU and with batching on; 1 elsewhere); ``decode_graphs``: those graphs built
        already (decode_graph.read_graphs), else they are built here; ``overlap``: each K-step call runs in a
        thread of its own while this one applies the call before it (batch.py); ``cuda_graphs``: on CUDA, the plain
        K-step calls as captured CUDA graphs (decode_graph.BucketDecode)."""
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not max_queue_wait > 0:
            raise ValueError(f"max_queue_wait must be > 0 seconds, got {max_queue_wait}")
        self.model = model
        self.label = model.label
        self.max_active = max_active  # batch slots (--max-active-streams)
        self.max_queue = max_queue  # requests that may wait for a slot (--max-queue)
        self.max_queue_wait = max_queue_wait  # seconds a request may wait (--max-queue-wait)
        self.stats = CoreStats()
        self.outbox = Outbox()
        self.prime_cache = PrimeCache(prime_cache if batching else 0)
        self.queue: collections.deque[Admission] = collections.deque()
        # The core thread changes the queue and takes slots under this lock; the core process's I/O thread reads
        # how many slots are free under it (first_characters). Slots freed by a step are not under it: a read
        # that misses them sees less room than there is, never more.
        self.admission_lock = threading.Lock()
        self._last_scan = 0.0
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        decoder = None
        if decode_steps > 1 and batching:
            decoder = model.k_step_decoder(decode_steps, decode_graphs, cuda_graphs)
        self.decoder = decoder  # decode_graph.Decoder (or a stand-in's), None: one character a call
        self._prepared = False
        self.decode_steps = decoder.steps if decoder is not None else 1
        if batching:
            self.scheduler = BatchScheduler(model, max_active, self.outbox, self.stats, self.prime_cache, decoder,
                                            overlap)
        else:
            self.scheduler = NaiveScheduler(model, max_active, self.outbox, self.stats)

    # ---- messages from the front-ends ----

    def add(self, fe: int, entries: list[protocol.Admit], now: float) -> None:
        for m in entries:
            e = Admission.of(fe, m, now)
            with self.admission_lock:
                full = self.scheduler.used + len(self.queue) >= self.max_active + self.max_queue
                if not full:
                    self.queue.append(e)
            if full:  # front-ends refuse at once on their own count; two of them can still race past it
                self._refuse(e, "RESOURCE_EXHAUSTED", "queue_full", self.full_message(), now)

    def first_characters(self, adds: list[protocol.Admit]) -> tuple[np.ndarray, np.ndarray] | None:
        """I/O thread: the first characters of new streams whose prime was read before, drawn now.

        Only streams without stop sequences, while slots are free, with the CPU's first-character
        policy (batch.py). Each such admission gets ``cached`` (the prime cache entry) and ``first``
        (its first id), which Batch.add then uses. Returns (rows int32 [k], ids int32 [k]) or None.
        ``adds`` are the I/O thread's own until it hands them to the core thread, after this returns;
        the room is read under ``admission_lock``, the prime cache under its own lock, and the sampler
        is an onnxruntime session, which may run from two threads at once.
        """
        batch = getattr(self.scheduler, "batch", None)
        if batch is None or batch.held or not self.prime_cache.capacity:
            return None
        with self.admission_lock:
            room = self.max_active - self.scheduler.used - len(self.queue)
        chosen = []
        for a in adds:
            if len(chosen) >= room:
                break
            if not a.plain:
                continue
            entry = self.prime_cache.get(np.asarray(a.prime, np.int64), count=False)
            if entry is not None and entry[1] is not None:
                a.cached = entry
                chosen.append(a)
        if not chosen:
            return None
        seeds = sampling.seed_array([a.seed for a in chosen])
        picked = self.model.sample(np.stack([a.cached[1] for a in chosen]),
                                   np.array([a.temperature for a in chosen], np.float32),
                                   np.array([a.top_k for a in chosen], np.int64),
                                   np.array([a.top_p for a in chosen], np.float32),
                                   sampling.uniforms(seeds, np.zeros(len(chosen), np.int64)))
        ids = picked.ids[:, 0]
        for a, first in zip(chosen, ids.tolist()):
            a.first = first
        return np.array([a.row for a in chosen], np.int32), ids.astype(np.int32)

    def full_message(self) -> str:
        return errors.at_capacity(self.label, self.max_active, len(self.queue), self.max_queue).message

    def cancel(self, fe: int, rows: list[int], now: float) -> None:
        wanted = set(rows)
        with self.admission_lock:
            gone = [e for e in self.queue if e.fe == fe and e.row in wanted]
            for e in gone:
                self.queue.remove(e)
        for e in gone:
            self._refuse(e, "CANCELLED", "cancelled", "cancelled", now)
            wanted.discard(e.row)
        for row in wanted:
            self.scheduler.cancel(fe, row)

    def drop_frontend(self, fe: int, now: float) -> None:
        """A front-end is gone: its queued streams leave, its slots free at the next step."""
        with self.admission_lock:
            for e in [e for e in self.queue if e.fe == fe]:
                self.queue.remove(e)
        self.scheduler.drop_frontend(fe)

    def _refuse(self, e: Admission, code: str, reason: str, message: str, now: float) -> None:
        self.outbox.end(e.fe, protocol.End(row=e.row, code=code, reason=reason, message=message, admitted=now,
                                           first=now, last=now))

    # ---- one round ----

    def prepare(self) -> None:
        """Before the first round, on the thread that runs the rounds: on CUDA with --cuda-graphs on, the K-step
        calls' trial and every batch size captured (decode_graph.BucketDecode.prepare), and the log says which
        way the K-step decode runs. Once: a second call does nothing."""
        decoder = self.decoder
        if decoder is None or self._prepared:
            return
        self._prepared = True
        started = time.monotonic()
        self.scheduler.prepare()
        if self.model.device == "cuda":
            why = decoder.bucketed.why_not or "--cuda-graphs off"
            log.info("%s: K-step decode, K=%d, CUDA graphs %s (%.2f s)", self.label, decoder.steps,
                     "on" if decoder.cuda_graphs else f"off: {why}", time.monotonic() - started)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy or bool(self.queue)

    @property
    def load(self) -> tuple[int, int]:
        """(slots taken, requests queued)."""
        return self.scheduler.used, len(self.queue)

    def round(self, now: float, flush=None) -> None:
        """Queue limits, admission into free slots, then one round of the scheduler's work."""
        q = self.queue
        while q and (now - q[0].queued_at > self.max_queue_wait or q[0].deadline <= now):
            e = q.popleft()
            if e.deadline <= now:
                self._refuse(e, "DEADLINE_EXCEEDED", "deadline", "deadline passed after 0 of "
                             f"{e.max_chars} characters", now)
            else:
                self._refuse(e, "RESOURCE_EXHAUSTED", "queue_wait",
                             f"waited {now - e.queued_at:.1f}s for a batch slot of model {self.label} "
                             f"(limit --max-queue-wait {self.max_queue_wait:g}s; all {self.max_active} slots busy); "
                             f"retry later or raise --max-active-streams", now)
        if q and now - self._last_scan >= QUEUE_SCAN_SECONDS:  # a short deadline behind a long wait
            self._last_scan = now
            for e in [e for e in q if e.deadline <= now]:
                q.remove(e)
                self._refuse(e, "DEADLINE_EXCEEDED", "deadline",
                             f"deadline passed after 0 of {e.max_chars} characters", now)
        with self.admission_lock:  # the queue's expired streams left above: only the core thread removes those
            free = self.scheduler.free
            if q and free:
                new = [q.popleft() for _ in range(min(free, len(q)))]
                self.scheduler.add(new, now)
        self.scheduler.work(bool(q), flush)

    def end_all(self, error: errors.CharrnnError, now: float) -> None:
        """Ends every stream, queued or in a slot, with ``error`` (the core stops or failed)."""
        code, reason, message = error.code, error.reason, error.message
        while self.queue:
            self._refuse(self.queue.popleft(), code, reason, message, now)
        self.scheduler.end_all(code, reason, message, now)
