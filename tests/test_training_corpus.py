"""Corpus preparation: sources, vocabulary, hashing, the token file, the split, and decoding errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from charrnn.training import corpus as corpus_mod
from charrnn.training.batches import Lanes, train_lanes, val_lanes
from charrnn.training.corpus import CorpusError, list_sources, prepare_corpus, scan_corpus, token_dtype


def test_vocabulary_is_sorted_code_points_and_sha256_covers_the_bytes(tmp_path):
    text = "hello, world\nzebra ABC"
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    vocab, info = scan_corpus([f])
    assert vocab == sorted(set(text))
    assert info.chars == len(text)
    assert info.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_token_file_round_trips_and_last_tenth_is_validation(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    (tmp_path / "c.txt").write_text(text)
    c = prepare_corpus(tmp_path / "c.txt", tmp_path / "run")
    assert c.tokens.dtype == np.uint8
    assert c.decode(c.tokens) == text
    assert len(c.val) == 100 and c.decode(c.val) == text[-100:]
    assert c.decode(c.train) == text[:900]


def test_unicode_corpus_vocab_round_trips_exactly(tmp_path):
    # Cyrillic, CJK, emoji (outside the BMP), a combining accent, and a character past U+FFFF in the middle
    text = "Привет, мир! 你好世界 🙂🚀 e\u0301 café 𝄞 " * 50
    f = tmp_path / "u.txt"
    f.write_text(text, encoding="utf-8")
    c = prepare_corpus(f, tmp_path / "run")
    assert c.vocab == sorted(set(text))
    assert "\u0301" in c.vocab and "🙂" in c.vocab and "𝄞" in c.vocab
    assert c.decode(c.tokens) == text


def test_chunk_boundary_inside_a_multibyte_character(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 5)  # splits most 3- and 4-byte characters across reads
    text = "ab你好🙂cd" * 20
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    c = prepare_corpus(tmp_path / "u.txt", tmp_path / "run")
    assert c.decode(c.tokens) == text


@pytest.mark.parametrize("size,dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_token_dtype_is_the_smallest_that_holds_the_vocabulary(size, dtype):
    assert token_dtype(size) == dtype


def test_large_vocabulary_uses_uint16_tokens(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    (tmp_path / "cjk.txt").write_text(text)
    c = prepare_corpus(tmp_path / "cjk.txt", tmp_path / "run")
    assert c.tokens.dtype == np.uint16 and len(c.vocab) == 300
    assert c.decode(c.tokens) == text


def test_directory_reads_text_files_recursively_in_sorted_order_and_skips_binary(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "2.txt").write_text("BBB")
    (src / "a.txt").write_text("AAA")
    (src / "c.md").write_text("CCC")
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    (src / ".hidden").write_text("HHH")
    assert [p.name for p in list_sources(src)] == ["a.txt", "2.txt", "c.md"]
    c = prepare_corpus(src, tmp_path / "run")
    assert c.decode(c.tokens) == "AAABBBCCC"
    assert len(c.info.sources) == 3


def test_run_folder_inside_the_corpus_directory_is_not_read_as_text(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh" * 20)
    first = prepare_corpus(tmp_path, tmp_path / "run")
    (tmp_path / "run" / "samples.txt").write_text("zzz")  # what a run writes beside its tokens
    again = prepare_corpus(tmp_path, tmp_path / "run")
    assert again.info.sources == first.info.sources == [str(tmp_path / "a.txt")]
    assert again.info.sha256 == first.info.sha256


def test_glob_selects_files_as_one_corpus(tmp_path):
    for name, body in [("x1.txt", "one "), ("x2.txt", "two "), ("y.txt", "nope")]:
        (tmp_path / name).write_text(body)
    files = list_sources(str(tmp_path / "x*.txt"))
    assert [p.name for p in files] == ["x1.txt", "x2.txt"]
    _, info = scan_corpus(files)
    assert info.sha256 == hashlib.sha256(b"one two ").hexdigest()


@pytest.mark.parametrize("spec,message", [("missing.txt", "no such file"), ("nothing*.txt", "matches no files")])
def test_bad_data_path_is_a_clear_error(tmp_path, spec, message):
    with pytest.raises(CorpusError, match=message):
        list_sources(str(tmp_path / spec))


def test_undecodable_bytes_name_the_file_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 7)  # the bad byte lies in a later chunk
    f = tmp_path / "bad.txt"
    f.write_bytes("héllo wörld ".encode() + b"\xff" + b" tail")
    offset = len("héllo wörld ".encode())
    with pytest.raises(CorpusError, match=rf"bad.txt: not valid UTF-8 at byte offset {offset} \(bytes ff"):
        scan_corpus([f])
    vocab, info = scan_corpus([f], errors="replace")
    assert "\ufffd" in vocab and info.chars == len("héllo wörld ") + 1 + len(" tail")


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        scan_corpus([tmp_path / "e.txt"])


def test_token_file_is_reused_only_when_the_corpus_is_unchanged(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("abcabc" * 100)
    run = tmp_path / "run"
    prepare_corpus(f, run)
    stamp = (run / "tokens.bin").stat().st_mtime_ns
    prepare_corpus(f, run)
    assert (run / "tokens.bin").stat().st_mtime_ns == stamp
    f.write_text("xyzxyz" * 100)
    c = prepare_corpus(f, run)
    assert c.decode(c.tokens[:3]) == "xyz"


def test_lanes_continue_from_one_batch_to_the_next():
    tokens = np.arange(1000, dtype=np.uint16)
    lanes = train_lanes(tokens, batch_size=4, seq_len=10)
    assert lanes.lane_len == 249 and lanes.windows == 24
    x0, y0 = lanes.window(0)
    x1, _ = lanes.window(1)
    assert x0.shape == (4, 10) and x0.dtype == np.int64
    assert (y0[:, :-1] == x0[:, 1:]).all()  # targets are the next characters
    assert (x1[:, 0] == x0[:, -1] + 1).all()  # each lane goes on where it stopped
    assert list(x0[:, 0]) == [0, 249, 498, 747]  # lanes are contiguous blocks


def test_ranks_own_disjoint_lanes():
    tokens = np.arange(1000, dtype=np.uint16)
    a = train_lanes(tokens, 2, 10, rank=0, world=2).window(0)[0]
    b = train_lanes(tokens, 2, 10, rank=1, world=2).window(0)[0]
    assert set(a[:, 0]).isdisjoint(b[:, 0]) and sorted([*a[:, 0], *b[:, 0]]) == list(Lanes(tokens, 10, 4).window(0)[0][:, 0])


def test_too_short_splits_are_errors_naming_the_flags():
    with pytest.raises(CorpusError, match=r"training split has 100 characters.*--batch-size 8 x --seq-len 16 needs at least 129"):
        train_lanes(np.zeros(100, np.uint8), 8, 16)
    with pytest.raises(CorpusError, match=r"validation split .* has 10 characters.*--seq-len 16 needs at least 17"):
        val_lanes(np.zeros(10, np.uint8), 16)
