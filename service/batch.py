"""One batch of the engine core: streams read their primes, then every step advances them all at once.

``Batch.work`` is one round: some prefill, then one decode step. Where a new
stream's first character is drawn depends on the device. On CUDA (a step costs
a fraction of a millisecond, and another sampler call per round as much) a new
stream reads all of its prime but the last character in prefill and joins the
batch with that character as its next input: its first character is drawn by
the batch step like every other, on the device, and no logits come to the
host. On the CPU (a step of a real model takes milliseconds) it reads all of its
prime and its first character is drawn at once from the prefill's last logits,
by the same sampler graph, so the time to its first character does not wait
for a step of the whole batch. Prefill (prefill.py) reads primes in cohorts,
within a time budget per round, and says which streams join; the batch applies
it. A one-character prime (and the empty prime) needs no prefill at all on
CUDA, and a prime read before is not read again (primecache.py).

The decode step is one call of the model and the sampler for every slot of
the extent (slots.py), then a few array operations over the batch: counts,
stop automata (automata.py), lengths, deadlines and cancels; which end a row
meets when several hold at once is one table, ``_ENDS``. No Python runs per
stream in a step, except for the streams that end. What each front-end must
hear goes into the ``Outbox``: the ids of its rows, K a row per decode call
(``_advance`` applies the K at once); the ends; and for rows with stop
sequences how many characters to hold back.

With batching on, the core runs one Batch over all its slots; with batching
off, every stream is a Batch of one slot in a thread of its own (core.py).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from charrnn.service import protocol, sampling
from charrnn.service.automata import AutomatonTable, stop_automaton
from charrnn.service.controls import ControlRows
from charrnn.service.scoring import ScoreRun
from charrnn.service.metrics import CoreStats
from charrnn.service.prefill import Prefill
from charrnn.service.primecache import PrimeCache
from charrnn.service.requests import Controls
from charrnn.service.runtime import LoadedModel, State
from charrnn.service.slots import Slots, captured_extents

# How a stream ends, in order of precedence: when several hold at one step, the first names the end
# (_end_kinds decides, _end applies). (code, reason) of each.
_ENDS = (("OK", "stop"),  # a stop sequence matched
         ("OK", "match"),  # the regex's match is complete
         ("OK", "length"),  # max_chars generated
         ("CANCELLED", "cancelled"),
         ("DEADLINE_EXCEEDED", "deadline"))
_STOP, _MATCH, _LENGTH, _CANCEL, _DEADLINE = range(len(_ENDS))
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
    cached: tuple | None = None  # its prime's cache entry, when the core's I/O thread drew its first character
    first: int | None = None  # ... and that character's id (already sent)
    logprobs: int = 0  # alternatives wanted per character (0: no log-probabilities)
    score: tuple | None = None  # a Score request: (characters of text at the end of ``prime``, alternatives)
    controls: Controls | None = None  # bias, regex, allowed, penalties (controls.py)
    resumed: int = 0  # the last this many ids of ``prime`` are resume_text: already generated, counted as such

    @classmethod
    def of(cls, fe: int, a: protocol.Admit, now: float) -> "Admission":
        """The core's record of front-end ``fe``'s admission ``a``, queued at ``now``."""
        stops = tuple(tuple(None if t < 0 else t for t in s) for s in a.stops)
        return cls(fe=fe, row=a.row, prime=np.asarray(a.prime, np.int64), max_chars=a.max_chars,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                   stops=stops, deadline=float("inf") if a.deadline is None else a.deadline,
                   arrived=a.arrived or now, queued_at=now, cached=a.cached, first=a.first,
                   logprobs=a.logprobs, controls=a.controls, resumed=a.resumed,
                   score=(a.text_chars, a.top) if a.kind == "score" else None)


class Outbox:
    """What each front-end hears from this round: {fe: protocol.Out with its steps and ends}."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the batching-off threads write here too
        self._by_fe: dict[int, protocol.Out] = {}
        self._seen: set[int] = set()  # front-ends that ever had a stream: one, in the usual case

    def admit(self, fe: int) -> None:
        """A stream of front-end ``fe`` takes a slot (with a single front-end, no step needs splitting)."""
        self._seen.add(fe)

    def _box(self, fe: int) -> protocol.Out:
        box = self._by_fe.get(fe)
        if box is None:
            box = self._by_fe[fe] = protocol.Out()
        return box

    def chars(self, fe: np.ndarray, rows: np.ndarray, ids: np.ndarray, hold: np.ndarray | None,
              lp: protocol.Logprobs | None = None, count: np.ndarray | None = None) -> None:
        """One decode call's new characters of each of these rows (arrays: front-end [n], row [n], ids [n, K];
        ``count`` [n]: how many of its K ids a row keeps, None: all), and when some have stop sequences, how
        many of their latest characters each must hold back (they may begin one)."""
        if not len(rows):
            return
        i32 = np.int32
        with self._lock:
            first = int(fe[0])
            if len(self._seen) == 1 and first in self._seen or (fe == first).all():  # one front-end: no split
                self._box(first).steps.append(protocol.Step(
                    rows.astype(i32), ids.astype(i32), None if hold is None else hold.astype(i32), lp,
                    None if count is None else count.astype(i32)))
                return
            for f in np.unique(fe).tolist():
                sel = fe == f
                part = None if lp is None else protocol.Logprobs(lp.chosen[sel], lp.top_ids[sel], lp.top_lp[sel])
                self._box(f).steps.append(protocol.Step(
                    rows[sel].astype(i32), ids[sel].astype(i32), None if hold is None else hold[sel].astype(i32),
                    part, None if count is None else count[sel].astype(i32)))

    def end(self, fe: int, end: protocol.End) -> None:
        with self._lock:
            self._box(fe).ends.append(end)

    def pop_all(self) -> dict[int, protocol.Out]:
        with self._lock:
            out, self._by_fe = self._by_fe, {}
        return out


