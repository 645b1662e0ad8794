"""The rows of the running batch and of the streams still reading their primes (engine thread only).

``Batch`` holds every decoding stream as one row of parallel numpy arrays plus
one recurrent state for all rows ([layers, n, hidden] per tensor), so a decode
step is one onnxruntime call and one vectorised sampling call. Rows join at the
end (concatenate) and leave by a gather of the rows that stay; between changes
the state that onnxruntime returns is fed straight back, with no copy.

``Cohort`` is a group of new streams whose primes have the same number of
characters left to read; they are prefilled together, one call for the group,
and each one's first character is sampled from the logits of its prime's last
character, so a new stream does not wait for a step of the whole batch.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from charrnn.service import sampling
from charrnn.service.runtime import LoadedModel, State
from charrnn.service.streams import Stream


class Batch:
    PENDING = 64  # characters a row collects before they are handed over anyway

    def __init__(self, model: LoadedModel):
        self.model = model
        self.streams: list[Stream] = []
        self.tokens = np.empty(0, np.int64)  # [n] next input token of each row
        self.temperature = np.empty(0, np.float64)  # [n]
        self.top_k = np.empty(0, np.int64)  # [n]
        self.top_p = np.empty(0, np.float64)  # [n]
        self.seeds = np.empty(0, np.uint64)  # [n] each row's own generator
        self.generated = np.empty(0, np.int64)  # [n] characters generated so far (= next draw number)
        self.limit = np.empty(0, np.int64)  # [n] max_chars
        self.deadline = np.empty(0, np.float64)  # [n] time.monotonic() deadline, inf when none
        self.stops = np.empty(0, bool)  # [n] the stream has stop sequences (its text goes through Stream.push)
        # Text not yet handed to the streams: token ids [n, PENDING], the first ``pending[i]`` of row i.
        # Rows without stop sequences collect their characters here and get them as one string
        # when their loop is due a delivery, when they end or when the buffer is full.
        self.held = np.empty((0, self.PENDING), np.int32)
        self.pending = np.empty(0, np.int64)  # [n]
        self.boxes: collections.Counter = collections.Counter()  # Mailbox -> rows whose reader it wakes
        self.state: State | None = None
        vocab = model.metadata.vocab
        # Code point of each token: rows of ids become strings in one numpy call (a U-string
        # array drops trailing NULs, which is how rows with fewer characters end).
        self._codes = np.array([ord(c) for c in vocab], np.uint32) if "\x00" not in vocab else None
        self._vocab = list(vocab)

    def __len__(self) -> int:
        return len(self.streams)

    def join(self, streams: list[Stream], tokens: np.ndarray, state: State) -> None:
        """Appends rows: their next input tokens int64 [k] (each one's latest character) and state (batch k)."""
        temperature, top_k, top_p, seeds = sampling_arrays(streams)
        self.streams.extend(streams)
        self.tokens = np.concatenate([self.tokens, tokens])
        self.temperature = np.concatenate([self.temperature, temperature])
        self.top_k = np.concatenate([self.top_k, top_k])
        self.top_p = np.concatenate([self.top_p, top_p])
        self.seeds = np.concatenate([self.seeds, seeds])
        self.generated = np.concatenate([self.generated, np.array([s.generated for s in streams], np.int64)])
        self.limit = np.concatenate([self.limit, np.array([s.request.max_chars for s in streams], np.int64)])
        deadlines = [np.inf if s.request.deadline is None else s.request.deadline for s in streams]
        self.deadline = np.concatenate([self.deadline, np.array(deadlines, np.float64)])
        self.stops = np.concatenate([self.stops, np.array([bool(s.request.stop) for s in streams], bool)])
        self.held = np.concatenate([self.held, np.zeros((len(streams), self.PENDING), np.int32)])
        self.pending = np.concatenate([self.pending, np.zeros(len(streams), np.int64)])
        self.boxes.update(s._mailbox for s in streams)
        self.state = state if self.state is None else self.model.concat([self.state, state])

    def keep(self, rows: np.ndarray) -> None:
        """Keeps only ``rows`` (int64 [m], ascending): the others have left (their text handed over)."""
        gone = np.ones(len(self.streams), bool)
        gone[rows] = False
        self.boxes.subtract(self.streams[i]._mailbox for i in np.flatnonzero(gone).tolist())
        self.boxes = +self.boxes  # drops the loops left without rows
        self.streams = [self.streams[i] for i in rows.tolist()]
        for name in ("tokens", "temperature", "top_k", "top_p", "seeds", "generated", "limit", "deadline", "stops",
                     "held", "pending"):
            setattr(self, name, getattr(self, name)[rows])
        self.state = self.model.take(self.state, rows) if len(rows) else None

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Advances every row by one character: returns (logits float32 [n, V], next ids int64 [n])."""
        logits, self.state = self.model.run(self.tokens[:, None], self.state)  # [n, 1, V]
        logits = logits[:, 0, :]
        u = sampling.uniforms(self.seeds, self.generated)
        ids = sampling.sample(logits, self.temperature, self.top_k, self.top_p, u)
        self.tokens = ids
        self.generated += 1
        if len(ids) and self.pending.max() >= self.PENDING:
            self.hand_over()
        self.held[np.arange(len(ids)), self.pending] = ids
        self.pending += ~self.stops  # rows with stop sequences hand each character over at once
        return logits, ids

    def hand_over(self, rows: np.ndarray | None = None) -> None:
        """Gives rows without stop sequences (all, or ``rows`` int64 [m]) their collected text, one string each.

        Also brings each one's ``Stream.generated`` up to date (the engine counts
        in ``generated`` between hand-overs). Rows with stop sequences received
        their characters one by one through ``Stream.push`` already.
        """
        if rows is None:
            rows = np.flatnonzero((self.pending > 0) & ~self.stops)
        else:
            rows = rows[(self.pending[rows] > 0) & ~self.stops[rows]]
        if not len(rows):
            return
        counts = self.pending[rows]
        width = int(counts.max())
        ids = self.held[rows, :width]  # [m, width]
        if self._codes is not None:
            codes = self._codes[ids]
            codes[np.arange(width)[None, :] >= counts[:, None]] = 0  # NULs past each row's end: dropped
            texts = codes.view(f"U{width}").ravel().tolist()
        else:  # a vocabulary with NUL in it: character by character
            vocab = self._vocab
            texts = ["".join(vocab[t] for t in r[:c]) for r, c in zip(ids.tolist(), counts.tolist())]
        streams = self.streams
        for i, text, generated in zip(rows.tolist(), texts, self.generated[rows].tolist()):
            s = streams[i]
            s._chunks.append(text)
            s.generated = generated
        self.pending[rows] = 0


def sampling_arrays(streams: list[Stream]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(temperature float64, top_k int64, top_p float64, seeds uint64), each [k], of ``streams``."""
    params = [s.request.sampling for s in streams]
    return (
        np.array([p.temperature for p in params], np.float64),
        np.array([p.top_k for p in params], np.int64),
        np.array([p.top_p for p in params], np.float64),
        sampling.seed_array([p.seed for p in params]),
    )


