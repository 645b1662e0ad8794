"""The engine of a model version: what the servicer submits to; and the supervised one, which keeps its core
running or takes the model out of service loudly.

``Engine`` is the interface (state, submit, the message while down, the model,
max_active). ``SupervisedEngine`` (here, in the server) holds a core
(cores.CoreHandle) and replaces it when it fails; ``frontend.RemoteEngine`` is
the same engine as another front-end process sees it.

An engine that fails (an onnxruntime call raises: a CUDA error, a broken
device) has already ended every stream it held with UNAVAILABLE naming the
model. The supervisor then:

- restarts it after a backoff (``--engine-restart-backoff``, doubling with each
  failure inside the window, up to ``--engine-max-backoff``), with a fresh
  onnxruntime session whose trial step must pass: a transient fault heals by
  itself;
- marks the model FAILED after ``--engine-max-failures`` failures within
  ``--engine-failure-window`` seconds: its health entry turns NOT_SERVING, so
  load balancers stop sending traffic, and it keeps retrying every
  ``--engine-max-backoff`` seconds, back to SERVING when a restart passes;
- treats an engine that goes silent for ``--step-timeout`` seconds (a step that
  never returns) as hung: its streams end at once. A core process is killed and
  restarts like any failed one. An engine on a thread of this process cannot be
  killed: the model is FAILED and the server reports itself not live (health
  service ``liveness``), so the kubelet restarts the pod.

While the model is not serving, ``submit`` refuses at once with UNAVAILABLE
and a message that says whether it is restarting or failed.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from charrnn.service import errors
from charrnn.service.metrics import Metrics
from charrnn.service.protocol import EngineState
from charrnn.service.requests import GenerationRequest
from charrnn.service.streams import Stream

log = logging.getLogger("charrnn.service.engine")


@dataclass(frozen=True)
class RestartPolicy:
    """How an engine is restarted and when its model is given up on (flags of charrnn-serve)."""

    backoff: float = 0.1  # seconds before the first restart; doubles with each failure in the window
    max_backoff: float = 30.0  # the longest wait between restarts, and the retry interval once failed
    max_failures: int = 5  # failures within `window` that mark the model failed
    window: float = 60.0  # seconds over which failures are counted
    step_timeout: float = 30.0  # seconds an engine with work may go without finishing a round


class Engine(abc.ABC):
    """The engine of one model version, as the servicer and the model table use it."""

    model: object  # its metadata, device, name and version
    max_active: int

    @property
    @abc.abstractmethod
    def state(self) -> EngineState: ...

    @property
    @abc.abstractmethod
    def down_message(self) -> str:
        """What a request hears while the engine does not serve ("" while it does)."""

    @abc.abstractmethod
    def _submit_all(self, request) -> list[Stream]: ...

    def submit(self, request: GenerationRequest) -> Stream:
        """One sample's stream, as submit_all."""
        return self.submit_all(request)[0]

    def submit_all(self, request) -> list[Stream]:
        """Every sample's stream of a request (or a Score job's one) while serving; UNAVAILABLE at once, saying
        why, while restarting or failed."""
        if self.state is not EngineState.SERVING:
            raise errors.Unavailable(self.down_message or "the model is not serving", "engine")
        return self._submit_all(request)


