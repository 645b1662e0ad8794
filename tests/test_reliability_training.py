"""charrnn-train killed with SIGKILL at random steps, resumed with --resume each time, equals the unbroken run.

testkit/training_faults.py does the killing; here two kills (one of them aimed
at a checkpoint being written), `python -m bench.reliability --long` five.
"""

from __future__ import annotations

import pytest

from testkit.training_faults import kill_and_resume

pytestmark = pytest.mark.slow


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_losses_and_weights(tmp_path):
    r = kill_and_resume(tmp_path, kills=2, seed=3, max_steps=150, eval_interval=25)
    assert r["killed_runs"] == 2, r["kills"]  # neither run finished before its kill
    assert r["final_returncode"] == 0, r["final_stderr"]
    assert any(step > 0 for step in r["resumes"]), r  # at least one run restarted from a checkpoint
    assert r["steps_compared"] == 150
    assert r["steps_equal"], f"per-step loss or lr differs from step {r['first_different_step']}"
    assert r["evaluations_compared"] == 6 and r["evaluations_equal"]
    assert r["final_weights_equal"]
