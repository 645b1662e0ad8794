"""Soak: 256 misbehaving concurrent streams against a real charrnn-serve for ~30 s (testkit/soak.py).

Clients cancel at random moments, set short deadlines, read slowly and open
fresh connections; afterwards the server has answered only documented
statuses, its memory under load grew by under 3%, its descriptors and stream gauges are
back where they started, and it still reports SERVING.
`python -m bench.reliability --long` runs the same soak for 10 minutes.

The warm-up is 15 s: the server's RSS climbs for its first 15 to 20 s of such
load (allocator arenas, gRPC's buffers). The growth compares the median RSS of
the soak's first and last 6 s, both under the same load (testkit/soak.py):
0.4 to 0.8% in four runs of this test's ~35,000 requests, of which grpc.aio's
own leak of ~90 bytes per cancelled call (docs/reliability.md) is about half.
Comparing idle readings instead failed one run in three at 5%: after the load
stops, the same server's idle RSS lands anywhere between 108 and 113 MB.
Keeping a bytearray(100) per request (about 160 bytes) measured 3.8% and 5.2%,
and once passed: the smallest leak this test catches is a few hundred bytes a
request.
"""

from __future__ import annotations

import asyncio

import pytest

from testkit import probes
from testkit.soak import SERVER_ARGS, SoakConfig, soak
from testkit.serve_process import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(model_repo, no_torch_env):
    with ServeProcess(model_repo, *SERVER_ARGS, env=no_torch_env) as server:
        figures = asyncio.run(soak(server.target, server.proc.pid, server.metrics_url,
                                   SoakConfig(streams=256, seconds=30.0, warmup_seconds=15.0)))
        figures["server_alive"] = server.proc.poll() is None
        figures["server_log"] = server.log()
        yield figures


def test_every_status_is_documented(report):
    assert report["undocumented"] == {}, report["client_codes"]
    assert not {"INTERNAL", "UNKNOWN"} & set(report["server_codes"]), report["server_codes"]
    assert report["bad_ok_streams"] == 0
    assert "Traceback" not in report["server_log"]


def test_the_misbehaviours_really_happened(report):
    codes = report["client_codes"]
    assert report["requests"] > 1000 and codes.get("OK", 0) > 500, codes
    for outcome in (probes.CLIENT_CANCELLED, "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"):
        assert codes.get(outcome, 0) > 0, f"no {outcome} in {codes}"
    assert report["fds_peak"] > report["fds_start"] + 4, "clients never held several connections"


def test_memory_under_load_grows_by_less_than_3_percent(report):
    assert report["rss_growth"] < 0.03, (report["rss_start_bytes"], report["rss_end_bytes"], report["requests"])


def test_descriptors_return_to_the_starting_count(report):
    assert report["fds_end"] <= report["fds_start"], (report["fds_start"], report["fds_end"])


def test_stream_gauges_return_to_zero_and_health_stays_serving(report):
    assert report["active_after"] == 0 and report["queued_after"] == 0
    assert report["health_after"] == "SERVING" and report["server_alive"]
