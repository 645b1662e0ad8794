"""Turning a core's ids into each stream's text: the output side of a front-end, apart from any socket.

``OutputProcessor`` keeps, for every stream of one engine client, the ids that
came but are not text yet ([rows, PENDING]), how many of them to hold back
(they may begin a stop sequence; the core says how many), how many came in
all, and the log-probabilities of the characters not handed over. ``apply``
takes one ``protocol.Out``: per decode call, the rows' K ids each go into
those arrays at once; the
streams whose first character came, and all of them when a delivery is due
(the flush interval), get their text, one numpy call for all rows; each end
hands over what is left (cutting a matched stop sequence, dropping held text
at an error) and finishes or fails its stream. It returns the streams whose
readers must wake at once. No Python runs per character.

It is used by CoreClient's I/O thread alone, but for ``add`` and ``owns``,
which the asyncio loop calls under ``lock``; unit tests drive it with
hand-made messages and no socket (tests/test_output.py).
"""

from __future__ import annotations

import threading

import numpy as np

from charrnn.modelfile import ModelMetadata
from charrnn.service import errors, protocol
from charrnn.service.requests import FinishReason, GenerationResult, GenerationStats, ScoreJob
from charrnn.service.streams import Stream

PENDING = 128  # characters a row collects before they are handed over anyway (> the longest stop sequence)


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


class OutputProcessor:
    def __init__(self, label: str, metadata: ModelMetadata):
        self.label = label
        self.set_metadata(metadata)
        self.lock = threading.Lock()  # guards the rows and the streams: the loop adds, the I/O thread ends
        self._streams: dict[int, Stream] = {}  # row -> stream
        self._lps: dict[int, list] = {}  # row -> log-probabilities not yet handed over (rows that asked)
        self._free_rows: list[int] = []
        self._cap = 0
        self._held = np.zeros((0, PENDING), np.int32)  # [rows, PENDING] ids not yet handed over
        self._pending = np.zeros(0, np.int64)  # [rows] how many of them
        self._hold = np.zeros(0, np.int64)  # [rows] of those, how many to keep back (they may begin a stop)
        self._got = np.zeros(0, np.int64)  # [rows] characters received

    def set_metadata(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self._codes = np.array([ord(c) for c in metadata.vocab], np.uint32) if "\x00" not in metadata.vocab else None

    @property
    def live(self) -> int:
        """Streams not yet ended."""
        return len(self._streams)

    # ---- the asyncio loop, under ``lock`` ----

    def add(self, stream: Stream) -> int:
        """A new stream: its row (call under ``lock``)."""
        if not self._free_rows:
            old, self._cap = self._cap, max(64, 2 * self._cap)
            self._held = np.concatenate([self._held, np.zeros((self._cap - old, PENDING), np.int32)])
            for name in ("_pending", "_hold", "_got"):
                setattr(self, name, np.concatenate([getattr(self, name), np.zeros(self._cap - old, np.int64)]))
            self._free_rows = list(range(self._cap - 1, old - 1, -1))
        row = self._free_rows.pop()
        self._pending[row] = self._hold[row] = self._got[row] = 0
        self._streams[row] = stream
        if not isinstance(stream.request, ScoreJob) and stream.request.logprobs:
            self._lps[row] = []
        return row

    def owns(self, stream: Stream) -> bool:
        """``stream`` has not ended here (call under ``lock``): a cancel for it still means something."""
        return self._streams.get(stream.row) is stream

    # ---- the I/O thread ----

    def apply(self, out: protocol.Out, now: float, flush: bool) -> list[Stream]:
        """One message's steps and ends; ``flush``: every row's text goes out now. Returns the streams to wake
        at once (a first character, an end); with ``flush`` the caller wakes every reader anyway."""
        fresh: list[int] = []
        for step in out.steps:
            rows, hold, lp = step.rows, step.hold, step.logprobs
            ids = step.ids if step.ids.ndim == 2 else step.ids[:, None]  # [n, K]
            width = ids.shape[1]
            count = width if step.count is None else step.count  # ids a row keeps: the rest are past its end
            full = rows[self._pending[rows] + width > PENDING]
            if len(full):
                self._hand_over(full)
            fresh += rows[self._got[rows] == 0].tolist()
            # All K go in (within PENDING: see above); those past a row's count are never read.
            self._held[rows[:, None], self._pending[rows][:, None] + np.arange(width)] = ids
            self._pending[rows] += count
            self._got[rows] += count
            if hold is not None:  # at most what is here: a resumed stream's first holds may reach into resume_text
                self._hold[rows] = np.minimum(hold, self._pending[rows])
            if lp is not None and self._lps:
                self._collect_logprobs(rows, ids, lp, np.broadcast_to(count, len(rows)))
        urgent = [self._streams[r] for r in fresh if r in self._streams]
        for s in urgent:
            s.first_char_at = now
        if flush:
            self._hand_over(np.flatnonzero(self._pending > self._hold))
        elif fresh:
            self._hand_over(np.array(fresh, np.int64))
        ended = [self.end(e) for e in out.ends]
        return urgent + [s for s in ended if s is not None]

    def fail_all(self, error: errors.CharrnnError) -> list[Stream]:
        """Ends every stream with ``error`` (the core died without saying so); returns them."""
        with self.lock:
            streams = list(self._streams.items())
            self._streams.clear()
            self._lps.clear()
            self._free_rows.extend(row for row, _ in streams)
        for _, s in streams:
            s.fail(error)
        return [s for _, s in streams]

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

    def _collect_logprobs(self, rows: np.ndarray, ids: np.ndarray, lp: protocol.Logprobs, count: np.ndarray) -> None:
        """Keeps each logprobs row's (char, logprob, [(char, logprob)] of its N best) until its text goes out:
        ``ids`` [n, K], of which the first ``count`` [n] of a row are its."""
        vocab = self.metadata.vocab
        chosen, top_ids, top_lp = lp.chosen, lp.top_ids, lp.top_lp  # [n, K], [n, K, k], [n, K, k]
        for i, (r, c) in enumerate(zip(rows.tolist(), count.tolist())):
            entries = self._lps.get(r)
            if entries is None:
                continue
            k = self._streams[r].request.logprobs
            for j in range(c):
                entries.append((vocab[ids[i, j]], float(chosen[i, j]),
                                [(vocab[t], float(v)) for t, v in zip(top_ids[i, j, :k].tolist(),
                                                                        top_lp[i, j, :k].tolist())]))

    def end(self, end: protocol.End) -> Stream | None:
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
        with self.lock:
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
        with self.lock:
            self._free_rows.append(row)
        return stream


def _resumed_chars(request) -> int:
    resumed = getattr(request, "resume_ids", None)  # a ScoreJob has none
    return 0 if resumed is None else len(resumed)
