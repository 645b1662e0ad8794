"""Every error a client can meet, as one exception type per kind.

The engine and the model repository raise these without knowing about gRPC;
the servicer maps ``code`` to a gRPC status in one table (servicer.STATUS_FOR)
and uses ``code`` as the value of the ``code`` label on
``charrnn_requests_total``.
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
    """Base class. ``code`` is the gRPC status name the client will see."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(CharrnnError, ValueError):
    """A request field breaks a rule. Message form: '<field> must be <rule>, got <value>'."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, value: object, rule: str, hint: str = ""):
        msg = f"{field} must be {rule}, got {shown(value)}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.field = field
        self.value = value


class ModelNotFound(CharrnnError):
    code = "NOT_FOUND"


class Overloaded(CharrnnError):
    """A server limit (batch slots, queue length, queue wait) was reached."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit  # "queue_full" | "queue_wait"


class DeadlineExceeded(CharrnnError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(CharrnnError):
    """The server is draining, the model was removed while the request waited, or its engine failed."""

    code = "UNAVAILABLE"


def reason_of(error: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def engine_failed(label: str, error: BaseException) -> Unavailable:
    """What the streams of ``label`` end with when its engine fails under them: the model, the reason, what next."""
    return Unavailable(f"the engine of model {label} failed ({reason_of(error)}); it restarts by itself, retry")


class Cancelled(CharrnnError):
    """The client went away; nobody reads this message, it only labels the metric."""

    code = "CANCELLED"
