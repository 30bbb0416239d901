"""Node-loss scenarios on a simulated multi-node cluster, each in a process of its own (a test session already holds
its own Ray): ``python tests/ray/multinode_scenarios.py <scenario> <out_dir> [--max-failures N]``.

Each writes ``<out_dir>/result.json`` with what happened; ``tests/ray/test_multinode.py`` asserts on it.

- ``train``: a 2-worker DDP run whose workers sit on nodes ``a`` and ``b`` (one ``train_slot`` each); node ``b`` is
  removed once both ranks have written the step-6 checkpoint, and node ``c`` is added. The run must restart from that
  checkpoint on ``a`` and ``c`` and end with the weights and losses of an uninterrupted run on the same cluster.
- ``eval``: a suite scored by a 2-actor pool, one actor on each of nodes ``a`` and ``b`` (one ``score_slot``
  each); node ``b`` is removed while its actor holds batches, and node ``c`` is added. Every image must be scored
  exactly once in the final counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before Ray is imported: see robustfm.testing.cluster (loopback addresses stay loopback).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from robustfm.evals.actors import FieldSpec, ScoringActor  # noqa: E402
from robustfm.evals.config import EvalConfig, EvalDataConfig  # noqa: E402
from robustfm.evals.metrics import MetricSpec, MetricTable  # noqa: E402
from robustfm.evals.suite import Suite, SuiteOutput  # noqa: E402
from robustfm.testing.cluster import SimulatedCluster, wait_for
from robustfm.train.synthetic import SyntheticBatchSource, TinyRegressionTask  # noqa: E402

STEP_PACE_S = 0.4  # each training step sleeps this long, so that the node is lost mid-stage, not after the run


class PacedTask(TinyRegressionTask):
    """The tiny regression task, slowed to ``STEP_PACE_S`` per step, writing ``<node id> <pid>`` to ``log_path`` on
    its first step in each worker process (which node each attempt of the run trained on)."""

    def __init__(self, log_path: str) -> None:
        super().__init__()
        self.log_path = log_path
        self.logged = False

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if not self.logged:
            import ray

            with open(self.log_path, "a") as log:
                log.write(f"{ray.get_runtime_context().get_node_id()} {os.getpid()}\n")
            self.logged = True
        time.sleep(STEP_PACE_S)
        return super().forward(batch)


class PacedTaskBuilder:
    """Picklable ``build_task`` for the engine."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def __call__(self) -> PacedTask:
        return PacedTask(self.log_path)


class InBackground:
    """Runs ``work()`` in a thread (this main thread must stay free: Ray starts nodes only from it); :meth:`outcome`
    waits for it and returns ``(result, None)`` or ``(None, error text)``, recorded rather than raised so that the
    test can say what went wrong."""

    def __init__(self, work: Any, what: str) -> None:
        self.what, self.found = what, {}
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work: Any) -> None:
        try:
            self.found["result"] = work()
        except Exception as err:
            self.found["error"] = f"{type(err).__name__}: {err}"

    def outcome(self, timeout_s: float = 300) -> tuple[Any, str | None]:
        self.thread.join(timeout=timeout_s)
        if "result" in self.found:
            return self.found["result"], None
        return None, self.found.get("error", f"{self.what} did not end within {timeout_s:.0f} s")


def train_config(storage: Path, max_failures: int) -> Any:
    from robustfm.config import load_config
    from robustfm.train import TrainConfig

    return load_config(
        TrainConfig,
        base={
            "launcher": "ray",
            "num_workers": 2,
            "resources_per_worker": {"CPU": 0.5, "train_slot": 1},  # one worker per node: each node has one slot
            "storage_path": str(storage),
            "log_every_steps": 1,
            "seed": 4,
            "checkpoint_every_steps": 6,
            "max_failures": max_failures,
            "optimizer": {"name": "sgd", "momentum": 0.9},
            "strategy": {"name": "ddp"},
            "stages": {
                "head": {"trainable": ["head"], "lr": {"head": 0.05}, "loss_weights": {"mse": 1.0}},
                "body": {
                    "trainable": ["body", "head"],
                    "lr": {"body": 0.02, "head": 0.02},
                    "epochs": 2,
                    "loss_weights": {"mse": 1.0, "l1": 0.5},
                },
            },
        },
    )


