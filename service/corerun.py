"""The engine core's loop (its socket, its rounds, what it sends), and its process: ``python -m charrnn.service.corerun``.

The core binds one ZeroMQ ROUTER socket. Every front-end connects a DEALER
(identity ``fe-<n>``); the primary one (the server's own process) also
supervises. Two threads: the core's thread runs the rounds (every message
waiting: admissions, cancels, control; one round of the core, core.py; then one
message per front-end with its rows' new ids, ends and the core's load; the
primary's also carries the metric deltas and is the heartbeat the watchdog
listens for), and an I/O thread owns the socket: it receives and sends while
the core's thread is inside a step (onnxruntime releases the GIL), so packing
and sending never add to a step. Sends never block: when a front-end lags and
its pipe is full, its messages merge and wait, and the step goes on (``a
lagging front-end never slows the step``).

A stream whose prime was read before and that has no stop sequences gets its
first character from the I/O thread at once (sampled from the cached logits of
its prime's last character, on the CPU policy of batch.py), without waiting for
the step in flight; it joins the batch at the next round.

An exception in a round is an engine failure: every stream ends with
UNAVAILABLE, the primary is told why, and the process exits with status 3 for
its supervisor to restart it.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import threading
import time

import zmq

from charrnn.service import errors, protocol
from charrnn.service.core import CUDA_GRAPHS, DECODE_STEPS, MAX_ACTIVE, MAX_QUEUE, OVERLAP, Core

log = logging.getLogger("charrnn.service.corerun")

HEARTBEAT_SECONDS = 0.2  # the longest silence towards the primary front-end while the core is alive
FINAL_SEND_MS = 1000  # how long the core's last message may wait for a front-end to take it
RETRY_SECONDS = 0.01  # how often a message that a lagging front-end could not take is offered again
# A front-end hears the core at most every MESSAGE_SECONDS while it works (the steps between are one
# message, in order): on a GPU a step takes a fraction of a millisecond, and a message per step would
# cost the core more than the step. A step longer than this (a real model on a CPU) is a message each.
MESSAGE_SECONDS = 0.002
IDLE_POLL_MS = 100  # how long an idle core sleeps in poll
QUEUE_POLL_MS = 10  # ... while streams wait in the queue (their deadlines and queue waits are checked)
EXIT_FAILED = 3  # the status of a core process whose engine failed
EXIT_REFUSED = 2  # ... whose model file could not be served


class CoreLoop:
    def __init__(self, core: Core, sock: zmq.Socket):
        self.core = core
        self.sock = sock  # used by the I/O thread alone once run() starts
        self.frontends: dict[bytes, int] = {}  # identity -> front-end number
        self.primary: bytes | None = None
        self.draining = False
        self.stopping = False
        self.message_seconds = MESSAGE_SECONDS
        self.failure = ""  # why the engine failed, once it has
        self._inbox: collections.deque = collections.deque()  # I/O thread -> core thread: (identity, message)
        self._work = threading.Event()  # set when the inbox has something
        self._outq: collections.deque = collections.deque()  # core thread -> I/O thread: (identity, message, last)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._waiting: dict[bytes, protocol.Out] = {}  # I/O thread: messages a lagging front-end could not take yet
        self._retry_at = 0.0
        self._last_send = 0.0
        self._last_beat = 0.0
        self._closing = False
        self._flushed = threading.Event()
        self._parent = os.getppid()
        self._io_failure = ""  # set by the I/O thread when it fails

    @property
    def io_failure(self) -> str:
        """Why the I/O thread failed ("" while it has not): then the streams' ends never left the core."""
        return self._io_failure

    def stop(self) -> None:
        """From another thread: end every stream and return from run() at the next round."""
        self.stopping = True
        self._work.set()

    def run(self) -> int:
        """Rounds until drained or stopped (returns 0) or failed (returns EXIT_FAILED)."""
        io = threading.Thread(target=self._io, name=f"core-io-{self.core.label}", daemon=True)
        io.start()
        try:
            return self._rounds()
        finally:
            self._closing = True
            os.write(self._wake_w, b"x")
            self._flushed.wait(FINAL_SEND_MS / 1000 + 2)
            io.join(5.0)

    def _rounds(self) -> int:
        core = self.core
        try:
            core.prepare()  # on this thread, before any stream's step (done already in a core process)
            while True:
                if core.busy:
                    timeout = 0 if core.scheduler.busy else QUEUE_POLL_MS
                else:
                    timeout = IDLE_POLL_MS
                self._receive(timeout)
                if self._io_failure:  # nothing reaches the front-ends any more: fail, and be restarted
                    raise RuntimeError(self._io_failure)
                now = time.monotonic()
                if self.stopping:
                    core.end_all(errors.stopped(core.label), now)
                    self._send(final=True)
                    return 0
                core.round(now, flush=self._send)  # first characters go out before the step
                if not core.busy or time.monotonic() - self._last_send >= self.message_seconds:
                    self._send()
                if self.draining and not core.busy:
                    self._send(final=True)
                    return 0
                if os.getppid() != self._parent:  # the server is gone: nobody is left to serve
                    return 0
        except Exception as e:  # noqa: BLE001 - any exception in a round is an engine failure
            log.exception("engine %s failed; ending its streams", core.label)
            self.failure = errors.reason_of(e)
            failure = errors.engine_failed(core.label, e)
            try:
                core.end_all(failure, time.monotonic())
            except Exception:  # noqa: BLE001 - the streams are told by the front-ends then
                log.exception("engine %s: its streams could not be ended from the core", core.label)
            self._send(final=True, failed=errors.reason_of(e))
            return EXIT_FAILED

    # ---- the core's thread ----

    def _receive(self, timeout_ms: int) -> None:
        if not self._inbox:
            self._work.wait(timeout_ms / 1000)
        self._work.clear()
        now = time.monotonic()
        while self._inbox:
            identity, m = self._inbox.popleft()
            self._handle(identity, m, now)

    def _handle(self, identity: bytes, m: protocol.Hello | protocol.Work | protocol.Drain | protocol.Stop | protocol.Gone,
                now: float) -> None:
        if isinstance(m, protocol.Hello):
            self.frontends[identity] = m.fe
            if m.primary:
                self.primary = identity
            return
        fe = self.frontends.get(identity)
        if isinstance(m, protocol.Work) and fe is not None:
            if m.add:
                if self.draining:
                    refusal = errors.draining(self.core.label)
                    for a in m.add:
                        self.core.outbox.end(fe, protocol.End(
                            row=a.row, code=refusal.code, reason=refusal.reason, message=refusal.message,
                            admitted=now, first=now, last=now))
                else:
                    self.core.add(fe, m.add, now)
            if m.cancel:
                self.core.cancel(fe, m.cancel, now)
        elif isinstance(m, protocol.Drain):
            self.draining = True
        elif isinstance(m, protocol.Stop):
            self.stopping = True
        elif isinstance(m, protocol.Gone):
            self.core.drop_frontend(m.fe, now)

    def _send(self, final: bool = False, failed: str = "") -> None:
        """Hands this round's messages to the I/O thread: one per front-end with news, and the primary's beat."""
        now = self._last_send = time.monotonic()
        out = self.core.outbox.pop_all()
        load = self.core.load
        beat = self.primary is not None and (now - self._last_beat >= HEARTBEAT_SECONDS or final)
        for ident, fe in list(self.frontends.items()):
            box = out.pop(fe, None)
            primary = ident == self.primary
            if box is None and not (primary and (beat or failed)) and not final:
                continue
            message = box or protocol.Out()
            message.load, message.busy = load, self.core.busy
            if primary:
                message.stats = self.core.stats.pop_all()
                message.failed = failed
                self._last_beat = now
            self._outq.append((ident, message, final))
        os.write(self._wake_w, b"x")

    # ---- the I/O thread ----

    def _io(self) -> None:
        try:
            self._serve_io()
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the core silent
            log.exception("engine %s: the core's I/O thread failed", self.core.label)
            self._io_failure = f"the core's I/O thread failed: {errors.reason_of(e)}"
            self._work.set()
            self._flushed.set()

    def _serve_io(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll(RETRY_SECONDS * 1000 if self._waiting else IDLE_POLL_MS))
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self.sock in events:
                self._take_in()
            self._send_out()
            if self._closing and not self._outq:
                self._flushed.set()
                return

    def _take_in(self) -> None:
        got = False
        while True:
            try:
                identity, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            m = protocol.decode_to_core(data)
            if isinstance(m, protocol.Work) and m.add and identity in self.frontends and not self.draining:
                self._start_early(identity, m.add)
            self._inbox.append((identity, m))
            got = True
        if got:
            self._work.set()

    def _start_early(self, identity: bytes, adds: list[protocol.Admit]) -> None:
        """First characters of streams whose prime was read before, now (see the module docstring)."""
        core = self.core
        early = core.first_characters(adds)
        if early is not None:
            rows, ids = early
            self._deliver(identity, protocol.Out(steps=[protocol.Step(rows, ids)]), final=False)

    def _send_out(self) -> None:
        now = time.monotonic()
        while self._outq:
            ident, message, final = self._outq.popleft()
            if ident in self._waiting:
                self._waiting[ident].merge(message)
                if now < self._retry_at and not final:
                    continue
                message = self._waiting.pop(ident)
            if not self._deliver(ident, message, final):
                self._retry_at = now + RETRY_SECONDS
        if self._waiting and now >= self._retry_at:
            for ident in list(self._waiting):
                if not self._deliver(ident, self._waiting.pop(ident), False):
                    self._retry_at = now + RETRY_SECONDS

    def _deliver(self, ident: bytes, message: protocol.Out, final: bool) -> bool:
        """Sends one message; False when the front-end lags (it waits, and later ones merge into it).

        ``final``: the last message before the core exits, given FINAL_SEND_MS to go out; a
        front-end that does not take it by then is not waited for."""
        if final:
            self.sock.setsockopt(zmq.SNDTIMEO, FINAL_SEND_MS)
        try:
            self.sock.send_multipart([ident, protocol.encode(message)], 0 if final else zmq.NOBLOCK)
        except zmq.Again:
            if not final:
                self._waiting[ident] = message
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:  # a front-end that is gone has nobody to read
                raise
        return True


