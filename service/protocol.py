"""Every message between a front-end and an engine core: typed msgspec structs, one batch per message.

What crosses the ZeroMQ socket between a front-end's CoreClient (coreclient.py)
and an engine core (corerun.py) is one of the structs below, encoded as
msgpack by msgspec (vLLM's EngineCoreRequest / EngineCoreOutputs are the
model). A message's type is its struct's tag; the fields are named and typed
in the code, and a decoder refuses what it does not know. The busiest structs
travel as msgpack arrays in their fields' order (``array_like``), so a field's
name is not sent with every stream's record. numpy
arrays travel as one msgpack extension each (dtype, shape, raw bytes): a
step's ids for thousands of streams are one memory copy, not a list of ints.

front-end -> core
    Hello     a front-end announces itself (``primary``: it records the metrics)
    Work      admissions (``Admit``, one per new stream) and cancels (front-end rows)
    Drain     no new streams; exit once idle            (from the supervisor)
    Stop      end every stream now and exit            (from the supervisor)
    Gone      a front-end process died: free its slots (from the supervisor)

core -> front-end
    Loaded    the model file loaded; the trial step runs now (to the supervisor)
    Up        the trial step passed: the model's metadata properties
    Refused   the model file cannot be served: the reason
    Out       this front-end's news since the last Out: per decode call (``Step``) its rows and their new
              ids, K a row (and how many to hold back, and log-probabilities when asked); the streams that ended
              (``End``); the core's load; to the primary, the metric deltas (``StatsDelta``); the last
              Out of a failed engine carries ``failed``. ``Out.merge`` folds a later Out into one that
              a lagging front-end has not taken yet.

server -> other front-end processes (frontend.py)
    Table            every served version (``TableRow``), the default model, draining, stop
other front-end -> server
    FrontendHello    a front-end process announces itself
    FrontendMetrics  its metric changes since the last
"""

from __future__ import annotations

import enum
from typing import Any, Literal, Union

import msgspec
import numpy as np

from charrnn.service.requests import Controls

_NDARRAY = 1  # msgpack extension type of a numpy array


class EngineState(enum.Enum):
    """A model version's engine (engine.py), as TableRow.state and the charrnn_engine_state metric say it."""

    SERVING = "serving"
    RESTARTING = "restarting"  # failed; a restart is scheduled
    FAILED = "failed"  # too many failures in the window, or hung: out of the load balancer


class Record(msgspec.Struct, array_like=True):
    """Every struct here: encoded as a msgpack array of its fields in order (a tagged one, its tag first)."""


class Admit(Record):
    """One stream for the core: a Generate sample or a Score request (``kind``)."""

    kind: Literal["generate", "score"]
    row: int  # the stream's row at its front-end
    prime: np.ndarray  # int64 [T >= 1]: the prime's ids (for a resumed stream, then resume_text's; for a score, then the text's)
    max_chars: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stops: list[list[int]] = []  # token ids of each stop sequence; -1: a character outside the vocabulary
    deadline: float | None = None  # time.monotonic() by which it must end
    arrived: float = 0.0
    logprobs: int = 0  # alternatives wanted per character (0: no log-probabilities)
    controls: Controls | None = None  # requests.Controls, as validation made it
    resumed: int = 0  # the last this many ids of ``prime`` are resume_text: generated already
    text_chars: int = 0  # a score: characters of text at the end of ``prime``
    top: int = 0  # a score: alternatives per character
    # Set in the core process only, never sent: the prime cache entry and first id of a stream whose first
    # character the core's I/O thread drew (core.first_characters).
    cached: Any = None
    first: int | None = None

    @property
    def plain(self) -> bool:
        """A Generate sample with nothing beyond temperature, top-k and top-p, and not resumed."""
        return (self.kind == "generate" and not self.stops and self.controls is None and not self.logprobs
                and not self.resumed)


class Hello(Record, tag="hello"):
    fe: int
    primary: bool = False


class Work(Record, tag="work"):
    add: list[Admit] = []
    cancel: list[int] = []  # front-end rows


class Drain(Record, tag="drain"):
    pass


class Stop(Record, tag="stop"):
    pass


class Gone(Record, tag="gone"):
    fe: int


class Loaded(Record, tag="loaded"):
    pass


class Up(Record, tag="up"):
    props: dict[str, str]  # the model file's metadata properties


class Refused(Record, tag="refused"):
    reason: str


class Logprobs(Record):
    chosen: np.ndarray  # float32 [n, K]: each row's drawn characters' log-probabilities
    top_ids: np.ndarray  # int32 [n, K, k]: the k most likely characters at each
    top_lp: np.ndarray  # float32 [n, K, k]: and theirs


class Step(Record):
    """One decode call's new characters of some rows of a front-end: K per row, fewer for a row that ended
    inside the call (``count``)."""

    rows: np.ndarray  # int32 [n]
    ids: np.ndarray  # int32 [n, K] (or [n]: one character each)
    hold: np.ndarray | None = None  # int32 [n]: latest characters that may begin a stop sequence (None: no stops)
    logprobs: Logprobs | None = None
    count: np.ndarray | None = None  # int32 [n]: how many of a row's K ids are its (None: all K)


