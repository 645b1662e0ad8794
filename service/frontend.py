"""gRPC front-ends: what every one of them serves, and the extra front-end processes that share its port.

The server's own process is front-end 0 and supervises the engine cores. With
``--frontends N`` it starts N - 1 more processes (``python -m
charrnn.service.frontend``), each a grpc.aio server on the same port
(SO_REUSEPORT: the kernel spreads connections, not calls, over them), with its
own engine clients of every core. They learn the model table (names, versions,
metadata, core addresses, states) from the server over ZeroMQ (``FrontendHub``
here, ``TableView`` there) and send it their metric changes twice a second,
which the server adds to its one registry. A front-end that dies is restarted,
and the cores free its slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import zmq
import zmq.asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from charrnn import modelfile as mf
from charrnn.service import errors, protocol, tracing
from charrnn.service.config import ServeConfig, limits_of
from charrnn.service.coreclient import CoreClient
from charrnn.service.cores import ServedModel
from charrnn.service.metrics import Metrics, apply_frontend_delta, frontend_delta, frontend_snapshot
from charrnn.service.repository import Loaded, ModelEntry, ModelTable
from charrnn.service.servicer import GeneratorServicer, add_generator_to_server
from charrnn.service.engine import Engine, EngineState
from charrnn.v1 import generator_pb2

log = logging.getLogger("charrnn.service.frontend")
EXIT_CLIENT_BROKEN = 70  # a front-end whose engine client failed exits with this status, to be restarted

GENERATOR_SERVICE = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name  # "charrnn.v1.Generator"
LIVENESS_SERVICE = "liveness"  # health service the liveness probe asks: NOT_SERVING once an engine thread hung
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
METRICS_SECONDS = 0.5  # how often another front-end sends its metric changes
RESTART_SECONDS = 1.0  # wait before a dead front-end process is started again


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_server(config: ServeConfig, servicer: GeneratorServicer, health_servicer, creds, reuseport: bool):
    """The gRPC server of one front-end: the Generator, health, reflection; (server, bound port)."""
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # One front-end: a port already in use is an error, not a second silent listener.
        ("grpc.so_reuseport", 1 if reuseport else 0),
    ]
    server = grpc.aio.server(options=options)
    add_generator_to_server(servicer, server)  # undecodable requests get INVALID_ARGUMENT, not UNKNOWN
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((GENERATOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = hostport(config.host, config.port)
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address} (--host/--port): {e}") from None
    return server, port


class HealthState:
    """Sets grpc.health.v1 from a table: each model SERVING while its newest version serves, the server while any
    model does, ``liveness`` unless an engine thread hung."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self.servicer = servicer
        self._names: set[str] = set()

    async def update(self, entries: list[ModelEntry], hung: bool) -> None:
        latest = {e.name: e for e in entries if e.latest}
        serving = {name for name, e in latest.items() if e.state is EngineState.SERVING}
        for name in sorted(latest):
            await self.servicer.set(name, SERVING if name in serving else NOT_SERVING)
        for gone in sorted(self._names - set(latest)):
            await self.servicer.set(gone, NOT_SERVING)
        status = SERVING if serving else NOT_SERVING
        await self.servicer.set("", status)
        await self.servicer.set(GENERATOR_SERVICE, status)
        await self.servicer.set(LIVENESS_SERVICE, NOT_SERVING if hung else SERVING)
        self._names = set(latest)

    @property
    def names(self) -> set[str]:
        return self._names


def table_rows(entries: list[ModelEntry]) -> list[protocol.TableRow]:
    """What another front-end needs of each served version (the repository's side)."""
    return [protocol.TableRow(name=e.name, version=e.version, props=e.model.metadata.to_props(),
                              device=e.model.device, path=str(e.model.path), address=e.engine.core.address,
                              state=e.state.value, message=e.engine.down_message, max_active=e.engine.max_active,
                              max_queue=e.engine.core.max_queue) for e in entries]


