"""The model file contract between the exporter and the service (docs/model-format.md).

One ONNX file is one complete model: the graph runs any number of steps for any
batch size with the recurrent state passed in and out explicitly, and the
vocabulary, the architecture and the provenance travel as metadata properties
(``ModelProto.metadata_props``), which onnxruntime reads without the ``onnx``
package (``InferenceSession.get_modelmeta().custom_metadata_map``).

This module is plain Python on purpose: the exporter (torch) writes with it and
the service (onnxruntime, no torch) reads with it, so both sides share one
definition of the keys and one validator.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Bumped when a reader of the old format could misread a new file.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

CELLS = ("lstm", "gru", "rnn")

# The model repository on disk: MODELS/<name>/<version>/model.onnx, versions positive integers.
MODEL_FILE = "model.onnx"
MODEL_NAME_RULE = "1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RULE = "a positive integer without leading zeros"
MAX_VERSION_DIGITS = 18  # versions fit a signed 64-bit integer (the proto's uint64, Prometheus labels)
_DECIMAL = re.compile(r"-?[0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Graph inputs and outputs. Shapes: B = batch, T = steps, L = layers, H = hidden, V = vocab.
INPUT_TOKENS = "tokens"  # int64   [B, T]
INPUT_H = "h"  # float32 [L, B, H]
INPUT_C = "c"  # float32 [L, B, H], LSTM only
OUTPUT_LOGITS = "logits"  # float32 [B, T, V]
OUTPUT_H = "h_out"  # float32 [L, B, H]
OUTPUT_C = "c_out"  # float32 [L, B, H], LSTM only

# Metadata property keys. Every value is a string.
KEY_FORMAT_VERSION = "charrnn.format_version"  # "1"
KEY_VOCAB = "charrnn.vocab"  # JSON list of Unicode code points, index -> character
KEY_CELL = "charrnn.cell"  # "lstm" | "gru" | "rnn"
KEY_LAYERS = "charrnn.layers"  # decimal integer
KEY_HIDDEN = "charrnn.hidden"  # decimal integer
KEY_EMBED_DIM = "charrnn.embed_dim"  # decimal integer
KEY_VAL_LOSS = "charrnn.val_loss"  # decimal float, nats per character ("nan" if never evaluated)
KEY_TRAIN_STEPS = "charrnn.train_steps"  # decimal integer
KEY_CORPUS_SHA256 = "charrnn.corpus_sha256"  # hex
KEY_CORPUS_CHARS = "charrnn.corpus_chars"  # decimal integer
KEY_CREATED = "charrnn.created"  # ISO 8601 UTC time of export
KEY_TRAIN_CONFIG = "charrnn.train_config"  # JSON object, informational only

REQUIRED_KEYS = (
    KEY_FORMAT_VERSION,
    KEY_VOCAB,
    KEY_CELL,
    KEY_LAYERS,
    KEY_HIDDEN,
    KEY_VAL_LOSS,
    KEY_TRAIN_STEPS,
    KEY_CORPUS_SHA256,
)


# Where the fixed dimensions of each graph tensor come from, for check_io's messages.
_DIMS_FROM = {
    INPUT_TOKENS: "", OUTPUT_LOGITS: " (vocab_size from the metadata)",
    **{n: " (layers, hidden from the metadata)" for n in (INPUT_H, INPUT_C, OUTPUT_H, OUTPUT_C)},
}


class ModelFormatError(ValueError):
    """A model file breaks the contract. The message says which rule."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the metadata properties of a model file say."""

    vocab: tuple[str, ...]  # index -> one character (one code point)
    cell: str  # "lstm" | "gru" | "rnn"
    layers: int  # stacked recurrent layers, >= 1
    hidden: int  # units per layer, >= 1
    val_loss: float  # nats per character on the validation split; nan if unknown
    train_steps: int  # optimizer steps
    corpus_sha256: str  # hex digest of the training corpus
    embed_dim: int = 0  # 0 if not recorded
    corpus_chars: int = 0  # 0 if not recorded
    created: str = ""
    train_config: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def has_cell_state(self) -> bool:
        """LSTM carries (h, c); GRU and vanilla RNN carry h alone."""
        return self.cell == "lstm"

    @property
    def start_id(self) -> int:
        """What an empty prime feeds the model: a newline (the start of a line), else the first character."""
        return self.vocab.index("\n") if "\n" in self.vocab else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (every character must be in the vocabulary); [start_id] for ""."""
        if not text:
            return [self.start_id]
        index = self.index
        return [index[ch] for ch in text]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Character -> token id."""
        return {ch: i for i, ch in enumerate(self.vocab)}

    def state_names(self) -> tuple[tuple[str, str], ...]:
        """(input name, output name) of each recurrent state tensor."""
        pairs = [(INPUT_H, OUTPUT_H)]
        if self.has_cell_state:
            pairs.append((INPUT_C, OUTPUT_C))
        return tuple(pairs)

    def check_io(self, inputs, outputs) -> None:
        """Checks a graph's inputs and outputs against this metadata; raises ModelFormatError.

        ``inputs`` and ``outputs`` are what ``onnxruntime.InferenceSession.get_inputs()`` /
        ``get_outputs()`` return: objects with ``.name``, ``.type`` ("tensor(int64)") and
        ``.shape`` (ints for fixed dimensions, a str or None for symbolic ones). Batch and
        steps must be symbolic, so one graph serves any batch and any number of steps.
        """
        L, H, V = self.layers, self.hidden, self.vocab_size
        want_in = {INPUT_TOKENS: ("tensor(int64)", ("batch", "steps"))}
        want_out = {OUTPUT_LOGITS: ("tensor(float)", ("batch", "steps", V))}
        for i, o in self.state_names():
            want_in[i] = ("tensor(float)", (L, "batch", H))
            want_out[o] = ("tensor(float)", (L, "batch", H))
        for kind, args, want in (("input", inputs, want_in), ("output", outputs, want_out)):
            got = {a.name: a for a in args}
            if set(got) != set(want):
                raise ModelFormatError(
                    f"graph {kind}s must be {', '.join(want)} for a {self.cell} model, got {', '.join(got) or 'none'}"
                )
            for name, (dtype, dims) in want.items():
                arg = got[name]
                shape = list(arg.shape or [])
                fits = arg.type == dtype and len(shape) == len(dims) and all(
                    # A named dimension must be symbolic; a number must match exactly.
                    not isinstance(d, int) if isinstance(w, str) else d == w
                    for d, w in zip(shape, dims)
                )
                if not fits:
                    seen = f"{arg.type} {shape}"
                    raise ModelFormatError(
                        f"graph {kind} {name!r} must be {dtype} [{', '.join(map(str, dims))}]{_DIMS_FROM[name]}, "
                        f"got {seen}"
                    )

    def to_props(self) -> dict[str, str]:
        props = {
            KEY_FORMAT_VERSION: str(self.format_version),
            KEY_VOCAB: json.dumps([ord(ch) for ch in self.vocab]),
            KEY_CELL: self.cell,
            KEY_LAYERS: str(self.layers),
            KEY_HIDDEN: str(self.hidden),
            KEY_EMBED_DIM: str(self.embed_dim),
            KEY_VAL_LOSS: repr(float(self.val_loss)),
            KEY_TRAIN_STEPS: str(self.train_steps),
            KEY_CORPUS_SHA256: self.corpus_sha256,
            KEY_CORPUS_CHARS: str(self.corpus_chars),
            KEY_CREATED: self.created,
            KEY_TRAIN_CONFIG: json.dumps(self.train_config, sort_keys=True),
        }
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        """Parses and validates metadata properties; raises ModelFormatError naming the rule broken."""
        missing = [k for k in REQUIRED_KEYS if k not in props]
        if missing:
            raise ModelFormatError(
                f"metadata is missing {', '.join(missing)} (is this a charrnn model file? "
                f"see docs/model-format.md)"
            )
        version = _int(props, KEY_FORMAT_VERSION, minimum=1)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ModelFormatError(
                f"{KEY_FORMAT_VERSION} is {version}, this charrnn reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}; upgrade charrnn or re-export the model"
            )
        vocab = _vocab(props[KEY_VOCAB])
        cell = props[KEY_CELL]
        if cell not in CELLS:
            raise ModelFormatError(f"{KEY_CELL} must be one of {', '.join(CELLS)}, got {cell!r}")
        try:
            val_loss = float(props[KEY_VAL_LOSS])
        except ValueError:
            raise ModelFormatError(f"{KEY_VAL_LOSS} must be a number, got {props[KEY_VAL_LOSS]!r}") from None
        if not (math.isnan(val_loss) or 0 <= val_loss < math.inf):
            raise ModelFormatError(f"{KEY_VAL_LOSS} must be a finite number >= 0, or nan, got {val_loss}")
        corpus_sha256 = props[KEY_CORPUS_SHA256]
        if corpus_sha256 and not _SHA256.fullmatch(corpus_sha256):
            raise ModelFormatError(
                f"{KEY_CORPUS_SHA256} must be 64 lowercase hex digits, or empty if unknown, got {corpus_sha256!r}"
            )
        train_config: dict = {}
        if props.get(KEY_TRAIN_CONFIG):
            try:
                train_config = json.loads(props[KEY_TRAIN_CONFIG])
            except json.JSONDecodeError as e:
                raise ModelFormatError(f"{KEY_TRAIN_CONFIG} is not valid JSON: {e}") from None
            if not isinstance(train_config, dict):
                raise ModelFormatError(
                    f"{KEY_TRAIN_CONFIG} must be a JSON object, got {type(train_config).__name__}"
                )
        return cls(
            vocab=vocab,
            cell=cell,
            layers=_int(props, KEY_LAYERS, minimum=1),
            hidden=_int(props, KEY_HIDDEN, minimum=1),
            val_loss=val_loss,
            train_steps=_int(props, KEY_TRAIN_STEPS, minimum=0),
            corpus_sha256=corpus_sha256,
            embed_dim=_int(props, KEY_EMBED_DIM, minimum=0) if KEY_EMBED_DIM in props else 0,
            corpus_chars=_int(props, KEY_CORPUS_CHARS, minimum=0) if KEY_CORPUS_CHARS in props else 0,
            created=props.get(KEY_CREATED, ""),
            train_config=train_config,
            format_version=version,
        )


