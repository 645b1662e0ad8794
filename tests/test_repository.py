"""The model repository on real folders of real model files."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

import pytest

from charrnn import modelfile as mf
from charrnn.service import errors
from charrnn.service import cores
from charrnn.service.metrics import Metrics
from charrnn.service.repository import ModelRepository, RepositoryError
from charrnn.service.requests import FinishReason, GenerationRequest
from testkit.requests import generation_request
from testkit.modelfactory import make_model_repo


def open_repo(root, metrics=None, **kw) -> ModelRepository:
    metrics = metrics or Metrics()
    return ModelRepository(root, device="cpu", engine_factory=cores.factory("thread", device="cpu", threads=0, metrics=metrics),
                           metrics=metrics, log=logging.getLogger("test.repository"), **kw)


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def repo_root(model_repo, tmp_path):
    return shutil.copytree(model_repo, tmp_path / "models")  # tiny/1 (LSTM), other/1 (GRU)


def test_every_model_is_loaded_and_the_newest_version_is_what_a_name_means(repo_root):
    make_model_repo(repo_root, name="tiny", versions=(2, 10))
    metrics = Metrics()
    repo = open_repo(repo_root, metrics)
    repo.load()
    try:
        got = [(e.name, e.version, e.latest, e.is_default) for e in repo.entries()]
        assert got == [("other", 1, True, True), ("tiny", 1, False, False), ("tiny", 2, False, False),
                       ("tiny", 10, True, False)]
        assert repo.resolve("tiny").version == 10  # numeric order, not text order
        assert repo.resolve("tiny@2").version == 2
        assert repo.resolve("").name == "other"  # alphabetically first without "default"
        assert sample(metrics, "charrnn_models_loaded") == 4
        assert sample(metrics, "charrnn_model_info", model="tiny", version="10", cell="lstm", layers="1",
                      hidden="16", device="cpu") == 1
        assert sample(metrics, "charrnn_max_active_streams", model="tiny") == 256
    finally:
        repo.close(0)


def test_the_default_model_is_the_flag_else_default_else_the_first_name(repo_root):
    repo = open_repo(repo_root, default_model="tiny")
    repo.load()
    assert repo.resolve("").name == "tiny" and repo.default_model == "tiny"
    repo.close(0)
    shutil.copytree(repo_root / "tiny", repo_root / "default")
    repo = open_repo(repo_root)
    repo.load()
    assert repo.default_model == "default"
    assert [e.name for e in repo.entries() if e.is_default] == ["default"]
    repo.close(0)
    with pytest.raises(RepositoryError, match="--default-model 'nope' is not in .*models: default, other, tiny"):
        open_repo(repo_root, default_model="nope").load()


@pytest.mark.parametrize("field", ["../x", "/etc", "a/b", "..", "tiny/../other", "x y", "tiny@x", "tiny@0",
                                   "tiny@01", "tiny@", "@1", "tiny@1@2"])
def test_names_that_look_like_paths_or_break_the_rule_are_refused(repo_root, field):
    repo = open_repo(repo_root)
    repo.load()
    try:
        with pytest.raises(errors.InvalidArgument, match=r"^model must be .*, got ") as info:
            repo.resolve(field)
        assert info.value.field == "model" and info.value.value == field
    finally:
        repo.close(0)


def test_unknown_models_and_versions_name_what_is_served(repo_root):
    repo = open_repo(repo_root)
    repo.load()
    try:
        for field in ("nope", "tiny@3"):
            with pytest.raises(errors.ModelNotFound, match=f"model '{field}' is not served here; "
                                                           r"models: other \(version 1\), tiny \(version 1\)"):
                repo.resolve(field)
    finally:
        repo.close(0)


@pytest.mark.parametrize("field", ["tiny@0", "tiny@01", "tiny@-1", "tiny@1.0", "tiny@\u0663", "tiny@" + "9" * 19,
                                   "tiny@" + "9" * 5000])
def test_versions_that_are_not_positive_integers_are_invalid_arguments(repo_root, field):
    repo = open_repo(repo_root)
    repo.load()
    try:
        with pytest.raises(errors.InvalidArgument, match="^model must be 'name@version' with a version that is "
                                                         "a positive integer without leading zeros, got "):
            repo.resolve(field)
    finally:
        repo.close(0)


def test_bad_files_are_logged_with_path_and_reason_counted_and_skipped(repo_root, caplog):
    (repo_root / "broken" / "1").mkdir(parents=True)
    (repo_root / "broken" / "1" / mf.MODEL_FILE).write_bytes(b"garbage")
    (repo_root / "tiny" / "v2").mkdir()
    (repo_root / "bad name").mkdir()
    (repo_root / "empty" / "3").mkdir(parents=True)
    metrics = Metrics()
    repo = open_repo(repo_root, metrics)
    with caplog.at_level(logging.WARNING, logger="test.repository"):
        repo.load()
    try:
        assert sorted(f"{e.name}@{e.version}" for e in repo.entries()) == ["other@1", "tiny@1"]
        text = caplog.text
        assert f"{repo_root / 'broken' / '1' / mf.MODEL_FILE}: onnxruntime cannot load it" in text
        assert f"{repo_root / 'tiny' / 'v2'}: skipped: a version folder must be a positive integer" in text
        assert f"{repo_root / 'bad name'}: skipped: model name must be" in text
        assert f"{repo_root / 'empty' / '3' / mf.MODEL_FILE}: no such file" in text
        assert sample(metrics, "charrnn_model_load_failures_total", model="broken") == 1
    finally:
        repo.close(0)


def test_a_repository_without_a_usable_model_is_an_error_listing_each_path(tmp_path):
    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "a" / "1" / mf.MODEL_FILE).write_bytes(b"x")
    (tmp_path / "b" / "one").mkdir(parents=True)
    with pytest.raises(RepositoryError) as info:
        open_repo(tmp_path).load()
    message = str(info.value)
    assert message.startswith(f"no usable model in {tmp_path}:")
    assert f"{tmp_path / 'a' / '1' / mf.MODEL_FILE}: onnxruntime cannot load it" in message
    assert f"{tmp_path / 'b' / 'one'}: skipped" in message
    with pytest.raises(RepositoryError, match="no model files found; expected .*/<name>/<version>/model.onnx"):
        open_repo(tmp_path / "a" / "1").load()
    with pytest.raises(RepositoryError, match="must be a folder"):
        open_repo(tmp_path / "missing").load()


def test_reload_adds_a_version_that_then_serves_new_requests(repo_root):
    metrics = Metrics()
    repo = open_repo(repo_root, metrics)
    repo.load()
    try:
        make_model_repo(repo_root, name="tiny", versions=(2,))
        summary = repo.reload()
        assert summary.added == ["tiny@2"] and not summary.removed and str(summary) == "added tiny@2"
        assert repo.resolve("tiny").version == 2 and repo.resolve("tiny@1").version == 1
        assert sample(metrics, "charrnn_models_loaded") == 3
        assert str(repo.reload()) == "no changes"
    finally:
        repo.close(0)


def test_reload_refuses_a_corrupt_version_and_keeps_the_old_one_serving(repo_root):
    metrics = Metrics()
    repo = open_repo(repo_root, metrics)
    repo.load()
    try:
        bad = repo_root / "tiny" / "2" / mf.MODEL_FILE
        bad.parent.mkdir()
        bad.write_bytes(b"half a file")
        summary = repo.reload()
        assert not summary.changed
        assert summary.refused and summary.refused[0].startswith(f"{bad}: ")
        assert repo.resolve("tiny").version == 1
        assert sample(metrics, "charrnn_model_load_failures_total", model="tiny") == 1
        assert repo.reload().refused == []  # the same bad file is not retried (or counted) on every poll
    finally:
        repo.close(0)


def _long_request(model, n=400) -> GenerationRequest:
    return generation_request(model.metadata, "A", n, seed=3, temperature=None, request_id="r")


def test_a_removed_model_stops_serving_while_its_streams_in_flight_finish(repo_root):
    metrics = Metrics()
    repo = open_repo(repo_root, metrics)
    repo.load()

    async def main():
        entry = repo.resolve("tiny")
        stream = entry.engine.submit(_long_request(entry.model, 3000))
        first = await stream.__anext__()
        shutil.rmtree(repo_root / "tiny")
        summary = await asyncio.to_thread(repo.reload)
        with pytest.raises(errors.ModelNotFound):
            repo.resolve("tiny")
        rest = "".join([c async for c in stream])
        for _ in range(200):
            if not entry.engine.running:
                break
            await asyncio.sleep(0.01)
        return summary, first + rest, stream.result, entry.engine.running

    try:
        summary, text, result, still_running = asyncio.run(main())
        assert summary.removed == ["tiny@1"]
        assert len(text) == 3000 and result.finish_reason is FinishReason.LENGTH
        assert not still_running
        assert sample(metrics, "charrnn_model_info", model="tiny", version="1", cell="lstm", layers="1",
                      hidden="16", device="cpu") is None
        assert sample(metrics, "charrnn_models_loaded") == 1
    finally:
        repo.close(0)


def test_close_gives_streams_the_grace_period_then_ends_them_unavailable(repo_root):
    repo = open_repo(repo_root)
    repo.load()

    async def main():
        entry = repo.resolve("tiny")
        short = entry.engine.submit(_long_request(entry.model, 50))
        endless = entry.engine.submit(_long_request(entry.model, 10**9))
        started = time.monotonic()
        await asyncio.to_thread(repo.close, 0.3)
        took = time.monotonic() - started
        text = "".join([c async for c in short])
        with pytest.raises(errors.Unavailable, match="server shutting down"):
            async for _ in endless:
                pass
        return took, text

    took, text = asyncio.run(main())
    assert 0.3 <= took < 3 and len(text) == 50
    assert repo.entries() == []
