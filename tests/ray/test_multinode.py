"""Past one machine, by simulation: several Ray nodes on loopback (``robustfm.testing.cluster``), one of them lost
while work runs. Each scenario runs in a process of its own (``tests/ray/multinode_scenarios.py``; this session's
Ray stays out of it) and reports what happened; the assertions are here.

Checked by hand that these fail without the restart logic: with ``--max-failures 0`` the training scenario ends in
``WorkerGroupError`` (the lost node's worker took the run down); with ``--max-failures 0`` (``max_trial_failures``)
the sweep scenario leaves the lost node's trial in ERROR after its first epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def run_scenario(name: str, out: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "tests/ray/multinode_scenarios.py", name, str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.timeout(660)
def test_training_survives_the_loss_of_a_worker_node(tmp_path):
    found = run_scenario("train", tmp_path)
    assert "error" not in found, found["error"]
    nodes = found["nodes"]
    assert found["run_had_finished"] is False  # the node went while the stage ran
    # Ray Train restarted the worker group on what was left (a) and what came (c), resuming the step-6 checkpoint ...
    assert set(found["attempt_nodes"][:2]) == {nodes["a"], nodes["b"]}
    assert set(found["attempt_nodes"][-2:]) == {nodes["a"], nodes["c"]}
    assert 6 in found["resumed_at_steps"], found["resumed_at_steps"]
    # ... and ended where the uninterrupted run on the same cluster did, bit for bit.
    assert found["tensors_differing"] == [] and found["tensors"] > 0
    assert found["losses"] == found["reference_losses"] and found["global_step"] == 12


@pytest.mark.timeout(660)
def test_an_evaluation_pool_scores_every_image_once_after_losing_a_node(tmp_path):
    found = run_scenario("eval", tmp_path)
    assert "error" not in found, found["error"]
    nodes = found["nodes"]
    assert nodes["b"] in found["batch_nodes"]  # node b's actor held a batch when the node was lost
    assert nodes["b"] not in found["row_nodes"]  # ... and none of the final rows came from it
    assert sorted(found["ids"]) == sorted(set(found["ids"])) and len(found["ids"]) == found["samples"]
    assert found["counts"] == {"scored": found["samples"], "skipped": 0, "rows": found["samples"]}


@pytest.mark.timeout(660)
def test_a_sweep_survives_the_loss_of_a_trial_node(tmp_path):
    found = run_scenario("sweep", tmp_path)
    assert "error" not in found, found["error"]
    nodes, lost = found["nodes"], found["lost_trial"]
    assert found["trial_had_finished"] is False  # the node went while the trial trained
    # Tune restarted the trial whose node was lost; its Train run came back on a node still there ...
    assert found["trial_nodes"][lost][0] == nodes["b"] and found["trial_nodes"][lost][-1] in (nodes["a"], nodes["c"])
    # ... resumed from the step-6 checkpoint (the end of epoch 1): the new attempt did not train epoch 1 again.
    attempts = found["attempts"][lost]
    assert len(attempts) == 2 and attempts[0][0] == 1 and attempts[1] == [2, 3], attempts
    # Both trials ended with all their epochs and a finite metric.
    assert len(found["trials"]) == 2
    for trial in found["trials"]:
        assert trial["status"] == "DONE" and trial["epochs"] == found["total_epochs"], trial
        assert trial["val/loss"] < 1e30
