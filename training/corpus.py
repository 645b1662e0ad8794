"""Corpus: text files -> vocabulary of Unicode code points -> token ids in a memory-mapped file.

Two streaming passes over the files, each reading ``CHUNK_BYTES`` at a time, so
a corpus of any size is never held in memory:

1. ``scan_corpus``: decodes UTF-8, builds the vocabulary (sorted code points),
   counts characters and hashes the bytes (sha256 of all files, in order).
2. ``encode_corpus``: writes the token id of every character to ``tokens.bin``
   in the run folder (uint8 while the vocabulary fits, else uint16, else uint32).

The files of a corpus are read in sorted order and joined with nothing between
them. The last ``VAL_FRACTION`` of the characters is the validation split,
contiguous, as nanoGPT does.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CHUNK_BYTES = 4 << 20  # bytes read per step of either pass
VAL_FRACTION = 0.1  # last 10% of the characters
TOKENS_FILE = "tokens.bin"
TOKENS_META = "tokens.json"
SNIFF_BYTES = 8192  # a file whose first 8 KiB hold a NUL byte is binary, not text


class CorpusError(ValueError):
    """The corpus cannot be read or cannot be used for training."""


@dataclass
class CorpusInfo:
    sha256: str  # hex digest of the bytes of all source files, concatenated in order
    chars: int  # characters (code points) in the whole corpus
    sources: list[str]  # the files, in the order they were read

    def as_dict(self) -> dict:
        return asdict(self)


def list_sources(spec: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """A file, a directory (all text files under it) or a glob pattern -> files in a fixed order.

    Files under ``exclude`` (the run folder, when it sits inside the corpus) are never part of it.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    skip = exclude.resolve() if exclude is not None else None

    def outside_run(p: Path) -> bool:
        return skip is None or not p.resolve().is_relative_to(skip)

    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and outside_run(p) and _is_text(p)
        )
        if not files:
            raise CorpusError(f"--data {spec}: directory holds no text files")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(p for p in map(Path, glob.glob(str(spec), recursive=True)) if p.is_file() and outside_run(p))
        if not files:
            raise CorpusError(f"--data {spec}: pattern matches no files")
        return files
    raise CorpusError(f"--data {spec}: no such file, directory or glob pattern")


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def _decoded_chunks(path: Path, errors: str, digest=None):
    """Yields the text of ``path`` chunk by chunk; undecodable bytes name the file and byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    consumed = 0  # bytes handed to the decoder before this chunk
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK_BYTES)
            final = not data
            pending = len(decoder.getstate()[0])  # bytes of a split character held from the last chunk
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                offset = consumed - pending + e.start
                bad = e.object[e.start:e.end].hex(" ")
                raise CorpusError(
                    f"{path}: not valid UTF-8 at byte offset {offset} (bytes {bad}: {e.reason}); "
                    "fix the file or pass --errors replace to read such bytes as U+FFFD"
                ) from None
            if digest is not None:
                digest.update(data)
            consumed += len(data)
            if text:
                yield text
            if final:
                return


def scan_corpus(sources: list[Path], errors: str = "strict") -> tuple[list[str], CorpusInfo]:
    """First pass: vocabulary (sorted by code point), character count and sha256 of the bytes."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    chars = 0
    for path in sources:
        for text in _decoded_chunks(path, errors, digest):
            seen.update(text)
            chars += len(text)
    if chars == 0:
        raise CorpusError(f"--data {_describe(sources)}: the corpus is empty (0 characters)")
    vocab = sorted(seen)
    return vocab, CorpusInfo(digest.hexdigest(), chars, [str(p) for p in sources])


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def encode_corpus(sources: list[Path], vocab: list[str], info: CorpusInfo, out: Path, errors: str = "strict") -> Path:
    """Second pass: writes every character's id to ``out`` (raw array of ``token_dtype``)."""
    dtype = token_dtype(len(vocab))
    lookup = np.zeros(ord(vocab[-1]) + 1, dtype=dtype)  # code point -> id; at most 1.1M entries (U+10FFFF)
    lookup[[ord(ch) for ch in vocab]] = np.arange(len(vocab), dtype=dtype)
    at = 0
    # Plain appends, not a writable memory map: dirty mapped pages would count in the process's
    # resident memory until the end, so a 500 MB corpus would cost 500 MB of RSS.
    with open(out, "wb") as f:
        for path in sources:
            for text in _decoded_chunks(path, errors):
                cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [chunk chars] code points
                f.write(lookup[cps].tobytes())
                at += len(cps)
        f.flush()
        os.fsync(f.fileno())
    if at != info.chars:
        raise CorpusError(f"--data {_describe(sources)}: files changed while being read ({info.chars} then {at} characters)")
    return out


def _describe(sources: list[Path]) -> str:
    return str(sources[0]) if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more files)"


def map_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    """The token file as a read-only array backed by the page cache, not by process memory.

    Batches read a few hundred bytes from each of many far-apart places; MADV_RANDOM stops the
    kernel from reading (and mapping) megabytes around each one.
    """
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dtype)


@dataclass
class Corpus:
    """A prepared corpus: its vocabulary and the token ids of both splits (memory-mapped)."""

    vocab: list[str]  # index -> one character
    info: CorpusInfo
    tokens: np.ndarray  # [chars] ids, memory-mapped read-only
    split: int  # first validation index: train = tokens[:split], val = tokens[split:]

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split:]

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def validation_start(chars: int) -> int:
    """Index of the first validation character of a corpus of ``chars`` characters: the last VAL_FRACTION."""
    return chars - int(chars * VAL_FRACTION)


def scan_spec(spec: str | os.PathLike, run_dir: Path, errors: str = "strict") -> tuple[list[Path], list[str], CorpusInfo]:
    """The files of ``spec`` (outside the run folder), then their vocabulary and info (``scan_corpus``)."""
    sources = list_sources(spec, exclude=run_dir)
    return (sources, *scan_corpus(sources, errors))


def prepare_corpus(spec: str | os.PathLike, run_dir: Path, errors: str = "strict", vocab: list[str] | None = None,
                   scanned: tuple[list[Path], list[str], CorpusInfo] | None = None) -> Corpus:
    """Scans ``spec``, writes (or reuses) RUNDIR/tokens.bin, and maps it.

    ``vocab`` (from a checkpoint being resumed) must then match the corpus's own. ``scanned`` is what
    ``scan_spec`` returned to a caller that scanned first (the scan is not repeated).
    """
    sources, found, info = scanned or scan_spec(spec, run_dir, errors)
    if vocab is not None and vocab != found:
        raise CorpusError(f"--data {spec}: its vocabulary ({len(found)} characters) differs from the checkpoint's ({len(vocab)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens_path, meta_path = run_dir / TOKENS_FILE, run_dir / TOKENS_META
    meta = {"sha256": info.sha256, "chars": info.chars, "vocab_size": len(found), "dtype": token_dtype(len(found)).name}
    if not (meta_path.is_file() and tokens_path.is_file() and json.loads(meta_path.read_text()) == meta):
        meta_path.unlink(missing_ok=True)  # the meta file is written last: it vouches for a complete tokens file
        encode_corpus(sources, found, info, tokens_path, errors)
        meta_path.write_text(json.dumps(meta) + "\n")
    tokens = map_tokens(tokens_path, np.dtype(meta["dtype"]))
    return Corpus(found, info, tokens, validation_start(info.chars))
