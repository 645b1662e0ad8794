"""The model repository: MODELS/<name>/<version>/model.onnx on disk is the whole story of what serves.

``load`` opens every model file (each with its own Engine); ``reload`` rescans:
new versions start serving new requests, a version whose file is gone stops
taking new streams while the ones in flight finish on it, and a file that fails
its checks is refused while what served before keeps serving. ``resolve`` turns
the request's model field ("" | "name" | "name@version") into a loaded entry,
without ever using that field to open a path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from charrnn import modelfile as mf
from charrnn.service import errors, protocol
from charrnn.service.metrics import Metrics
from charrnn.service.engine import Engine, EngineState, RestartPolicy, SupervisedEngine

DEFAULT_NAME = "default"  # the default model when --default-model is not given, if it exists


class RepositoryError(RuntimeError):
    """No usable model, or the repository folder itself is unusable. The message lists each path and why."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: int
    latest: bool  # the newest loaded version of `name` (what "name" resolves to)
    is_default: bool  # what "" resolves to
    model: object  # cores.ServedModel (a core process) or runtime.LoadedModel (in-process): metadata, device
    engine: Engine

    @property
    def state(self) -> EngineState:
        return self.engine.state


@dataclass
class ReloadSummary:
    added: list[str] = field(default_factory=list)  # "name@version"
    replaced: list[str] = field(default_factory=list)  # same version, new file
    removed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "<path>: <reason>"

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(items)}" for what, items in
                 (("added", self.added), ("replaced", self.replaced), ("removed", self.removed),
                  ("refused", self.refused)) if items]
        return "; ".join(parts) or "no changes"


@dataclass
class Loaded:
    """One served version in a ModelTable: the repository's (a SupervisedEngine, with the file's signature) or
    another front-end's (a RemoteEngine, frontend.py)."""

    model: object  # as first loaded (a restart loads the same file anew: engine.model)
    engine: Engine
    signature: tuple = ()  # (inode, size, mtime_ns) of the file when loaded; the repository's only