def is_version(text: str) -> bool:
    """Whether a folder name (or the part after '@') is a version. Checked as text: int() refuses past 4300 digits."""
    return text.isascii() and text.isdigit() and len(text) <= MAX_VERSION_DIGITS and text[0] != "0"


def check_model_name(name: str) -> str:
    """Returns ``name`` if it may name a model in a repository, else raises ModelFormatError."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ModelFormatError(f"model name must be {MODEL_NAME_RULE}, got {name!r}")
    return name


def _int(props: dict[str, str], key: str, minimum: int) -> int:
    raw = props[key]
    # ASCII decimal only: int() would also take " 3", "3_000" and other scripts' digits.
    if not isinstance(raw, str) or not _DECIMAL.fullmatch(raw):
        raise ModelFormatError(f"{key} must be a decimal integer, got {raw!r}")
    value = int(raw)
    if value < minimum:
        raise ModelFormatError(f"{key} must be >= {minimum}, got {value}")
    return value


def _vocab(raw: str) -> tuple[str, ...]:
    try:
        points = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{KEY_VOCAB} is not valid JSON: {e}") from None
    if not isinstance(points, list) or not points:
        raise ModelFormatError(f"{KEY_VOCAB} must be a non-empty JSON list of code points, got {raw[:40]!r}")
    chars = []
    for i, p in enumerate(points):
        if not isinstance(p, int) or isinstance(p, bool) or not (0 <= p <= 0x10FFFF):
            raise ModelFormatError(f"{KEY_VOCAB}[{i}] must be a code point in [0, 0x10FFFF], got {p!r}")
        if 0xD800 <= p <= 0xDFFF:
            raise ModelFormatError(f"{KEY_VOCAB}[{i}] is a surrogate (U+{p:04X}), which is not a character")
        chars.append(chr(p))
    if len(set(chars)) != len(chars):
        dupes = sorted(c for c, n in Counter(chars).items() if n > 1)
        raise ModelFormatError(f"{KEY_VOCAB} repeats characters: {', '.join(describe_char(c) for c in dupes)}")
    return tuple(chars)


def describe_char(ch: str) -> str:
    """A readable name for one character in error messages: 'x' (U+0078 LATIN SMALL LETTER X)."""
    name = unicodedata.name(ch, "")
    shown = repr(ch) if ch.isprintable() else ""
    return f"{shown} (U+{ord(ch):04X}{' ' + name if name else ''})".strip()
