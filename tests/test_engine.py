"""The generation engine on real onnxruntime sessions of tiny exported models.

Each test drives an Engine from asyncio the way the servicer does: submit a
validated request, iterate the stream's chunks, read the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import onnxruntime as ort
import pytest

from charrnn import modelfile as mf
from charrnn.service import errors
from charrnn.service.cores import ThreadCore
from charrnn.service.prefill import MAX_PREFILL_STEPS
from charrnn.service.metrics import Metrics
from charrnn.service.requests import FinishReason, GenerationRequest
from charrnn.service.runtime import load_model
from testkit.requests import generation_request

PRIME = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def model(model_repo):
    return load_model(model_repo / "tiny" / "1" / mf.MODEL_FILE, "tiny", 1, "cpu")


def request(model, prime=PRIME, max_chars=60, *, seed=1, temperature=1.0, top_k=0, top_p=1.0, stop=(),
            deadline=None) -> GenerationRequest:
    return generation_request(model.metadata, prime, max_chars, seed=seed, temperature=temperature, top_k=top_k,
                              top_p=top_p, stop=stop, deadline=deadline, request_id=f"test-{seed}")


@contextlib.contextmanager
def running(model, **kw):
    metrics = kw.pop("metrics", None) or Metrics()
    engine = ThreadCore(model, metrics=metrics, **kw)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop(5.0)


async def _read(stream) -> str:
    return "".join([chunk async for chunk in stream])


async def collect(engine, req) -> tuple[str, object]:
    stream = engine.submit(req)
    text = await _read(stream)
    return text, stream.result


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def gauge(metrics: Metrics, name: str, model="tiny") -> float:
    return metrics.registry.get_sample_value(name, {"model": model})


def greedy_by_hand(path, vocab, prime: str, n: int) -> str:
    """Argmax decoding straight on an onnxruntime session: the reference for temperature 0."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    state = {k: np.zeros((1, 1, 16), np.float32) for k in names if k != "tokens"}
    tokens = np.array([[vocab.index(c) for c in prime]], np.int64)
    out = []
    for _ in range(n):
        logits, *new = sess.run(None, {"tokens": tokens, **state})
        state = dict(zip([k for k in names if k != "tokens"], new))
        nxt = int(np.argmax(logits[0, -1]))
        out.append(vocab[nxt])
        tokens = np.array([[nxt]], np.int64)
    return "".join(out)


def crowd(model, n=100):
    """n requests with all kinds of primes (lengths 1..40) and sampling settings."""
    reqs = []
    for i in range(n):
        prime = ("The quick brown fox jumps over the lazy dog. " * 2)[: 1 + (i * 7) % 40]
        reqs.append(request(model, prime, 20 + i % 50, seed=1000 + i, temperature=0.5 + (i % 4) * 0.25,
                            top_k=(0, 5, 1, 20)[i % 4], top_p=(1.0, 0.9, 1.0, 0.5)[i % 4]))
    return reqs


@pytest.mark.parametrize("batching", [True, False])
def test_seeded_stream_gives_the_same_text_alone_and_among_100_others(model, batching):
    target = request(model, max_chars=200, seed=42, temperature=0.9, top_p=0.95)

    async def main():
        with running(model, batching=batching) as engine:
            alone, _ = await collect(engine, target)
            results = await asyncio.gather(*(collect(engine, r) for r in crowd(model)[:50]),
                                           collect(engine, target),
                                           *(collect(engine, r) for r in crowd(model)[50:]))
            return alone, results[50][0]

    alone, among = run(main())
    assert len(alone) == 200
    assert among == alone


def test_batching_on_and_off_give_the_same_seeded_text(model):
    reqs = crowd(model, 30)

    async def texts(batching):
        with running(model, batching=batching) as engine:
            return [t for t, _ in await asyncio.gather(*(collect(engine, r) for r in reqs))]

    assert run(texts(True)) == run(texts(False))


@pytest.mark.parametrize("prime", ["R", PRIME, "abcdefghij" * 30])  # 1 char, short, longer than a prefill call
def test_greedy_equals_argmax_decoding_by_hand(model, model_repo, prime):
    assert len("abcdefghij" * 30) > MAX_PREFILL_STEPS
    want = greedy_by_hand(model_repo / "tiny" / "1" / mf.MODEL_FILE, model.metadata.vocab, prime, 80)

    async def main():
        with running(model) as engine:
            others = [collect(engine, r) for r in crowd(model, 20)]
            results = await asyncio.gather(*others, collect(engine, request(model, prime, 80, temperature=0.0)))
            return results[-1]

    text, result = run(main())
    assert text == want
    assert result.finish_reason is FinishReason.LENGTH
    assert result.stats.generated_chars == 80
    assert result.stats.prime_chars == len(prime)


