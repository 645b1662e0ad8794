"""`charrnn-generate`: stream text from a charrnn server to stdout, score a text, or list the models.

    charrnn-generate --prime "ROMEO:" --max-chars 300 --temperature 0.8
    charrnn-generate --server host:50051 --tls-ca ca.pem --list
    charrnn-generate -n 20 --regex '[A-Z][a-z]+\n' --max-chars 20 --seed 1      # 20 names, one request
    charrnn-generate --score play.txt --prime "ROMEO:"                           # bits per character
    charrnn-generate --prime "ROMEO:" --max-chars 20 --logprobs 3                # log-probabilities on stderr

Text is written as it arrives (flushed per chunk). Exit status: 0 done; 1 the
server refused or ended the call (the gRPC status and the server's message on
stderr: INVALID_ARGUMENT names the request field and the rule); 2 a flag this
command refuses before it connects (a value the request cannot carry, an
unreadable --score file, --timeout <= 0, a --bias that is not C=V): the usage,
then "charrnn-generate: error: <flag> must be <rule>, got <value>".
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from charrnn import commandline
from charrnn.service.client import FieldError, GeneratorClient, ServiceError, build_request

FLAGS = {"n": "-n"}  # request fields whose flag is not --<field-with-dashes>


def build_parser() -> argparse.ArgumentParser:
    p = commandline.ArgumentParser(prog="charrnn-generate", description="Sample text from a charrnn server.")
    p.add_argument("--server", default=os.environ.get("CHARRNN_SERVER", "localhost:50051"),
                   help="host:port of the server, several separated by commas, or dns:///name:port (every "
                        "replica behind a name); a stream cut by its replica's death or drain resumes on another "
                        "with the same text. Env CHARRNN_SERVER. Default: localhost:50051.")
    p.add_argument("--max-resumes", type=int, default=None,
                   help="Times a cut stream is resumed on another replica before the call fails; 0: never. "
                        "Default: 5 with several addresses or a dns:/// name, 0 with one host:port.")
    p.add_argument("--model", default="", help='"name" or "name@version"; empty means the server\'s default model.')
    p.add_argument("--prime", default="", help="Text the model reads before sampling; echoed first unless --no-echo.")
    p.add_argument("--max-chars", type=int, default=300, help="Characters to generate. Default: 300.")
    p.add_argument("--temperature", type=float, default=None, help="Softmax temperature; 0 is greedy. Default: 1.0.")
    p.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely characters; 0 is off.")
    p.add_argument("--top-p", type=float, default=0.0, help="Nucleus sampling mass in (0, 1]; 0 is off.")
    p.add_argument("--seed", type=int, default=None, help="Seed: the same request gives the same text.")
    p.add_argument("--stop", action="append", default=[], help="Stop sequence (repeat for several).")
    p.add_argument("--request-id", default="", help="Id that appears in the server's logs for this request.")
    p.add_argument("-n", type=int, default=1, help="Samples from the same prime (sample i seeded seed + i).")
    p.add_argument("--logprobs", type=int, default=0,
                   help="With each character its log-probability and the N most likely, printed on stderr.")
    p.add_argument("--regex", default="", help="The generated text must match this regular expression.")
    p.add_argument("--allowed-chars", default="", help="Only these characters can be generated.")
    p.add_argument("--bias", action="append", default=[], metavar="C=V",
                   help="Add V (in [-100, 100]) to the logit of character C (repeat; \\n for a newline).")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="In [-2, 2]; 0 is off.")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="In [-2, 2]; 0 is off.")
    p.add_argument("--repetition-penalty", type=float, default=0.0, help="In (0, 10]; 0 or 1 is off.")
    p.add_argument("--score", metavar="FILE",
                   help="Score FILE's text (- for stdin) after --prime instead: print bits per character.")
    p.add_argument("--timeout", type=float, default=None, help="Deadline of the whole call, in seconds.")
    p.add_argument("--no-echo", action="store_true", help="Do not print the prime before the generated text.")
    p.add_argument("--stats", action="store_true", help="Print the stream's stats on stderr at the end.")
    p.add_argument("--list", action="store_true", help="List the server's models and exit.")
    p.add_argument("--tls", action="store_true", help="Use TLS with the system's trusted roots.")
    p.add_argument("--tls-ca", default="", help="PEM CA that signed the server's certificate (turns on TLS).")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for servers that require mutual TLS.")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert.")
    return p


def _print_models(client: GeneratorClient) -> None:
    rows = [("MODEL", "CELL", "LAYERS", "HIDDEN", "VOCAB", "VAL_LOSS", "DEVICE", "STATE", "")]
    for m in client.list_models():
        marks = ", ".join(w for w, on in (("latest", m.latest), ("default", m.is_default)) if on)
        rows.append((f"{m.name}@{m.version}", m.cell, str(m.layers), str(m.hidden), str(m.vocab_size),
                     f"{m.validation_loss:.4f}", m.device, m.state, marks))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _biases(items: list[str]) -> dict[str, float]:
    """--bias C=V flags as logit_bias (C may be written \\n or \\t)."""
    out = {}
    for item in items:
        char, sep, value = item.rpartition("=")
        char = {"\\n": "\n", "\\t": "\t"}.get(char, char)
        if not sep:
            raise ValueError(f"--bias must be C=V (a character, a number), got {item!r}")
        try:
            out[char] = float(value)
        except ValueError:
            raise ValueError(f"--bias value must be a number, got {value!r} in {item!r}") from None
    return out


def _print_logprobs(entries, prefix: str = "") -> None:
    for e in entries:
        top = "  ".join(f"{a.char!r} {a.logprob:.3f}" for a in e.top)
        print(f"{prefix}{e.char!r}\t{e.logprob:.4f}\t{top}", file=sys.stderr)


def _score_text(parser: argparse.ArgumentParser, path: str) -> str:
    """The text of --score FILE (- for stdin); a file that cannot be read is a usage error."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        parser.error(f"--score must be a UTF-8 text file, got {path!r}: an undecodable byte at {e.start}")
    except OSError as e:
        parser.error(f"--score must be a readable text file (or - for stdin), got {path!r}: {e.strerror}")


