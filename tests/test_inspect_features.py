"""The inspector's text features and cell ranking, on hand-written strings with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.inspector import features as ft
from charrnn.inspector.ranking import feature_window, pearson, rank_cells
from charrnn.inspector.trace import Trace

PROSE = ft.SYNTAXES["prose"]
PYTHON = ft.SYNTAXES["python"]
C = ft.SYNTAXES["c"]


def bits(s: str) -> list[float]:
    """'0110' -> [0, 1, 1, 0]: expected arrays written under the text they describe."""
    return [float(b) for b in s]


@pytest.mark.parametrize(
    "text, syntax, expected",
    [
        ('a "bc" d', PROSE, "00111000"),  # opening quote inside, closing quote outside
        ("Call'd 'tis", PROSE, "00000000000"),  # apostrophes are not quotes in prose
        ('x"a\nb"y', PROSE, "0111100"),  # a quotation may run over a line break
        ("s = 'a#b' # it's", PYTHON, "0000111100000000"),  # '#' inside a string is not a comment
        ("'a\\'b'", PYTHON, "111110"),  # an escaped quote does not close the string
        ('"""a\nb""" x', PYTHON, "11111111000"),  # triple quotes span lines
        ("'ab\nc", PYTHON, "11100"),  # an unterminated one-line string ends with its line
        ("x = `a` // it's", C, "000011000000000"),
    ],
)
def test_in_quotes(text, syntax, expected):
    assert ft.in_quotes(text, syntax).tolist() == bits(expected)


@pytest.mark.parametrize(
    "text, syntax, expected",
    [
        ("s = 'a#b' # it's\nx", PYTHON, "000000000011111100"),  # the newline ends the comment, outside it
        ("x // don't\ny", C, "001111111100"),
        ("a = 1 // 2", PYTHON, "0000000000"),  # floor division is not a comment in Python
        ("# a\n#", PROSE, "00000"),  # prose has no comments
    ],
)
def test_in_comment(text, syntax, expected):
    assert ft.in_comment(text, syntax).tolist() == bits(expected)


@pytest.mark.parametrize(
    "text, syntax, expected",
    [
        ("(a[b)c)]", PROSE, [1, 1, 2, 2, 1, 1, 0, 0]),  # an unmatched closer leaves depth at 0
        ('f("(", x)', PYTHON, [0, 1, 1, 1, 1, 1, 1, 1, 0]),  # a bracket inside a string does not count
        ("{x} # (", PYTHON, [1, 1, 0, 0, 0, 0, 0]),  # nor one inside a comment
        ('("(")', PROSE, [1, 1, 2, 2, 1]),  # in prose, brackets count inside quotations too
    ],
)
def test_bracket_depth(text, syntax, expected):
    assert ft.bracket_depth(text, syntax).tolist() == [float(v) for v in expected]


def test_line_position_counts_characters_read_in_the_line():
    assert ft.line_position("ab\ncd\n").tolist() == [1, 2, 0, 1, 2, 0]
    assert ft.line_position("\n\nx").tolist() == [0, 0, 1]


def test_after_newline_marks_each_newline():
    assert ft.after_newline("ab\ncd\n").tolist() == bits("001001")


def test_indentation_grows_through_leading_blanks_and_holds_to_the_line_end():
    assert ft.indentation("  a b\n\tx\n").tolist() == [1, 2, 2, 2, 2, 0, 1, 1, 0]


def test_speaker_heading_is_a_short_line_ending_in_colon_after_a_blank_line():
    text = "ROMEO:\nHi: there\nSay:\n\nJULIET:\nx"
    expected = "111111" + "0" + "0" * 9 + "0" + "0000" + "0" + "0" + "1111111" + "0" + "0"
    assert ft.speaker_heading(text).tolist() == bits(expected)


def test_every_extractor_returns_one_value_per_character():
    text = "def f(x):\n    return 'a' # b\n"
    for syntax in ft.SYNTAXES.values():
        for feature in ft.features_for(syntax):
            assert feature.extract(text).shape == (len(text),), feature.name


def test_features_follow_the_kind_of_text():
    prose = {f.name for f in ft.features_for(PROSE)}
    code = {f.name for f in ft.features_for(PYTHON)}
    assert {"quotes", "brackets", "line_position", "after_newline", "speaker"} == prose
    assert {"quotes", "brackets", "line_position", "after_newline", "comment", "indentation"} == code


@pytest.mark.parametrize(
    "name, path, expected",
    [("auto", "x/lib.py", "python"), ("auto", "main.C", "c"), ("auto", "val.txt", "prose"), ("auto", "README", "prose"),
     ("c", "x.py", "c")],
)
def test_syntax_for(name, path, expected):
    assert ft.syntax_for(name, path).name == expected


def test_syntax_for_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="syntax must be one of auto, prose, python, c, got 'cobol'"):
        ft.syntax_for("cobol")


def test_pearson_on_hand_computed_columns():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    columns = np.stack(
        [[2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 2.0, 3.0]],
        axis=1,
    )
    # Last column: deviations (-1, 0, 0, 1) against (-1.5, -.5, .5, 1.5): 3 / sqrt(2 * 5).
    expected = [1.0, -1.0, 0.0, 0.0, 3 / np.sqrt(10)]
    assert pearson(x, columns) == pytest.approx(expected)
    assert pearson(np.ones(4), columns) == pytest.approx([0.0] * 5)  # a constant feature correlates with nothing


def test_rank_cells_finds_the_unit_that_is_the_feature():
    text = "ab\ncde\nf\n" * 20
    rng = np.random.default_rng(0)
    T = len(text)
    h = rng.uniform(-0.5, 0.5, (T, 2, 6)).astype(np.float32)
    c = rng.uniform(-0.5, 0.5, (T, 2, 6)).astype(np.float32)
    position = ft.line_position(text)
    c[:, 1, 4] = -position / 3  # c, layer 2, cell 4 counts the line position, with a negative sign
    h[:, 0, 2] = ft.after_newline(text)
    trace = Trace(text=text, states={"c": c, "h": h}, logits=np.zeros((T, 3), np.float32))
    ranks = {r.feature.name: r for r in rank_cells(trace, ft.features_for(PROSE), top=2)}
    (unit, r), _ = ranks["line_position"].best
    assert (unit.state, unit.layer, unit.cell) == ("c", 1, 4) and r == pytest.approx(-1.0)
    (unit, r), _ = ranks["after_newline"].best
    assert (unit.state, unit.layer, unit.cell) == ("h", 0, 2) and r == pytest.approx(1.0)
    assert not ranks["quotes"].present and ranks["quotes"].best == ()  # no '"' in the text


def test_feature_window_starts_at_a_line_and_covers_where_the_feature_changes():
    text = "".join(f"line {i:02d}\n" for i in range(60))  # 8 characters per line
    values = np.zeros(len(text))
    values[400:404] = 1  # in line 50
    start, end = feature_window(values, text, width=80)
    assert start == 0 or text[start - 1] == "\n"
    assert start <= 400 and 404 <= end and end - start == 80
    assert feature_window(values, "short", width=80) == (0, 5)