def test_top_k_1_equals_greedy(model):
    async def main():
        with running(model) as engine:
            greedy, _ = await collect(engine, request(model, temperature=0.0, max_chars=100))
            top1, _ = await collect(engine, request(model, temperature=1.5, top_k=1, seed=7, max_chars=100))
            return greedy, top1

    greedy, top1 = run(main())
    assert top1 == greedy


def test_stop_sequence_ends_the_stream_and_is_not_returned(model):
    async def main():
        with running(model) as engine:
            full, _ = await collect(engine, request(model, temperature=0.0, max_chars=120))
            stop = full[40:43]
            cut = full.index(stop)
            text, result = await collect(engine, request(model, temperature=0.0, max_chars=120,
                                                         stop=("never-there", stop)))
            return full, stop, cut, text, result

    full, stop, cut, text, result = run(main())
    assert text == full[:cut]
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.stats.stop_sequence == stop
    assert result.stats.generated_chars == cut + len(stop)


def test_stop_sequence_that_never_matches_returns_all_text(model):
    async def main():
        with running(model) as engine:
            full, _ = await collect(engine, request(model, temperature=0.0, max_chars=90))
            held, result = await collect(engine, request(model, temperature=0.0, max_chars=90, stop=(full[-1] + "@",)))
            return full, held, result

    full, held, result = run(main())
    assert held == full  # the held-back last character is released at the end
    assert result.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("batching", [True, False])
def test_cancelled_stream_frees_its_slot_within_one_step(model, batching):
    metrics = Metrics()

    async def main():
        with running(model, metrics=metrics, batching=batching) as engine:
            stream = engine.submit(request(model, max_chars=1_000_000))
            first = await stream.__anext__()
            for _ in range(100):  # the engine thread publishes its gauges once per round
                if gauge(metrics, "charrnn_active_streams") == 1:
                    break
                await asyncio.sleep(0.01)
            assert first and gauge(metrics, "charrnn_active_streams") == 1
            stream.cancel()
            while not engine.idle:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)  # the gauges follow the core's next message
            # Counted by the core from the moment the cancel reached it (it crossed a socket on its way).
            return stream.steps_after_cancel, gauge(metrics, "charrnn_active_streams")

    steps, active = run(main())
    assert steps <= 1  # the step the cancel found the core in, and no more
    assert active == 0


@pytest.mark.parametrize("batching", [True, False])
def test_deadline_ends_the_stream_with_deadline_exceeded_and_frees_the_slot(model, batching):
    metrics = Metrics()

    async def main():
        with running(model, metrics=metrics, batching=batching) as engine:
            req = request(model, max_chars=1_000_000, deadline=time.monotonic() + 0.2)
            got = []
            with pytest.raises(errors.DeadlineExceeded, match="deadline passed after"):
                async for chunk in engine.submit(req):
                    got.append(chunk)
            assert got, "text produced before the deadline is delivered"
            while not engine.idle:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            return gauge(metrics, "charrnn_active_streams")

    assert run(main()) == 0


def test_full_queue_is_refused_at_once_naming_the_limit_and_its_flag(model):
    async def main():
        with running(model, max_active=1, max_queue=2) as engine:
            streams = [engine.submit(request(model, max_chars=1_000_000)) for _ in range(3)]
            started = time.monotonic()
            with pytest.raises(errors.Overloaded) as info:
                engine.submit(request(model))
            refused_in = time.monotonic() - started
            for s in streams:
                s.cancel()
            return info.value, refused_in

    err, refused_in = run(main())
    assert err.reason == "queue_full" and err.code == "RESOURCE_EXHAUSTED"
    assert "--max-queue 2" in err.message and "1 batch slots" in err.message
    assert refused_in < 0.5  # at once: no waiting for a slot or a queue place


@pytest.mark.parametrize("batching", [True, False])
def test_waiting_past_max_queue_wait_is_refused_with_queue_wait(model, batching):
    async def main():
        with running(model, max_active=1, max_queue=4, max_queue_wait=0.2, batching=batching) as engine:
            hog = engine.submit(request(model, max_chars=1_000_000))
            started = time.monotonic()
            with pytest.raises(errors.Overloaded) as info:
                await collect(engine, request(model))
            waited = time.monotonic() - started
            hog.cancel()
            return info.value, waited

    err, waited = run(main())
    assert err.reason == "queue_wait"
    assert "--max-queue-wait 0.2s" in err.message
    assert 0.2 <= waited < 2.0


