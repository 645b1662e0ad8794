"""`charrnn-serve`: the gRPC server, its health and reflection services, /metrics, reload and drain.

Life of a server: load every model of the repository (refuse to start when none
is usable), bind the gRPC and metrics ports, report SERVING, then serve until
SIGTERM or SIGINT. SIGHUP (and --reload-interval) rescans the repository.
SIGTERM drains: health turns NOT_SERVING at once, new streams are refused with
UNAVAILABLE, streams in flight get --drain-grace seconds to finish and are then
ended with UNAVAILABLE; only then does the gRPC server stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

# gRPC's C core writes its own lines to stderr (a refused TLS handshake logs at info) and reads
# this once, at import: keep it to errors so that, with --log-format json, the log stays one JSON
# object per line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402 (after the setting above)
from grpc_health.v1 import health
from prometheus_client import start_http_server

from charrnn.service import cores, logs, sampler, tls, tracing
from charrnn.service.config import ServeConfig, frontend_count, limits_of, parse_args
from charrnn.service.frontend import FrontendHub, HealthState, grpc_server, hostport, table_rows
from charrnn.service.metrics import Metrics
from charrnn.service.repository import ModelRepository, RepositoryError
from charrnn.service.runtime import select_device
from charrnn.service.servicer import GeneratorServicer
from charrnn.service.engine import RestartPolicy

STOP_FLUSH_SECONDS = 1.0  # after the drain, time for handlers to send their last message before sockets close


class StartupError(Exception):
    """The server cannot start; the message says why and what to change."""


class Server:
    """One running charrnn-serve process."""

    def __init__(self, config: ServeConfig, log: logging.Logger):
        self.config = config
        self.log = log
        self.metrics = Metrics()
        self.repository: ModelRepository | None = None
        self.servicer: GeneratorServicer | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0  # bound gRPC port
        self.metrics_port = 0  # bound metrics port
        self.http_port = -1  # bound HTTP port (-1: no HTTP)
        self.http = None  # http_api.HttpServer with --http-port
        self._metrics_httpd = None
        self._reload_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._health_state = HealthState(self.health)
        self.hub: FrontendHub | None = None  # the other front-end processes (--frontends)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The engine cores' sockets (ipc://) live here; removed when the server stops.
        self._workdir = tempfile.mkdtemp(prefix="charrnn-")
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.config
        self._loop = asyncio.get_running_loop()
        try:  # unreadable certificate files fail before minutes of model loading, not after
            creds = tls.server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca) if c.tls else None
        except ValueError as e:
            raise StartupError(str(e)) from None
        try:
            device = select_device(c.device)
        except RuntimeError as e:  # --device cuda where CUDA is not usable; the message says why
            raise StartupError(str(e)) from None
        # The sampler graphs, built once here for every engine core process (sampler.write_graphs).
        await asyncio.to_thread(sampler.write_graphs, self._workdir)
        self.repository = ModelRepository(
            c.models,
            device=device,
            # One engine core process per model version (corerun.py), each loading its own file.
            engine_factory=cores.factory(
                "process", device=device, threads=c.threads, metrics=self.metrics, workdir=self._workdir,
                max_active=c.max_active_streams, max_queue=c.max_queue, max_queue_wait=c.max_queue_wait,
                batching=c.batching, flush_interval=c.flush_interval, decode_steps=c.decode_steps,
                overlap=c.overlap, cuda_graphs=c.cuda_graphs, step_timeout=c.step_timeout,
                log_format=c.log_format, log_level=c.log_level,
            ),
            metrics=self.metrics,
            log=logging.getLogger("charrnn.service.repository"),
            default_model=c.default_model or None,
            policy=RestartPolicy(backoff=c.engine_restart_backoff, max_backoff=c.engine_max_backoff,
                                 max_failures=c.engine_max_failures, window=c.engine_failure_window,
                                 step_timeout=c.step_timeout),
            on_change=self._engine_changed,
        )
        try:
            await asyncio.to_thread(self.repository.load)
        except RepositoryError as e:  # its message lists each bad path and why
            raise StartupError(str(e)) from None

        self.servicer = GeneratorServicer(
            self.repository, self.metrics, limits_of(c),
            logging.getLogger("charrnn.service.servicer"), tracing=tracing.from_env(),
        )
        count = frontend_count(c)
        try:
            server, self.port = grpc_server(c, self.servicer, self.health, creds, reuseport=count > 1)
        except OSError as e:
            raise StartupError(str(e)) from None
        try:
            self._metrics_httpd, _ = start_http_server(c.metrics_port, addr=c.host, registry=self.metrics.registry)
        except OSError as e:
            where = hostport(c.host, c.metrics_port)
            raise StartupError(f"cannot serve metrics on {where} (--host/--metrics-port): {e}") from None
        self.metrics_port = self._metrics_httpd.server_port
        await server.start()
        self.grpc_server = server
        if c.http_port >= 0:
            from charrnn.service import http_api  # FastAPI and uvicorn: imported only when HTTP is on

            try:
                self.http = await http_api.start(c, self.servicer, self.repository, reuseport=count > 1)
            except OSError as e:
                raise StartupError(str(e)) from None
            self.http_port = self.http.port
        if count > 1:
            # The others bind the ports now taken (SO_REUSEPORT): a --port 0 server shares the one it got.
            shared = ServeConfig(**{**dataclasses.asdict(c), "port": self.port, "http_port": self.http_port})
            self.hub = FrontendHub(shared, self.metrics, self._workdir, count, self.repository.frontend_gone)
            self.hub.start()
        await self._set_health()
        if c.reload_interval > 0:
            self._poller = asyncio.create_task(self._poll(c.reload_interval))
        self._watchdog = asyncio.create_task(self._watch(min(1.0, c.step_timeout / 4)))
        self.log.info(
            "serving",
            extra={"grpc_port": self.port, "metrics_port": self.metrics_port, "http_port": self.http_port,
                   "device": device, "tls": c.tls,
                   "mutual_tls": bool(c.tls_client_ca), "frontends": count,
                   "models": ",".join(sorted(self._health_state.names))},
        )

    async def _set_health(self) -> None:
        """Health follows the engines (frontend.HealthState); the other front-ends hear the same table."""
        entries = self.repository.entries()
        await self._health_state.update(entries, self.repository.hung)
        if self.hub is not None:
            self.hub.publish(table_rows(entries), self.repository.default_model, self.repository.hung)

    def _engine_changed(self) -> None:
        """An engine changed state (any thread): health follows on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._set_health()))
        except RuntimeError:  # the loop closed in between
            pass

    async def _watch(self, interval: float) -> None:
        """The watchdog: looks for engines that hold work and make no progress (SupervisedEngine.check)."""
        while True:
            await asyncio.sleep(interval)
            self.repository.check_engines(time.monotonic())

    async def reload(self, why: str) -> None:
        """Rescans the repository (new versions serve new streams; streams in flight finish where they are)."""
        async with self._reload_lock:
            if self.servicer is not None and self.servicer.draining:
                return  # a SIGHUP during the drain: the repository is closing
            started = time.monotonic()
            try:
                summary = await asyncio.to_thread(self.repository.reload)
            except Exception:
                self.log.exception("reload failed; the models loaded before keep serving", extra={"trigger": why})
                return
            await self._set_health()
            self.log.info(
                "reloaded",
                extra={"trigger": why, "changes": str(summary), "seconds": round(time.monotonic() - started, 3)},
            )

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.reload("poll")

    async def drain_and_stop(self) -> None:
        """SIGTERM: refuse new work at once, give streams in flight --drain-grace seconds, then stop."""
        started = time.monotonic()
        grace = self.config.drain_grace
        if self.servicer is not None:
            self.servicer.draining = True
        self.metrics.draining.set(1)
        await self.health.enter_graceful_shutdown()
        if self.hub is not None:
            self.hub.publish(table_rows(self.repository.entries()), self.repository.default_model, False,
                             draining=True)
        for task in (self._poller, self._watchdog):
            if task is not None:
                task.cancel()
        self.log.info("draining", extra={"drain_grace": grace})
        if self.repository is not None:
            # Engines refuse new streams, finish those in flight, and end what is left after `grace`
            # with UNAVAILABLE; blocking, so it runs off the event loop while the handlers keep streaming.
            await asyncio.to_thread(self.repository.close, grace)
        drained = time.monotonic() - started
        if self.hub is not None:
            self.hub.publish([], None, False, draining=True, stop=True)
            await asyncio.to_thread(self.hub.close, STOP_FLUSH_SECONDS + 5)
        if self.http is not None:
            await self.http.stop()
        if self.grpc_server is not None:
            # The shape of grpc's graceful-shutdown example: stop(grace) lets the last messages go out.
            await self.grpc_server.stop(STOP_FLUSH_SECONDS)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        if self.servicer is not None and self.servicer.tracing is not None:
            await asyncio.to_thread(self.servicer.tracing.close)  # the last spans leave
        shutil.rmtree(self._workdir, ignore_errors=True)
        total = time.monotonic() - started
        self.log.info("stopped", extra={"drain_seconds": round(drained, 3), "total_seconds": round(total, 3)})

    async def close_unstarted(self) -> None:
        """Releases what a failed start had already opened (engines, ports); nothing was served yet."""
        if self.repository is not None:
            await asyncio.to_thread(self.repository.close, 0)
        if self.http is not None:
            await self.http.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(None)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def banner(self) -> str:
        c = self.config
        shown = "localhost" if c.host in ("0.0.0.0", "::", "") else c.host
        target = hostport(shown, self.port)
        tls_args = " --tls-ca CA.pem" if c.tls else ""
        if c.tls_client_ca:
            tls_args += " --tls-cert CLIENT.pem --tls-key CLIENT.key"
        models = ", ".join(sorted(f"{e.name}@{e.version}" for e in self.repository.entries() if e.latest))
        http = ""
        if self.http_port >= 0:
            http = (f"  HTTP     {self.http.scheme}://{hostport(shown, self.http_port)}/  "
                    "(playground; OpenAI API at /v1)\n")
        return (
            f"charrnn-serve: serving {models}\n"
            f"  gRPC     {target}{' (TLS)' if c.tls else ''}\n"
            f"{http}"
            f"  metrics  http://{hostport(shown, self.metrics_port)}/metrics\n"
            f"  try      {generate_command()} --server {target}{tls_args}"
            ' --prime "ROMEO:" --max-chars 300 --temperature 0.8\n'
        )


def generate_command() -> str:
    """How to run this install's `charrnn-generate` from the shell that started the server: its bare name when
    PATH finds it, else its path, relative to the working directory when under it (`.venv/bin/...` after
    `make run`)."""
    beside = Path(sys.executable).parent / "charrnn-generate"  # the interpreter's own bin/, symlinks kept
    found = shutil.which("charrnn-generate")
    if found and Path(found).resolve() == beside.resolve():
        return "charrnn-generate"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


async def serve(config: ServeConfig, log: logging.Logger) -> None:
    server = Server(config, log)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload("SIGHUP")))
    try:
        await server.start()
    except BaseException:
        await server.close_unstarted()
        raise
    sys.stdout.write(server.banner())
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.drain_and_stop()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logs.configure(config.log_format, config.log_level)
    log = logging.getLogger("charrnn.service.server")
    try:
        asyncio.run(serve(config, log))
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0


def cli() -> None:
    """The `charrnn-serve` command: ``main``, then the process ends at once (logs.exit_now)."""
    logs.exit_now(main())


if __name__ == "__main__":
    cli()