@dataclass
class Call:
    """One K-step decode call, as the host applies it: the rows it ran (their slots and streams at its launch,
    so that a slot taken by another stream since is told apart), what it drew, and the regex states it started
    from (the table's have moved on by the time it is applied, and may have been renumbered: so they are kept
    local to each row's automaton, automata.AutomatonTable.offset)."""

    slots: np.ndarray  # int64 [n]: the rows decoding at its launch
    serial: np.ndarray  # int64 [n]: their streams (Slots.serial)
    ids: np.ndarray  # int64 [n, K]
    lp: protocol.Logprobs | None
    regex: tuple[np.ndarray, np.ndarray] | None  # int32 [n] each: local state and offset at launch (None: none)
    started: float
    finished: float

    def live(self, s: Slots) -> np.ndarray:
        """Which of its rows still hold their slot (bool [n]); those that ended since must not be touched."""
        return s.active[self.slots] & (s.serial[self.slots] == self.serial)

    def moved(self, src: list[int], dst: list[int], capacity: int) -> None:
        """Slots were compacted from ``src`` to ``dst``: its rows follow."""
        where = np.arange(capacity)
        where[src] = dst
        self.slots = where[self.slots]


class Batch:
    def __init__(self, model: LoadedModel, capacity: int, *, outbox: Outbox, stats: CoreStats,
                 prime_cache: PrimeCache | None = None, decoder=None, overlap: bool = False):
        self.model = model
        # The K-step decode (--decode-steps > 1; model.k_step_decoder: decode_graph.Decoder, or a stand-in's),
        # or None: one character a call.
        self.decoder = decoder
        # --overlap: a K-step call runs in this thread while the core thread applies the call before it.
        self._caller = (ThreadPoolExecutor(1, thread_name_prefix=f"engine-{model.label}-decode")
                        if overlap and decoder is not None else None)
        self._unapplied: Call | None = None  # the last K-step call, when its outputs wait for the next (overlap)
        self.slots = Slots(model, capacity)
        self.outbox = outbox
        self.stats = stats
        self.prime_cache = prime_cache
        self.stops = AutomatonTable(model.metadata.vocab_size, capacity)  # each slot's stop automaton and state
        self.controls = ControlRows(capacity, model.metadata.vocab)
        self.where: dict[tuple[int, int], int] = {}  # (front-end, row) -> slot
        # Prime characters left to the batch step: 1 on CUDA (first characters drawn by the step), 0 on the
        # CPU (drawn from the prefill's last logits at once); see the module docstring. The device path's dry
        # run on the CPU (runtime.py) takes CUDA's.
        self.held = 1 if model.device_path else 0
        self.prefill = Prefill(model, self.slots, self.held, prime_cache)  # the cohorts and Score requests
        self.steps = 0  # decode steps so far
        self._started = False  # some stream got its first character outside the step, this round
        self._last_step_seconds = 0.0

    @property
    def busy(self) -> bool:
        return self.prefill.busy or self.slots.used > 0

    def prepare(self) -> None:
        """Before the first call, on this thread: the K-step decode's CUDA graphs captured for every extent
        (decode_graph.BucketDecode.prepare) by the thread that will make the calls (the caller thread with
        --overlap), since onnxruntime keeps a graph in its capturing thread's context. With them, the extents
        are the captured sizes only (slots.py)."""
        bucketed = getattr(self.decoder, "bucketed", None)
        if bucketed is None or not bucketed.cuda_graph:
            return
        sizes = captured_extents(self.slots.capacity)
        prepare = lambda: bucketed.prepare(sizes)
        if self._caller is not None:
            self._caller.submit(prepare).result()
        else:
            prepare()
        if bucketed.cuda_graph:
            self.slots.sizes = sizes

    @property
    def free(self) -> int:
        return self.slots.free_count

    def add(self, entries: list[Admission], now: float) -> None:
        """Streams that got a slot: short and cached primes join the batch at once, the rest wait in cohorts."""
        s = self.slots
        ready: list[tuple[int, object]] = []  # (slot, prime cache entry; None: nothing to read)
        early: list[tuple[int, object, int]] = []  # (slot, state, first id already sent)
        by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
        reading: dict[bytes, int] = {}  # prime -> the slot it is read for
        copies: dict[int, list[int]] = {}  # that slot -> the other slots of the same prime
        taken = s.allocate(len(entries))
        for fe in {e.fe for e in entries}:
            self.outbox.admit(fe)
        for name, attr in (("fe", "fe"), ("row", "row"), ("temperature", "temperature"), ("top_k", "top_k"),
                           ("top_p", "top_p"), ("limit", "max_chars"), ("deadline", "deadline"), ("arrived", "arrived")):
            s.arrays[name][taken] = [getattr(e, attr) for e in entries]
        s.seed[taken] = np.array([e.seed & 0xFFFFFFFFFFFFFFFF for e in entries], np.uint64)
        s.admitted_at[taken] = now
        if self.held:
            s.token[taken] = [e.prime[-1] for e in entries]  # read by the batch step that draws the first character
        self.stats.observe("queue_wait", np.array([now - e.queued_at for e in entries]))
        for e, slot in zip(entries, taken.tolist()):
            self.where[(e.fe, e.row)] = slot
            if e.score is not None:
                self.prefill.add_score(slot, e.prime, *e.score)
                continue
            self.controls.start(slot, e.logprobs, e.controls)
            if e.stops:
                self.stops.start(slot, e.stops, lambda e=e: stop_automaton(e.stops, self.model.metadata.vocab_size))
            if e.resumed:  # the draws go on at the next position; the controls have seen the text
                resumed = e.prime[len(e.prime) - e.resumed:]
                s.generated[slot] = e.resumed
                self.controls.replay(slot, resumed)
                self.stops.replay(slot, resumed)
            if len(e.prime) == self.held:
                ready.append((slot, None))
                continue
            if e.first is not None:  # started by the I/O thread from the cache: already counted and sent
                self.prime_cache.count_hit()
                self.stats.cache(True)
                early.append((slot, e.cached[0], e.first))
                continue
            entry = self.prime_cache.get(e.prime) if self.prime_cache is not None else None
            if self.prime_cache is not None and self.prime_cache.capacity:
                self.stats.cache(entry is not None)
            if entry is not None:
                ready.append((slot, entry))
            elif (key := e.prime.tobytes()) in reading:  # the n samples of a request: their prime is read once
                copies[reading[key]].append(slot)
            else:
                reading[key], copies[slot] = slot, []
                by_length.setdefault(len(e.prime) - self.held, []).append((slot, e.prime))
        if early:
            slots = np.array([r[0] for r in early], np.int64)
            s.place(slots, self.model.concat([r[1] for r in early]))
            s.active[slots] = True
            s.first_at[slots] = s.last_at[slots] = now
            self._advance(slots, np.array([r[2] for r in early], np.int64)[:, None], now, emit=False)
        if ready:
            slots = np.array([r[0] for r in ready], np.int64)
            zero = self.model.zero_state(1)
            state = self.model.concat([zero if r[1] is None else r[1][0] for r in ready])
            self._join(slots, state, np.stack([r[1][1] for r in ready]) if not self.held else None)
        self.prefill.add(by_length, copies)

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

    def work(self, joining: bool, flush=None) -> None:
        """One round; ``joining``: streams wait for slots (the next round's joins would fill holes);
        ``flush()``, when given, sends what the outbox holds: it is called before the step when new
        streams have their first characters, so that those do not wait for the step."""
        self._prefill()
        if flush is not None and self._started:
            flush()
        self._started = False
        if self.slots.active[: self.slots.extent].any():
            self._decode(self.steps_now(joining), flush)
        elif self._unapplied is not None:  # its rows all ended when the call before it was applied
            self._apply(self._unapplied)
            self._unapplied = None
        if not self.prefill.cohorts and not (joining and self.slots.capacity > 1):
            moved = self.slots.compact()
            self.controls.move(*moved)
            self.stops.move(*moved)
            if self._unapplied is not None and moved[0]:
                self._unapplied.moved(*moved, self.slots.capacity)
            for src, dst in zip(*moved):
                self.where[(int(self.slots.fe[dst]), int(self.slots.row[dst]))] = dst

    # ---- prefill: Prefill decides, the batch applies ----

    def _prefill(self) -> None:
        decoding = self.slots.active[: self.slots.extent].any()
        budget = max(MIN_PREFILL_SECONDS, self._last_step_seconds) if decoding else float("inf")
        done = self.prefill.run(budget)
        now = time.monotonic()
        for slots in done.gone:
            self._end(slots, now, np.full(len(slots), -1))
        for run in done.scored:
            self._scored(run)
        for slots, state, logits in done.joins:
            self._join(slots, state, logits)

    def _scored(self, run: ScoreRun) -> None:
        s, slot, now = self.slots, run.slot, time.monotonic()
        fe, row = int(s.fe[slot]), int(s.row[slot])
        self.outbox.end(fe, protocol.End(row=row, code="OK", reason="score", admitted=float(s.admitted_at[slot]),
                                         first=now, last=now, score=run.result()))
        self.where.pop((fe, row), None)
        s.free(np.array([slot]))

    def _join(self, slots: np.ndarray, state: State, logits: np.ndarray | None) -> None:
        """New streams join the batch: read but for ``held`` prime characters (their next input), or, with the
        logits [k, V] of their prime's last character, with their first character drawn from them now."""
        s = self.slots
        s.place(slots, state)
        s.active[slots] = True
        if logits is not None:
            picked = self.model.sample(logits, s.temperature[slots], s.top_k[slots], s.top_p[slots],
                                       sampling.uniforms(s.seed[slots], s.generated[slots]),
                                       self.controls.sampler_controls(slots))
            now = time.monotonic()
            s.first_at[slots] = s.last_at[slots] = now
            self._advance(slots, picked.ids, now, lp=_logprobs(picked, slice(None)))
            self._started = True

    # ---- decode ----

    def _decode(self, steps: int, flush=None) -> None:
        """One decode call: every slot of the extent advances ``steps`` characters. One step is the model and
        the sampler, applied at once. More is the fused K-step graph (decode_graph.py); with --overlap it runs
        in the caller thread while this one applies the call before it (ends, stops, messages) and, with
        ``flush``, sends those messages at once, and is itself applied during the next call, or before any
        single step."""
        if steps == 1:
            if self._unapplied is not None:
                self._apply(self._unapplied)
                self._unapplied = None
            if self.slots.active[: self.slots.extent].any():  # rows may have ended just now
                self._single_step()
            return
        launched = time.monotonic()
        run, slots, serial, regex = self._launch(steps)
        if self._caller is None:
            self._apply(self._land(*run(), slots, serial, regex, launched))
            return
        started = threading.Event()
        running = self._caller.submit(lambda: (started.set(), run())[1])
        # The caller thread needs the GIL until onnxruntime's run releases it: wait until it has it, or this
        # thread would hold it through the whole apply and the call would start only after.
        started.wait()
        if self._unapplied is not None:
            self._apply(self._unapplied)  # while the call runs: onnxruntime has released the GIL
            if flush is not None:  # its characters and ends go out now, not after this call
                flush()
        self._unapplied = self._land(*running.result(), slots, serial, regex, launched)

    def _launch(self, steps: int):
        """The K-step call's inputs for slots [0, extent): (a function that runs it, the rows decoding, their
        streams, their regex states as Call.regex has them). The arrays the core thread writes while a call
        runs under --overlap (last ids, counts, regex states) go in as copies. Each row draws at its next
        position: past the characters of a call not applied yet."""
        s, e = self.slots, self.slots.extent
        slots = np.flatnonzero(s.active[:e])
        position = s.generated[:e].copy()
        if self._unapplied is not None:
            call = self._unapplied
            position[call.slots[call.live(s)]] += call.ids.shape[1]
        u = sampling.uniforms(s.seed[:e, None], position[:, None] + np.arange(steps))  # [e, K]
        controls = self.controls.sampler_controls(slice(0, e), regex_mask=False)
        automaton = self.controls.automaton_inputs(slice(0, e)) if controls is not None else None
        tokens = s.token[:e, None].copy()
        if controls is not None:
            controls.counts = controls.counts.copy()
            automaton.state = automaton.state.copy()
        regex = None
        if automaton is not None:
            offset = self.controls.regexes.offset[slots].copy()
            regex = (automaton.state[slots] - offset, offset)
        state, temperature, top_k, top_p = s.state, s.temperature[:e], s.top_k[:e], s.top_p[:e]
        return (lambda: self.decoder.decode(tokens, state, temperature, top_k, top_p, u, controls, automaton),
                slots, s.serial[slots].copy(), regex)

    def _land(self, graph, state: State, slots: np.ndarray, serial: np.ndarray,
              regex: tuple[np.ndarray, np.ndarray] | None, started: float) -> Call:
        """A K-step call returned: the next call's inputs (state, each row's last id, penalty counts, regex
        states) are its outputs, for the rows that still hold their slot; the rest waits in the Call."""
        s = self.slots
        finished = time.monotonic()
        self._last_step_seconds = finished - started
        s.state = state
        ids = graph.ids[slots]
        lp = _logprobs(graph, slots)
        call = Call(slots, serial, ids, lp, regex, started, finished)
        live = call.live(s)
        rows = slots[live]
        s.token[rows] = ids[live, -1]
        if graph.counts is not None:
            self.controls.set_counts(rows, graph.counts[rows])
        if graph.automaton_state is not None:  # numbered as the table was at the launch: renumbered to today's
            table = self.controls.regexes
            table.state[rows] = graph.automaton_state[rows] - regex[1][live] + table.offset[rows]
        return call

    def _apply(self, call: Call) -> None:
        """A K-step call's characters, for its rows that still hold their slot: stats, then ``_advance``."""
        s = self.slots
        live = call.live(s)
        rows, steps = call.slots[live], call.ids.shape[1]
        gaps = self._gaps(rows, call.finished, steps)
        lp = call.lp
        if lp is not None and not live.all():
            lp = protocol.Logprobs(lp.chosen[live], lp.top_ids[live], lp.top_lp[live])
        regex_from = None if call.regex is None else call.regex[0][live] + self.controls.regexes.offset[rows]
        count = self._advance(rows, call.ids[live], call.finished, lp=lp, regex_from=regex_from)
        self._observe(call.started, call.finished, steps, gaps, count)
        self.steps += steps

    def _single_step(self) -> None:
        """The model step and the sampler, one character of every row, applied at once."""
        s = self.slots
        e = s.extent
        t0 = time.monotonic()
        controls = self.controls.sampler_controls(slice(0, e))
        picked, s.state = self.model.decode(
            s.token[:e, None], s.state, s.temperature[:e], s.top_k[:e], s.top_p[:e],
            sampling.uniforms(s.seed[:e], s.generated[:e]), controls)
        now = time.monotonic()
        self._last_step_seconds = now - t0
        rows = s.active_rows()  # a slice when no hole: every index below is then a view
        gaps = self._gaps(rows, now, 1)
        lp = _logprobs(picked, rows)
        count = self._advance(rows, picked.ids[rows], now, lp=lp)
        self._observe(t0, now, 1, gaps, count)
        self.steps += 1

    def _gaps(self, rows, finished: float, steps: int) -> np.ndarray:
        """Before a call is applied: each row's gap between its characters (the time since its last one over
        the call's steps; NaN for a row whose first character this is, which starts its decode instead)."""
        s = self.slots
        first = s.generated[rows] == 0
        gaps = (finished - s.last_at[rows]) / steps
        gaps[first] = np.nan
        if first.any():
            s.first_at[(np.arange(s.extent)[rows])[first]] = finished
        s.last_at[rows] = finished
        return gaps

    def _observe(self, started: float, finished: float, steps: int, gaps: np.ndarray, count: np.ndarray) -> None:
        """A call's figures: its time per step; at each step the rows that kept its character; each character's
        gap from the one before (``gaps`` [n], ``count`` [n]: the characters each row kept)."""
        self.stats.observe_same("step", (finished - started) / steps, steps)
        if steps == 1:
            self.stats.observe_same("batch", len(count), 1)
        else:
            self.stats.observe("batch", (count[None, :] > np.arange(steps)[:, None]).sum(axis=1))
        kept = np.repeat(gaps, count) if steps > 1 else gaps
        self.stats.observe("inter_char", kept[~np.isnan(kept)])

    def steps_now(self, joining: bool) -> int:
        """How many characters the next decode call advances: 1 while streams wait for a slot or read their
        prime (their first characters must not wait for a K-step call); else --decode-steps."""
        if self.decoder is None or joining or self.prefill.busy:
            return 1
        return self.decoder.steps

    def _advance(self, slots: np.ndarray | slice, ids: np.ndarray, now: float, emit: bool = True,
                 lp: protocol.Logprobs | None = None, regex_from: np.ndarray | None = None) -> np.ndarray:
        """Each of ``slots`` (an index array or a slice) produced ``ids`` [n, K], K characters in order:
        the stop automata (and the regex states, from ``regex_from``) walk the K ids, K gathers over all rows
        at once, and each row ends at the first of its K characters where an end holds (stop sequence, regex
        match, length; cancel and deadline at its first), keeping the ids up to it. K = 1 outside a K-step
        call: then the host moves the penalty counts and regex states (a K-step call brought its own: _land).
        ``emit=False``: the front-ends have the characters already. Returns how many of its K ids each row
        kept."""
        s = self.slots
        n, steps = ids.shape
        end_at = np.full(n, steps)  # the step (0-based) at which each row ends; steps: none
        stop_states, matched = None, None
        if self.stops.in_use:  # rows without stop sequences sit in state 0, which never moves
            stop_states = self.stops.walk(self.stops.state[slots], ids)
            matched = self.stops.accept[stop_states]  # [n, K]: 1 + stop index, 0 = none
            end_at = np.minimum(end_at, _first(matched > 0, steps))
        complete = None
        if regex_from is not None:  # a K-step call's rows with regexes
            regexes = self.controls.regexes
            complete = regexes.accept[regexes.walk(regex_from, ids)] > 0  # [n, K]
            end_at = np.minimum(end_at, _first(complete, steps))
        elif steps == 1:
            done = self.controls.advance(slots, ids[:, 0])  # rows whose regex match is complete
            if done is not None:
                complete = done[:, None]
                end_at[done] = 0
        generated = s.generated[slots]
        limit = s.limit[slots]
        end_at = np.minimum(end_at, np.maximum(limit - generated - 1, 0))
        end_at[s.cancelled[slots] | (s.deadline[slots] <= now)] = 0
        ended = end_at < steps
        count = np.minimum(end_at + 1, steps)
        last = count - 1
        pick = np.arange(n)
        generated = generated + count
        s.generated[slots] = generated
        if steps == 1:  # a K-step call's rows have their next input already (_land)
            s.token[slots] = ids[:, 0]
        hold = None
        if stop_states is not None:
            final = stop_states[pick, last]
            self.stops.state[slots] = final
            hold = self.stops.depth[final]
        if emit:
            self.outbox.chars(s.fe[slots], s.row[slots], ids, hold, lp, count if ended.any() else None)
        if ended.any():
            index = np.arange(s.extent)[slots] if isinstance(slots, slice) else slots
            at = end_at[ended]
            stop = matched[ended, at] - 1 if matched is not None else np.full(len(at), -1)
            self._end(index[ended], now, stop, None if complete is None else complete[ended, at], count[ended])
        return count

    def _end(self, slots: np.ndarray, now: float, stop_index: np.ndarray, complete: np.ndarray | None = None,
             drawn: np.ndarray | None = None) -> None:
        """Ends ``slots``: by stop sequence (index >= 0), regex match, length, cancel or deadline, in that order;
        ``drawn``: the characters each drew in the call that ends it (for a cancel's count)."""
        s = self.slots
        generated, limit = s.generated[slots], s.limit[slots]
        kind = _end_kinds(stop_index, complete, generated, limit, s.cancelled[slots])
        # A cancel's count: the decode steps whose characters it drew after the cancel came.
        after = self.steps - s.cancelled_at[slots] + (0 if drawn is None else drawn)
        columns = zip(slots.tolist(), kind.tolist(), stop_index.tolist(), s.fe[slots].tolist(), s.row[slots].tolist(),
                      generated.tolist(), limit.tolist(), s.first_at[slots].tolist(), s.admitted_at[slots].tolist(),
                      after.tolist())
        for slot, k, stop, fe, row, gen, lim, first, admitted, after_cancel in columns:
            code, reason = _ENDS[k]
            message = f"deadline passed after {gen} of {lim} characters" if k == _DEADLINE else ""
            self.outbox.end(fe, protocol.End(row=row, code=code, reason=reason, message=message, stop=stop,
                                             generated=gen, admitted=admitted, first=first if gen else now, last=now,
                                             steps_after_cancel=after_cancel if k == _CANCEL else 0))
            self.where.pop((fe, row), None)
        self.stops.release(slots)
        self.controls.free(slots)
        s.free(slots)

    def end_all(self, code: str, reason: str, message: str, now: float) -> None:
        """Ends every stream held (prefilling or decoding) with an error."""
        s = self.slots
        for (fe, row), slot in list(self.where.items()):
            first = float(s.first_at[slot]) if s.generated[slot] else now
            self.outbox.end(fe, protocol.End(row=row, code=code, reason=reason, message=message,
                                             generated=int(s.generated[slot]), admitted=float(s.admitted_at[slot]),
                                             first=first, last=now))
            s.free(np.array([slot]))
            self.stops.release(slot)
            self.controls.free(slot)
        self.where.clear()
        self.prefill.clear()
        self._unapplied = None


