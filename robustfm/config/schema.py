"""Config sections shared by every job. Method-specific sections live next to their code and compose these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from robustfm.config.core import check


@dataclass(frozen=True)
class RayConfig:
    """Where the job's Ray runs."""

    address: str | None = None
    """None starts an embedded local Ray (a laptop); ``"auto"`` joins the cluster a ``ray job submit`` runs on."""
    num_cpus: int | None = None
    """CPUs of the embedded local Ray (None: all of this machine's). Ignored when joining a cluster."""
    include_dashboard: bool = True
    """Start the dashboard with the embedded Ray (it binds 127.0.0.1). It also serves Ray's State API, which Ray
    Train uses to clean up after a run; without it the cleaner warns every second and may outlive its run."""

    def __post_init__(self) -> None:
        check(self.num_cpus is None or self.num_cpus > 0, "num_cpus", self.num_cpus, "must be positive")


@dataclass(frozen=True)
class TrackingConfig:
    """Where metrics, params and artifacts go."""

    backend: Literal["mlflow", "none"] = "mlflow"
    """``mlflow`` logs every run; ``none`` logs nothing (the no-op tracker, same interface)."""
    uri: str | None = None
    """MLflow tracking URI. None: ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store under ``store_dir``."""
    store_dir: str = "mlruns"
    """Local store (``mlflow.db`` + artifacts) used when no URI is given; resolved to an absolute path by the driver."""
    experiment: str = "robustfm"
    """MLflow experiment name."""
    fallback_dir: str | None = None
    """Local SQLite store that receives whatever an unreachable tracking server has not taken when a tracker closes
    (nothing is lost; the path is logged). None: ``~/.cache/robustfm/mlflow-fallback`` on the machine that logged."""


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to build through :func:`robustfm.models.create_model`."""

    name: str = "open_clip/tiny-vit"
    """``family/arch``: an open_clip (``open_clip/ViT-B-32``) or timm (``timm/vit_base_patch16_224``) name, or a
    registered tiny config (``open_clip/tiny-vit``, ``timm/tiny-vit``)."""
    pretrained: str | None = None
    """None (random init), an open_clip/timm pretrained tag (``openai``; needs internet), or a local weights path
    (``.safetensors``, or a torch checkpoint loaded with ``weights_only=True``)."""

    def __post_init__(self) -> None:
        family, sep, arch = self.name.partition("/")
        check(
            bool(sep and family and arch), "name", self.name, "must look like 'family/arch' (e.g. open_clip/ViT-B-32)"
        )


def check_perturbation_grid(perturbations: Sequence[str] | None, values_per_perturbation: int) -> None:
    """The checks of the two fields every config that draws everyday edits carries: ``perturbations`` (names of
    ``robustfm.perturbations.PERTURBATIONS``; None: all) and ``values_per_perturbation`` (points of each range)."""
    check(
        values_per_perturbation >= 2,
        "values_per_perturbation",
        values_per_perturbation,
        "must be >= 2 (the two ends of each range)",
    )
    if perturbations is None:
        return
    from robustfm.perturbations import PERTURBATIONS  # imports torch: the edits register themselves

    check(len(perturbations) > 0, "perturbations", perturbations, "must name at least one edit")
    for name in perturbations:
        try:
            PERTURBATIONS.check(name)
        except KeyError as err:
            check(False, "perturbations", name, str(err))
