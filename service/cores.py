"""Where a core runs: in a process of its own (the server), or on a thread of this process.

``CoreHandle`` is the one interface to a running core (vLLM's EngineCoreClient,
TGI's Backend): ``start(on_failure)``, ``submit_all``, ``drain``, ``stop``,
``idle``, ``running``, ``stalled``, ``stop_hung``, ``model`` (name, version,
label, metadata, device) and ``max_active``. The engine of a model version
(engine.SupervisedEngine) holds one and replaces it when it fails. Both
implementations talk to the core through a ``CoreClient`` (coreclient.py) over
ZeroMQ (ipc:// between processes, inproc:// within one), so the same messages
cross either way. ``factory`` is the one place that chooses between them.

- ``ProcessCore``: ``python -m charrnn.service.corerun`` loads and checks the
  model file itself and reports its metadata (``up``) or why it refuses it. A
  core that exits, or goes silent past ``--step-timeout``, is killed and counts
  as an engine failure; its streams end with UNAVAILABLE at once.
- ``ThreadCore``: a ``Core`` on a thread, for tests, tools and benchmarks
  that drive an engine without a server (like vLLM's in-process client). A
  thread cannot be killed: a hung one is abandoned.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq

from charrnn import modelfile as mf
from charrnn.service import decode_graph, errors, protocol
from charrnn.service.core import CUDA_GRAPHS, DECODE_STEPS, MAX_ACTIVE, MAX_QUEUE, OVERLAP, Core
from charrnn.service.corerun import EXIT_FAILED, CoreLoop
from charrnn.service.coreclient import CoreClient
from charrnn.service.metrics import Metrics
from charrnn.service.requests import GenerationRequest
from charrnn.service.runtime import K_STEP_DEVICES, LoadedModel
from charrnn.service.streams import Stream

log = logging.getLogger("charrnn.service.cores")

START_SECONDS = 300.0  # the longest a core process may take to load its model (the trial step: step_timeout)
_SERIAL = itertools.count()
_KEPT: list = []  # contexts of abandoned engine threads: never garbage-collected (zmq would wait on them)


@dataclass(frozen=True)
class ServedModel:
    """What the front-ends know of a model version: its place, its metadata, its device."""

    name: str
    version: int
    path: Path
    metadata: mf.ModelMetadata
    device: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class CoreHandle(abc.ABC):
    """A running core, wherever it runs. What both kinds share is here: the client, drain and refusal, and the
    counts the servicer reads; where they differ is abstract."""

    client: CoreClient
    model: object  # ServedModel (a process) or runtime.LoadedModel (a thread): name, version, metadata, device
    label: str
    max_active: int

    @abc.abstractmethod
    def start(self, on_failure: Callable[[Exception], None] | None = None) -> None:
        """Starts the core and its client; ``on_failure(error)`` is called once if the core fails later."""

    @abc.abstractmethod
    def stop(self, timeout: float) -> None:
        """Ends every remaining stream with UNAVAILABLE and stops the core."""

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """The core is alive (not failed, stopped or abandoned)."""

    @abc.abstractmethod
    def stop_hung(self, error: errors.CharrnnError) -> bool:
        """A core silent past --step-timeout: its streams end with ``error``; True if it was killed (and so
        restarts), False if it could only be abandoned."""

    def submit(self, request: GenerationRequest) -> Stream:
        return self.submit_all(request)[0]

    def submit_all(self, request) -> list[Stream]:
        if self._draining:
            raise errors.draining(self.model.label)
        return self.client.submit_all(request)

    def drain(self) -> None:
        """No new streams; those queued and in flight finish, then the core exits."""
        self._draining = True
        self.client.control(protocol.Drain())

    @property
    def active(self) -> int:
        return self.client.core_load[0]

    @property
    def queued(self) -> int:
        return self.client.core_load[1]

    @property
    def idle(self) -> bool:
        """No stream of this process, nor of any other front-end, in the core (its last report)."""
        return self.client.live == 0 and self.client.core_load == (0, 0)

    def stalled(self, now: float) -> float:
        """Seconds the core has been silent while alive (it speaks at least every 0.2 s when well)."""
        return now - self.client.last_heard if self.running else 0.0


class ThreadCore(CoreHandle):
    def __init__(self, model: LoadedModel, *, metrics: Metrics, max_active: int = MAX_ACTIVE, max_queue: int = MAX_QUEUE,
                 max_queue_wait: float = 30.0, batching: bool = True, flush_interval: float = 0.05,
                 prime_cache: int = 1024, decode_steps: int = DECODE_STEPS, overlap: bool = OVERLAP,
                 cuda_graphs: bool = CUDA_GRAPHS):
        self.model = model
        self.name, self.label = model.name, model.label
        self.max_active = max_active
        self._ctx = zmq.Context()
        self.context = self._ctx  # another front-end of this core connects in it, to ``address``
        self.address = address = f"inproc://core-{os.getpid()}-{next(_SERIAL)}"
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind(address)
        self.core = Core(model, max_active=max_active, max_queue=max_queue, max_queue_wait=max_queue_wait,
                         batching=batching, prime_cache=prime_cache, decode_steps=decode_steps, overlap=overlap,
                         cuda_graphs=cuda_graphs)
        self._loop = CoreLoop(self.core, sock)
        self.client = CoreClient(model.label, model.name, model.metadata, ctx=self._ctx, address=address,
                                 metrics=metrics, max_active=max_active, max_queue=max_queue,
                                 flush_interval=flush_interval)
        self.prime_cache = self.core.prime_cache  # primes read before (prime_cache=0 turns it off)
        self._draining = False
        self._abandoned = False
        self._client_broken = False  # the client's I/O thread failed (on_broken)
        self._thread: threading.Thread | None = None

    def start(self, on_failure: Callable[[Exception], None] | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        # The loop learns the client from its hello before the first round.
        self._thread = threading.Thread(target=self._run, args=(on_failure,), name=f"engine-{self.model.label}",
                                        daemon=True)
        self._thread.start()
        self.client.on_broken = lambda why: self._broken(why, on_failure)
        self.client.start()

    def _broken(self, why: str, on_failure) -> None:
        """The client failed under a running core: the core is left to itself and the engine restarts."""
        self._abandoned = self._client_broken = True
        self._loop.stop()
        if on_failure is not None:
            on_failure(RuntimeError(why))

    def _run(self, on_failure) -> None:
        status = self._loop.run()
        if self._client_broken:  # the loop has returned and the client's thread is gone: nothing uses the sockets
            self.client.close()
            self._loop.sock.close()
            self._ctx.term()
        if self._abandoned:
            return
        if status == EXIT_FAILED:
            self.client.refuse(errors.not_running(self.model.label))
            if self._loop.io_failure:  # the core could not tell its streams: they end here
                self.client.fail_all(errors.engine_failed(self.model.label, RuntimeError(self._loop.io_failure)))
            if on_failure is not None:
                on_failure(RuntimeError(self._loop.failure))

    def stop(self, timeout: float) -> None:
        """Ends every remaining stream with UNAVAILABLE and joins the core's thread."""
        self._draining = True
        self.client.control(protocol.Stop())
        if self._thread is not None:
            self._thread.join(timeout)
        _settle(self.client, timeout)
        self.client.close()
        if self._thread is None or not self._thread.is_alive():
            self._loop.sock.close()
            self._ctx.term()
        else:  # a thread still inside onnxruntime: its sockets stay open (terminating would wait for it)
            _KEPT.append(self._ctx)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._abandoned

    def stop_hung(self, error: errors.CharrnnError) -> bool:
        """A thread cannot be killed: it is abandoned (its streams end with ``error``); returns False."""
        self._abandoned = True
        _KEPT.append(self._ctx)
        self.client.refuse(error)
        self.client.fail_all(error)
        return False


