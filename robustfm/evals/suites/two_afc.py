"""2AFC perceptual similarity (NIGHTS, BAPPS; paper 003 §IV): does the model find the candidate closer to the
reference that humans found closer, clean and when an attacker perturbs the reference?

Each row is a triplet (``robustfm.data.sources_2afc``): reference ``image``, candidates ``left`` / ``right`` and
``p_right``, the share of judges who found the right one closer. Similarity is the cosine of the model's image
embeddings (projected; the cosine is the same normalized or not). Per subset (``class_name``):

- ``accuracy``: the decision "right" iff cos(ref, right) > cos(ref, left) (**a tie goes left**, as perceptual-metrics
  decides) against the binarized label ``p_right > 0.5`` (0.5 counts as left);
- ``soft_score``: with d = 1 - cos, (d_left < d_right)(1 - p) + (d_right < d_left) p + 0.5 [d_left = d_right] (LPIPS'
  and DreamSim's score: agreement with the share of judges, ties half);
- ``robust_accuracy`` per threat: APGD on the CE of the two *unscaled* cosines, only the reference moving, on the
  first ``attack_samples`` triplets of each subset ordered by a hash of their id (perceptual-metrics' attack; paper 003:
  100 iterations, 1 restart, random start, Linf 4/255 and L2 3.0, 1,000 triplets per subset). A triplet is robust when
  decided right clean and at every iterate (a row with a non-finite loss or gradient is not robust, and counted).

Over subsets: the mean of the subsets' values (``mean_over_subsets``: BAPPS' headline number averages its 6 subsets)
and the value over all rows pooled (``all``: NIGHTS' "entire test set"). Images go through the shared eval
preprocessing (resize the shorter side to the model's size, bicubic, centre crop): BAPPS' 64 px images are upsampled
bicubically where perceptual-metrics resizes bilinearly; the protocol records it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable, mean_of, two_afc_correct, two_afc_soft_score
from robustfm.evals.suite import Plot, Suite, SuiteOutput, condition_name
from robustfm.evals.zero_shot_attacks import attack_subset, with_attack_subset_digest

CLEAN = "clean"
TIE_RULE = "sim_right > sim_left decides right; a tie decides left; label = p_right > 0.5"
PREPROCESSING = "shorter side resized to the model's image size (bicubic), centre crop; candidates likewise"


@dataclass(frozen=True)
class Threat:
    """One threat model of the attack on the reference."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 4 / 255
    """Radius in [0,1] pixel units (paper 003: Linf 4/255 = 0.0157, L2 3.0)."""

    def __post_init__(self) -> None:
        check(self.norm in ("linf", "l2"), "norm", self.norm, "must be linf or l2")
        check(self.eps > 0, "eps", self.eps, "must be > 0")


@dataclass(frozen=True)
class TwoAFCConfig:
    """2AFC agreement with human judgements, clean and with the reference attacked."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Triplet shards (``prepare_data`` with source ``nights`` or ``bapps``): ``left``, ``right``, ``p_right``."""
    threats: tuple[Threat, ...] = (Threat("linf", 4 / 255), Threat("l2", 3.0))
    """Attacks on the reference, each its own condition (empty: clean only, no gradients)."""
    attack_steps: int = 100
    """APGD iterations per restart."""
    attack_restarts: int = 1
    attack_samples: int | None = 1000
    """Triplets attacked per subset: the first N by a hash of their id (a fixed subset whatever the seed). None: all."""

    def __post_init__(self) -> None:
        check(self.attack_steps >= 1, "attack_steps", self.attack_steps, "must be >= 1")
        check(self.attack_restarts >= 1, "attack_restarts", self.attack_restarts, "must be >= 1")
        check(
            self.attack_samples is None or self.attack_samples >= 1,
            "attack_samples",
            self.attack_samples,
            "must be >= 1 or null (all)",
        )
        names = [threat_condition(t) for t in self.threats]
        check(len(set(names)) == len(names), "threats", self.threats, "must not repeat a threat")