def train_scenario(cluster: SimulatedCluster, out: Path, max_failures: int) -> dict[str, Any]:
    from robustfm.train import fit

    source = SyntheticBatchSource(num_samples=64, global_batch_size=16, seed=7)  # 12 steps over both stages
    nodes = {name: cluster.add_node(name, 1, {"train_slot": 1}) for name in ("a", "b")}
    cluster.connect()
    storage, tracking = out / "storage", f"sqlite:///{out}/mlflow.db"
    cfg = train_config(storage, max_failures)

    reference_log = out / "uninterrupted_nodes.log"
    reference = fit(cfg, PacedTaskBuilder(str(reference_log)), source, run_name="uninterrupted", tracking_uri=tracking)

    attempts_log = out / "lost_node_nodes.log"
    run = InBackground(
        lambda: fit(cfg, PacedTaskBuilder(str(attempts_log)), source, run_name="lost-node", tracking_uri=tracking),
        "the run",
    )
    marks = storage / "lost-node" / "checkpoint_step_000000006" / "parts_written"
    wait_for(lambda: marks.is_dir() and len(list(marks.iterdir())) == 2, 180, "both ranks' step-6 checkpoint")
    cluster.remove_node("b")
    record: dict[str, Any] = {"run_had_finished": (storage / "lost-node" / "checkpoint_step_000000012").exists()}
    nodes["c"] = cluster.add_node("c", 1, {"train_slot": 1})
    record["nodes"] = nodes
    result, error = run.outcome()
    if error:
        return {**record, "error": error}

    state, expected = result.load_state_dict(), reference.load_state_dict()
    differing = [key for key in expected if not torch.equal(state[key], expected[key])]
    record.update(
        tensors=len(expected),
        tensors_differing=differing,
        losses=[r["loss/total"] for r in result.history],
        reference_losses=[r["loss/total"] for r in reference.history],
        global_step=result.metrics["global_step"],
        reference_nodes=_node_log(reference_log),
        attempt_nodes=_node_log(attempts_log),
        resumed_at_steps=_resumed_at_steps(tracking),
    )
    return record


def _node_log(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def _resumed_at_steps(tracking: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=200)
    return sorted(
        int(r.data.tags["resumed_at_step"])
        for r in runs
        if r.info.run_name.startswith("lost-node") and "resumed_at_step" in r.data.tags
    )


# --- eval: an actor pool losing a node mid-suite ------------------------------------------------------------------

SAMPLES = 24
BATCH_PACE_S = 1.0  # each scored batch sleeps this long ...
FIRST_BATCH_PACE_S = 4.0  # ... and an actor's first one this long: node b's actor surely holds it when b is lost


@dataclass(frozen=True)
class PacedConfig:
    """The paced suite's config: synthetic images only."""

    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(synthetic_samples=SAMPLES))


class PacedScorer(ScoringActor):
    """Scores nothing but where it ran: each row gets the node id of the actor; ``BATCH_PACE_S`` per batch
    (``FIRST_BATCH_PACE_S`` for its first). Writes ``<node id> <pid>`` to ``params["log"]`` when a batch starts."""

    def output_fields(self) -> dict[str, FieldSpec]:
        return {"node": (object, ())}

    def score(self, batch: Any, pixels: Any) -> list[dict[str, Any]]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        with open(self.params["log"], "a") as log:
            log.write(f"{node} {os.getpid()}\n")
        time.sleep(BATCH_PACE_S if getattr(self, "paced_once", False) else FIRST_BATCH_PACE_S)
        self.paced_once = True
        return [{"id": i, "node": node} for i in batch["id"]]


class PacedSuite(Suite):
    name = "paced_test"
    version = "1"
    scorer = PacedScorer
    metric_specs = (MetricSpec("rows", "higher", "rows scored"),)

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        return {"log": self.cfg.output_dir + "/batches.log"}

    def aggregate(self, rows: Any, params: Any) -> SuiteOutput:
        metrics = MetricTable()
        metrics.add("all/rows", float(len(rows["id"])), self.spec("rows"))
        return SuiteOutput(metrics, [])


def eval_scenario(cluster: SimulatedCluster, out: Path, max_failures: int) -> dict[str, Any]:
    from ray import cloudpickle

    from robustfm.config import load_config
    from robustfm.evals import SUITES
    from robustfm.evals.runner import run_suite

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this script by name
    SUITES.register("paced_test", PacedSuite, config=PacedConfig)
    nodes = {name: cluster.add_node(name, 1, {"score_slot": 1}) for name in ("a", "b")}
    cluster.connect()
    cfg = load_config(
        EvalConfig,
        base={
            "output_dir": str(out),
            "pool": {
                "min_actors": 2,
                "max_actors": 2,
                "num_cpus": 0.5,
                "resources": {"score_slot": 1},  # one actor per scoring node: each node has one score_slot
                "batch_size": 2,
            },
        },
    )
    log = out / "batches.log"
    suite = InBackground(lambda: run_suite("paced_test", "open_clip/tiny-vit", cfg, keep_rows=True), "the suite")
    wait_for(lambda: log.exists() and nodes["b"] in log.read_text(), 240, "a batch scored on node b")
    cluster.remove_node("b")
    record: dict[str, Any] = {"batches_started_before_loss": len(log.read_text().splitlines())}
    nodes["c"] = cluster.add_node("c", 1, {"score_slot": 1})
    record["nodes"] = nodes
    result, error = suite.outcome()
    if error:
        return {**record, "error": error}
    rows = result.rows
    record.update(
        counts=result.counts,
        ids=[str(i) for i in rows["id"]],
        row_nodes=[str(n) for n in rows["node"]],
        batch_nodes=_node_log(log),
        samples=SAMPLES,
    )
    return record


SCENARIOS = {"train": train_scenario, "eval": eval_scenario}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-failures", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="rfm-nodes-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = SimulatedCluster(temp_dir, head_cpus=1)
    try:
        record = SCENARIOS[args.scenario](cluster, args.out, args.max_failures)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    (args.out / "result.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
