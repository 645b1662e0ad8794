"""Training across nodes under torchrun's elastic launcher, two "nodes" on one machine.

Each node is a torchrun launcher on 127.0.0.1 (c10d rendezvous, gloo, the tiny
preset; testkit/multinode.py). A run to the end; a run whose rank-1 worker is
killed with SIGKILL, and one whose whole node 1 is killed and started again:
both must end with the uninterrupted run's per-step losses, evaluations and
final weights. Then the set-ups that must be refused: nodes reading different
corpora, nodes that do not share the run folder, and a resume with another
number of ranks.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from charrnn.training.checkpoint import load_checkpoint
from charrnn.training.cli import main
from charrnn.training.nodes import launch_warnings
from charrnn.training.runtime import Runtime
from testkit.multinode import TwoNodes, train_args, two_node_run
from testkit.training_faults import corpus

pytestmark = pytest.mark.slow

MAX_STEPS, EVAL_INTERVAL, KILL_AFTER = 100, 20, 30  # the kill lands after the checkpoint of step 20, well before the end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def data(workdir):
    return corpus(workdir / "corpus.txt")


@pytest.fixture(scope="module")
def whole(workdir, data):
    """The uninterrupted two-node run."""
    return two_node_run(workdir, data, "whole", MAX_STEPS, EVAL_INTERVAL)


def test_two_nodes_on_loopback_train_to_the_end_with_one_set_of_weights(whole, workdir):
    assert whole["returncodes"] == [0, 0], whole["output"][-3000:]
    ckpt = load_checkpoint(workdir / "whole" / "last.pt")
    ranks = ckpt["resume"]["ranks"]
    assert ckpt["step"] == MAX_STEPS and ckpt["resume"]["world"] == 2
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert not torch.equal(ranks[0]["carried"][0], ranks[1]["carried"][0])  # each rank its own lanes
    assert [r["step"] for r in whole["steps"]] == list(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize("fault", ["worker", "node"])
def test_a_killed_worker_or_node_restarts_every_rank_from_the_last_checkpoint_to_the_same_weights(
        whole, workdir, data, fault):
    # "worker": rank 1's process dies; its launcher restarts it and the other launcher restarts its own.
    # "node": node 1's launcher and worker die together and node 1 starts again, as a replaced pod does.
    cut = two_node_run(workdir, data, f"cut-{fault}", MAX_STEPS, EVAL_INTERVAL, fault=fault, kill_after=KILL_AFTER,
                       max_restarts=2)
    assert cut["returncodes"] == [0, 0], cut["output"][-3000:]
    assert cut["killed"]["steps_logged"] < MAX_STEPS  # the kill landed mid-run
    assert cut["resumed_from"] and all(0 < step < MAX_STEPS for step in cut["resumed_from"]), cut["resumed_from"]
    assert cut["steps"] == whole["steps"]  # every step's loss, learning rate and window length
    assert cut["metrics"] == whole["metrics"] and len(cut["metrics"]) == MAX_STEPS // EVAL_INTERVAL
    assert cut["digest"] == whole["digest"]


def test_nodes_that_read_different_corpora_are_refused_before_training(workdir, data):
    other = workdir / "other.txt"
    other.write_text(data.read_text()[:-1] + "?")  # one character differs
    out = workdir / "different-corpora"
    with TwoNodes(workdir / "different-corpora-logs", (train_args(data, out, MAX_STEPS, EVAL_INTERVAL),
                                                       train_args(other, out, MAX_STEPS, EVAL_INTERVAL))) as nodes:
        codes = nodes.wait(120)
        output = nodes.output()
    assert codes == [1, 1]
    assert "--data must be the same corpus on every node: rank 0 on" in output
    assert not (out / "steps.jsonl").exists()


def test_nodes_that_do_not_share_the_run_folder_are_refused_on_resume(whole, workdir, data):
    mine, theirs = workdir / "not-shared-a", workdir / "not-shared-b"
    shutil.copytree(workdir / "whole", mine)  # holds last.pt of step MAX_STEPS; the other folder is empty
    args = (train_args(data, mine, MAX_STEPS + 20, EVAL_INTERVAL), train_args(data, theirs, MAX_STEPS + 20, EVAL_INTERVAL))
    with TwoNodes(workdir / "not-shared-logs", args) as nodes:
        codes = nodes.wait(120)
        output = nodes.output()
    assert codes == [1, 1]
    assert "--out must be one folder that every node mounts (a shared volume)" in output
    assert f"last.pt of step {MAX_STEPS}" in output and "no last.pt" in output


def test_resuming_with_another_number_of_ranks_is_refused(whole, workdir, data, capsys):
    run = workdir / "one-rank"
    shutil.copytree(workdir / "whole", run)
    args = train_args(data, run, MAX_STEPS + 20, EVAL_INTERVAL)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--nproc-per-node must be such that --nnodes x --nproc-per-node = 2 ranks, as in the run being resumed" in err
    assert load_checkpoint(run / "last.pt")["step"] == MAX_STEPS  # untouched


@pytest.mark.parametrize("env, restarts, resume, said", [
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}, 0, True, ["TORCH_DISABLE_SHARE"]),
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}, 0, True, []),
    ({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, 0, True, []),
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}, 1, False, ["--resume is not set"]),
], ids=["shared-store", "own-store", "no-restarts", "restart-without-resume"])
def test_rank_0_warns_of_launches_whose_restarts_cannot_continue_the_run(env, restarts, resume, said):
    rt = Runtime(torch.device("cpu"), rank=0, world=2, restarts=restarts)
    warnings = launch_warnings(rt, resume, env)
    assert len(warnings) == len(said) and all(s in w for s, w in zip(said, warnings)), warnings