def threat_condition(threat: Threat) -> str:
    """``apgd_linf:0.0156863``: the metric-key-safe name of one attack condition."""
    return condition_name(f"apgd_{threat.norm}", threat.eps)


class TwoAFCScorer(ScoringActor):
    """The similarities of the reference to both candidates, clean (and, in the subclass, at the attacked reference).

    Similarity is the cosine of image embeddings, or minus the distance for a model that is a distance between two
    images (``pair_distance``: LPIPS); both decide and score the same way (the larger similarity is the closer one).
    """

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "condition": (object, ()),
            "subset": (object, ()),
            "p_right": (np.float64, ()),
            "sim_left": (np.float64, ()),
            "sim_right": (np.float64, ()),
            "correct": (np.int8, ()),
            "attack_failed": (np.int8, ()),
            "zero_gradient": (np.int8, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.evals.data import decode_batch

        ids = [str(i) for i in batch["id"]]
        size = self.model.image_size
        left, left_bad = decode_batch(batch["left"], ids, size)
        right, right_bad = decode_batch(batch["right"], ids, size)
        bad = [a or b for a, b in zip(left_bad, right_bad, strict=True)]
        rows = [{"id": ids[i], "status": f"candidate_{reason}"} for i, reason in enumerate(bad) if reason]
        good = [i for i, reason in enumerate(bad) if reason is None]
        if not good:
            return rows
        device = pixels.device
        # decode_batch leaves undecodable rows out of its array: row i of the batch is entry (decodable before i).
        left_rows = np.cumsum([r is None for r in left_bad])[good] - 1
        right_rows = np.cumsum([r is None for r in right_bad])[good] - 1
        triplets = _Triplets(
            self.model,
            [ids[i] for i in good],
            [str(batch["class_name"][i]) for i in good],
            [float(batch["p_right"][i]) for i in good],
            *_candidates(self.model, torch.from_numpy(left[left_rows]), torch.from_numpy(right[right_rows]), device),
        )
        reference = pixels[torch.tensor(good, device=device)]
        with torch.no_grad():
            rows += triplets.rows(CLEAN, reference)
        rows += self.attack(triplets, reference)
        return rows

    def attack(self, triplets: _Triplets, reference: Any) -> list[dict[str, Any]]:
        """Rows of the attack conditions (none without threats)."""
        return []


def _candidates(model: Any, left: Any, right: Any, device: Any) -> tuple[Any, Any]:
    """What the similarity needs of the candidates: their embeddings (computed once), or their pixels for a
    distance model."""
    import torch

    left, right = left.to(device), right.to(device)
    if hasattr(model, "pair_distance"):
        return left, right
    with torch.no_grad():
        return model.encode_image(left).float(), model.encode_image(right).float()


class TwoAFCAttackScorer(TwoAFCScorer):
    """:class:`TwoAFCScorer` plus APGD on the reference for every threat (autograd on; the model frozen, fp32)."""

    needs_gradients = True

    def attack(self, triplets: _Triplets, reference: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.attacks import AttackConfig, apgd
        from robustfm.seeding import sample_seed

        chosen = set(self.params["attack_ids"])
        keep = [i for i, sample in enumerate(triplets.ids) if sample in chosen]
        if not keep:
            return []
        part = triplets.select(keep)
        x = reference[torch.tensor(keep, device=reference.device)]
        labels = torch.tensor([p > 0.5 for p in part.p_right], device=x.device, dtype=torch.long)
        with torch.no_grad():
            clean_correct = part.correct(x)
        rows = []
        for threat in self.params["threats"]:
            name = condition_name(f"apgd_{threat['norm']}", threat["eps"])
            config = AttackConfig(
                norm=threat["norm"],
                eps=float(threat["eps"]),
                steps=self.params["attack_steps"],
                restarts=self.params["attack_restarts"],
                objective="ce",  # CE on [sim_left, sim_right]: the unscaled cosines for an embedding model
                precision=self.gradient_precision,
            )
            seeds = [sample_seed(i, 0, f"two_afc/{name}", self.seed) for i in part.ids]
            result = apgd(part.logits, x, {"labels": labels}, config, row_seeds=seeds, eval_modules=self.model)
            decisive = torch.where(result.success.view(-1, 1, 1, 1), result.x_success, result.x_adv)
            robust = clean_correct & ~result.success & ~result.failed
            with torch.no_grad():
                rows += part.rows(name, decisive, robust, result.failed, result.zero_grad_steps > 0)
        return rows


@dataclass
class _Triplets:
    """The decoded triplets of a batch: ids, subsets, judgements and the candidates (embeddings, or pixels for a
    distance model)."""

    model: Any
    ids: list[str]
    subsets: list[str]
    p_right: list[float]
    left: Any
    right: Any

    def select(self, index: Sequence[int]) -> _Triplets:
        return _Triplets(
            self.model,
            [self.ids[i] for i in index],
            [self.subsets[i] for i in index],
            [self.p_right[i] for i in index],
            self.left[list(index)],
            self.right[list(index)],
        )

    def logits(self, reference: Any) -> Any:
        """``(N, 2)`` similarities of the reference pixels to (left, right)."""
        import torch
        import torch.nn.functional as F

        if hasattr(self.model, "pair_distance"):
            distance = self.model.pair_distance
            return -torch.stack((distance(reference, self.left), distance(reference, self.right)), dim=1)
        embedding = self.model.encode_image(reference).float()
        left = F.cosine_similarity(embedding, self.left, dim=1)
        return torch.stack((left, F.cosine_similarity(embedding, self.right, dim=1)), dim=1)

    def correct(self, reference: Any) -> Any:
        import torch

        similarity = self.logits(reference)
        labels = torch.tensor([p > 0.5 for p in self.p_right], device=similarity.device)
        return (similarity[:, 1] > similarity[:, 0]) == labels

    def rows(self, name: str, reference: Any, robust: Any = None, failed: Any = None, zero: Any = None) -> list[dict]:
        similarity = self.logits(reference).detach().cpu().numpy().astype(np.float64)
        sim_left, sim_right = similarity[:, 0], similarity[:, 1]
        decided = (sim_right > sim_left) == (np.asarray(self.p_right) > 0.5)
        flags = [np.zeros(len(self.ids), dtype=bool) if t is None else t.detach().cpu().numpy() for t in (failed, zero)]
        correct = decided if robust is None else robust.detach().cpu().numpy()
        return [
            {
                "id": sample,
                "condition": name,
                "subset": subset,
                "p_right": p,
                "sim_left": float(sl),
                "sim_right": float(sr),
                "correct": int(c),
                "attack_failed": int(f),
                "zero_gradient": int(z),
            }
            for sample, subset, p, sl, sr, c, f, z in zip(
                self.ids, self.subsets, self.p_right, sim_left, sim_right, correct, *flags, strict=True
            )
        ]


def attacked_per_subset(ids: Sequence[str], subsets: Sequence[str], n: int | None) -> list[str]:
    """The first ``n`` ids of each subset ordered by BLAKE2b of the id (None: all), sorted: independent of seeds,
    batches and actors."""
    chosen: list[str] = []
    for subset in sorted(set(subsets)):
        members = [i for i, s in zip(ids, subsets, strict=True) if s == subset]
        chosen += attack_subset(members, [0] * len(members), n)
    return sorted(chosen)


@SUITES.register("two_afc", config=TwoAFCConfig)
class TwoAFCSuite(Suite):
    name = "two_afc"
    version = "1"
    scorer = TwoAFCScorer
    columns = ("class_name", "left", "right", "p_right")
    sort_keys = ("id", "condition")
    metric_specs = (
        MetricSpec("accuracy", "higher", "share of triplets where the model picks the candidate most judges picked"),
        MetricSpec("soft_score", "higher", "agreement with the share of judges: (1-p) or p for the picked side"),
        MetricSpec(
            "robust_accuracy",
            "higher",
            "share of the attacked triplets decided right clean and at every iterate of APGD on the reference",
        ),
        MetricSpec("failed", "lower", "share of the attacked triplets whose loss or gradient was not finite"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if self.section.threats:
            self.scorer = TwoAFCAttackScorer

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        attacked: list[str] = []
        if self.section.threats:
            table = dataset.select_columns(["id", "class_name"]).to_pandas()
            ids, subsets = table["id"].astype(str).tolist(), table["class_name"].astype(str).tolist()
            attacked = attacked_per_subset(ids, subsets, self.section.attack_samples)
        return {
            "threats": [{"norm": t.norm, "eps": float(t.eps)} for t in self.section.threats],
            "attack_steps": self.section.attack_steps,
            "attack_restarts": self.section.attack_restarts,
            "attack_ids": attacked,
            "tie_rule": TIE_RULE,
            "preprocessing": PREPROCESSING,
        }

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        """Paper 003 Table I's shape: accuracy clean and under each threat, all triplets pooled."""
        columns = {"2AFC clean": f"{CLEAN}/all/accuracy"}
        for threat in params.get("threats", []):
            name = condition_name(f"apgd_{threat['norm']}", threat["eps"])
            columns[f"2AFC {threat['norm']} {threat['eps']:.4g}"] = f"{name}/all/robust_accuracy"
        return columns

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record, with the attacked triplets as their count and the SHA-256 of their ids (not the ids)."""
        return super().protocol_params(with_attack_subset_digest(params))

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        condition = np.asarray(rows["condition"]).astype(str)
        subset = np.asarray(rows["subset"]).astype(str)
        sim_left, sim_right = np.asarray(rows["sim_left"]), np.asarray(rows["sim_right"])
        p_right = np.asarray(rows["p_right"])
        correct, failed = np.asarray(rows["correct"]), np.asarray(rows["attack_failed"])
        subsets = sorted(set(subset[condition == CLEAN]))
        metrics, table = MetricTable(), []
        accuracy_series: dict[str, tuple[list[Any], list[float]]] = {}

        def report(name: str, family: str, per_subset: dict[str, float], pooled: float, counts: dict[str, int]) -> None:
            for key, value in per_subset.items():
                metrics.add(f"{name}/{key}/{family}", value, self.spec(family))
                table.append({"condition": name, "subset": key, "metric": family, "value": value, "n": counts[key]})
            metrics.add(f"{name}/mean_over_subsets/{family}", mean_of(per_subset), self.spec(family))
            metrics.add(f"{name}/all/{family}", pooled, self.spec(family))
            total = sum(counts.values())
            table.append({"condition": name, "subset": "all", "metric": family, "value": pooled, "n": total})

        clean = condition == CLEAN
        decided = two_afc_correct(sim_left, sim_right, p_right)
        soft = two_afc_soft_score(-sim_left, -sim_right, p_right)  # distances up to a constant: the same comparisons
        counts = {s: int((clean & (subset == s)).sum()) for s in subsets}
        per_subset = {s: float(decided[clean & (subset == s)].mean()) for s in subsets}
        report(CLEAN, "accuracy", per_subset, float(decided[clean].mean()), counts)
        accuracy_series[CLEAN] = (subsets, [per_subset[s] for s in subsets])
        soft_per_subset = {s: float(soft[clean & (subset == s)].mean()) for s in subsets}
        report(CLEAN, "soft_score", soft_per_subset, float(soft[clean].mean()), counts)
        for threat in params["threats"]:
            name = condition_name(f"apgd_{threat['norm']}", threat["eps"])
            mask = condition == name
            present = [s for s in subsets if (mask & (subset == s)).any()]
            if not present:
                continue
            counts = {s: int((mask & (subset == s)).sum()) for s in present}
            robust = {s: float(correct[mask & (subset == s)].mean()) for s in present}
            report(name, "robust_accuracy", robust, float(correct[mask].mean()), counts)
            metrics.add(f"{name}/all/failed", float(failed[mask].mean()), self.spec("failed"))
            if present == subsets:  # a bar chart's series share their x labels
                accuracy_series[name] = (present, [robust[s] for s in present])
        plot = Plot("two_afc_accuracy", "2AFC accuracy per subset", "subset", "accuracy", accuracy_series, kind="bar")
        return SuiteOutput(metrics, table, [plot])
