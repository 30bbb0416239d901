"""MLflow for a sweep, written only by the Tune driver: one parent run, one child run per trial.

Trials run in parallel processes; several writers on one SQLite file would lock each other out. So the trials log
nothing themselves: a Tune :class:`SweepMlflowCallback` on the driver turns trial events into MLflow calls
(start -> child run with the sampled values as params, each epoch's result -> metrics at ``step=epoch``, end ->
status). A resumed sweep finds its parent and the children of unfinished trials again (by the ``trial_id`` tag)
and keeps writing into them. Writes are synchronous: a handful per trial epoch, on the driver's event loop.

This module imports ray (Tune's ``Callback``): import it only where a sweep runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from robustfm.tracking import without_secrets

logger = logging.getLogger("robustfm.sweeps")
PARENT_ID_FILE = "mlflow_parent_run_id.txt"
"""Next to the Tune experiment: the sweep's parent run, reused when the sweep resumes."""


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created (artifacts next to a SQLite store) when missing."""
    from robustfm.tracking.writer import artifact_location_for

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location_for(uri))


def start_parent_run(uri: str, experiment: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Create the sweep's parent run (status RUNNING) and return its id."""
    from mlflow.entities import Param

    client = mlflow_client(uri)
    run = client.create_run(experiment_id(client, experiment, uri), run_name=name, tags=dict(tags))
    clean = without_secrets({str(k): str(v) for k, v in params.items()}, "params")
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in clean.items()])
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Mark an existing run RUNNING again (a resumed sweep)."""
    mlflow_client(uri).update_run(run_id, status="RUNNING")


def mark_interrupted(uri: str, parent_run_id: str) -> None:
    """An interrupted sweep: its parent and its still-running child runs become KILLED until a resume reopens them."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    running_children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' AND attributes.status = 'RUNNING'",
    )
    for child in running_children:
        client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="KILLED")


class SweepMlflowCallback(Callback):
    """Logs each trial as a child run of ``parent_run_id``; picklable (Tune saves it with the experiment).

    Args:
        uri, experiment: the MLflow store and experiment of the parent run.
        parent_run_id: the sweep's run.
        sweep_name: prefix of the child runs' names (``<sweep>-<trial id>``).
        epoch_key: the result field used as the metrics' step.
        total_epochs: epochs a trial runs when nothing stops it (a trial that reported fewer was stopped early).
    """

    def __init__(
        self, uri: str, experiment: str, parent_run_id: str, sweep_name: str, epoch_key: str, total_epochs: int
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.epoch_key = epoch_key
        self.total_epochs = total_epochs
        self._client: Any = None
        self._runs: dict[str, str] = {}
        self._epochs: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_epochs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    def child_run_id(self, trial: Any) -> str:
        """The trial's child run: known, found again after a resume (tag ``trial_id``), or created now."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        exp_id = experiment_id(self.client, self.experiment, self.uri)
        found = self.client.search_runs(
            [exp_id],
            filter_string=(
                f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' AND tags.trial_id = '{trial.trial_id}'"
            ),
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._epochs[trial.trial_id] = _last_step(self.client, run_id, self.epoch_key)
        else:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial.trial_id, "sweep": self.sweep_name}
            run = self.client.create_run(exp_id, run_name=f"{self.sweep_name}-{trial.trial_id}", tags=tags)
            run_id = run.info.run_id
            params = {"trial_id": trial.trial_id, **{str(k): str(v) for k, v in trial.config.items()}}
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in without_secrets(params, "params").items()])
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.child_run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        if self.epoch_key not in result:
            return
        run_id = self.child_run_id(trial)
        epoch = int(result[self.epoch_key])
        self._epochs[trial.trial_id] = max(epoch, self._epochs.get(trial.trial_id, 0))
        # The recipe's metrics are "kind/name"; Tune's own fields (time_total_s, pid, ...) have no slash.
        values = {k: float(v) for k, v in result.items() if "/" in k and isinstance(v, (int, float))}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in values.items() if math.isfinite(v)]
        metrics.append(Metric(self.epoch_key, float(epoch), now, epoch))
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str) -> None:
        run_id = self.child_run_id(trial)
        epochs = self._epochs.get(trial.trial_id, 0)
        self.client.set_tag(run_id, "epochs_reported", str(epochs))
        self.client.set_tag(run_id, "stopped_early", str(status == "FINISHED" and epochs < self.total_epochs).lower())
        self.client.set_terminated(run_id, status=status)


def _last_step(client: Any, run_id: str, key: str) -> int:
    history = client.get_metric_history(run_id, key)
    return max((int(m.step) for m in history), default=0)


def finish_parent_run(
    uri: str,
    parent_run_id: str,
    sweep_name: str,
    best_trial_id: str,
    best_config: Mapping[str, Any],
    metric: str,
    best_value: float,
) -> None:
    """Tag the best trial (and its child run) on the parent, log its metric as ``best/<metric>``, end the run."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' AND tags.trial_id = '{best_trial_id}'",
    )
    client.set_tag(parent_run_id, "best_trial_id", best_trial_id)
    if children:
        client.set_tag(parent_run_id, "best_run_id", children[0].info.run_id)
        client.set_tag(children[0].info.run_id, "best_trial", "true")
    for path, value in best_config.items():
        client.set_tag(parent_run_id, f"best.{path}", str(value))
    client.log_metric(parent_run_id, f"best/{metric}", float(best_value))
    client.set_terminated(parent_run_id, status="FINISHED")
    logger.info("sweep %s: best trial %s (%s = %.4f)", sweep_name, best_trial_id, metric, best_value)
