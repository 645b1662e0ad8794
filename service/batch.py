"""One batch of the engine core: streams read their primes, then every step advances them all at once.

``Batch.work`` is one round: some prefill, then one decode step. Prefill groups
new streams by how many prime characters they have left (``Cohort``): the one
with the most left runs until it catches up with the next, and they merge, so k
new primes cost max(length) sequential calls, bounded per round so that a long
prime cannot stall the running batch. A stream's first character is sampled
from its prime's last logits, and a prime read before is not read again
(primecache.py).

The decode step is one call of the model and the sampler for every slot of
the extent (slots.py), then a few array operations over the batch: counts,
stop automata (automata.py), lengths, deadlines and cancels. No Python runs per
stream in a step, except for the streams that end. What each front-end must
hear goes into the ``Outbox``: the ids of its rows, per step; the ends; and for
rows with stop sequences how many characters to hold back.

With batching on, the core runs one Batch over all its slots; with batching
off, every stream is a Batch of one slot in a thread of its own (core.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from charrnn.service import sampling
from charrnn.service.automata import AutomatonTable, stop_automaton
from charrnn.service.metrics import CoreStats
from charrnn.service.primecache import PrimeCache
from charrnn.service.runtime import LoadedModel, State
from charrnn.service.slots import Slots

MAX_PREFILL_STEPS = 128  # prime characters per prefill call: a long prime takes several rounds
MIN_PREFILL_SECONDS = 0.002  # prefill time per round while streams decode (at least the last step's time)


@dataclass
class Admission:
    """A validated request as it reaches the core (front-end row, token ids, sampling, limits)."""

    fe: int
    row: int
    prime: np.ndarray  # int64 [T >= 1]
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stops: tuple = ()  # tuple of tuples of token ids (None: a character outside the vocabulary)
    deadline: float = float("inf")  # time.monotonic()
    arrived: float = 0.0
    queued_at: float = 0.0

    @classmethod
    def from_wire(cls, fe: int, m: dict, now: float) -> "Admission":
        stops = tuple(tuple(None if t < 0 else t for t in s) for s in m.get("stops", ()))
        deadline = m.get("deadline")
        return cls(fe=fe, row=m["row"], prime=np.asarray(m["prime"], np.int64), max_chars=m["max_chars"],
                   temperature=m["temperature"], top_k=m["top_k"], top_p=m["top_p"], seed=m["seed"],
                   stops=stops, deadline=float("inf") if deadline is None else deadline,
                   arrived=m.get("arrived", now), queued_at=now)


class Outbox:
    """What each front-end hears from this round: {fe: {"steps": [(rows, ids, hold or None)], "ends": [...]}}."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the batching-off threads write here too
        self._by_fe: dict[int, dict] = {}

    def _box(self, fe: int) -> dict:
        box = self._by_fe.get(fe)
        if box is None:
            box = self._by_fe[fe] = {"steps": [], "ends": []}
        return box

    def chars(self, fe: np.ndarray, rows: np.ndarray, ids: np.ndarray, hold: np.ndarray | None) -> None:
        """One step's new character of each of these rows (arrays [n]: front-end, row, id), and when some
        have stop sequences, how many of their latest characters each must hold back (they may begin one)."""
        if not len(rows):
            return
        with self._lock:
            first = int(fe[0])
            if (fe == first).all():  # one front-end, the usual case: no split
                self._box(first)["steps"].append((rows.astype(np.int32), ids.astype(np.int32),
                                                  None if hold is None else hold.astype(np.int32)))
                return
            for f in np.unique(fe).tolist():
                sel = fe == f
                self._box(f)["steps"].append((rows[sel].astype(np.int32), ids[sel].astype(np.int32),
                                              None if hold is None else hold[sel].astype(np.int32)))

    def end(self, fe: int, record: list) -> None:
        """[row, code, reason, message, stop index or -1, generated, admitted_at, first_at, last_at,
        decode steps the stream ran after its cancel arrived]."""
        with self._lock:
            self._box(fe)["ends"].append(record)

    def take(self) -> dict[int, dict]:
        with self._lock:
            out, self._by_fe = self._by_fe, {}
        return out


class Cohort:
    """New streams with ``remaining`` prime characters left to read each; prefilled by one call per round."""

    def __init__(self, slots: list[int], primes: list[np.ndarray], state: State, remaining: int):
        self.slots = slots
        self.primes = primes
        self.state = state  # after reading all but the last ``remaining`` characters of each prime
        self.remaining = remaining

    def tokens(self, steps: int) -> np.ndarray:
        """int64 [k, steps]: the next ``steps`` prime characters of each member."""
        return np.stack([p[len(p) - self.remaining: len(p) - self.remaining + steps] for p in self.primes])


