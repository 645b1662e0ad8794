"""Continuous batching on the engine thread: prefill new streams, then advance all of them a step at a time.

Each round of the engine thread calls ``work``: first some prefill (new streams
read their primes, grouped in cohorts, for at most about one decode step's
time), then one decode step of the whole batch. A new stream's first character
is sampled from the logits of its prime's last character, so it streams
before its first batch step; a prime read before is not read again
(``batch.PrimeCache``). Streams that end leave the batch in the step that saw
it and their slots are handed back through ``release``.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

import numpy as np

from charrnn.service.batch import Batch, Cohort, PrimeCache, sample_next
from charrnn.service.metrics import observe_many
from charrnn.service.requests import FinishReason
from charrnn.service.runtime import LoadedModel, State
from charrnn.service.streams import Mailbox, Stream

log = logging.getLogger("charrnn.service.engine")

MAX_PREFILL_STEPS = 128  # prime characters per prefill call: a long prime takes several rounds
MIN_PREFILL_SECONDS = 0.002  # prefill time per round while streams decode (at least the last step's time)


class Scheduler:
    def __init__(self, model: LoadedModel, *, prime_cache: int, release: Callable[[int], None],
                 cancel_mark: Callable[[], int], step_hist, batch_hist, inter_hist, cache_counters=None):
        self.model = model
        self.prime_cache = PrimeCache(prime_cache, cache_counters)
        self.batch = Batch(model)
        self.cohorts: list[Cohort] = []
        self._release = release  # frees n batch slots (the engine's counter)
        self._cancel_mark = cancel_mark  # moves whenever a stream is cancelled (Stream.cancel)
        self._cancels_seen = 0  # the mark at the last look for cancelled rows
        self._vocab = list(model.metadata.vocab)
        self._fresh: list[Stream] = []  # joined the batch since its last step (first character from prefill)
        self._last_step_seconds = 0.0
        self._last_step_at = 0.0
        self._step_hist, self._batch_hist, self._inter_hist = step_hist, batch_hist, inter_hist

    @property
    def busy(self) -> bool:
        return bool(len(self.batch) or self.cohorts)

    def held(self) -> list[Stream]:
        return [s for c in self.cohorts for s in c.streams] + self.batch.streams

    def clear(self) -> None:
        """Drops every stream (the engine ends them); text the batch still collects goes to them first."""
        try:
            self.batch.hand_over()
        except Exception:  # noqa: BLE001 - the streams must still be ended
            log.exception("engine %s: collected text lost", self.model.label)
        self.cohorts.clear()
        self.batch = Batch(self.model)
        self._fresh.clear()

    def add(self, new: list[Stream]) -> None:
        """Streams that just got a slot: a cached prime joins at once, the rest wait in cohorts."""
        by_length: dict[int, list[Stream]] = collections.defaultdict(list)
        cached: list[tuple[Stream, tuple]] = []
        for s in new:
            entry = self.prime_cache.get(s)
            if entry is not None:
                cached.append((s, entry))
            else:
                by_length[len(s.request.prime_ids)].append(s)
        if cached:
            state = self.model.concat([state for _, (state, _) in cached])
            self._first_chars([s for s, _ in cached], state, np.stack([logits for _, (_, logits) in cached]))
        for length, group in by_length.items():
            state = self.model.zero_state(len(group))
            same = next((c for c in self.cohorts if c.remaining == length), None)
            if same is None:
                self.cohorts.append(Cohort(group, state, length))
            else:
                same.streams.extend(group)
                same.state = self.model.concat([same.state, state])

    def join_started(self, streams: list[Stream], states: list[State], tokens: list[int]) -> None:
        """Streams whose first character was sampled already (Engine.submit, cached prime) join the batch."""
        self.batch.join(streams, np.array(tokens, np.int64), self.model.concat(states))
        self._fresh.extend(streams)

    def work(self) -> None:
        self._prefill()
        if len(self.batch):
            self._decode()

    def _prefill(self) -> None:
        """Reads primes: the cohort with the most left runs until it catches the next one, then they merge.

        So k new streams cost max(prime length) sequential steps, not the sum. Bounded
        per round (MIN_PREFILL_SECONDS or the last decode step's time, whichever is
        more) while other streams decode, so a long prime cannot stall the batch.
        """
        self._drop_gone_from_cohorts()
        budget = max(MIN_PREFILL_SECONDS, self._last_step_seconds) if len(self.batch) else float("inf")
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
                self.prime_cache.put(self.model, top.streams, top.state, logits[:, -1, :])
                self._first_chars(top.streams, top.state, logits[:, -1, :])
            elif len(cohorts) > 1 and top.remaining == cohorts[1].remaining:
                nxt = cohorts.pop(1)
                top.streams += nxt.streams
                top.state = self.model.concat([top.state, nxt.state])

    def _first_chars(self, streams: list[Stream], state: State, logits: np.ndarray) -> None:
        """Samples each new stream's first character from its prime's last logits [k, V]; joins the batch."""
        ids = sample_next(logits, streams)
        now = time.monotonic()
        vocab = self._vocab
        ended = {}
        for i, tok in enumerate(ids.tolist()):
            s = streams[i]
            s.first_char_at = now
            why = s.advance(vocab[tok], now)
            if why is not None:
                ended[i] = why
        self._end_rows(streams, ended, now)
        post(streams, streams)  # first characters go out at once
        keep = [i for i in range(len(streams)) if i not in ended]
        if keep:
            state = self.model.take(state, np.array(keep, np.int64)) if ended else state
            joining = [streams[i] for i in keep]
            self.batch.join(joining, ids[keep], state)
            self._fresh.extend(joining)

    def _drop_gone_from_cohorts(self) -> None:
        now = time.monotonic()
        for c in self.cohorts:
            ended = {i: why for i, s in enumerate(c.streams) if (why := s.gone(now)) is not None}
            if not ended:
                continue
            self._end_rows(c.streams, ended, now)
            post(c.streams, [c.streams[i] for i in ended])
            keep = [i for i in range(len(c.streams)) if i not in ended]
            c.streams = [c.streams[i] for i in keep]
            c.state = self.model.take(c.state, np.array(keep, np.int64)) if keep else None
        self.cohorts = [c for c in self.cohorts if c.streams]

    def _decode(self) -> None:
        """One step of the whole batch: one onnxruntime call, one sampling call, the ends found vectorised.

        Python touches only the streams that need it this step: those with stop
        sequences (each character through Stream.push), those that end, and,
        when their loop is due a delivery, every stream once for its collected text.
        """
        b = self.batch
        t0 = time.monotonic()
        _, ids = b.step()
        now = time.monotonic()
        self._last_step_seconds = now - t0
        self._step_hist.observe(now - t0)
        self._batch_hist.observe(len(b))
        streams, vocab = b.streams, self._vocab
        # The order of precedence is Stream.advance's: stop, length, cancel, deadline.
        ended = {}
        stop_rows = np.flatnonzero(b.stops)
        for i, tok in zip(stop_rows.tolist(), ids[stop_rows].tolist()):
            s = streams[i]
            if s.push(vocab[tok]) is not None:
                ended[i] = s.matched_stop
        for i in np.flatnonzero(b.generated >= b.limit).tolist():
            ended.setdefault(i, FinishReason.LENGTH)
        gone = np.flatnonzero(b.deadline <= now).tolist()
        mark = self._cancel_mark()
        if mark != self._cancels_seen:  # read before the scan: a later cancel moves it again
            self._cancels_seen = mark
            gone += [i for i, s in enumerate(streams) if s._cancelled]
        gone = [i for i in gone if i not in ended]
        if ended or gone:
            b.hand_over(np.array(sorted({*ended, *gone}), np.int64))  # their text, and their counts for the message
            for i in gone:
                ended.setdefault(i, streams[i].gone(now))
        # Streams that were in the previous step share one gap; those that joined since count from their first.
        observe_many(self._inter_hist, now - self._last_step_at, len(b) - len(self._fresh))
        for s in self._fresh:
            self._inter_hist.observe(now - s.first_char_at)
        self._fresh.clear()
        self._last_step_at = now
        boxes = list(b.boxes)
        if any(box.due(now) for box in boxes):
            b.hand_over()
        urgent = [streams[i] for i in ended]
        if ended:
            self._end_rows(streams, ended, now)
            b.keep(np.array([i for i in range(len(streams)) if i not in ended], np.int64))
        post_to(boxes, urgent)

    def _end_rows(self, streams: list[Stream], ended: dict, now: float) -> None:
        """Ends ``streams[i]`` for each i in ``ended`` (its reason) and frees their slots."""
        if not ended:
            return
        for i, why in ended.items():
            streams[i].end(why, now)
        self._release(len(ended))


def post(streams: list[Stream], urgent: list[Stream]) -> None:
    """Tells the loop(s) of ``streams`` that text is waiting; ``urgent`` streams are woken at once."""
    post_to({s._mailbox for s in streams}, urgent)


def post_to(boxes, urgent: list[Stream]) -> None:
    """Posts once to each Mailbox in ``boxes`` and to those of ``urgent`` streams, which are woken at once."""
    wake: dict[Mailbox, list[Stream]] = dict.fromkeys(boxes, ())
    for s in urgent:
        wake[s._mailbox] = [*wake.get(s._mailbox, ()), s]
    for box, streams in wake.items():
        box.post(streams)

