"""What a suite is: its data, its scoring actor class, its aggregation and the direction of every metric.

A suite subclass is registered in ``robustfm.evals.SUITES`` together with its config class (``@SUITES.register(name,
config=...)`` in its own module under ``robustfm/evals/suites/``); :func:`robustfm.evals.runner.run_suite` runs any
of them the same way: data (shaped by :meth:`Suite.shape_dataset`) -> scoring actor pool -> rows on the driver ->
:meth:`Suite.aggregate` -> protocol, artifacts, MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from robustfm.config.core import to_dict
from robustfm.evals.actors import ScoringActor
from robustfm.evals.config import EvalConfig, EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable


@dataclass
class Plot:
    """A figure as data, so that the report card can overlay two models' series on the same axes.

    Attributes:
        name: file stem of the PNG.
        title, xlabel, ylabel: axis text.
        series: label -> (x values, y values).
        kind: ``line`` (x numeric) or ``bar`` (x categorical; every series shares the x labels).
    """

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[Any], list[float]]]
    kind: Literal["line", "bar"] = "line"


@dataclass
class SuiteOutput:
    """What a suite's aggregation produces from the scored rows."""

    metrics: MetricTable
    table: list[dict[str, Any]]
    """One row per (condition, metric) or similar: the table artifact (CSV and JSON)."""
    plots: list[Plot] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    """Pictures to look at (e.g. a grid of originals and inversions): name -> uint8 ``[H, W, 3]``, written as
    ``images/<name>.png`` beside the plots."""


class Suite(ABC):
    """One evaluation: subclasses set the class attributes and implement the three hooks.

    Args:
        cfg: the evaluation config; the suite reads its own section ``cfg.suites[name]`` (its registered config
            class, which has a ``data`` field).
    """

    name: ClassVar[str]
    version: ClassVar[str]
    """Bumped whenever a change could move a number: results of different versions are not comparable."""
    scorer: ClassVar[type[ScoringActor]]
    """The per-batch scoring actor class (``scorer.needs_gradients`` declares an attack or relevance scorer)."""
    columns: ClassVar[tuple[str, ...]] = ()
    """Shard columns the suite reads besides ``id`` and ``image``; checked against the shards' own columns before
    anything is scored."""
    sort_keys: ClassVar[tuple[str, ...]] = ("id",)
    """Output columns that order the scored rows before aggregation (results never depend on batch order)."""
    metric_specs: ClassVar[tuple[MetricSpec, ...]]
    """Every metric family this suite reports, with its direction and definition."""
    needs_shards: ClassVar[bool] = False
    """True when the suite has no synthetic data (its data must come from shards, e.g. a retrieval benchmark with its
    own ground truth): ``--suite all`` leaves it out while its ``data.shards`` is unset."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.section = cfg.suites[self.name]

    @property
    def data(self) -> EvalDataConfig:
        """The data section of this suite."""
        return self.section.data

    def spec(self, family: str) -> MetricSpec:
        """The declared :class:`MetricSpec` of a metric family (an undeclared family is a bug)."""
        for spec in self.metric_specs:
            if spec.name == family:
                return spec
        raise KeyError(f"suite {self.name!r} reports undeclared metric family {family!r}")

    def shape_dataset(self, dataset: Any) -> Any:
        """Reshape the rows before scoring (a ``ray.data.Dataset`` of ``id``, ``image`` and :attr:`columns`), e.g.
        gather the rows of a pair or triplet into one row. The result must keep an ``id`` column and an ``image``
        column of encoded bytes (the scorer decodes it). Default: unchanged."""
        return dataset

    @classmethod
    def settings_problems(cls, section: Any) -> list[str]:
        """What is wrong with this suite's section that only files can tell (a missing pool, an unknown name whose
        registry imports torch), as messages naming the field; checked on the driver before Ray starts. Default:
        nothing (the config class's own checks already ran)."""
        return []

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        """Plain-data parameters handed to every actor (resolved names, prompts, class names...)."""
        return {}

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """What the protocol records about this suite's settings: its config section and the resolved params."""
        section = {k: v for k, v in to_dict(self.section).items() if k != "data"}
        return {"config": section, "resolved": to_dict(dict(params))}

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        """Column label -> metric key of the suite's headline table in the report card (one row per model, the
        shape of a paper's table, e.g. 2AFC accuracy clean, Linf, L2). Default: none."""
        return {}

    @abstractmethod
    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        """Metrics, table and plots from the scored rows (status ``ok`` only, sorted by :attr:`sort_keys`)."""


def condition_name(edit: str, parameter: float | int) -> str:
    """``gaussian_noise:3``, ``jpeg_quality:55``: the metric-key-safe name of one evaluation condition, shared by the
    suites so that their per-condition metrics line up (zero-shot accuracy and embedding cosine at one value)."""
    return f"{edit}:{parameter:g}"


def resolve_names(
    names: Sequence[str] | None, default: Sequence[str], registry: Any, what: str, *, allow_empty: bool = False
) -> list[str]:
    """``names`` (or ``default`` when None), each checked against ``registry`` so typos fail before Ray starts; an
    empty selection is an error unless ``allow_empty`` (a suite that can run without any such condition)."""
    chosen = list(default if names is None else names)
    if not chosen and not allow_empty:
        raise ValueError(f"no {what} selected")
    for name in chosen:
        registry.check(name)
    return chosen
