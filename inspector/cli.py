"""charrnn-inspect: what the cells of a trained model do, and what temperature does to its samples.

    charrnn-inspect models/shakespeare val.txt                  # = charrnn-inspect cells ...
    charrnn-inspect cells MODEL TEXTFILE --out page.html --png-dir pictures/
    charrnn-inspect sweep MODEL --prime "ROMEO:" --temperatures 0.2,0.5,1.0 --seed 0 --chars 300

MODEL is a model file (.onnx), a version folder, MODELS/<name> (its newest
version) or a repository holding one model. Exit status: 0 done; 2 the input
was refused (the message says which argument and why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from charrnn import commandline
from charrnn.inspector.features import SYNTAXES, features_for, syntax_for
from charrnn.inspector.ranking import rank_cells
from charrnn.inspector.sweep import format_sweep, parse_temperatures, sweep
from charrnn.inspector.trace import InspectError, encode, open_model, trace_text

COMMANDS = ("cells", "sweep")
MAX_CHARS_LIMIT = 20_000  # a page holds layers * hidden * states bytes per character
DEFAULT_TEMPERATURES = "0.2,0.5,0.8,1.0,1.3"
MODEL_HELP = "model.onnx, a version folder, MODELS/<name> (its newest version), or a one-model repository"


def build_parser() -> argparse.ArgumentParser:
    p = commandline.ArgumentParser(
        prog="charrnn-inspect",
        description="Look inside a charrnn model: cells against a text (default command), or a temperature sweep.",
        epilog="charrnn-inspect MODEL TEXTFILE [options] is short for charrnn-inspect cells MODEL TEXTFILE [options]. "
        "See docs/inspect.md.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cells", help="run the model over a text and write one self-contained HTML page")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    c.add_argument("textfile", metavar="TEXTFILE", help="UTF-8 text to run the model over")
    c.add_argument("--out", help="HTML page to write (default: inspect-<TEXTFILE stem>.html in the current folder)")
    c.add_argument("--max-chars", type=int, default=3000,
                   help=f"characters of the text to use, 1 to {MAX_CHARS_LIMIT} (default: 3000)")
    c.add_argument("--start", default="0", help="where to begin: a character offset or a percentage such as 90%% "
                   "(moved forward to the next line start; default: 0)")
    c.add_argument("--syntax", default="auto", choices=("auto", *SYNTAXES),
                   help="how quotes, comments and brackets are read (default: auto: from the file suffix, else prose)")
    c.add_argument("--top", type=int, default=3, help="cells shown per feature (default: 3)")
    c.add_argument("--png-dir", help="also write <feature>.png, the best cell for each feature, into this folder")
    c.add_argument("--unknown", choices=("error", "drop"), default="error",
                   help="characters the model does not know: refuse the text (default) or leave them out")
    c.add_argument("--sweep", metavar="TEMPERATURES", help="add samples at these temperatures, e.g. 0.2,0.8,1.3")
    _sample_args(c)
    s = sub.add_parser("sweep", help="print samples from one prime at several temperatures")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--temperatures", default=DEFAULT_TEMPERATURES,
                   help=f"comma-separated, 0 = greedy (default: {DEFAULT_TEMPERATURES})")
    _sample_args(s)
    return p


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prime", default="", help="text to start from (default: a newline)")
    p.add_argument("--seed", type=int, default=0, help="seed of every temperature's generator (default: 0)")
    p.add_argument("--chars", type=int, default=300, help="characters to sample per temperature (default: 300)")


def read_text(path: str, start: str, max_chars: int) -> tuple[str, int]:
    """(text, offset of its first character in the file): up to ``max_chars`` from ``start``."""
    if not 1 <= max_chars <= MAX_CHARS_LIMIT:
        raise InspectError(f"--max-chars must be in [1, {MAX_CHARS_LIMIT}], got {max_chars}")
    try:
        full = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InspectError(f"TEXTFILE {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise InspectError(f"TEXTFILE {path!r} must be UTF-8 text, got an undecodable byte at {e.start}") from None
    except OSError as e:
        raise InspectError(f"TEXTFILE {path!r} cannot be read: {e.strerror}") from None
    try:
        offset = round(len(full) * float(start[:-1]) / 100) if start.endswith("%") else int(start)
    except ValueError:
        raise InspectError(f"--start must be a character offset or a percentage like 90%, got {start!r}") from None
    if not 0 <= offset < len(full):
        raise InspectError(f"--start must fall inside TEXTFILE's {len(full)} characters, got {start!r} ({offset})")
    if offset > 0 and full[offset - 1] != "\n":
        line_end = full.find("\n", offset)
        offset = offset if line_end < 0 or line_end + 1 >= len(full) else line_end + 1
    return full[offset : offset + max_chars], offset


def run_cells(args: argparse.Namespace) -> int:
    from charrnn.inspector.page import PageSource, render_page  # noqa: PLC0415 (sweep needs neither)

    if not 1 <= args.top <= 50:
        raise InspectError(f"--top must be in [1, 50], got {args.top}")
    temperatures = parse_temperatures(args.sweep) if args.sweep else ()
    if args.png_dir:
        try:  # checked before any work; matplotlib is imported only when pictures are asked for
            from charrnn.inspector.pictures import draw_rankings  # noqa: PLC0415
        except ImportError as e:
            raise InspectError(
                f"--png-dir needs matplotlib and Pillow ({e}); install them with pip install 'charrnn[inspect]'"
            ) from None
    out = Path(args.out) if args.out else Path(f"inspect-{Path(args.textfile).stem}.html")
    # The output folders are made before any work, so that a path that cannot be written fails at once.
    _make_folder(out.parent, "--out", str(out), "a file in a folder that can be made")
    if args.png_dir:
        _make_folder(Path(args.png_dir), "--png-dir", args.png_dir, "a folder that can be made")
    model = open_model(args.model)
    raw, offset = read_text(args.textfile, args.start, args.max_chars)
    text, ids = encode(raw, model.meta, unknown=args.unknown)
    syntax = syntax_for(args.syntax, args.textfile)
    trace = trace_text(model, text, ids)
    rankings = rank_cells(trace, features_for(syntax), top=args.top)
    samples = sweep(model, args.prime, temperatures, seed=args.seed, chars=args.chars) if temperatures else ()
    source = PageSource(args.textfile, offset, syntax.name, dropped=len(raw) - len(text))
    page = render_page(model, trace, rankings, source, samples, args.prime)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise InspectError(f"--out must be a file that can be written, got {str(out)!r}: {e.strerror}") from None
    print(model.describe())
    print(f"{len(text)} characters from {args.textfile} (offset {offset}, syntax {syntax.name})")
    print(f"{'feature':<44} {'best cell':<22} {'r':>7}")
    for r in rankings:
        if not r.best:
            print(f"{r.feature.label:<44} {'(not present in this text)':<22}")
        for k, (unit, rv) in enumerate(r.best):
            print(f"{r.feature.label if k == 0 else '':<44} {unit.describe():<22} {rv:+7.3f}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.png_dir:
        try:
            paths = draw_rankings(trace, rankings, Path(args.png_dir), model_label=model.label)
        except OSError as e:
            raise InspectError(f"--png-dir must be a folder that can be written, got {args.png_dir!r}: "
                               f"{e.strerror}") from None
        for path in paths:
            print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB)")
    return 0


def _make_folder(folder: Path, flag: str, value: str, rule: str) -> None:
    """Makes ``folder`` and its parents; else InspectError "<flag> must be <rule>, got <value>: <why>"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError: a file where a folder has to be
        why = f"{e.filename} is a file" if isinstance(e, FileExistsError) else e.strerror
        raise InspectError(f"{flag} must be {rule}, got {value!r}: {why}") from None


def run_sweep(args: argparse.Namespace) -> int:
    temperatures = parse_temperatures(args.temperatures)
    model = open_model(args.model)
    samples = sweep(model, args.prime, temperatures, seed=args.seed, chars=args.chars)
    print(f"{model.describe()}; prime {args.prime or chr(10)!r}, seed {args.seed}, {args.chars} characters each\n")
    print(format_sweep(samples, args.prime))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["cells", *argv]  # charrnn-inspect MODEL TEXTFILE is the cells command
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_cells(args) if args.command == "cells" else run_sweep(args)
    except InspectError as e:
        parser.exit(2, f"charrnn-inspect: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