class SupervisedEngine(Engine):
    """The engine of one model version in the server: a core, restarted when it fails."""

    def __init__(
        self,
        launch: Callable[[], object],
        *,
        policy: RestartPolicy,
        metrics: Metrics,
        on_change: Callable[[], None] = lambda: None,
    ):
        """``launch()`` makes a new, unstarted core (a cores.CoreHandle) of one model file;
        the first one starts here, and a refusal (ModelFormatError) propagates."""
        self.policy = policy
        self._launch_new = launch
        self._on_change = on_change  # told of every state change (the server updates health), any thread
        self._lock = threading.Lock()
        self._state = EngineState.SERVING
        self._hung = False
        self._failures: collections.deque[float] = collections.deque()  # time.monotonic() of each, in the window
        self._last_error = ""
        self._timer: threading.Timer | None = None
        self._retired = False  # drained or stopped: never restarted again
        core = self._launch_new()
        self.core = core
        core.start(on_failure=self._failed)  # a refused model file raises here: no series are made for it
        self.model = core.model  # the model as the current core loaded it
        self._m_failures = metrics.engine_failures.labels(core.name)
        self._m_state = {s: metrics.engine_state.labels(core.name, s.value) for s in EngineState}
        self._m_state[EngineState.SERVING].inc()

    def _launch(self):
        core = self._launch_new()
        core.start(on_failure=self._failed)
        return core

    # ---- what callers see ----

    @property
    def label(self) -> str:
        return self.core.label

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def hung(self) -> bool:
        """An engine thread is blocked for good: the process must be restarted (liveness)."""
        return self._hung

    def _submit_all(self, request) -> list[Stream]:
        with self._lock:  # the state and its core, together
            state, core = self._state, self.core
        if state is not EngineState.SERVING:
            raise errors.Unavailable(self._down_message(state), "engine")
        return core.submit_all(request)

    @property
    def down_message(self) -> str:
        state = self._state
        return "" if state is EngineState.SERVING else self._down_message(state)

    def _down_message(self, state: EngineState) -> str:
        p = self.policy
        if state is EngineState.RESTARTING:
            return f"model {self.label} is restarting after its engine failed ({self._last_error}); retry in a moment"
        if self._hung:
            return (f"model {self.label} has failed: its engine made no progress for {p.step_timeout:g}s "
                    f"(--step-timeout); the server must be restarted")
        return (f"model {self.label} has failed: {len(self._failures)} engine failures in {p.window:g}s "
                f"(last: {self._last_error}); it is retried every {p.max_backoff:g}s")

    @property
    def max_active(self) -> int:
        return self.core.max_active

    @property
    def idle(self) -> bool:
        return self.core.idle

    @property
    def running(self) -> bool:
        return self.core.running or self._timer is not None

    # ---- failures ----

    def _failed(self, error: BaseException) -> None:
        """An engine failure (engine thread) or a failed restart (timer thread): count it, schedule the next try."""
        reason = errors.reason_of(error)
        with self._lock:
            if self._retired:
                return
            now = time.monotonic()
            self._failures.append(now)
            while self._failures and now - self._failures[0] > self.policy.window:
                self._failures.popleft()
            self._last_error = reason
            count = len(self._failures)
            failed = count >= self.policy.max_failures
            state = EngineState.FAILED if failed else EngineState.RESTARTING
            delay = self.policy.max_backoff if failed else min(
                self.policy.max_backoff, self.policy.backoff * 2 ** (count - 1))
            self._set_state(state)
            self._timer = threading.Timer(delay, self._restart)
            self._timer.daemon = True
            self._timer.start()
        self._m_failures.inc()
        log.error("engine of %s failed (%s); %d failure%s in %gs; %s, next try in %.1fs", self.label, reason, count,
                  "" if count == 1 else "s", self.policy.window,
                  "model marked failed (health NOT_SERVING)" if failed else "restarting", delay)
        self._on_change()

    def _restart(self) -> None:
        """Timer thread: a fresh session from the same file (its trial step must pass) and a new engine."""
        with self._lock:
            self._timer = None
            if self._retired:
                return
        try:
            core = self._launch()
        except Exception as e:  # noqa: BLE001 - any reason the model cannot run counts as a failure
            self._failed(e)
            return
        with self._lock:
            if self._retired:
                core.stop(5.0)
                return
            self.model, self.core = core.model, core
            self._set_state(EngineState.SERVING)
        log.info("engine of %s restarted and serving", self.label)
        self._on_change()

    def check(self, now: float) -> None:
        """The watchdog: an engine silent for --step-timeout seconds is hung."""
        if self._state is not EngineState.SERVING:
            return
        stalled = self.core.stalled(now)
        if stalled <= self.policy.step_timeout:
            return
        error = errors.Unavailable(
            f"the engine of model {self.label} made no progress for {stalled:.1f}s (--step-timeout "
            f"{self.policy.step_timeout:g}s); retry on another replica", "engine")
        log.error("engine of %s made no progress for %.1fs (--step-timeout %gs): its streams end", self.label,
                  stalled, self.policy.step_timeout)
        if self.core.stop_hung(error):
            return  # killed: it reports its end as a failure and restarts
        with self._lock:
            if self._state is not EngineState.SERVING or self._retired:
                return
            self._hung = True
            self._failures.append(now)
            self._last_error = f"no progress for {stalled:.1f}s"
            self._set_state(EngineState.FAILED)
        self._m_failures.inc()
        log.error("engine of %s cannot be stopped (a thread): the model is marked failed and the server reports "
                  "itself not live", self.label)
        self._on_change()

    def _set_state(self, state: EngineState) -> None:
        """Under self._lock."""
        if state is not self._state:
            self._m_state[self._state].dec()
            self._m_state[state].inc()
            self._state = state

    # ---- lifecycle (the repository) ----

    def _retire(self) -> None:
        with self._lock:
            if self._retired:
                return
            self._retired = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._m_state[self._state].dec()

    def drain(self) -> None:
        """No new streams; those in flight finish; no restart after this."""
        self._retire()
        self.core.drain()

    def stop(self, timeout: float) -> None:
        self._retire()
        self.core.stop(timeout)
