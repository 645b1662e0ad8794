"""Every error a client can meet, as one exception type per kind, and the one list of outcomes.

The engine and the model repository raise these without knowing about gRPC.
Each error has a ``code`` (the gRPC status name the client sees) and a
``reason`` from a small fixed set (the `reason` label of
``charrnn_requests_total``, as TGI labels its error types). ``OUTCOMES`` lists
every (code, reason) a request can end with; the servicer's status table and
the metrics are built from it.
"""

from __future__ import annotations


# A client's bad value is quoted back in the status message, which travels in an HTTP/2 header:
# clients refuse headers over 16 KiB by default, so a long value is cut and its length given.
MAX_QUOTED_CHARS = 80


def shown(value: object) -> str:
    """How a message quotes a client's value: its repr, a long string cut to MAX_QUOTED_CHARS characters."""
    if isinstance(value, str) and len(value) > MAX_QUOTED_CHARS:
        return f"{value[:MAX_QUOTED_CHARS]!r}... ({len(value):,} characters)"
    return repr(value)


class CharrnnError(Exception):
    """Base class. ``code`` is the gRPC status name the client will see; ``reason`` one of ``REASONS``."""

    code = "INTERNAL"
    REASONS: tuple[str, ...] = ("internal",)

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.REASONS[0]
        if self.reason not in self.REASONS:
            raise ValueError(f"reason of {type(self).__name__} must be one of {self.REASONS}, got {reason!r}")


class InvalidArgument(CharrnnError, ValueError):
    """A request field breaks a rule. Message form: '<field> must be <rule>, got <value>'."""

    code = "INVALID_ARGUMENT"
    REASONS = ("validation",)

    def __init__(self, field: str, value: object, rule: str, hint: str = ""):
        msg = f"{field} must be {rule}, got {shown(value)}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.field = field
        self.value = value


class ModelNotFound(CharrnnError):
    code = "NOT_FOUND"
    REASONS = ("unknown_model",)


class Overloaded(CharrnnError):
    """A server limit (batch slots, queue length, queue wait) was reached."""

    code = "RESOURCE_EXHAUSTED"
    REASONS = ("queue_full", "queue_wait")  # every slot busy and the queue full; waited past --max-queue-wait

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason)


class DeadlineExceeded(CharrnnError):
    code = "DEADLINE_EXCEEDED"
    REASONS = ("deadline",)


class Unavailable(CharrnnError):
    """The server is draining, the model was removed while the request waited, or its engine failed."""

    code = "UNAVAILABLE"
    REASONS = ("draining", "engine")  # shutting down or the version removed; the engine failed or restarts


def reason_of(error: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def engine_failed(label: str, error: BaseException) -> Unavailable:
    """What the streams of ``label`` end with when its engine fails under them: the model, the reason, what next."""
    return Unavailable(f"the engine of model {label} failed ({reason_of(error)}); it restarts by itself, retry",
                       "engine")


def not_running(label: str) -> Unavailable:
    """What a stream meets while model ``label``'s engine is down and not yet restarted."""
    return Unavailable(f"model {label} is not running; retry in a moment", "engine")


SHUTTING_DOWN = "server shutting down; retry on another replica"


def draining(label: str = "") -> Unavailable:
    """The one refusal of a new stream while the server drains (no ``label``: the servicer), or while model
    ``label``'s core takes no new streams (a drain, or its version was removed by a reload)."""
    if not label:
        return Unavailable(SHUTTING_DOWN, "draining")
    return Unavailable(f"server shutting down: model {label} takes no new streams; retry on another replica",
                       "draining")


def stopped(label: str) -> Unavailable:
    """What a stream still running when model ``label``'s core is stopped ends with."""
    return Unavailable(f"server shutting down: model {label} stopped; retry on another replica", "draining")


def at_capacity(label: str, max_active: int, queued: int, max_queue: int) -> Overloaded:
    """Every batch slot and queue place of model ``label`` is taken (the front-end's count or the core's)."""
    return Overloaded("queue_full", f"model {label} is at capacity: all {max_active} batch slots are busy and "
                                    f"{queued} requests are queued (--max-queue {max_queue}); retry later, "
                                    f"or raise --max-queue / --max-active-streams")


class Cancelled(CharrnnError):
    """The client went away; nobody reads this message, it only labels the metric."""

    code = "CANCELLED"
    REASONS = ("cancelled",)


# Every (code, reason) a Generate request can end with: OK, then each error kind's reasons.
OUTCOMES: tuple[tuple[str, str], ...] = (("OK", "ok"),) + tuple(
    (cls.code, reason)
    for cls in (InvalidArgument, ModelNotFound, Overloaded, DeadlineExceeded, Unavailable, Cancelled, CharrnnError)
    for reason in cls.REASONS
)
# Every gRPC status name a request can end with, in that order.
CODES: tuple[str, ...] = tuple(dict.fromkeys(code for code, _ in OUTCOMES))
