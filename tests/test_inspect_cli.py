"""charrnn-inspect end to end: real model repositories on disk, real files written, real exit codes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from charrnn.inspector.cli import main
from charrnn.inspector.sweep import format_sweep, parse_temperatures, sweep
from charrnn.inspector.trace import InspectError, open_model
from testkit.modelfactory import make_model_repo

VOCAB = "\n !\"#'(),-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz=+"
PLAY = 'ROMEO:\nSay "what (is) it", friend.\n\nJULIET:\nNo; (nay) [yes]\n\n' * 6
CODE = 'def f(x):\n    # say "hi"\n    return g(x, "a(b")  # done\n\n' * 5


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model_repo(root, name="tiny", versions=(1, 2), layers=2, hidden=8, vocab=VOCAB)


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    (tmp_path / "lib.py").write_text(CODE, encoding="utf-8")
    return tmp_path


def test_default_command_writes_one_page_into_the_current_folder(repo, texts, monkeypatch, capsys):
    monkeypatch.chdir(texts)
    assert main([str(repo / "tiny"), "play.txt"]) == 0
    out = capsys.readouterr().out
    page = texts / "inspect-play.html"
    assert page.is_file() and page.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert "tiny@2: lstm 2x8" in out  # MODELS/<name> means its newest version
    assert "speaker heading" in out and "bracket depth" in out and "wrote inspect-play.html" in out


def test_cells_command_and_default_command_write_the_same_analysis(repo, texts, capsys):
    a, b = texts / "a.html", texts / "b.html"
    main(["cells", str(repo), str(texts / "play.txt"), "--out", str(a)])
    first = capsys.readouterr().out.replace(str(a), "PAGE")
    main([str(repo / "tiny" / "2" / "model.onnx"), str(texts / "play.txt"), "--out", str(b)])
    second = capsys.readouterr().out.replace(str(b), "PAGE")
    assert first == second and "c layer" in first
    assert a.read_bytes() == b.read_bytes()


def test_code_text_is_read_as_python_and_gets_comment_and_indentation_features(repo, texts, capsys):
    assert main([str(repo), str(texts / "lib.py"), "--out", str(texts / "code.html"), "--max-chars", "150"]) == 0
    out = capsys.readouterr().out
    assert "syntax python" in out and "inside a comment (#" in out and "indentation" in out
    assert "150 characters" in out


def test_png_dir_holds_one_picture_per_feature_present(repo, texts, capsys):
    pictures = texts / "png"
    main([str(repo), str(texts / "play.txt"), "--out", str(texts / "p.html"), "--png-dir", str(pictures)])
    names = sorted(p.name for p in pictures.iterdir())
    assert names == ["after_newline.png", "brackets.png", "line_position.png", "quotes.png", "speaker.png"]
    for p in pictures.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 50
            assert len(im.getcolors(256) or []) > 4  # coloured text, not a blank canvas
        assert p.stat().st_size < 60_000


def test_start_takes_a_percentage_and_moves_to_the_next_line(repo, texts, capsys):
    main([str(repo), str(texts / "play.txt"), "--out", str(texts / "s.html"), "--start", "50%", "--max-chars", "30"])
    out = capsys.readouterr().out
    offset = int(out.split("(offset ")[1].split(",")[0])
    assert PLAY[offset - 1] == "\n" and offset >= len(PLAY) // 2


def test_sweep_is_reproducible_with_a_seed_and_differs_across_temperatures(repo):
    model = open_model(repo)
    temps = (0.0, 0.5, 1.0, 1.5)
    a = sweep(model, "ROMEO:", temps, seed=7, chars=60)
    b = sweep(model, "ROMEO:", temps, seed=7, chars=60)
    assert a == b
    assert len({s.text for s in a}) == len(temps)  # every temperature gives its own text
    assert all(len(s.text) == 60 and set(s.text) <= set(VOCAB) for s in a)
    assert sweep(model, "ROMEO:", temps, seed=8, chars=60)[2] != a[2]  # another seed, another sample
    # One lane does not depend on the others: the same temperature alone gives the same text.
    assert sweep(model, "ROMEO:", (1.0,), seed=7, chars=60)[0] == a[2]
    # Greedy is the argmax path, whatever the seed.
    assert sweep(model, "ROMEO:", (0.0,), seed=99, chars=60)[0] == a[0]


def test_a_sweep_lane_is_the_text_the_service_generates_for_that_seed(repo):
    import asyncio

    from charrnn.service.cores import ThreadCore
    from charrnn.service.metrics import Metrics
    from charrnn.service.runtime import load_model
    from testkit.requests import generation_request

    served = load_model(repo / "tiny" / "2" / "model.onnx", "tiny", 2, "cpu")
    engine = ThreadCore(served, metrics=Metrics())
    engine.start()

    async def generate(temperature: float) -> str:
        req = generation_request(served.metadata, "ROMEO:", 80, temperature=temperature, seed=5, request_id="sweep")
        return "".join([chunk async for chunk in engine.submit(req)])

    try:
        expected = [asyncio.run(asyncio.wait_for(generate(t), 60)) for t in (0.5, 1.0)]
    finally:
        engine.stop(5.0)
    assert [s.text for s in sweep(open_model(repo), "ROMEO:", (0.5, 1.0), seed=5, chars=80)] == expected


def test_sweep_command_prints_each_temperature_under_a_header(repo, capsys):
    argv = ["sweep", str(repo), "--prime", "ROMEO:", "--temperatures", "0.2,1.3", "--seed", "0", "--chars", "50"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("── temperature ") == 2 and "temperature 0.2 " in out and "temperature 1.3 " in out
    assert out.count("\nROMEO:") == 2
    samples = sweep(open_model(repo), "ROMEO:", (0.2, 1.3), seed=0, chars=50)
    assert format_sweep(samples, "ROMEO:") in out


def test_parse_temperatures():
    assert parse_temperatures("0.2, 0.5,1") == (0.2, 0.5, 1.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "{repo}", "--temperatures", "0.2,hot"],
         "--temperatures must be numbers separated by commas, got '0.2,hot'"),
        (["sweep", "{repo}", "--temperatures", "-1"],
         r"--temperatures must each be in \[0, 100\] \(0 = greedy\), got '-1'"),
        (["sweep", "{repo}", "--chars", "0"], r"--chars must be in \[1, 100000\], got 0"),
        (["sweep", "{repo}", "--prime", "ROMEO~"],
         r"--prime holds characters the model does not know: '~' \(U\+007E TILDE\)"),
        (["sweep", "{texts}/nothing"], "MODEL '.*nothing' is neither a file nor a folder"),
        (["sweep", "{texts}"], "MODEL '.*' holds no model.onnx"),
        (["{repo}", "{texts}/missing.txt"], "TEXTFILE '.*missing.txt' does not exist"),
        (["{repo}", "{texts}/play.txt", "--max-chars", "0"], r"--max-chars must be in \[1, 20000\], got 0"),
        (["{repo}", "{texts}/play.txt", "--start", "x"],
         "--start must be a character offset or a percentage like 90%, got 'x'"),
        (["{repo}", "{texts}/play.txt", "--start", "100%"],
         f"--start must fall inside TEXTFILE's {len(PLAY)} characters, got '100%'"),
        (["{repo}", "{texts}/play.txt", "--top", "0"], r"--top must be in \[1, 50\], got 0"),
        (["{repo}", "{texts}/weird.txt"],
         r"TEXTFILE holds characters the model does not know: '\*' \(U\+002A ASTERISK\), '~'"),
        (["{repo}", "{texts}/latin1.txt"], "TEXTFILE '.*latin1.txt' must be UTF-8 text, got an undecodable byte at 3"),
        (["{texts}/two", "{texts}/play.txt"], "is a model repository holding a, b; name one"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_it(argv, message, repo, texts, capsys):
    (texts / "weird.txt").write_text("ab*c~", encoding="utf-8")
    (texts / "latin1.txt").write_bytes("abc\xe9".encode("latin-1"))
    for name in ("a", "b"):
        (texts / "two" / name / "1").mkdir(parents=True, exist_ok=True)
        (texts / "two" / name / "1" / "model.onnx").symlink_to(repo / "tiny" / "1" / "model.onnx")
    argv = [a.format(repo=repo, texts=texts) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("charrnn-inspect: error: ")
    assert re.search(message, err), err


def test_unknown_drop_leaves_out_what_the_model_does_not_know(repo, texts, capsys):
    (texts / "weird.txt").write_text("ab*c~\nd", encoding="utf-8")
    assert main([str(repo), str(texts / "weird.txt"), "--unknown", "drop", "--out", str(texts / "w.html")]) == 0
    assert "5 characters" in capsys.readouterr().out
    assert "2 unknown characters left out" in (texts / "w.html").read_text(encoding="utf-8")


def test_a_model_that_breaks_the_contract_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(InspectError, match=f"{bad}: onnxruntime cannot load it"):
        open_model(bad)


def test_console_script_runs_without_torch(repo, texts):
    """The bundled model of a fresh clone is inspected with the service's install: no torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from charrnn.inspector.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = texts / "no-torch.html"
    result = subprocess.run(
        [sys.executable, "-c", code, str(repo), str(texts / "play.txt"), "--out", str(out),
         "--png-dir", str(texts / "nt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and len(list((texts / "nt").iterdir())) == 5


def test_png_dir_without_matplotlib_is_refused_before_any_work(repo, texts):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # a service-only install has no matplotlib
        "from charrnn.inspector.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = texts / "never.html"
    result = subprocess.run(
        [sys.executable, "-c", code, str(repo), str(texts / "play.txt"), "--out", str(out), "--png-dir", "x"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--png-dir needs matplotlib and Pillow" in result.stderr and "charrnn[inspect]" in result.stderr
    assert not out.exists()