class FrontendHub:
    """The server's side: starts the other front-ends, tells them the table, adds their metrics."""

    def __init__(self, config: ServeConfig, metrics: Metrics, workdir: str, count: int, on_gone):
        self.config, self.metrics, self.count = config, metrics, count
        self._on_gone = on_gone  # on_gone(front-end number): the cores free its slots
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{workdir}/frontends.sock"
        self._sock.bind(self.address)
        self._lock = threading.Lock()  # the socket is used by the hub's thread and by publish()
        self._peers: dict[bytes, int] = {}
        self._table = protocol.Table()
        self._procs: dict[int, subprocess.Popen] = {}
        self._closing = False

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)
        self._thread = threading.Thread(target=self._run, name="frontend-hub", daemon=True)
        self._thread.start()

    def _spawn(self, index: int) -> None:
        argv = [sys.executable, "-m", "charrnn.service.frontend", "--index", str(index), "--control", self.address,
                "--config", json.dumps(asdict(self.config))]
        self._procs[index] = proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._watch, args=(index, proc), name=f"frontend-{index}", daemon=True).start()

    def _watch(self, index: int, proc: subprocess.Popen) -> None:
        status = proc.wait()
        if self._closing:
            return
        log.error("front-end %d exited with status %s; its streams' slots are freed, it restarts", index, status)
        self._on_gone(index)
        time.sleep(RESTART_SECONDS)
        if not self._closing:
            self._spawn(index)

    def _run(self) -> None:
        while not self._closing:
            if not self._sock.poll(200):
                continue
            with self._lock:
                identity, data = self._sock.recv_multipart()
            m = protocol.decode_to_hub(data)
            if isinstance(m, protocol.FrontendHello):
                self._peers[identity] = m.fe
                self._send(identity, self._table)
            elif isinstance(m, protocol.FrontendMetrics):
                apply_frontend_delta(self.metrics, m.delta)

    def publish(self, rows: list[protocol.TableRow], default: str | None, hung: bool, draining: bool = False,
                stop: bool = False) -> None:
        """Tells every front-end the current table (and that the server drains, or stops)."""
        self._table = protocol.Table(rows=rows, hung=hung, default=default)
        told = protocol.Table(rows=rows, hung=hung, default=default, draining=draining, stop=stop)
        for identity in list(self._peers):
            self._send(identity, told)

    def _send(self, identity: bytes, message: protocol.Table) -> None:
        with self._lock:
            try:
                self._sock.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
            except zmq.ZMQError:  # gone, or not reading: the next table reaches it
                pass

    def close(self, timeout: float) -> None:
        self._closing = True
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(1.0)
        self._sock.close()


class RemoteEngine(Engine):
    """The engine of a model version as another front-end sees it: a client of its core, and the state the server
    last published."""

    def __init__(self, client: CoreClient, row: protocol.TableRow, model: ServedModel):
        self.client, self.row, self.model = client, row, model
        self.max_active = row.max_active

    @property
    def state(self) -> EngineState:
        return EngineState(self.row.state)

    @property
    def down_message(self) -> str:
        return "" if self.state is EngineState.SERVING else self.row.message

    def _submit_all(self, request):
        return self.client.submit_all(request)


