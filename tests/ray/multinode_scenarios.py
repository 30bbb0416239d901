"""Node-loss scenarios on a simulated multi-node cluster, each in a process of its own (a test session already holds
its own Ray): ``python tests/ray/multinode_scenarios.py <scenario> <out_dir> [--max-failures N]``.

Each writes ``<out_dir>/result.json`` with what happened; ``tests/ray/test_multinode.py`` asserts on it.

- ``train``: a 2-worker DDP run whose workers sit on nodes ``a`` and ``b`` (one ``train_slot`` each); node ``b`` is
  removed once both ranks have written the step-6 checkpoint, and node ``c`` is added. The run must restart from that
  checkpoint on ``a`` and ``c`` and end with the weights and losses of an uninterrupted run on the same cluster.
- ``eval``: a suite scored by a 2-actor pool, one actor on each of nodes ``a`` and ``b`` (one ``score_slot``
  each); node ``b`` is removed while its actor holds batches, and node ``c`` is added. Every image must be scored
  exactly once in the final counts.
- ``sweep``: a 2-trial sweep (``jobs/sweep.py``'s ``plan_sweep`` / ``run_sweep``) whose trials train on nodes ``a``
  and ``b``; node ``b`` is removed once its trial has written its step-6 checkpoint, and node ``c`` is added. With
  ``max_trial_failures`` (``--max-failures``) Tune restarts that trial, whose Train run resumes from the checkpoint:
  every trial must end with all its epochs, the restarted one without training its first epoch again.
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

from robustfm.config.schema import TrackingConfig  # noqa: E402
from robustfm.evals.actors import FieldSpec, ScoringActor  # noqa: E402
from robustfm.evals.config import EvalConfig, EvalDataConfig  # noqa: E402
from robustfm.evals.metrics import MetricSpec, MetricTable  # noqa: E402
from robustfm.evals.suite import Suite, SuiteOutput  # noqa: E402
from robustfm.testing.cluster import SimulatedCluster, wait_for
from robustfm.train import TrainConfig  # noqa: E402
from robustfm.train.synthetic import TINY_TWO_STAGES, SyntheticBatchSource, TinyRegressionTask  # noqa: E402

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
            "stages": TINY_TWO_STAGES,
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


# --- sweep: a Tune trial losing its node -------------------------------------------------------------------------

SWEEP_RECIPE = "paced_sweep_test"


@dataclass(frozen=True)
class PacedSweepConfig:
    """The swept recipe's config: what the sweep driver reads (``output_dir``, ``seed``, ``train``, ``tracking``)."""

    output_dir: str = "outputs/paced-sweep"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The types themselves, not their names: a trial process gets this class by value (it cannot import the script), and
# resolving the names would look them up in that process's __main__.
PacedSweepConfig.__annotations__.update(output_dir=str, seed=int, train=TrainConfig, tracking=TrackingConfig)


