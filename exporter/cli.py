"""charrnn-export: a training checkpoint -> a checked model file in a model repository.

    charrnn-export runs/shakespeare --name shakespeare --repo models/
    # models/shakespeare/<next version>/model.onnx

Exit status: 0 published; 1 the exported graph failed a check (nothing
published); 2 the input was refused (checkpoint, name, version, repository),
or torch and onnx (the `export` extra) are not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from charrnn import commandline
from charrnn import modelfile as mf
from charrnn.exporter import DEFAULT_TOLERANCE
from charrnn.extras import missing_extra

try:  # torch and onnx: the export extra, which the service's install (make run) leaves out; main says so
    from charrnn.exporter.export import ExportError, ExportReport, export_model
    from charrnn.exporter.repository import RepositoryError, publish
    from charrnn.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from charrnn.training.model import CharRNN, ModelConfig
except ModuleNotFoundError as e:
    MISSING: ModuleNotFoundError | None = e
else:
    MISSING = None


def build_parser() -> argparse.ArgumentParser:
    p = commandline.ArgumentParser(
        prog="charrnn-export",
        description="Export a charrnn checkpoint to MODELS/<name>/<version>/model.onnx (docs/model-format.md).",
    )
    p.add_argument(
        "checkpoint", metavar="RUN_OR_CKPT", help="a checkpoint file, or a run folder (its best.pt, else last.pt)"
    )
    p.add_argument("--name", required=True, help=f"model name: {mf.MODEL_NAME_RULE}")
    p.add_argument("--repo", default="models", help="model repository folder (default: models)")
    p.add_argument("--version", type=int, default=None, help="version to publish (default: highest existing + 1)")
    p.add_argument("--force", action="store_true", help="replace the model file of an existing version")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest error accepted on logits and state, |ONNX - PyTorch| / max(1, |PyTorch|) "
        f"(default: {DEFAULT_TOLERANCE:g})",
    )
    return p


def model_from_checkpoint(ck: dict, path: Path) -> CharRNN:
    """Rebuilds the trained model from a loaded checkpoint; errors name the checkpoint file."""
    try:
        model = CharRNN(ModelConfig(**ck["model_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_config {ck['model_config']!r} does not build a model: {e}") from None
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: model weights do not fit model_config: {e}") from None
    return model.eval()


def provenance(ck: dict, path: Path) -> dict:
    """The export_model keyword arguments that record where the weights came from."""
    corpus = ck["corpus"]
    if not isinstance(corpus, dict) or "sha256" not in corpus:
        raise CheckpointError(f"{path}: corpus must be a dict with sha256 and chars, got {corpus!r}")
    # The loss of these very weights: ck["val_loss"] was measured at ck["step"]. best_val_loss
    # only stands in when no evaluation happened at this step (it is then the run's best).
    val_loss = _float(ck.get("val_loss"))
    if math.isnan(val_loss) and "best_val_loss" in ck and path.name == "best.pt":
        val_loss = _float(ck["best_val_loss"])
    return dict(
        val_loss=val_loss,
        train_steps=int(ck["step"]),
        corpus_sha256=str(corpus["sha256"]),
        corpus_chars=int(corpus.get("chars", 0)),
        train_config=ck.get("train_config") or {},
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:  # also refuses nan
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.version is not None and not mf.is_version(str(args.version)):
        parser.error(f"--version must be a positive integer of at most {mf.MAX_VERSION_DIGITS} digits, "
                     f"got {args.version}")
    try:  # before the checkpoint is read: a typo in the name costs nothing
        mf.check_model_name(args.name)
    except ValueError as e:
        print(f"charrnn-export: error: --name: {e}", file=sys.stderr)
        return 2
    if MISSING is not None:
        print(missing_extra("charrnn-export", "export", MISSING), file=sys.stderr)
        return 2
    ck_path = Path(args.checkpoint)
    try:
        ck_path = resolve_checkpoint(args.checkpoint)
        ck = load_checkpoint(ck_path)
        model = model_from_checkpoint(ck, ck_path)
        prov = provenance(ck, ck_path)
        vocab = list(ck["vocab"])

        def write(path: Path) -> ExportReport:
            return export_model(model, vocab, path, tolerance=args.tolerance, **prov)

        final, report = publish(args.repo, args.name, write, version=args.version, force=args.force)
    except (CheckpointError, RepositoryError) as e:
        print(f"charrnn-export: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # export_model refusing the vocabulary or metadata
        print(f"charrnn-export: {ck_path}: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"charrnn-export: nothing published under {Path(args.repo) / args.name}: {e.reason}", file=sys.stderr)
        return 1
    except OSError as e:  # the repository folder cannot be made or written
        where = f"{e.filename}: " if e.filename else ""
        print(f"charrnn-export: nothing published under {Path(args.repo) / args.name}: {where}{e.strerror or e}",
              file=sys.stderr)
        return 2
    report = dataclasses.replace(report, path=final)
    print(f"checkpoint  {ck_path}")
    print(describe(report))
    return 0


def describe(report: ExportReport) -> str:
    """The short report printed after a successful export."""
    m = report.metadata
    lines = [
        f"wrote       {report.path} ({report.size_bytes} bytes)",
        f"model       {m.cell} layers={m.layers} hidden={m.hidden} embed_dim={m.embed_dim} vocab={m.vocab_size}",
        f"provenance  val_loss={m.val_loss:.4f} train_steps={m.train_steps} "
        f"corpus_sha256={m.corpus_sha256[:12] or '-'} corpus_chars={m.corpus_chars}",
        f"parity      max|d logits|={report.max_delta_logits:.3g} max|d state|={report.max_delta_state:.3g} "
        f"error={report.max_error:.3g} (tolerance {report.tolerance:g} on |d| / max(1, |torch|))",
    ]
    lines += [f"            {p.describe()}" for p in report.parity]
    return "\n".join(lines)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


if __name__ == "__main__":
    sys.exit(main())