class TableView(ModelTable):
    """Another front-end's model table: what the server published, with an engine client of each core."""

    def __init__(self, index: int, flush_interval: float):
        self.index, self.flush_interval = index, flush_interval
        self._ctx = zmq.Context.instance()
        self._clients: dict[str, CoreClient] = {}  # core address -> client
        self._table = {}
        self.hung = False

    def update(self, message: protocol.Table) -> None:
        table, seen = {}, set()
        for row in message.rows:
            meta = mf.ModelMetadata.from_props(row.props)
            client = self._clients.get(row.address)
            if client is None:
                client = self._clients[row.address] = CoreClient(
                    f"{row.name}@{row.version}", row.name, meta, ctx=self._ctx, address=row.address,
                    fe=self.index, primary=False, max_active=row.max_active, max_queue=row.max_queue,
                    flush_interval=self.flush_interval)
                client.on_broken = self._client_broken
                client.start()
            seen.add(row.address)
            model = ServedModel(row.name, row.version, Path(row.path), meta, row.device)
            table[(row.name, row.version)] = Loaded(model, RemoteEngine(client, row, model))
        for address in [a for a in self._clients if a not in seen]:
            client = self._clients.pop(address)  # a removed or restarted core: its streams ended there
            client.fail_all(errors.Unavailable(
                f"the engine of model {client.label} stopped (its core process ended); it restarts by itself, retry",
                "engine"))
            client.close()
        self._explicit_default = message.default
        self.hung = message.hung
        self._table = table

    def _client_broken(self, reason: str) -> None:
        """A client's I/O thread failed (its streams have ended UNAVAILABLE): this front-end exits a moment
        later, once those statuses are sent; the server restarts it and the cores free its slots."""
        log.error("front-end %d: the engine client failed (%s); exiting to be restarted", self.index, reason)
        threading.Timer(1.0, os._exit, (EXIT_CLIENT_BROKEN,)).start()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


async def serve_frontend(config: ServeConfig, index: int, control: str) -> None:
    """One extra front-end process: the same gRPC service on the same port, fed by the server's table."""
    from charrnn.service import tls

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control)
    await sock.send(protocol.encode(protocol.FrontendHello(fe=index)))
    view, metrics = TableView(index, config.flush_interval), Metrics()
    view.update(protocol.decode_table(await asyncio.wait_for(sock.recv(), 60)))
    servicer = GeneratorServicer(view, metrics, limits_of(config),
                                 logging.getLogger("charrnn.service.servicer"), frontend=index,
                                 tracing=tracing.from_env())
    health_servicer = health.aio.HealthServicer()
    state = HealthState(health_servicer)
    creds = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls else None
    server, _ = grpc_server(config, servicer, health_servicer, creds, reuseport=True)
    await server.start()
    http = None
    if config.http_port >= 0:  # the server bound it first: this is the port it got
        from charrnn.service import http_api

        http = await http_api.start(config, servicer, view, reuseport=True)
    await state.update(view.entries(), view.hung)
    log.info("front-end %d serving", index, extra={"frontend": index})
    parent, last = os.getppid(), frontend_snapshot(metrics)
    try:
        while True:
            if await sock.poll(int(METRICS_SECONDS * 1000)):
                m = protocol.decode_table(await sock.recv())
                if m.draining and not servicer.draining:
                    servicer.draining = True
                    await health_servicer.enter_graceful_shutdown()
                view.update(m)
                if not servicer.draining:
                    await state.update(view.entries(), view.hung)
                if m.stop:
                    break
            now = frontend_snapshot(metrics)
            delta = frontend_delta(last, now)
            if delta:
                await sock.send(protocol.encode(protocol.FrontendMetrics(delta=delta)))
            last = now
            if os.getppid() != parent:  # the server is gone
                break
    finally:
        if http is not None:
            await http.stop()
        await server.stop(1.0)
        if servicer.tracing is not None:
            await asyncio.to_thread(servicer.tracing.close)
        view.close()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from charrnn.service import logs

    p = argparse.ArgumentParser(prog="python -m charrnn.service.frontend", description=__doc__.splitlines()[0])
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--config", required=True, help="the server's settings as JSON")
    a = p.parse_args(argv)
    config = ServeConfig(**json.loads(a.config))
    logs.configure(config.log_format, config.log_level)
    asyncio.run(serve_frontend(config, a.index, a.control))
    return 0


if __name__ == "__main__":
    from charrnn.service.logs import exit_now

    exit_now(main())  # everything is closed: no interpreter finalization
