"""Faults: killed clients, a killed server, a model file damaged under load, a taken port, a full disk.

The scenarios live in testkit/faults.py and testkit/training_faults.py (the
reliability benchmark records the same figures); each test asserts the promise.
"""

from __future__ import annotations

import pytest

from testkit import faults, training_faults

pytestmark = pytest.mark.slow


def test_killed_client_frees_its_slot(model_repo, no_torch_env):
    r = faults.client_killed_mid_stream(model_repo, no_torch_env)
    assert r["bytes_received_before_kill"] > 0 and r["active_before_kill"] == 1, r
    assert r["active_after_kill"] == 0, r
    assert r["counted_as_cancelled"], r
    assert r["server_alive"] and r["health"] == "SERVING"


def test_server_killed_and_restarted_clients_see_unavailable_then_a_retry_succeeds(model_repo, no_torch_env):
    r = faults.server_killed_and_restarted(model_repo, no_torch_env)
    assert r["in_flight_code"] == "UNAVAILABLE", r
    assert r["while_down_code"] == "UNAVAILABLE", r
    assert r["retry_ok"], r
    assert set(r["retry_codes"]) <= {"UNAVAILABLE"}, r  # nothing but "not there yet" before the success
    assert r["health"] == "SERVING"


def test_truncated_model_file_is_refused_at_reload_while_the_loaded_one_keeps_serving(repo_copy, no_torch_env):
    r = faults.model_truncated_while_served(repo_copy, no_torch_env)
    assert r["streams_unfinished_at_refusal"] == len(r["chars_at_refusal"]), "streams ended before the reload"
    assert r["streams_completed"] == len(r["stream_results"]), r["stream_results"]
    assert r["refusal_names_path"] and "cannot load" in r["refusal"], r["refusal"]
    assert r["new_request_chars"] == 20
    assert r["load_failures"] == 1 and r["models_loaded"] == 2  # tiny@1 (from memory) and other@1
    assert r["health"] == r["health_tiny"] == "SERVING" and r["server_alive"]


@pytest.mark.parametrize("which, flag", [("metrics", "--metrics-port"), ("grpc", "--port")])
def test_a_taken_port_at_start_up_is_a_clear_error_and_a_non_zero_exit(model_repo, no_torch_env, which, flag):
    r = faults.port_taken_at_startup(model_repo, no_torch_env, which)
    assert r["returncode"] != 0, r
    assert "cannot start" in r["error_line"] and flag in r["error_line"] and r["port"] in r["error_line"], r
    assert not r["traceback"] and not r["banner_printed"], r


def test_disk_full_while_a_checkpoint_is_written_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    r = training_faults.disk_full_during_checkpoint(tmp_path)
    assert r["returncode"] not in (0, None), r
    reason = "No space left on device" if r["how"] == "tmpfs" else "File too large"
    assert "last.pt" in r["error"] and reason in r["error"], r
    assert not r["traceback"], r
    assert r["checkpoint_step_after"] == r["checkpoint_step_before"] == 40, r  # the last good one, loadable
    assert r["temporary_files_left"] == [], r