def main(argv: list[str] | None = None) -> int:
    from charrnn.service import logs
    from charrnn.service.runtime import load_model, trial_step

    p = argparse.ArgumentParser(prog="python -m charrnn.service.corerun", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-active", type=int, default=MAX_ACTIVE)
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE)
    p.add_argument("--max-queue-wait", type=float, default=30.0)
    p.add_argument("--batching", choices=("on", "off"), default="on")
    p.add_argument("--prime-cache", type=int, default=1024)
    p.add_argument("--log-format", default="text")
    p.add_argument("--log-level", default="info")
    p.add_argument("--sampler-graphs", default="", help="folder of the sampler graphs (sampler.write_graphs)")
    p.add_argument("--decode-steps", type=int, default=DECODE_STEPS)
    p.add_argument("--overlap", choices=("on", "off"), default="on" if OVERLAP else "off")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on" if CUDA_GRAPHS else "off")
    p.add_argument("--decode-graphs", default="", help="prefix of the K-step graphs (decode_graph.write_graphs)")
    a = p.parse_args(argv)
    logs.configure(a.log_format, a.log_level)
    if a.sampler_graphs:
        from charrnn.service import sampler

        sampler.read_graphs(a.sampler_graphs)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full pipe is an error we handle, not a silent drop
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(a.address)
    primary = _await_primary(sock)
    try:
        model = load_model(a.path, a.name, a.version, a.device, a.threads, trial=False)
        model.sampler  # created now: the first request does not pay for it
        # Loading may take minutes on a GPU; the trial step is a step, watched like any other.
        sock.send_multipart([primary, protocol.encode(protocol.Loaded())])
        trial_step(model)
    except Exception as e:  # noqa: BLE001 - ModelFormatError, OSError, onnxruntime's own
        sock.send_multipart([primary, protocol.encode(protocol.Refused(reason=str(e)))])
        sock.close()
        return EXIT_REFUSED
    graphs = None
    if a.decode_graphs:
        from charrnn.service import decode_graph

        graphs = decode_graph.read_graphs(a.decode_graphs)
    core = Core(model, max_active=a.max_active, max_queue=a.max_queue, max_queue_wait=a.max_queue_wait,
                batching=a.batching == "on", prime_cache=a.prime_cache, decode_steps=a.decode_steps,
                decode_graphs=graphs, overlap=a.overlap == "on", cuda_graphs=a.cuda_graphs == "on")
    try:
        core.prepare()  # CUDA graphs captured on this thread, the rounds' (watched as the trial step is)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own, past what BucketDecode falls back from
        sock.send_multipart([primary, protocol.encode(protocol.Refused(reason=str(e)))])
        sock.close()
        return EXIT_REFUSED
    loop = CoreLoop(core, sock)
    loop.frontends[primary] = 0
    loop.primary = primary
    sock.send_multipart([primary, protocol.encode(protocol.Up(props=dict(model.session.get_modelmeta()
                                                                         .custom_metadata_map)))])
    status = loop.run()
    sock.close()
    ctx.term()
    return status


def _await_primary(sock: zmq.Socket) -> bytes:
    """The identity of the supervisor, from its hello (it connects before anything else)."""
    while True:
        identity, data = sock.recv_multipart()
        m = protocol.decode_to_core(data)
        if isinstance(m, protocol.Hello) and m.primary:
            return identity


if __name__ == "__main__":
    from charrnn.service.logs import exit_now

    exit_now(main())  # everything is closed: no interpreter finalization