def test_slow_reader_gets_multi_char_chunks_and_production_does_not_wait(model):
    async def main():
        with running(model) as engine:
            stream = engine.submit(request(model, max_chars=3000))
            chunks = [await stream.__anext__()]
            for _ in range(400):  # without reading: the engine must finish on its own
                if stream.done:
                    break
                await asyncio.sleep(0.01)
            finished_unread = stream.done
            chunks += [c async for c in stream]
            return chunks, finished_unread, stream.result

    chunks, finished_unread, result = run(main())
    assert finished_unread
    assert len("".join(chunks)) == 3000 == result.stats.generated_chars
    assert len(chunks) <= 3 and max(map(len, chunks)) > 1000


def test_drain_refuses_new_streams_and_lets_running_ones_finish(model):
    async def main():
        with running(model) as engine:
            stream = engine.submit(request(model, max_chars=500))
            engine.drain()
            with pytest.raises(errors.Unavailable, match="server shutting down"):
                engine.submit(request(model))
            text = "".join([c async for c in stream])
            for _ in range(200):
                if not engine.running:
                    break
                await asyncio.sleep(0.01)
            return text, stream.result, engine.running

    text, result, still_running = run(main())
    assert len(text) == 500 and result.finish_reason is FinishReason.LENGTH
    assert not still_running  # a drained engine's thread ends once idle


@pytest.mark.parametrize("batching", [True, False])
def test_stop_ends_remaining_streams_with_unavailable(model, batching):
    async def main():
        engine = ThreadCore(model, metrics=Metrics(), max_active=1, batching=batching)
        engine.start()
        active = engine.submit(request(model, max_chars=1_000_000))
        queued = engine.submit(request(model))
        await active.__anext__()
        await asyncio.to_thread(engine.stop, 5.0)
        outcomes = []
        for s in (active, queued):
            with pytest.raises(errors.Unavailable, match="server shutting down") as info:
                async for _ in s:
                    pass
            outcomes.append(info.value)
        return outcomes, engine

    outcomes, engine = run(main())
    assert len(outcomes) == 2 and not engine.running and engine.idle


def test_engine_records_step_batch_queue_and_inter_char_metrics(model):
    metrics = Metrics()
    reqs = [request(model, "abc"[: 1 + i % 3], 25, seed=i) for i in range(12)]

    async def main():
        with running(model, metrics=metrics) as engine:
            await asyncio.gather(*(collect(engine, r) for r in reqs))

    run(main())
    assert gauge(metrics, "charrnn_queue_wait_seconds_count") == 12
    assert gauge(metrics, "charrnn_inter_char_seconds_count") == 12 * 24  # one gap between each two characters
    # The first character of each stream comes from its prefill; the other 24 from batch steps.
    steps = gauge(metrics, "charrnn_step_seconds_count")
    assert 24 <= steps < 12 * 24  # batched: far fewer steps than characters
    assert gauge(metrics, "charrnn_batch_size_sum") == 12 * 24
    assert gauge(metrics, "charrnn_active_streams") == 0 and gauge(metrics, "charrnn_queued_streams") == 0


def test_a_prime_read_before_skips_its_prefill_and_gives_the_same_text(model):
    req = request(model, "KING RICHARD III:", 80, seed=9, temperature=0.8)

    async def main():
        with running(model) as engine:
            first, _ = await collect(engine, req)
            calls = engine.core.scheduler.batch.prefill.calls
            again, _ = await collect(engine, req)
            # It joined the batch with the cached state: no prefill call at all.
            prefill_skipped = engine.core.scheduler.batch.prefill.calls == calls > 0
            other, _ = await collect(engine, request(model, "zz", 80, seed=9, temperature=0.8))
            stats = (engine.prime_cache.hits, engine.prime_cache.misses)
        with running(model, prime_cache=0) as engine:
            uncached, _ = await collect(engine, req)
            off = (engine.prime_cache.hits, engine.prime_cache.misses)
        return first, again, other, uncached, stats, off, prefill_skipped

    first, again, other, uncached, stats, off, prefill_skipped = run(main())
    assert stats == (1, 2) and off == (0, 0)
    assert prefill_skipped
    assert again == first == uncached
    assert other != first