class ScoreResult(Record):
    lp: np.ndarray  # float32 [n]: each character's log-probability
    top_ids: np.ndarray  # int32 [n, top]
    top_lp: np.ndarray  # float32 [n, top]


class End(Record):
    """A stream ended: how (``code``, ``reason``) and its counts and times (time.monotonic())."""

    row: int
    code: str  # "OK" or the gRPC status name of an error
    reason: str  # "stop", "length", "match", "score", or the error's metric label ("cancelled", "draining", ...)
    message: str = ""  # for an error: what the caller is told
    stop: int = -1  # which stop sequence matched (-1: none)
    generated: int = 0
    admitted: float = 0.0
    first: float = 0.0  # its first character (admitted, when it had none)
    last: float = 0.0
    steps_after_cancel: int = 0  # decode steps the core ran for it after its cancel arrived
    score: ScoreResult | None = None


class StatsDelta(Record):
    """What the core counted since its last delta: histogram counts (with their sums) and prime cache lookups."""

    histograms: dict[str, tuple[np.ndarray, float]] = {}  # name -> (int64 count per bucket, +Inf last; sum)
    cache_hits: int = 0
    cache_misses: int = 0

    def merge(self, later: StatsDelta) -> None:
        for name, (counts, total) in later.histograms.items():
            mine = self.histograms.get(name)
            self.histograms[name] = (counts + mine[0], total + mine[1]) if mine else (counts, total)
        self.cache_hits += later.cache_hits
        self.cache_misses += later.cache_misses


class Out(Record, tag="out"):
    steps: list[Step] = []
    ends: list[End] = []
    load: tuple[int, int] | None = None  # the core's slots taken and requests queued, all front-ends (None: not said)
    busy: bool | None = None  # the core has work (None: not said)
    stats: StatsDelta | None = None  # to the primary front-end
    failed: str = ""  # the engine failed and the core exits: why

    def merge(self, later: Out) -> None:
        """Folds ``later`` into this one, in place: steps and ends in order, the newer load, deltas added (a
        front-end that lags for long costs no copying per round)."""
        self.steps.extend(later.steps)
        self.ends.extend(later.ends)
        self.load = later.load if later.load is not None else self.load
        self.busy = later.busy if later.busy is not None else self.busy
        self.failed = later.failed or self.failed
        if later.stats is not None:
            if self.stats is None:
                self.stats = later.stats
            else:
                self.stats.merge(later.stats)


# Between the server's process and its other front-end processes (frontend.py): the model table, and their
# metric changes.


class TableRow(Record):
    """One served model version, as another front-end needs it."""

    name: str
    version: int
    props: dict[str, str]  # the model file's metadata properties
    device: str
    path: str
    address: str  # the engine core's ZeroMQ address
    state: str  # an EngineState's value
    message: str  # why it does not serve, when it does not
    max_active: int
    max_queue: int


class FrontendHello(Record, tag="frontend_hello"):
    fe: int


class Table(Record, tag="table"):
    rows: list[TableRow] = []
    hung: bool = False  # some engine of the server's own process is hung (liveness)
    default: str | None = None  # the default model named by --default-model
    draining: bool = False
    stop: bool = False  # the server stops: the front-end exits


class FrontendMetrics(Record, tag="frontend_metrics"):
    delta: dict[str, Any]  # metrics.frontend_delta: {family: {label values: [counts or value, sum]}}


ToCore = Union[Hello, Work, Drain, Stop, Gone]
ToFrontend = Union[Loaded, Up, Refused, Out]
ToHub = Union[FrontendHello, FrontendMetrics]


def _encode_array(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return msgspec.msgpack.Ext(_NDARRAY, msgspec.msgpack.encode((obj.dtype.str, obj.shape, obj.tobytes())))
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot send {type(obj).__name__}")


def _decode_ext(code: int, data: memoryview) -> Any:
    if code != _NDARRAY:
        raise ValueError(f"unknown msgpack extension {code}")
    dtype, shape, raw = msgspec.msgpack.decode(data)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)  # a read-only view of the message


def _decode_array(kind: type, obj: Any) -> Any:
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise NotImplementedError(f"cannot read {kind}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_array)
_to_core = msgspec.msgpack.Decoder(ToCore, ext_hook=_decode_ext, dec_hook=_decode_array)
_to_frontend = msgspec.msgpack.Decoder(ToFrontend, ext_hook=_decode_ext, dec_hook=_decode_array)
_to_hub = msgspec.msgpack.Decoder(ToHub)
_table = msgspec.msgpack.Decoder(Table)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> Hello | Work | Drain | Stop | Gone:
    return _to_core.decode(data)


def decode_to_frontend(data: bytes) -> Loaded | Up | Refused | Out:
    return _to_frontend.decode(data)


def decode_to_hub(data: bytes) -> FrontendHello | FrontendMetrics:
    return _to_hub.decode(data)


def decode_table(data: bytes) -> Table:
    return _table.decode(data)