def _signature(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelTable:
    """What "", "name" and "name@version" mean, over a table (name, version) -> Loaded.

    The repository fills the table from disk; another front-end process fills it
    from what the repository published (frontend.py). The table is replaced
    whole, never changed, so lookups on the event loop see a consistent one.
    """

    _table: dict = {}
    _explicit_default: str | None = None  # --default-model

    def _names(self) -> set[str]:
        return {name for name, _ in self._table}

    @property
    def default_model(self) -> str | None:
        """--default-model if given; else "default" if it exists; else the alphabetically first name."""
        if self._explicit_default:
            return self._explicit_default
        names = self._names()
        if DEFAULT_NAME in names:
            return DEFAULT_NAME
        return min(names) if names else None

    def resolve(self, model_field: str) -> ModelEntry:
        """Turns the request's model field ("", "name" or "name@version") into its entry; never opens a path."""
        table = self._table
        name, sep, version_text = model_field.partition("@")
        if model_field == "":
            name = self.default_model or ""
            if not name:
                raise errors.ModelNotFound("no model is loaded")
        try:
            mf.check_model_name(name)
        except mf.ModelFormatError:
            raise errors.InvalidArgument(
                "model", model_field, f"'' or 'name' or 'name@version' with a name of {mf.MODEL_NAME_RULE}"
            ) from None
        if sep:
            v = version_text
            if not mf.is_version(v):
                raise errors.InvalidArgument("model", model_field, f"'name@version' with a version that is {mf.VERSION_RULE}")
            version = int(v)
        else:
            versions = [ver for n, ver in table if n == name]
            version = max(versions) if versions else 0
        if (name, version) not in table:
            raise errors.ModelNotFound(f"model {errors.shown(model_field)} is not served here; {self._listing(table)}")
        return self._entry(table, name, version)

    def entries(self) -> list[ModelEntry]:
        """Every loaded version, sorted by name then version."""
        table = self._table
        return [self._entry(table, n, v) for n, v in sorted(table)]

    def _entry(self, table: dict, name: str, version: int) -> ModelEntry:
        loaded = table[(name, version)]
        latest = version == max(v for n, v in table if n == name)
        return ModelEntry(name=name, version=version, latest=latest, is_default=latest and name == self.default_model,
                          model=loaded.engine.model, engine=loaded.engine)

    @staticmethod
    def _listing(table: dict) -> str:
        by_name: dict[str, list[int]] = {}
        for n, v in sorted(table):
            by_name.setdefault(n, []).append(v)
        if not by_name:
            return "no model is loaded"
        return "models: " + ", ".join(f"{n} (version{'s' if len(vs) > 1 else ''} {', '.join(map(str, vs))})"
                                      for n, vs in by_name.items())



class ModelRepository(ModelTable):
    def __init__(
        self,
        root: str | os.PathLike,
        *,
        device: str,
        engine_factory: Callable[[Path, str, int], object],
        metrics: Metrics,
        log: logging.Logger,
        default_model: str | None = None,
        policy: RestartPolicy = RestartPolicy(),
        on_change: Callable[[], None] = lambda: None,
    ):
        self.root = Path(root)
        self.device = device  # "cpu" | "cuda", from runtime.select_device
        self.engine_factory = engine_factory
        self.metrics = metrics
        self.log = log
        self.policy = policy  # restarts after engine failures (engine.py)
        self.on_change = on_change  # called (from any thread) when an engine changes state
        self._explicit_default = default_model or None  # --default-model
        # (name, version) -> Loaded. Replaced whole, never mutated, so resolve() on the
        # event loop reads a consistent table while a reload runs in another thread.
        self._table: dict[tuple[str, int], Loaded] = {}
        self._retiring: list[SupervisedEngine] = []  # engines of removed/replaced versions, draining
        self._refused: dict[Path, tuple] = {}  # file -> signature at refusal: not retried until it changes
        self._new_problems: list[str] = []  # layout problems first seen by the latest scan
        self._reload_lock = threading.Lock()

    # ---- loading ----

    def load(self) -> None:
        """Loads every model file; raises RepositoryError when none is usable (or --default-model is missing)."""
        with self._reload_lock:
            found, problems = self._scan()
            table: dict[tuple[str, int], Loaded] = {}
            for (name, version), path in sorted(found.items()):
                loaded, problem = self._load_one(name, version, path)
                if loaded is not None:
                    table[(name, version)] = loaded
                else:
                    problems.append(problem)
            self._table = table
            self._show_count()
            if not table:
                detail = "".join(f"\n  {p}" for p in problems) or (
                    f"\n  no model files found; expected {self.root}/<name>/<version>/{mf.MODEL_FILE}")
                raise RepositoryError(f"no usable model in {self.root}:{detail}")
            if self._explicit_default and self._explicit_default not in self._names():
                names = ", ".join(sorted(self._names()))
                self.close(0)
                raise RepositoryError(f"--default-model {self._explicit_default!r} is not in {self.root}; models: {names}")
            self.log.info("repository %s: serving %s; default model %s", self.root,
                          ", ".join(f"{n}@{v}" for n, v in sorted(table)), self.default_model)

    def reload(self) -> ReloadSummary:
        """Rescans the folder and applies the difference; see the module docstring."""
        with self._reload_lock:
            summary = ReloadSummary()
            found, _ = self._scan()
            summary.refused.extend(self._new_problems)
            table = dict(self._table)
            for key, path in sorted(found.items()):
                old = table.get(key)
                try:
                    sig = _signature(path)
                except OSError:
                    continue  # vanished between scan and now; the next scan sees it
                if old is not None and old.signature == sig:
                    continue
                if self._refused.get(path) == sig:
                    continue  # refused before and unchanged: already logged and counted
                loaded, problem = self._load_one(*key, path)
                if loaded is None:
                    summary.refused.append(problem)
                    continue
                table[key] = loaded
                if old is None:
                    summary.added.append(f"{key[0]}@{key[1]}")
                else:
                    summary.replaced.append(f"{key[0]}@{key[1]}")
                    self._retire(old, forget_info=self._info_labels(old.model) != self._info_labels(loaded.model))
            for key in [k for k in table if k not in found]:
                self._retire(table.pop(key), forget_info=True)
                summary.removed.append(f"{key[0]}@{key[1]}")
            self._table = table
            self._retiring = [e for e in self._retiring if e.running]
            self._show_count()
            if summary.changed:
                self.log.info("repository %s reloaded: %s", self.root, summary)
            return summary

    def _scan(self) -> tuple[dict[tuple[str, int], Path], list[str]]:
        """(name, version) -> model file, plus '<path>: <reason>' for folders that break the layout."""
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: the model repository must be a folder (--models)")
        found: dict[tuple[str, int], Path] = {}
        problems: list[str] = []
        self._new_problems = []  # the problems not reported by an earlier scan
        for name_dir in sorted(self.root.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue  # hidden folders (editors, atomic copies) and loose files are not models
            try:
                mf.check_model_name(name_dir.name)
            except mf.ModelFormatError as e:
                problems.append(self._problem(name_dir, f"skipped: {e}"))
                continue
            for version_dir in sorted(name_dir.iterdir()):
                if version_dir.name.startswith(".") or not version_dir.is_dir():
                    continue
                v = version_dir.name
                if not mf.is_version(v):
                    problems.append(self._problem(version_dir, f"skipped: a version folder must be {mf.VERSION_RULE}"))
                    continue
                path = version_dir / mf.MODEL_FILE
                if not path.is_file():
                    problems.append(self._problem(path, "no such file (each version folder holds one model.onnx)"))
                    continue
                found[(name_dir.name, int(v))] = path
        return found, problems

    def _problem(self, path: Path, reason: str) -> str:
        message = f"{path}: {reason}"
        key = path.resolve()
        if self._refused.get(key) != ("layout", reason):
            self._refused[key] = ("layout", reason)
            self.log.warning("%s", message)
            self._new_problems.append(message)
        return message

    def _load_one(self, name: str, version: int, path: Path) -> tuple[Loaded | None, str]:
        started = time.monotonic()
        try:
            sig = _signature(path)
            engine = SupervisedEngine(lambda: self.engine_factory(path, name, version), policy=self.policy,
                                      metrics=self.metrics, on_change=self.on_change)
        except (mf.ModelFormatError, OSError) as e:
            message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            self.log.error("refused %s@%d: %s", name, version, message)
            self.metrics.model_load_failures.labels(name).inc()
            try:
                self._refused[path] = _signature(path)
            except OSError:
                pass
            return None, message
        self._refused.pop(path, None)
        m = self.metrics
        m.init_model(name)
        model = engine.model
        seconds = time.monotonic() - started
        meta = model.metadata
        m.model_load.labels(name).observe(seconds)
        m.model_info.labels(*self._info_labels(model)).set(1)
        m.max_active_streams.labels(name).set(engine.max_active)
        self.log.info("loaded %s@%d from %s: %s %dx%d, vocabulary %d, on %s, in %.2fs", name, version, path,
                      meta.cell, meta.layers, meta.hidden, meta.vocab_size, self.device, seconds)
        return Loaded(model, engine, sig), ""

    def _retire(self, old: Loaded, forget_info: bool) -> None:
        """Stops new streams on a version; those in flight finish, then its engine thread ends."""
        old.engine.drain()
        self._retiring.append(old.engine)
        if forget_info:
            try:
                self.metrics.model_info.remove(*self._info_labels(old.model))
            except KeyError:
                pass

    def _info_labels(self, model) -> tuple[str, ...]:
        """Label values of charrnn_model_info: model, version, cell, layers, hidden, device."""
        meta = model.metadata
        return (model.name, str(model.version), meta.cell, str(meta.layers), str(meta.hidden), self.device)

    def _show_count(self) -> None:
        self.metrics.models_loaded.set(len(self._table))

    # ---- engine health ----

    def check_engines(self, now: float) -> None:
        """The watchdog's round: every engine that serves is checked for a hang (SupervisedEngine.check)."""
        for loaded in list(self._table.values()):
            loaded.engine.check(now)

    def frontend_gone(self, index: int) -> None:
        """Front-end process ``index`` died: every core frees its slots."""
        for loaded in list(self._table.values()):
            client = getattr(loaded.engine.core, "client", None)
            if client is not None:
                client.control(protocol.Gone(fe=index))

    @property
    def hung(self) -> bool:
        """Some engine thread is blocked for good: only a restart of the process frees it (liveness)."""
        return any(x.engine.hung for x in self._table.values()) or any(e.hung for e in self._retiring)

    # ---- shutdown ----

    def close(self, grace: float) -> None:
        """Drains every engine: streams in flight get ``grace`` seconds, then end with Unavailable."""
        engines = [x.engine for x in self._table.values()] + self._retiring
        for e in engines:
            e.drain()
        deadline = time.monotonic() + grace
        while any(not e.idle for e in engines) and time.monotonic() < deadline:
            time.sleep(0.02)
        for e in engines:
            e.stop(timeout=5.0)
        for loaded in self._table.values():
            self._retire(loaded, forget_info=True)
        self._table = {}
        self._retiring = []
        self._show_count()