class PacedValidation:
    """``on_epoch_end``: reports the epoch's last training loss as ``val/loss`` and appends ``<pid> <epochs done>``
    to ``log_path`` (which epochs each attempt of a trial trained)."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def __call__(self, stage: str, epoch: int, model_state: Any, last: dict[str, Any]) -> dict[str, float]:
        with open(self.log_path, "a") as log:
            log.write(f"{os.getpid()} {epoch}\n")
        return {"val/loss": float(last.get("loss/total", 0.0))}


@dataclass(frozen=True)
class PacedSweep:
    """A sweep adapter (``robustfm.sweeps.recipes.SweepableRecipe``) training the paced regression task."""

    config_class: type
    default_config: Path
    log_dir: str
    metrics: Any = field(default_factory=lambda: {"val/loss": "min"})
    diverged_values: Any = field(default_factory=lambda: {"val/loss": 1e30})

    def default_stages(self, cfg: Any) -> tuple[str, ...]:
        return tuple(cfg.train.stages)

    def check(self, cfg: Any, stages: Any, init_weights: str | None) -> None:
        pass

    def prepare(self, cfg: Any) -> Any:
        return cfg

    def train_trial(self, cfg: Any, stages: Any, init_weights: Any, run_name: str, run_callbacks: Any) -> Any:
        from robustfm.train import fit

        source = SyntheticBatchSource(num_samples=96, global_batch_size=16, seed=7)  # 6 steps per epoch
        log = f"{self.log_dir}/{run_name}"
        result = fit(
            cfg.train,
            PacedTaskBuilder(f"{log}.nodes"),
            source,
            run_name=run_name,
            on_epoch_end=PacedValidation(f"{log}.epochs"),
            run_callbacks=run_callbacks,
        )
        return result.metrics


def sweep_scenario(cluster: SimulatedCluster, out: Path, max_failures: int) -> dict[str, Any]:
    import yaml
    from ray import cloudpickle

    from robustfm.recipes import RECIPES
    from robustfm.sweeps.tune import plan_sweep, run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials cannot import this script by name
    config_path, space_path, logs = out / "paced.yaml", out / "space.yaml", out / "trials"
    logs.mkdir(parents=True, exist_ok=True)
    train = {
        "launcher": "ray",
        "num_workers": 1,
        "resources_per_worker": {"CPU": 0.25, "train_slot": 1},  # one trial's worker per node: one slot each
        "log_every_steps": 1,
        "seed": 4,
        "checkpoint_every_steps": 6,
        "max_failures": 0,  # a lost node fails the trial's Train run: the trial restart is what is tested
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "strategy": {"name": "ddp"},
        "stages": TINY_TWO_STAGES,
    }
    config_path.write_text(
        yaml.safe_dump({"output_dir": str(out), "train": train, "tracking": {"uri": f"sqlite:///{out}/mlflow.db"}})
    )
    space_path.write_text(
        yaml.safe_dump(
            {
                "recipe": SWEEP_RECIPE,
                "metric": "val/loss",
                "mode": "min",
                "num_samples": 1,
                "max_concurrent": 2,
                "searcher": {"type": "grid"},
                "scheduler": {"type": "fifo"},
                "space": {"train.stages.body.lr.body": "grid([0.02, 0.03])"},
                "max_trial_failures": max_failures,
            }
        )
    )
    adapter = PacedSweep(PacedSweepConfig, config_path, str(logs))
    RECIPES.register(SWEEP_RECIPE, lambda cfg: None, config=PacedSweepConfig, default_config=config_path, sweep=adapter)
    plan = plan_sweep(SWEEP_RECIPE, space_path)

    nodes = {name: cluster.add_node(name, 1, {"train_slot": 1}) for name in ("a", "b")}
    cluster.connect()
    sweep = InBackground(lambda: run_sweep(plan), "the sweep")

    def trial_on_b() -> str | None:
        for path in logs.glob("*.nodes"):
            if nodes["b"] in path.read_text():
                return path.name.removesuffix(".nodes")
        return None

    wait_for(lambda: trial_on_b() is not None, 240, "a trial training on node b")
    lost = trial_on_b()
    # A restarted trial's Train run resumes from what its controller registered (its snapshot file), not from any
    # folder written: wait for the step-6 checkpoint to be registered.
    snapshot = plan.experiment_dir / "train_runs" / lost / "checkpoint_manager_snapshot.json"
    wait_for(
        lambda: snapshot.is_file() and "checkpoint_step_000000006" in snapshot.read_text(),
        180,
        f"{lost}'s step-6 checkpoint registered",
    )
    cluster.remove_node("b")
    record: dict[str, Any] = {"lost_trial": lost}
    record["trial_had_finished"] = (plan.experiment_dir / "train_runs" / lost / "checkpoint_step_000000018").exists()
    nodes["c"] = cluster.add_node("c", 1, {"train_slot": 1})
    record["nodes"] = nodes
    result, error = sweep.outcome(timeout_s=400)
    if error:
        return {**record, "error": error}
    record["trials"] = [
        {"status": trial["status"], "epochs": trial["epochs"], "val/loss": trial["val/loss"]} for trial in result.trials
    ]
    record["total_epochs"] = plan.total_epochs
    record["attempts"] = {path.name.removesuffix(".epochs"): _attempts(path) for path in sorted(logs.glob("*.epochs"))}
    record["trial_nodes"] = {path.name.removesuffix(".nodes"): _node_log(path) for path in sorted(logs.glob("*.nodes"))}
    return record


def _attempts(path: Path) -> list[list[int]]:
    """The epochs each process (attempt) validated, in order of the attempts."""
    by_pid: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        pid, epoch = line.split()
        by_pid.setdefault(pid, []).append(int(epoch))
    return list(by_pid.values())


SCENARIOS = {"train": train_scenario, "eval": eval_scenario, "sweep": sweep_scenario}


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
