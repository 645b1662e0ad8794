"""The engine core's loop (its socket, its rounds, what it sends), and its process: ``python -m charrnn.service.corerun``.

The core binds one ZeroMQ ROUTER socket. Every front-end connects a DEALER
(identity ``fe-<n>``); the primary one (the server's own process) also
supervises. A round: read every message waiting (admissions, cancels, control),
one round of the core (core.py), then one message per front-end with its rows'
new ids, ends and the core's load; the primary's also carries the metric deltas
and serves as the heartbeat the watchdog listens for. Sends never block: when a
front-end lags and its pipe is full, its messages merge and wait, and the step
goes on (``a lagging front-end never slows the step``).

An exception in a round is an engine failure: every stream ends with
UNAVAILABLE, the primary is told why, and the process exits with status 3 for
its supervisor to restart it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import zmq

from charrnn.service import errors, wire
from charrnn.service.core import EngineCore

log = logging.getLogger("charrnn.service.core")

HEARTBEAT_SECONDS = 0.2  # the longest silence towards the primary front-end while the core is alive
FINAL_SEND_MS = 1000  # how long the core's last message may wait for a front-end to take it
RETRY_SECONDS = 0.01
# A front-end hears the core at most every MESSAGE_SECONDS while it works (the steps between are one
# message, in order): on a GPU a step takes a fraction of a millisecond, and a message per step would
# cost the core more than the step. A step longer than this (a real model on a CPU) is a message each.
MESSAGE_SECONDS = 0.002  # how often a message that a lagging front-end could not take is offered again
IDLE_POLL_MS = 100  # how long an idle core sleeps in poll
QUEUE_POLL_MS = 10  # ... while streams wait in the queue (their deadlines and queue waits are checked)
EXIT_FAILED = 3  # the status of a core process whose engine failed
EXIT_REFUSED = 2  # ... whose model file could not be served


def _merge(into: dict, new: dict) -> None:
    """Adds a later message to one front-end to the one still waiting for it: lists extended in order, the
    newest load, metric deltas added. In place: a front-end that lags for long costs no copying per round."""
    for key in ("steps", "ends"):
        into.setdefault(key, []).extend(new.get(key, ()))
    for key in ("load", "busy", "failed"):
        if key in new:
            into[key] = new[key]
    if "stats" in new:
        stats = into.setdefault("stats", {"h": {}, "cache": [0, 0]})
        for name, (counts, total) in new["stats"]["h"].items():
            mine = stats["h"].get(name)
            stats["h"][name] = [counts + mine[0], total + mine[1]] if mine else [counts, total]
        stats["cache"] = [a + b for a, b in zip(stats["cache"], new["stats"]["cache"])]


class CoreLoop:
    def __init__(self, core: EngineCore, sock: zmq.Socket):
        self.core = core
        self.sock = sock
        self.frontends: dict[bytes, int] = {}  # identity -> front-end number
        self.primary: bytes | None = None
        self.draining = False
        self.stopping = False
        self._waiting: dict[bytes, dict] = {}  # messages a lagging front-end could not take yet
        self._retry_at = 0.0
        self._last_send = 0.0
        self.message_seconds = MESSAGE_SECONDS
        self._last_beat = 0.0
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._parent = os.getppid()
        self.failure = ""  # why the engine failed, once it has

    def run(self) -> int:
        """Rounds until drained or stopped (returns 0) or failed (returns EXIT_FAILED)."""
        core = self.core
        try:
            while True:
                if core.busy:
                    timeout = 0 if core.scheduler.busy else QUEUE_POLL_MS
                else:
                    timeout = IDLE_POLL_MS
                self._receive(timeout)
                now = time.monotonic()
                if self.stopping:
                    core.end_all("UNAVAILABLE", "draining",
                                 f"server shutting down: model {core.label} stopped", now)
                    self._send(final=True)
                    return 0
                core.round(now)
                if not core.busy or time.monotonic() - self._last_send >= self.message_seconds:
                    self._send()
                if self.draining and not core.busy:
                    return 0
                if os.getppid() != self._parent:  # the server is gone: nobody is left to serve
                    return 0
        except Exception as e:  # noqa: BLE001 - any exception in a round is an engine failure
            log.exception("engine %s failed; ending its streams", core.label)
            self.failure = errors.reason_of(e)
            failure = errors.engine_failed(core.label, e)
            try:
                core.end_all("UNAVAILABLE", "engine", failure.message, time.monotonic())
            except Exception:  # noqa: BLE001 - the streams are told by the front-ends then
                log.exception("engine %s: its streams could not be ended from the core", core.label)
            self._send(final=True, extra={"failed": errors.reason_of(e)})
            return EXIT_FAILED

    def _receive(self, timeout_ms: int) -> None:
        events = dict(self._poller.poll(timeout_ms))
        if self.sock not in events:
            return
        now = time.monotonic()
        while True:
            try:
                identity, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(identity, wire.unpack(data), now)

    def _handle(self, identity: bytes, m: dict, now: float) -> None:
        kind = m["t"]
        if kind == "hello":
            self.frontends[identity] = m["fe"]
            if m.get("primary"):
                self.primary = identity
            return
        fe = self.frontends.get(identity)
        if kind == "work" and fe is not None:
            if m.get("add"):
                if self.draining:
                    for a in m["add"]:
                        self.core.outbox.end(fe, [a["row"], "UNAVAILABLE", "draining",
                                                  f"server shutting down: model {self.core.label} takes no new "
                                                  "streams", -1, 0, now, now, now])
                else:
                    self.core.add(fe, m["add"], now)
            if m.get("cancel"):
                self.core.cancel(fe, m["cancel"], now)
        elif kind == "drain":
            self.draining = True
        elif kind == "stop":
            self.stopping = True
        elif kind == "gone":
            self.core.drop_frontend(m["fe"], now)

    def _send(self, final: bool = False, extra: dict | None = None) -> None:
        now = self._last_send = time.monotonic()
        out = self.core.outbox.take()
        load = self.core.load
        by_identity = {ident: out.pop(fe, None) for ident, fe in self.frontends.items()}
        beat = self.primary is not None and (now - self._last_beat >= HEARTBEAT_SECONDS or final)
        for ident, box in by_identity.items():
            primary = ident == self.primary
            if box is None and ident not in self._waiting and not (primary and (beat or extra)):
                continue
            message = {"t": "out", "load": load, "busy": self.core.busy, **(box or {})}
            if primary:
                message["stats"] = self.core.stats.take()
                message.update(extra or {})
                self._last_beat = now
            if ident in self._waiting:
                _merge(self._waiting[ident], message)
                if now < self._retry_at and not final:
                    continue
                message = self._waiting.pop(ident)
            if not self._deliver(ident, message, block=final):
                self._retry_at = now + RETRY_SECONDS

    def _deliver(self, ident: bytes, message: dict, block: bool) -> bool:
        """Sends one message; False when the front-end lags (it waits, and later ones merge into it).

        ``block``: the last message before the core exits, given FINAL_SEND_MS to go out; a
        front-end that does not take it by then is not waited for."""
        if block:
            self.sock.setsockopt(zmq.SNDTIMEO, FINAL_SEND_MS)
        try:
            self.sock.send_multipart([ident, wire.pack(message)], 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            if not block:
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
    p.add_argument("--max-active", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--max-queue-wait", type=float, default=30.0)
    p.add_argument("--batching", choices=("on", "off"), default="on")
    p.add_argument("--prime-cache", type=int, default=1024)
    p.add_argument("--log-format", default="text")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logs.configure(a.log_format, a.log_level)
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
        sock.send_multipart([primary, wire.pack({"t": "loaded"})])
        trial_step(model)
    except Exception as e:  # noqa: BLE001 - ModelFormatError, OSError, onnxruntime's own
        sock.send_multipart([primary, wire.pack({"t": "refused", "reason": str(e)})])
        sock.close()
        return EXIT_REFUSED
    core = EngineCore(model, max_active=a.max_active, max_queue=a.max_queue, max_queue_wait=a.max_queue_wait,
                      batching=a.batching == "on", prime_cache=a.prime_cache)
    loop = CoreLoop(core, sock)
    loop.frontends[primary] = 0
    loop.primary = primary
    sock.send_multipart([primary, wire.pack({"t": "up", "props": dict(model.session.get_modelmeta()
                                                                           .custom_metadata_map)})])
    status = loop.run()
    sock.close()
    ctx.term()
    return status


def _await_primary(sock: zmq.Socket) -> bytes:
    """The identity of the supervisor, from its hello (it connects before anything else)."""
    while True:
        identity, data = sock.recv_multipart()
        if wire.unpack(data).get("primary"):
            return identity


if __name__ == "__main__":
    sys.exit(main())