def _request_fields(parser: argparse.ArgumentParser, args) -> dict:
    """The flags as GenerateRequest fields, refused before connecting when the request cannot carry them.

    Whether the server accepts them (ranges, the model's vocabulary, the regex) is the server's
    to say: it answers INVALID_ARGUMENT naming the field."""
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    try:
        bias = _biases(args.bias)
    except ValueError as e:
        parser.error(str(e))
    fields = dict(prime=args.prime, max_chars=args.max_chars, model=args.model, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, request_id=args.request_id,
                  n=args.n, logprobs=args.logprobs, regex=args.regex, allowed_chars=args.allowed_chars,
                  logit_bias=bias, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)
    try:
        build_request(**fields)
    except FieldError as e:
        flag = FLAGS.get(e.field, "--" + e.field.replace("_", "-"))
        parser.error(f"{flag} must be {e.rule}, got {e.value}")
    return fields


def _score(client: GeneratorClient, args, text: str, out) -> int:
    reply = client.score(text, args.prime, model=args.model, top_logprobs=args.logprobs, timeout=args.timeout)
    if args.logprobs:
        _print_logprobs(reply.logprobs)
    out.write(f"{reply.model}: {reply.bits_per_char:.4f} bits per character ({reply.nats_per_char:.4f} nats, "
              f"{len(reply.logprobs)} characters, total log-probability {reply.total_logprob:.2f})\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fields = _request_fields(parser, args)
    if args.max_resumes is not None and args.max_resumes < 0:
        parser.error(f"--max-resumes must be >= 0 (0: never resume), got {args.max_resumes}")
    resumes = logging.StreamHandler(sys.stderr)  # each resume on its own line: "charrnn-generate: stream cut ..."
    resumes.setFormatter(logging.Formatter("charrnn-generate: %(message)s"))
    logging.getLogger("charrnn.client").addHandler(resumes)
    text = _score_text(parser, args.score) if args.score else ""
    try:
        client = GeneratorClient(args.server, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key, max_resumes=args.max_resumes)
    except ValueError as e:  # unreadable TLS files
        print(f"charrnn-generate: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    try:
        with client:
            if args.list:
                _print_models(client)
                return 0
            if args.score:
                return _score(client, args, text, out)
            stream = client.generate(timeout=args.timeout, **fields)
            echo = "" if args.no_echo else args.prime
            if args.n > 1:  # the samples come mixed: each is printed whole at the end
                for _ in stream:
                    pass
                for i in sorted(stream.texts):
                    out.write(f"--- sample {i} ({stream.finish_reasons.get(i, '')})\n{echo}{stream.texts[i]}\n")
            else:
                # The prime is echoed with the first chunk, so a refused request prints nothing on stdout.
                for text in stream:
                    out.write(echo + text)
                    out.flush()
                    echo = ""
                out.write(echo + "\n")
            out.flush()
            for i in sorted(stream.logprobs):
                _print_logprobs(stream.logprobs[i], f"sample {i}: " if args.n > 1 else "")
            for i, s in sorted(stream.all_stats.items()) if args.stats else ():
                resumed = f", resumed {stream.resumes} time{'s' if stream.resumes > 1 else ''}" if stream.resumes else ""
                print(f"{s.model}: {s.generated_chars} chars{resumed}, finish {stream.finish_reasons[i]}, seed {s.seed}, "
                      f"queue {s.queue_seconds:.3f}s prefill {s.prefill_seconds:.3f}s decode {s.decode_seconds:.3f}s "
                      f"total {s.total_seconds:.3f}s", file=sys.stderr)
    except ServiceError as e:
        out.flush()
        print(f"charrnn-generate: {e} (server {args.server})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