def sample_next(logits: np.ndarray, streams: list[Stream]) -> np.ndarray:
    """Next character of each of a few streams from logits float32 [k, V] (outside the running batch)."""
    temperature, top_k, top_p, seeds = sampling_arrays(streams)
    u = sampling.uniforms(seeds, np.array([s.generated for s in streams], np.int64))
    return sampling.sample(logits, temperature, top_k, top_p, u)


class Cohort:
    """New streams with ``remaining`` prime characters left to read each; prefilled by one call per round."""

    def __init__(self, streams: list[Stream], state: State, remaining: int):
        self.streams = streams
        self.state = state  # after reading all but the last ``remaining`` characters of each prime
        self.remaining = remaining

    def tokens(self, steps: int) -> np.ndarray:
        """int64 [k, steps]: the next ``steps`` prime characters of each member."""
        rows = []
        for s in self.streams:
            ids = s.request.prime_ids
            start = len(ids) - self.remaining
            rows.append(ids[start : start + steps])
        return np.stack(rows).astype(np.int64, copy=False)


class PrimeCache:
    """What reading a prime leaves behind: its state (batch 1) and its last logits [V], by prime, LRU.

    Reading a prime is deterministic (no sampling), so a stream whose prime was
    read before skips its prefill: its first character is sampled from the cached
    logits and it joins the batch at once. Speaker names and the empty prime
    repeat all the time in char-rnn use, and a prefill at batch 1 costs several
    times what a character in the running batch costs.
    """

    MAX_PRIME = 1024  # longer primes are not kept (bounds the memory of the keys)

    def __init__(self, capacity: int, counters: tuple | None = None):
        self.capacity = capacity  # entries; 0 turns the cache off
        self.hits = 0
        self.misses = 0
        self._counters = counters  # (hit, miss) children of charrnn_prime_cache_lookups_total, or None
        self._lock = threading.Lock()  # read on the event loop (Engine.submit), written by the engine thread
        self._entries: collections.OrderedDict[bytes, tuple[State, np.ndarray]] = collections.OrderedDict()

    @staticmethod
    def key(stream: Stream) -> bytes:
        return stream.request.prime_ids.astype(np.int64, copy=False).tobytes()

    def get(self, stream: Stream, count: bool = True) -> tuple[State, np.ndarray] | None:
        """(state with batch 1, logits [V]) after the stream's prime, if it was read before."""
        if not self.capacity:
            return None
        key = self.key(stream)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            if count:
                self.hits += entry is not None
                self.misses += entry is None
        if count and self._counters is not None:
            self._counters[entry is None].inc()
        return entry

    def count_hit(self) -> None:
        with self._lock:
            self.hits += 1
        if self._counters is not None:
            self._counters[0].inc()

    def put(self, model: LoadedModel, streams: list[Stream], state: State, logits: np.ndarray) -> None:
        """Keeps each stream's row of ``state`` and ``logits`` [k, V] under its prime."""
        if not self.capacity:
            return
        for i, s in enumerate(streams):
            if len(s.request.prime_ids) > self.MAX_PRIME:
                continue
            key = self.key(s)
            with self._lock:
                if key in self._entries:
                    continue
            entry = (model.take(state, np.array([i], np.int64)), logits[i].copy())
            with self._lock:
                self._entries[key] = entry
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
