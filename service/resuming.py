"""A stream that survives its replica: on UNAVAILABLE it resumes on another one, with the same text.

A stream's draws are a pure function of (seed, position) and its state after
any text is rebuilt by prefill, so a stream cut after the characters T can go
on anywhere: the same request again, with the seed and model version its first
message reported and ``resume_text = T`` (docs/service.md). The reader of a
``ResumingGeneration`` sees each sample's text once, in order, with no gap and
no repeat, whatever happened underneath.

- Replicas: ``GeneratorClient`` takes one address, several (a list or
  "host:port,host:port"), or a ``dns:///name:port`` name, which gRPC resolves
  to every address behind it (a headless Kubernetes Service) and balances
  round robin. Each new call starts at the next address of a list; a resumed
  one at the address after the one that failed.
- What resumes: UNAVAILABLE (the replica died, drained past its grace, or
  cannot be reached), and a stream on which no message came for
  ``stall_seconds`` while the replica's health check did not say SERVING.
- How often: at most ``max_resumes`` times per call, waiting ``backoff``
  seconds, doubled each time up to 2 s. Each resume is logged (logger
  ``charrnn.client``) and counted in ``resumes``; the server's final stats say
  how many characters the last stream resumed from (``resumed_chars``).
- Samples (n > 1): each unfinished sample resumes as a request of its own
  (n 1, its own seed and text), one after another.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

import grpc

from charrnn.service.client import Generation, ServiceError
from charrnn.v1 import generator_pb2 as pb

log = logging.getLogger("charrnn.client")

MAX_BACKOFF = 2.0  # seconds between tries, at most


class Stalled(Exception):
    """No message for ``stall_seconds`` and the replica's health check did not answer SERVING."""


class ResumingGeneration(Generation):
    """One Generate call that resumes on another replica when its own goes away; read it as a Generation."""

    def __init__(self, open_call: Callable[[pb.GenerateRequest, float | None, int], tuple[object, str]],
                 check_health: Callable[[str], str], request: pb.GenerateRequest, timeout: float | None, *,
                 max_resumes: int, backoff: float, stall_seconds: float | None):
        super().__init__(None)
        self._open = open_call  # (request, timeout, try number) -> (call, the address it went to)
        self._check_health = check_health  # address -> grpc.health.v1 status name, or raises
        self._request = request
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.max_resumes, self.backoff, self.stall_seconds = max_resumes, backoff, stall_seconds
        self._cancelled = False
        # The call starts now, as a plain Generate call does: it takes its place in the server's queue
        # before the first read.
        self._first = self._open(request, timeout, 0)
        self._call = self._first[0]
        self.resumes = 0  # times a cut stream was resumed (resumed streams ask for ``model``, the version pinned)

    # ---- reading ----

    def __iter__(self) -> Iterator[str]:
        n = max(1, self._request.n)
        work: list[tuple[int | None, pb.GenerateRequest]] = [(None, self._request)]  # (sample, request)
        first_cut = ""  # why the stream was cut first (the error a caller would have seen without resuming)
        while work:
            sample, request = work[0]
            try:
                for response in self._responses(request, self.resumes):
                    text = self._take(response, sample)  # a resumed sample's messages say index 0
                    if text:
                        yield text
                work.pop(0)
            except (grpc.RpcError, Stalled) as e:
                if self._cancelled or not _resumable(e) or not self.max_resumes:
                    raise _error_of(e) from None
                if self.resumes >= self.max_resumes:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                       f"gave up after {self.resumes} resumes; cut by {first_cut}, last: "
                                       f"{_describe(e)}") from None
                if not self.resumes:
                    first_cut = _describe(e)
                self.resumes += 1
                left = [i for i in range(n) if i not in self.finish_reasons] if sample is None else [sample]
                log.warning("stream cut (%s); resuming %s at %s characters, try %d of %d", _describe(e),
                            ", ".join(f"sample {i}" for i in left), ", ".join(str(len(self.texts.get(i, "")))
                                                                               for i in left),
                            self.resumes, self.max_resumes)
                time.sleep(min(MAX_BACKOFF, self.backoff * 2 ** (self.resumes - 1)))
                work = [(i, self._resumed(i)) for i in left] + work[1:]

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    # ---- inside ----

    def _responses(self, request: pb.GenerateRequest, tries: int) -> Iterator[pb.GenerateResponse]:
        """The messages of ``request``'s call; ``tries``: calls of this stream before it (its address)."""
        if self._first is not None:
            (call, address), self._first = self._first, None
        else:
            timeout = None if self._deadline is None else max(0.001, self._deadline - time.monotonic())
            call, address = self._open(request, timeout, tries)
        self._call = call
        watch = _Watch(call, address, self._check_health, self.stall_seconds)
        try:
            for response in call:
                watch.heard()
                yield response
        except grpc.RpcError:
            if watch.stalled:
                raise Stalled(f"no message for {self.stall_seconds:g} s from {address}, which is not serving") from None
            raise
        finally:
            watch.stop()

    def _resumed(self, i: int) -> pb.GenerateRequest:
        """Sample ``i`` again from where its text stops: n 1, its own seed, the pinned model version."""
        request = pb.GenerateRequest()
        request.CopyFrom(self._request)
        request.n = 1
        if i in self.seeds:
            request.seed = self.seeds[i]
        elif self._request.HasField("seed"):
            request.seed = self._request.seed + i
        else:
            request.ClearField("seed")  # its first message never came: nothing of it was seen, any seed will do
        if self.model:
            request.model = self.model
        request.resume_text = self.texts.get(i, "")
        return request


class _Watch:
    """Cancels ``call`` when no message came for ``seconds`` and ``address``'s health is not SERVING."""

    def __init__(self, call, address: str, check_health: Callable[[str], str], seconds: float | None):
        self.call, self.address, self.check_health, self.seconds = call, address, check_health, seconds
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        if seconds:
            threading.Thread(target=self._run, name="charrnn-client-watch", daemon=True).start()

    def heard(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self.seconds)):
            if time.monotonic() - self._last < self.seconds:
                continue
            try:
                status = self.check_health(self.address)
            except Exception:  # noqa: BLE001 - any failure to answer is a failed check
                status = "UNREACHABLE"
            if status != "SERVING":
                self.stalled = True
                self.call.cancel()
                return
            self._last = time.monotonic()  # serving, only slow: look again after another while


def _resumable(e: Exception) -> bool:
    if isinstance(e, Stalled):
        return True
    return e.code() == grpc.StatusCode.UNAVAILABLE


def _error_of(e: Exception) -> ServiceError:
    """What the caller meets when a cut is not resumed: the call's own status, or UNAVAILABLE for a stall."""
    if isinstance(e, grpc.RpcError):
        return ServiceError.of(e)
    return ServiceError(grpc.StatusCode.UNAVAILABLE, str(e))


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)