class Batch:
    def __init__(self, model: LoadedModel, capacity: int, *, outbox: Outbox, stats: CoreStats,
                 prime_cache: PrimeCache | None = None):
        self.model = model
        self.slots = Slots(model, capacity)
        self.outbox = outbox
        self.stats = stats
        self.prime_cache = prime_cache
        self.stops = AutomatonTable(model.metadata.vocab_size)
        self.cohorts: list[Cohort] = []
        self.where: dict[tuple[int, int], int] = {}  # (front-end, row) -> slot
        self.steps = 0  # decode steps so far
        self._last_step_seconds = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.cohorts) or self.slots.used > 0

    @property
    def free(self) -> int:
        return self.slots.free_count

    def add(self, entries: list[Admission], now: float) -> None:
        """Streams that got a slot: a cached prime starts at once, the rest wait in cohorts."""
        s = self.slots
        cached: list[tuple[int, tuple]] = []
        by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
        for e in entries:
            slot = s.take()
            self.where[(e.fe, e.row)] = slot
            for name, value in (("fe", e.fe), ("row", e.row), ("temperature", e.temperature), ("top_k", e.top_k),
                                ("top_p", e.top_p), ("seed", e.seed & 0xFFFFFFFFFFFFFFFF), ("limit", e.max_chars),
                                ("deadline", e.deadline), ("arrived", e.arrived), ("admitted_at", now)):
                s.arrays[name][slot] = value
            self.stats.observe("queue_wait", now - e.queued_at)
            if e.stops:
                s.keys[slot] = e.stops
                s.stop_state[slot] = self.stops.start(e.stops, lambda e=e: stop_automaton(
                    e.stops, self.model.metadata.vocab_size))
            entry = self.prime_cache.get(e.prime) if self.prime_cache is not None else None
            if self.prime_cache is not None and self.prime_cache.capacity:
                self.stats.cache(entry is not None)
            if entry is not None:
                cached.append((slot, entry))
            else:
                by_length.setdefault(len(e.prime), []).append((slot, e.prime))
        if cached:
            slots = np.array([c[0] for c in cached], np.int64)
            state = self.model.concat([c[1][0] for c in cached])
            self._first_chars(slots, state, np.stack([c[1][1] for c in cached]), now)
        for length, group in by_length.items():
            state = self.model.zero_state(len(group))
            same = next((c for c in self.cohorts if c.remaining == length), None)
            if same is None:
                self.cohorts.append(Cohort([g[0] for g in group], [g[1] for g in group], state, length))
            else:
                same.slots += [g[0] for g in group]
                same.primes += [g[1] for g in group]
                same.state = self.model.concat([same.state, state])

    def cancel(self, fe: int, row: int) -> None:
        slot = self.where.get((fe, row))
        if slot is not None and not self.slots.cancelled[slot]:
            self.slots.cancelled[slot] = True
            self.slots.cancelled_at[slot] = self.steps

    def drop_frontend(self, fe: int) -> None:
        """A front-end died: its streams are cancelled (nobody reads their ends)."""
        for (f, _), slot in self.where.items():
            if f == fe:
                self.slots.cancelled[slot] = True

    def work(self, joining: bool) -> None:
        """One round; ``joining``: streams wait for slots (the next round's joins would fill holes)."""
        self._prefill()
        if self.slots.active[: self.slots.extent].any():
            self._decode()
        if not self.cohorts and not (joining and self.slots.capacity > 1):
            for src, dst in zip(*self.slots.compact()):
                self.where[(int(self.slots.fe[dst]), int(self.slots.row[dst]))] = dst

    # ---- prefill ----

    def _prefill(self) -> None:
        self._drop_gone_from_cohorts(time.monotonic())
        decoding = self.slots.active[: self.slots.extent].any()
        budget = max(MIN_PREFILL_SECONDS, self._last_step_seconds) if decoding else float("inf")
        t0 = time.monotonic()
        cohorts = self.cohorts
        while cohorts and time.monotonic() - t0 < budget:
            cohorts.sort(key=lambda c: c.remaining, reverse=True)
            top = cohorts[0]
            target = cohorts[1].remaining if len(cohorts) > 1 else 0
            steps = min(top.remaining - target, MAX_PREFILL_STEPS)
            logits, top.state = self.model.run(top.tokens(steps), top.state)  # [k, steps, V]
            top.remaining -= steps
            if top.remaining == 0:
                cohorts.pop(0)
                last = logits[:, -1, :]
                if self.prime_cache is not None:
                    self.prime_cache.put(self.model, top.primes, top.state, last)
                self._first_chars(np.array(top.slots, np.int64), top.state, last, time.monotonic())
            elif len(cohorts) > 1 and top.remaining == cohorts[1].remaining:
                nxt = cohorts.pop(1)
                top.slots += nxt.slots
                top.primes += nxt.primes
                top.state = self.model.concat([top.state, nxt.state])

    def _drop_gone_from_cohorts(self, now: float) -> None:
        s = self.slots
        for c in self.cohorts:
            slots = np.array(c.slots, np.int64)
            gone = s.cancelled[slots] | (s.deadline[slots] <= now)
            if not gone.any():
                continue
            self._end(slots[gone], now, np.full(int(gone.sum()), -1))
            keep = np.flatnonzero(~gone)
            c.slots = [c.slots[i] for i in keep.tolist()]
            c.primes = [c.primes[i] for i in keep.tolist()]
            c.state = self.model.take(c.state, keep) if len(keep) else None
        self.cohorts = [c for c in self.cohorts if c.slots]

    def _first_chars(self, slots: np.ndarray, state: State, logits: np.ndarray, now: float) -> None:
        """Samples each new stream's first character from its prime's last logits [k, V]; joins the batch."""
        s = self.slots
        self.slots.place(slots, state)
        picked = self.model.sample(logits, s.temperature[slots], s.top_k[slots], s.top_p[slots],
                                   sampling.uniforms(s.seed[slots], s.generated[slots]))
        s.first_at[slots] = now
        s.last_at[slots] = now
        s.active[slots] = True
        self._advance(slots, picked.ids[:, 0], now)

    # ---- decode ----

    def _decode(self) -> None:
        s = self.slots
        e = s.extent
        t0 = time.monotonic()
        picked, s.state = self.model.decode(
            s.token[:e, None], s.state, s.temperature[:e], s.top_k[:e], s.top_p[:e],
            sampling.uniforms(s.seed[:e], s.generated[:e]))
        now = time.monotonic()
        self.steps += 1
        self._last_step_seconds = now - t0
        rows = s.active_rows()
        self.stats.observe("step", now - t0)
        self.stats.observe("batch", len(rows))
        self.stats.observe("inter_char", now - s.last_at[rows])
        s.last_at[rows] = now
        self._advance(rows, picked.ids[rows, 0], now)

    def _advance(self, slots: np.ndarray, ids: np.ndarray, now: float) -> None:
        """Each of ``slots`` produced ``ids``: counts, stop automata, ends (stop, length, cancel, deadline)."""
        s = self.slots
        s.token[slots] = ids
        s.generated[slots] += 1
        states = self.stops.step(s.stop_state[slots], ids)
        s.stop_state[slots] = states
        matched = self.stops.accept[states]  # 1 + stop index, 0 = none
        hold = self.stops.depth[states] if states.any() else None  # rows without stop sequences sit in state 0
        self.outbox.chars(s.fe[slots], s.row[slots], ids, hold)
        ended = (matched > 0) | (s.generated[slots] >= s.limit[slots]) | s.cancelled[slots] | (s.deadline[slots] <= now)
        if ended.any():
            self._end(slots[ended], now, matched[ended] - 1)

    def _end(self, slots: np.ndarray, now: float, stop_index: np.ndarray) -> None:
        """Ends ``slots``: by stop sequence (index >= 0), length, cancel or deadline, in that order."""
        s = self.slots
        for slot, stop in zip(slots.tolist(), stop_index.tolist()):
            if stop >= 0:
                code, reason = "OK", "stop"
            elif s.generated[slot] >= s.limit[slot]:
                code, reason = "OK", "length"
            elif s.cancelled[slot]:
                code, reason = "CANCELLED", "cancelled"
            else:
                code, reason = "DEADLINE_EXCEEDED", "deadline"
            message = (f"deadline passed after {s.generated[slot]} of {s.limit[slot]} characters"
                       if reason == "deadline" else "")
            first = float(s.first_at[slot]) if s.active[slot] else now
            after_cancel = self.steps - int(s.cancelled_at[slot]) if reason == "cancelled" else 0
            self.outbox.end(int(s.fe[slot]), [int(s.row[slot]), code, reason, message, int(stop), int(s.generated[slot]),
                                              float(s.admitted_at[slot]), first, now, after_cancel])
            if s.keys[slot]:
                self.stops.release(s.keys[slot])
            self.where.pop((int(s.fe[slot]), int(s.row[slot])), None)
        s.free(slots)

    def end_all(self, code: str, reason: str, message: str, now: float) -> None:
        """Ends every stream held (prefilling or decoding) with an error."""
        s = self.slots
        for (fe, row), slot in list(self.where.items()):
            first = float(s.first_at[slot]) if s.active[slot] else now
            self.outbox.end(fe, [row, code, reason, message, -1, int(s.generated[slot]),
                                 float(s.admitted_at[slot]), first, now])
            s.free(np.array([slot]))
        self.where.clear()
        self.cohorts.clear()
