"""Simple properties of a text, one number per character, to hold cells up against.

Every extractor is a pure function of the string and returns float64 ``[len(text)]``.
Value ``i`` describes the reader's situation *after reading character i*, the
moment the cell activation recorded at ``i`` was computed: an opening quote is
already inside the quotation (1), the closing quote is outside again (0), a
newline is at line position 0.

Quotes, comments and brackets depend on what kind of text it is (``Syntax``).
In prose only ``"`` marks a quotation: the apostrophe is far more often an
apostrophe (``Call'd``, ``'tis``, ``o'er``) than a quote, so counting it would
"open" a quotation at every elision and never close it. In code both ``'`` and
``"`` open strings, a backslash escapes the next character, and quotes inside
comments (``# don't``) are not strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

_OPEN = "([{"
_CLOSE = ")]}"


@dataclass(frozen=True)
class Syntax:
    name: str  # shown on the page and in errors
    quotes: str  # characters that open (and close) a quotation or string literal
    comments: tuple[str, ...]  # markers that start a comment running to the end of the line
    code: bool  # backslash escapes; strings end at a newline unless triple-quoted;
    # brackets inside strings and comments do not count
    triple_quotes: bool = False  # Python's ''' and """ strings, which may span lines


SYNTAXES = {
    "prose": Syntax("prose", quotes='"', comments=(), code=False),
    "python": Syntax("python", quotes="'\"", comments=("#",), code=True, triple_quotes=True),
    # C, C++, Java, JavaScript, Go, Rust: // comments (block comments are not tracked).
    "c": Syntax("c", quotes="'\"`", comments=("//",), code=True),
}

# File suffix -> syntax, for --syntax auto. Anything else reads as prose.
SUFFIX_SYNTAX = {
    ".py": "python",
    ".pyi": "python",
    **{s: "c" for s in (".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs")},
}


def syntax_for(name: str, path: str = "") -> Syntax:
    """The Syntax called ``name``; ``auto`` picks one from the suffix of ``path``."""
    if name == "auto":
        suffix = path[path.rfind(".") :].lower() if "." in path else ""
        return SYNTAXES[SUFFIX_SYNTAX.get(suffix, "prose")]
    if name not in SYNTAXES:
        raise ValueError(f"syntax must be one of auto, {', '.join(SYNTAXES)}, got {name!r}")
    return SYNTAXES[name]


def lex(text: str, syntax: Syntax) -> tuple[np.ndarray, np.ndarray]:
    """(in_string, in_comment), each 0/1 float64 ``[len(text)]``.

    A comment marker's own characters count as inside the comment; the newline
    that ends a comment is outside it. A backslash and the character it escapes
    are inside the string.
    """
    n = len(text)
    in_string = np.zeros(n)
    in_comment = np.zeros(n)
    i = 0
    quote = ""  # the delimiter of the open string ("'" or '"""'), "" when outside
    while i < n:
        ch = text[i]
        if quote:
            if syntax.code and ch == "\\" and i + 1 < n:  # an escaped newline continues the string
                in_string[i : i + 2] = 1
                i += 2
                continue
            if text.startswith(quote, i):
                in_string[i : i + len(quote) - 1] = 1  # closed once its last character is read
                i += len(quote)
                quote = ""
                continue
            if ch == "\n" and syntax.code and len(quote) == 1:
                quote = ""  # an unterminated one-line string ends with its line
                i += 1
                continue
            in_string[i] = 1
            i += 1
            continue
        marker = next((m for m in syntax.comments if text.startswith(m, i)), "")
        if marker:
            end = text.find("\n", i)
            end = n if end < 0 else end
            in_comment[i:end] = 1
            i = end
            continue
        if ch in syntax.quotes:
            triple = ch * 3
            quote = triple if syntax.triple_quotes and text.startswith(triple, i) else ch
            in_string[i : i + len(quote)] = 1
            i += len(quote)
            continue
        i += 1
    return in_string, in_comment


def in_quotes(text: str, syntax: Syntax) -> np.ndarray:
    """1 inside a quotation (prose) or string literal (code), else 0."""
    return lex(text, syntax)[0]


def in_comment(text: str, syntax: Syntax) -> np.ndarray:
    """1 inside a comment (from its marker to the end of the line), else 0."""
    return lex(text, syntax)[1]


def bracket_depth(text: str, syntax: Syntax) -> np.ndarray:
    """How many of ( [ { are open; an unmatched closer leaves the depth at 0."""
    depth = np.zeros(len(text))
    if syntax.code:
        in_string, in_comment_ = lex(text, syntax)
        counted = (in_string == 0) & (in_comment_ == 0)
    else:
        counted = np.ones(len(text), dtype=bool)
    d = 0
    for i, ch in enumerate(text):
        if counted[i]:
            if ch in _OPEN:
                d += 1
            elif ch in _CLOSE:
                d = max(0, d - 1)
        depth[i] = d
    return depth


def line_position(text: str) -> np.ndarray:
    """Characters of the current line read so far: 0 at a newline, 1 at the line's first character."""
    pos = np.zeros(len(text))
    col = 0
    for i, ch in enumerate(text):
        col = 0 if ch == "\n" else col + 1
        pos[i] = col
    return pos


def after_newline(text: str) -> np.ndarray:
    """1 at each newline (the next character starts a line), else 0."""
    return np.array([1.0 if ch == "\n" else 0.0 for ch in text])


def indentation(text: str) -> np.ndarray:
    """Leading spaces and tabs of the current line read so far (a tab counts 1); held to the line's end."""
    out = np.zeros(len(text))
    indent = 0
    leading = True
    for i, ch in enumerate(text):
        if ch == "\n":
            indent, leading = 0, True
        elif leading and ch in " \t":
            indent += 1
        else:
            leading = False
        out[i] = indent
    return out


_HEADING = re.compile(r"[^\n:]{1,40}:")  # "ROMEO:", "First Citizen:", "KING RICHARD III:"


def speaker_heading(text: str) -> np.ndarray:
    """1 on a line that names a speaker, as in a play: a short line ending in ':' after a blank line.

    The newline that ends the heading is outside it (the speech begins).
    """
    out = np.zeros(len(text))
    start = 0
    for line in text.split("\n"):
        blank_before = start == 0 or text[max(0, start - 2) : start] == "\n\n"
        if blank_before and _HEADING.fullmatch(line):
            out[start : start + len(line)] = 1
        start += len(line) + 1
    return out


@dataclass(frozen=True)
class Feature:
    name: str  # identifier: file names, page anchors
    label: str  # what a reader sees
    extract: Callable[[str], np.ndarray]


def features_for(syntax: Syntax) -> tuple[Feature, ...]:
    """The features worth testing cells against in this kind of text."""
    quote_label = 'inside "quotes"' if not syntax.code else "inside a string literal"
    found = [
        Feature("quotes", quote_label, lambda t: in_quotes(t, syntax)),
        Feature("brackets", "bracket depth ( [ {", lambda t: bracket_depth(t, syntax)),
        Feature("line_position", "position in the line", line_position),
        Feature("after_newline", "just after a newline", after_newline),
    ]
    if syntax.comments:
        found.append(Feature("comment", f"inside a comment ({' '.join(syntax.comments)} to end of line)",
                             lambda t: in_comment(t, syntax)))
    if syntax.code:
        found.append(Feature("indentation", "indentation of the line", indentation))
    else:
        found.append(Feature("speaker", "speaker heading (NAME:)", speaker_heading))
    return tuple(found)
