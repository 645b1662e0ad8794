"""Prefill: new streams read their primes, a bounded share of each round; Score requests are read the same way.

New streams are grouped by how many prime characters they have left
(``Cohort``): the one with the most left runs until it catches up with the next,
and they merge, so k new primes cost max(length) sequential calls, bounded per
round (``MAX_PREFILL_STEPS`` a call, the round's time budget) so that a long
prime cannot stall the running batch. The n samples of one request read their
prime once, for one row, and that row's state is copied to the others.

``Prefill.run`` decides; the batch applies (batch.py): it returns the streams
whose primes are read (they join the batch), the Score requests done, and the
streams that went away while they read (cancelled, or past their deadline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from charrnn.service.primecache import PrimeCache
from charrnn.service.runtime import LoadedModel, State
from charrnn.service.scoring import ScoreRun
from charrnn.service.slots import Slots

MAX_PREFILL_STEPS = 128  # prime characters per prefill call: a long prime takes several rounds


class Cohort:
    """New streams with ``remaining`` prime characters left to read each; prefilled by one call per round."""

    def __init__(self, slots: list[int], primes: list[np.ndarray], state: State, remaining: int, held: int,
                 copies: list[list[int]] | None = None):
        self.slots = slots  # one per state row: the stream that row is read for
        self.primes = primes
        self.copies = copies or [[] for _ in slots]  # per row: more streams of the same prime (n samples)
        self.state = state  # after reading all but the last ``remaining`` + ``held`` characters of each prime
        self.remaining = remaining  # prime characters still to prefill
        self.held = held  # characters at the end of each prime left to the batch step (0 or 1)

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, slot) int64 [n] of every stream of the cohort: a row's own stream, then its copies."""
        pairs = [(i, x) for i, (lead, extra) in enumerate(zip(self.slots, self.copies)) for x in (lead, *extra)]
        rows, slots = zip(*pairs) if pairs else ((), ())
        return np.array(rows, np.int64), np.array(slots, np.int64)

    def tokens(self, steps: int) -> np.ndarray:
        """int64 [k, steps]: the next ``steps`` prime characters of each member."""
        end = self.remaining + self.held
        return np.stack([p[len(p) - end: len(p) - end + steps] for p in self.primes])


@dataclass
class Prefilled:
    """What one round of prefill leaves for the batch to apply."""

    joins: list[tuple[np.ndarray, State, np.ndarray | None]] = field(default_factory=list)  # slots, state, logits
    scored: list[ScoreRun] = field(default_factory=list)  # Score requests read to their end
    gone: list[np.ndarray] = field(default_factory=list)  # slots cancelled or past their deadline while reading


class Prefill:
    """The cohorts and Score requests of one batch, and the prefill calls that read them."""

    def __init__(self, model: LoadedModel, slots: Slots, held: int, prime_cache: PrimeCache | None):
        self.model, self.slots, self.held, self.prime_cache = model, slots, held, prime_cache
        self.cohorts: list[Cohort] = []
        self.scores: list[ScoreRun] = []  # Score requests being read (scoring.py)
        self.calls = 0  # prefill calls so far

    @property
    def busy(self) -> bool:
        return bool(self.cohorts) or bool(self.scores)

    def add(self, groups: dict[int, list[tuple[int, np.ndarray]]], copies: dict[int, list[int]]) -> None:
        """New streams to read, by prime characters left: (slot, prime) each; ``copies``: slot -> the other
        slots of the same prime."""
        for length, group in groups.items():
            state = self.model.zero_state(len(group))
            same = next((c for c in self.cohorts if c.remaining == length), None)
            if same is None:
                self.cohorts.append(Cohort([g[0] for g in group], [g[1] for g in group], state, length, self.held,
                                           [copies[g[0]] for g in group]))
            else:
                same.slots += [g[0] for g in group]
                same.primes += [g[1] for g in group]
                same.copies += [copies[g[0]] for g in group]
                same.state = self.model.concat([same.state, state])

    def add_score(self, slot: int, prime: np.ndarray, text_chars: int, top: int) -> None:
        self.scores.append(ScoreRun(self.model, slot, prime, text_chars, top))

    def run(self, budget: float) -> Prefilled:
        """Reads for up to ``budget`` seconds (at least one call when there is work)."""
        out = Prefilled()
        self._drop_gone(time.monotonic(), out)
        t0 = time.monotonic()
        self._score(t0, budget, out)
        cohorts = self.cohorts
        while cohorts and time.monotonic() - t0 < budget:
            cohorts.sort(key=lambda c: c.remaining, reverse=True)
            top = cohorts[0]
            target = cohorts[1].remaining if len(cohorts) > 1 else 0
            steps = min(top.remaining - target, MAX_PREFILL_STEPS)
            logits, top.state = self.model.run(top.tokens(steps), top.state)  # [k, steps, V]
            self.calls += 1
            top.remaining -= steps
            if top.remaining == 0:
                cohorts.pop(0)
                last = None if self.held else logits[:, -1, :]
                if self.prime_cache is not None:
                    self.prime_cache.put(self.model, top.primes, top.state, last)
                rows, slots = top.members()
                state = top.state
                if len(slots) > len(top.slots):  # each row's state copied to the streams that share its prime
                    state = self.model.gather(state, rows)
                    last = None if last is None else last[rows]
                out.joins.append((slots, state, last))
            elif len(cohorts) > 1 and top.remaining == cohorts[1].remaining:
                nxt = cohorts.pop(1)
                top.slots += nxt.slots
                top.primes += nxt.primes
                top.copies += nxt.copies
                top.state = self.model.concat([top.state, nxt.state])
        return out

    def _score(self, t0: float, budget: float, out: Prefilled) -> None:
        """Reads the Score requests a call further each, within the round's budget."""
        s = self.slots
        now = time.monotonic()
        for run in list(self.scores):
            slot = run.slot
            if s.cancelled[slot] or s.deadline[slot] <= now:
                self.scores.remove(run)
                out.gone.append(np.array([slot]))
                continue
            if time.monotonic() - t0 >= budget:
                break
            run.advance(self.model, MAX_PREFILL_STEPS)
            self.calls += 1
            if run.done:
                self.scores.remove(run)
                out.scored.append(run)

    def _drop_gone(self, now: float, out: Prefilled) -> None:
        s = self.slots
        for c in self.cohorts:
            _, every = c.members()
            gone = s.cancelled[every] | (s.deadline[every] <= now)
            if not gone.any():
                continue
            out.gone.append(every[gone])
            ended = set(every[gone].tolist())
            keep, slots, copies = [], [], []
            for i, (lead, extra) in enumerate(zip(c.slots, c.copies)):
                live = [x for x in [lead, *extra] if x not in ended]
                if live:  # the row is still read, for the first stream left of it
                    keep.append(i)
                    slots.append(live[0])
                    copies.append(live[1:])
            c.primes = [c.primes[i] for i in keep]
            c.slots, c.copies = slots, copies
            c.state = self.model.gather(c.state, np.array(keep, np.int64)) if keep else None
        self.cohorts = [c for c in self.cohorts if c.slots]

    def clear(self) -> None:
        self.cohorts.clear()
        self.scores.clear()