def _end_kinds(stop_index: np.ndarray, complete: np.ndarray | None, generated: np.ndarray, limit: np.ndarray,
               cancelled: np.ndarray) -> np.ndarray:
    """The index in _ENDS of each ending row's end: the first of _ENDS that holds (the deadline when none does:
    a row ends for one of them)."""
    holds = [stop_index >= 0, complete if complete is not None else False, generated >= limit, cancelled]
    return np.select(holds, [_STOP, _MATCH, _LENGTH, _CANCEL], _DEADLINE)


def _logprobs(answer, rows) -> protocol.Logprobs | None:
    """The log-probabilities of ``rows`` of a sampler's answer (sampler.Picked, K = 1) or a K-step graph's
    (decode_graph.Decoded): logprob [B, K], top_ids and top_logprobs [B, (K,) n]; as Outbox.chars takes them
    (None without)."""
    chosen, top_ids, top_lp = answer.logprob, answer.top_ids, answer.top_logprobs
    if chosen is None:
        return None
    if top_ids.ndim == 2:  # the sampler's: one step
        top_ids, top_lp = top_ids[:, None], top_lp[:, None]
    return protocol.Logprobs(chosen[rows].astype(np.float32), top_ids[rows].astype(np.int32),
                             top_lp[rows].astype(np.float32))


def _first(hit: np.ndarray, none: int) -> np.ndarray:
    """Each row's first column where ``hit`` [n, K] holds (``none`` where it never does)."""
    return np.where(hit.any(axis=1), hit.argmax(axis=1), none)
