"""The naive way to serve, kept as the baseline: one stream per thread, one onnxruntime call per character.

``Engine(batching=False)`` admits and queues streams exactly as the batching
engine does, then hands each admitted stream to ``run_alone`` in a pool
thread. Same sampling, same seeds, same stream semantics; only the batching is
missing, which is what the serving benchmark measures.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from charrnn.service import errors
from charrnn.service.batch import sample_next
from charrnn.service.streams import Stream

if TYPE_CHECKING:  # pragma: no cover
    from charrnn.service.engine import Engine

log = logging.getLogger("charrnn.service.engine")


def run_alone(engine: "Engine", s: Stream) -> None:
    """Generates ``s`` to its end in the calling pool thread, then frees its slot."""
    try:
        _generate(engine, s)
    except Exception as e:  # noqa: BLE001 - a failed onnxruntime call is a failure of the whole engine
        log.exception("stream %s failed", s.request.request_id)
        s.fail(errors.engine_failed(engine.model.label, e), time.monotonic())
        engine.fail_from_worker(e)
    finally:
        with engine._lock:
            engine._n_active -= 1
        s._mailbox.post([s])
        engine._wake.set()  # a slot is free: the engine thread admits the next queued stream


def _generate(engine: "Engine", s: Stream) -> None:
    model, vocab = engine.model, engine._vocab
    step_hist, batch_hist, inter_hist = engine._m_step, engine._m_batch, engine._m_inter
    if (why := s.gone(time.monotonic())) is not None:
        s.end(why, time.monotonic())
        return
    logits, state = model.run(s.request.prime_ids[None, :].astype(np.int64), model.zero_state(1))  # [1, T, V]
    token = int(sample_next(logits[:, -1, :], [s])[0])
    now = s.first_char_at = time.monotonic()
    why = s.advance(vocab[token], now)
    while why is None:
        s._mailbox.post([s] if s.generated == 1 else ())  # the first character at once, then every flush interval
        if engine._stopping or engine.halt is not None:
            why = engine.halt or errors.Unavailable(f"server shutting down: model {model.label} stopped")
            break
        last = now
        t0 = time.monotonic()
        logits, state = model.run(np.array([[token]], np.int64), state)  # [1, 1, V]
        token = int(sample_next(logits[:, 0, :], [s])[0])
        now = time.monotonic()
        step_hist.observe(now - t0)
        batch_hist.observe(1)
        inter_hist.observe(now - last)
        why = s.advance(vocab[token], now)
    s.end(why, now)