def test_the_prime_cache_forgets_the_least_recently_used_prime(model):
    primes = ["ROMEO:", "JULIET:", "ROMEO:", "HAMLET:", "JULIET:", "ROMEO:"]

    async def main():
        with running(model, prime_cache=2) as engine:
            for p in primes:
                await collect(engine, request(model, p, 5))
            return engine.prime_cache.hits, engine.prime_cache.misses

    # ROMEO miss, JULIET miss, ROMEO hit, HAMLET miss (evicts JULIET), JULIET miss (evicts ROMEO), ROMEO miss
    assert run(main()) == (1, 5)


def test_first_characters_and_ends_are_delivered_at_once_whatever_the_flush_interval(model):
    async def main():
        with running(model, flush_interval=10.0) as engine:  # ordinary text would wait 10 s
            started = time.monotonic()
            stream = engine.submit(request(model, max_chars=300))
            chunks, times = [], []
            async for chunk in stream:
                chunks.append(chunk)
                times.append(time.monotonic() - started)
            return chunks, times

    chunks, times = run(main())
    assert len("".join(chunks)) == 300
    assert len(chunks) <= 3  # the first character(s) at once, the rest when the stream ends
    assert times[0] < 1.0 and times[-1] < 5.0


def test_text_is_batched_into_chunks_at_the_flush_interval(model):
    async def main():
        with running(model, flush_interval=0.05) as engine:
            reqs = [request(model, max_chars=2000, seed=i) for i in range(4)]
            streams = [engine.submit(r) for r in reqs]

            async def read(s):
                started, n = time.monotonic(), 0
                async for _ in s:
                    n += 1
                return n, time.monotonic() - started

            return await asyncio.gather(*(read(s) for s in streams))

    for chunks, seconds in run(main()):
        assert chunks <= seconds / 0.05 + 3  # about one chunk per interval, not one per character



def test_text_is_the_same_whatever_the_flush_interval_and_however_it_is_collected(model):
    # 300 characters overflow the per-row collection (Batch.PENDING) several times at a 10 s interval;
    # a stop sequence that never matches sends its stream's characters one by one instead.
    reqs = [request(model, max_chars=300, seed=i, stop=("\x01never",) if i % 2 else ()) for i in range(6)]

    async def texts(flush_interval):
        with running(model, flush_interval=flush_interval) as engine:
            return await asyncio.gather(*(collect(engine, r) for r in reqs))

    at_once, collected = run(texts(0.0)), run(texts(10.0))
    assert [t for t, _ in at_once] == [t for t, _ in collected]
    assert all(len(t) == 300 == r.stats.generated_chars for t, r in collected)


def test_n_samples_read_their_prime_once_and_each_is_its_seeded_stream(model_repo):
    """n samples of one request: the prime is prefilled for one row whose state is copied to the n rows."""
    model = load_model(model_repo / "tiny" / "1" / mf.MODEL_FILE, "tiny", 1, "cpu")  # its own: run is wrapped
    prime = "KING HENRY:\nOnce more unto the breach, dear friends"
    read = []
    run_model = model.run

    def counting(tokens, state):
        if tokens.shape[1] > 1:  # a prefill call (decode steps read one character)
            read.append(tokens.shape[0] * tokens.shape[1])
        return run_model(tokens, state)

    model.run = counting

    async def main():
        with running(model, prime_cache=0) as engine:
            req = generation_request(model.metadata, prime, 40, seed=21, temperature=0.9, n=6, request_id="n")
            streams = engine.submit_all(req)
            texts = await asyncio.gather(*(_read(s) for s in streams))
            prefilled = sum(read)
            alone = [(await collect(engine, request(model, prime, 40, seed=21 + i, temperature=0.9)))[0]
                     for i in range(6)]
        return texts, prefilled, alone

    texts, prefilled, alone = run(main())
    assert prefilled == len(prime)  # once, not six times
    assert texts == alone and len(set(texts)) > 1


def test_cancelling_one_of_n_samples_while_its_prime_is_read_leaves_the_others_whole(model):
    prime = ("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 60)[:3000]

    async def main():
        with running(model, prime_cache=0) as engine:
            busy = engine.submit(request(model, "A", 1_000_000, seed=3))  # decoding: prefill goes a round at a time
            await busy.__anext__()
            req = generation_request(model.metadata, prime, 30, seed=50, temperature=0.9, n=4, request_id="n")
            streams = engine.submit_all(req)
            streams[0].cancel()
            texts = await asyncio.gather(*(_read(s) for s in streams[1:]))
            busy.cancel()
            alone = [(await collect(engine, request(model, prime, 30, seed=50 + i, temperature=0.9)))[0]
                     for i in range(1, 4)]
        return texts, alone

    texts, alone = run(main())
    assert texts == alone and all(len(t) == 30 for t in texts)