class ProcessCore(CoreHandle):
    def __init__(self, path: Path, name: str, version: int, *, device: str, threads: int, metrics: Metrics,
                 workdir: Path, max_active: int = MAX_ACTIVE, max_queue: int = MAX_QUEUE, max_queue_wait: float = 30.0,
                 batching: bool = True, flush_interval: float = 0.05, prime_cache: int = 1024,
                 decode_steps: int = DECODE_STEPS, overlap: bool = OVERLAP, cuda_graphs: bool = CUDA_GRAPHS,
                 step_timeout: float = 30.0,
                 log_format: str = "text", log_level: str = "info"):
        self.path, self.name, self.version, self.device = Path(path), name, version, device
        self._decode_steps = decode_steps if batching and device in K_STEP_DEVICES else 1
        self._step_timeout = step_timeout
        self.max_active = max_active
        self._metrics, self._flush, self.max_queue = metrics, flush_interval, max_queue
        self.address = f"ipc://{workdir}/core-{next(_SERIAL)}.sock"  # other front-ends connect here too
        self._argv = [sys.executable, "-m", "charrnn.service.corerun", "--address", self.address,
                      "--path", str(path), "--name", name, "--version", str(version), "--device", device,
                      "--threads", str(threads), "--max-active", str(max_active), "--max-queue", str(max_queue),
                      "--max-queue-wait", str(max_queue_wait), "--batching", "on" if batching else "off",
                      "--prime-cache", str(prime_cache), "--log-format", log_format, "--log-level", log_level,
                      "--sampler-graphs", str(workdir),  # sampler.write_graphs wrote them there
                      "--decode-steps", str(self._decode_steps), "--overlap", "on" if overlap else "off",
                      "--cuda-graphs", "on" if cuda_graphs else "off"]
        self._graphs = Path(workdir) / f"decode-{next(_SERIAL)}"  # the K-step graphs' files, built at start
        self._ctx = zmq.Context.instance()
        self._proc: subprocess.Popen | None = None
        self.model: ServedModel | None = None
        self.client: CoreClient | None = None
        self._draining = False
        self._stopping = False
        self.label = f"{name}@{version}"

    def start(self, on_failure: Callable[[Exception], None] | None = None) -> None:
        """Starts the process and waits until it serves or refuses; raises ModelFormatError('<path>: <why>')."""
        argv = self._argv
        if self._decode_steps > 1:
            try:  # built here, where the onnx package is loaded already (sampler.write_graphs)
                decode_graph.write_graphs(self.path, self._decode_steps, self._graphs)
                argv = [*argv, "--decode-graphs", str(self._graphs)]
            except Exception as e:  # noqa: BLE001 - an unreadable file: the core refuses it, with its own reason
                log.debug("K-step graphs of %s not built here (%s); the core builds them", self.path, e)
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        # A provisional client: the metadata comes with the core's first message.
        self.client = CoreClient(self.label, self.name, _PLACEHOLDER, ctx=self._ctx, address=self.address,
                                 metrics=self._metrics, max_active=self.max_active, max_queue=self.max_queue,
                                 flush_interval=self._flush)
        try:
            first = self._first("loaded", START_SECONDS)
            if isinstance(first, protocol.Loaded):
                first = self._first("up", self._step_timeout)
        finally:  # the core has read them (before ``up``) or will not: each start writes its own
            decode_graph.remove_graphs(self._graphs)
        if not isinstance(first, protocol.Up):
            why = first.reason if isinstance(first, protocol.Refused) else (
                f"the engine process exited with status {self._proc.poll()}" if self._proc.poll() is not None
                else "the engine process did not load the model in time (its trial step: --step-timeout "
                     f"{self._step_timeout:g}s)")
            self.client.close()
            self._kill()
            raise mf.ModelFormatError(why if why.startswith(str(self.path)) else f"{self.path}: {why}")
        metadata = mf.ModelMetadata.from_props(first.props)
        self.model = ServedModel(self.name, self.version, self.path, metadata, self.device)
        self.client.set_metadata(metadata)
        self._failed_reason = ""
        self.client.on_failed = self._note_failure  # the exit (_watch) reports it, with this reason
        self.client.on_broken = self._client_broken
        self.client.start()
        threading.Thread(target=self._watch, args=(on_failure,), name=f"watch-{self.label}", daemon=True).start()

    def _first(self, kind: str, seconds: float) -> protocol.Loaded | protocol.Up | protocol.Refused | None:
        """The core's next start-up message (``kind``, or ``refused``) within ``seconds``, else None."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._proc.poll() is None:
            m = self.client.receive_first(0.1)
            if m is not None:
                return m
        return None

    def _note_failure(self, reason: str) -> None:
        self._failed_reason = reason

    def _client_broken(self, reason: str) -> None:
        """The client failed under a running core: the core is killed, and _watch reports the failure."""
        self._failed_reason = reason
        self._kill()

    def _watch(self, on_failure) -> None:
        """Waits for the process to end; an end nobody asked for is an engine failure."""
        status = self._proc.wait()
        if self._stopping or (self._draining and status == 0):
            _settle(self.client, 1.0)
            self.client.close()
            return
        reason = self._failed_reason or f"the engine process exited with status {status}"
        error = errors.engine_failed(self.label, RuntimeError(reason))
        self.client.refuse(errors.not_running(self.label))
        self.client.fail_all(error)  # streams the core could not end itself (it was killed)
        self.client.close()
        if on_failure is not None:
            on_failure(RuntimeError(reason))

    def stop(self, timeout: float) -> None:
        self._stopping = self._draining = True
        if self.client is not None:
            self.client.control(protocol.Stop())
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
            _settle(self.client, 1.0)
            self.client.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop_hung(self, error: errors.CharrnnError) -> bool:
        """A silent core is killed: its streams end with ``error`` and it restarts; returns True."""
        self.client.refuse(error)
        self.client.fail_all(error)
        self._failed_reason = error.message
        self._kill()
        return True

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _settle(client: CoreClient, timeout: float) -> None:
    """Waits (up to ``timeout`` s) for the client to hear the ends of its streams."""
    deadline = time.monotonic() + timeout
    while client.live and time.monotonic() < deadline:
        time.sleep(0.01)


# A stand-in until the core reports the real metadata (nothing is submitted before that).
_PLACEHOLDER = mf.ModelMetadata(vocab=("\n",), cell="lstm", layers=1, hidden=1, val_loss=float("nan"),
                                train_steps=0, corpus_sha256="")


def factory(where: str, *, device: str, threads: int, metrics: Metrics, workdir: Path | None = None,
            step_timeout: float = 30.0, log_format: str = "text", log_level: str = "info",
            **core_args) -> Callable[[Path, str, int], CoreHandle]:
    """What makes the core of a model file, ``make(path, name, version)``: a ``ProcessCore`` (``where`` is
    "process", the server; its sampler graphs are in ``workdir``) or a ``ThreadCore`` ("thread": tests and
    tools). ``core_args``: max_active, max_queue, max_queue_wait, batching, flush_interval, prime_cache,
    decode_steps, overlap, cuda_graphs."""
    if where == "process":
        def make(path: Path, name: str, version: int) -> CoreHandle:
            return ProcessCore(path, name, version, device=device, threads=threads, metrics=metrics, workdir=workdir,
                               step_timeout=step_timeout, log_format=log_format, log_level=log_level, **core_args)
    elif where == "thread":
        from charrnn.service.runtime import load_model

        def make(path: Path, name: str, version: int) -> CoreHandle:
            return ThreadCore(load_model(path, name, version, device, threads), metrics=metrics, **core_args)
    else:
        raise ValueError(f"where must be 'process' or 'thread', got {where!r}")
    return make
