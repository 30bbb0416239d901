"""CFT concept validation (paper 001 §3.2, App. §6-7): which candidate concepts of each class are kept.

The paper validates the LLM's candidate concepts against a grounding model's masks on P images per class, in two
stages: first the occurrence rate, then the spatial coverage. Validation showed +1.9 IN-A / +1.3 IN-R top-1 over
unvalidated concepts (App. §7), and 15 % / 20 % were the best thresholds of those tried (App. §6).

Layout (local directories):

- ``concepts/<class>/<stem>__<concept>.png``: the mask a grounding model returned for ``concept`` in image
  ``<stem>``. No file, or an all-zero one, means the concept was not found there (GroundedSAM returns no mask).
- ``objects/<class>/<stem>.png``: the class-level object mask of the same image (e.g. ImageNet-S).

Each folder is read in its own format (``concept_format``, ``object_format``: ``binary`` or ``imagenet_s``, as in
:mod:`robustfm.data.concept_masks`); a pixel belongs to a mask when its value is > 0. A class's images are the stems
with an object mask; ``images_per_class`` of them are drawn without replacement by a generator seeded with
(``seed``, class name), so a class's sample does not depend on which other classes are validated (all of them when
it has fewer). The candidates are those named in ``candidates`` (JSON ``{class: [concept, ...]}``), else every
concept with a file in the class's folder.

1. occurrence(k) = share of the sampled images where M_k is non-empty; kept when >= ``min_occurrence``.
2. coverage (``coverage_scope: class``, the paper's definition): the mean over the sampled images of
   IoU(union of the occurrence-kept concepts' masks, object mask), images where both are empty left out. It is a
   property of the class's concept set: below ``min_coverage`` every occurrence-kept concept of the class is
   dropped. ``concept``: each concept's own mean IoU with the object mask over the images where it occurs
   (``concept_iou``, reported in either case) must reach the threshold.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.data.concept_masks import CONCEPT_SEPARATOR, decode_mask, split_concept_file
from robustfm.data.images import ImageDecodeError

TABLE_COLUMNS = ("class", "concept", "images", "present", "occurrence", "concept_iou", "coverage", "kept", "reason")
_EPS = 1e-9  # occurrence 3/20 must pass 0.15: compare with a tolerance, not bit-exactly


class ConceptInputError(ValueError):
    """A missing folder, a class without object masks, an unreadable or mis-sized mask: named in the message."""


@dataclass(frozen=True)
class ConceptValidationConfig:
    """``jobs/cft_concepts.py validate``: thresholds and where the masks are."""

    concepts: str = ""
    """Folder of ``<class>/<stem>__<concept>.png`` concept masks."""
    objects: str = ""
    """Folder of ``<class>/<stem>.png`` class-level object masks."""
    output: str = "outputs/cft_concepts"
    """Where ``concepts.csv`` and ``concepts.json`` are written."""
    candidates: str | None = None
    """JSON file ``{class: [concept, ...]}``: the candidate sets (concepts never found then still get a row). None:
    every concept with a file in the class's folder, and only the classes with a concept folder."""
    images_per_class: int = 30
    """P, images sampled per class (paper: 30)."""
    seed: int = 0
    """Seeds each class's sample together with the class name."""
    min_occurrence: float = 0.15
    """Stage 1: share of the sampled images where a concept is found (paper: 0.15)."""
    min_coverage: float = 0.20
    """Stage 2: mean IoU with the object masks (paper: 0.20)."""
    coverage_scope: Literal["class", "concept"] = "class"
    """``class``: IoU of the union of the class's occurrence-kept concepts (paper §3.2); ``concept``: each
    concept's own IoU, over the images where it occurs (a reading of App. §6's per-concept wording)."""
    concept_format: Literal["binary", "imagenet_s"] = "binary"
    """Encoding of the concept mask files."""
    object_format: Literal["binary", "imagenet_s"] = "binary"
    """Encoding of the object mask files (ImageNet-S's own files: ``imagenet_s``)."""
    progress: bool = True
    """Show a progress bar over the classes."""

    def __post_init__(self) -> None:
        check(bool(self.concepts), "concepts", self.concepts, "must name the folder of concept masks")
        check(bool(self.objects), "objects", self.objects, "must name the folder of object masks")
        check(self.images_per_class > 0, "images_per_class", self.images_per_class, "must be positive")
        for name in ("min_occurrence", "min_coverage"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, name, value, "must be a share in [0, 1]")


@dataclass(frozen=True)
class ConceptRow:
    """One candidate concept of one class, as the table lists it."""

    class_name: str
    concept: str
    images: int
    """Sampled images of the class."""
    present: int
    """Sampled images where the concept's mask is non-empty."""
    occurrence: float
    concept_iou: float | None
    """Mean IoU of the concept's own mask with the object mask over the images where it occurs (None: never)."""
    coverage: float | None
    """The coverage the threshold was applied to (None: not reached, dropped by occurrence)."""
    kept: bool
    reason: str
    """``kept``, ``low_occurrence`` or ``low_coverage``."""


@dataclass
class ValidationResult:
    """Rows, per-class facts (sampled stems, coverage) and notes on what was left out."""

    config: ConceptValidationConfig
    rows: list[ConceptRow] = field(default_factory=list)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kept(self) -> dict[str, list[str]]:
        """class -> kept concepts (every validated class, possibly with none)."""
        return {c: [r.concept for r in self.rows if r.class_name == c and r.kept] for c in self.classes}

    def summary(self) -> str:
        """A few lines for the end of the job."""
        cfg = self.config
        dropped = {reason: sum(r.reason == reason for r in self.rows) for reason in ("low_occurrence", "low_coverage")}
        kept = [r for r in self.rows if r.kept]
        lines = [
            f"concept validation: {len(self.rows)} candidate concepts in {len(self.classes)} classes, "
            f"P = {cfg.images_per_class} images per class (seed {cfg.seed})",
            f"  kept {len(kept)}; dropped {dropped['low_occurrence']} by occurrence < {cfg.min_occurrence:g}, "
            f"{dropped['low_coverage']} by coverage < {cfg.min_coverage:g} (scope {cfg.coverage_scope})",
        ]
        if kept:
            lines.append(
                f"  kept concepts: mean occurrence {np.mean([r.occurrence for r in kept]):.3f}, "
                f"mean coverage {np.mean([r.coverage for r in kept]):.3f}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _folder(path: str, field_name: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ConceptInputError(f"{field_name} folder {folder} does not exist or is not a directory")
    return folder


def _read_candidates(path: str) -> dict[str, list[str]]:
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConceptInputError(f"candidates file {file}: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()
    ):
        raise ConceptInputError(f"candidates file {file} must hold a JSON object {{class: [concept, ...]}}")
    for cls, concepts in data.items():
        bad = [c for c in concepts if not c or CONCEPT_SEPARATOR in c or "/" in c]
        if bad:
            raise ConceptInputError(
                f"candidates file {file}: class {cls!r} has concept names {bad} (empty, or containing "
                f"{CONCEPT_SEPARATOR!r} or '/', which the file names cannot hold)"
            )
    return {str(cls): list(dict.fromkeys(concepts)) for cls, concepts in data.items()}


def _concept_files(folder: Path) -> tuple[dict[str, dict[str, Path]], list[Path]]:
    """stem -> concept -> file, and the files that are not per-concept masks."""
    by_stem: dict[str, dict[str, Path]] = {}
    ignored = []
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        parsed = split_concept_file(file.name) if file.is_file() else None
        if parsed is None:
            ignored.append(file)
            continue
        by_stem.setdefault(parsed[0], {})[parsed[1]] = file
    return by_stem, ignored


def sample_stems(stems: list[str], class_name: str, count: int, seed: int) -> list[str]:
    """``count`` of ``stems`` (all when fewer), drawn by a generator seeded with (seed, class name); sorted."""
    ordered = sorted(stems)
    if len(ordered) <= count:
        return ordered
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=count, replace=False))


def _read(file: Path, mask_format: str, field_name: str) -> np.ndarray:
    try:
        return decode_mask(file.read_bytes(), str(file), mask_format) > 0
    except OSError as err:
        raise ConceptInputError(f"cannot read {file}: {err}") from None
    except ImageDecodeError as err:
        raise ConceptInputError(f"{err.detail} (read as {field_name}={mask_format})") from None


def _iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = np.count_nonzero(a | b)
    return None if union == 0 else np.count_nonzero(a & b) / union


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def validate_class(
    class_name: str,
    stems: list[str],
    concept_files: dict[str, dict[str, Path]],
    candidates: list[str],
    objects: Path,
    cfg: ConceptValidationConfig,
) -> tuple[list[ConceptRow], float | None]:
    """The rows of one class's candidates over its sampled ``stems``, and the class-scope coverage (None when no
    concept passed occurrence)."""
    masks: dict[str, dict[str, np.ndarray]] = {}  # stem -> concept -> non-empty mask
    object_masks: dict[str, np.ndarray] = {}
    for stem in stems:
        object_file = objects / f"{stem}.png"
        object_masks[stem] = _read(object_file, cfg.object_format, "object_format")
        masks[stem] = {}
        for concept in candidates:
            file = concept_files.get(stem, {}).get(concept)
            if file is None:
                continue
            mask = _read(file, cfg.concept_format, "concept_format")
            if mask.shape != object_masks[stem].shape:
                raise ConceptInputError(
                    f"concept mask {file} is {mask.shape[1]}x{mask.shape[0]}, its object mask {object_file} is "
                    f"{object_masks[stem].shape[1]}x{object_masks[stem].shape[0]}"
                )
            if mask.any():
                masks[stem][concept] = mask
    present = {k: [s for s in stems if k in masks[s]] for k in candidates}
    occurrence = {k: len(present[k]) / len(stems) for k in candidates}
    concept_iou = {
        k: _mean([iou for s in present[k] if (iou := _iou(masks[s][k], object_masks[s])) is not None])
        for k in candidates
    }
    frequent = [k for k in candidates if occurrence[k] + _EPS >= cfg.min_occurrence]
    class_coverage = None
    if frequent:
        ious = []
        for stem in stems:
            union = np.zeros_like(object_masks[stem])
            for k in frequent:
                if k in masks[stem]:
                    union |= masks[stem][k]
            if (iou := _iou(union, object_masks[stem])) is not None:
                ious.append(iou)
        class_coverage = _mean(ious)
    rows = []
    for k in candidates:
        coverage, reason = None, "low_occurrence"
        if k in frequent:
            coverage = class_coverage if cfg.coverage_scope == "class" else concept_iou[k]
            passed = coverage is not None and coverage + _EPS >= cfg.min_coverage
            reason = "kept" if passed else "low_coverage"
        row = ConceptRow(
            class_name,
            k,
            len(stems),
            len(present[k]),
            occurrence[k],
            concept_iou[k],
            coverage,
            reason == "kept",
            reason,
        )
        rows.append(row)
    return rows, class_coverage


def validate_concepts(cfg: ConceptValidationConfig) -> ValidationResult:
    """Validate every class's candidate concepts (see the module docstring).

    Raises:
        ConceptInputError: naming the path: a missing folder, a class without object masks, a class whose concept
            files match none of its object masks, a concept file outside the candidates, an unreadable or mis-sized
            mask.
    """
    from tqdm.auto import tqdm

    concepts_root = _folder(cfg.concepts, "concepts")
    objects_root = _folder(cfg.objects, "objects")
    listed = _read_candidates(cfg.candidates) if cfg.candidates is not None else None
    found = sorted(p.name for p in concepts_root.iterdir() if p.is_dir())
    classes = sorted(listed) if listed is not None else found
    if not classes:
        raise ConceptInputError(f"concepts folder {concepts_root} has no <class>/ folders (and no candidates file)")
    result = ValidationResult(cfg)
    ignored: list[Path] = []
    unmatched = 0
    small: list[str] = []
    for class_name in tqdm(classes, desc="validate", unit="class", disable=not cfg.progress):
        object_folder = objects_root / class_name
        stems = sorted(p.stem for p in object_folder.glob("*.png") if p.is_file()) if object_folder.is_dir() else []
        known = set(stems)
        if not stems:
            raise ConceptInputError(
                f"class {class_name!r} has no object masks: {object_folder} "
                f"{'holds no .png files' if object_folder.is_dir() else 'does not exist'} (expected <stem>.png)"
            )
        files, not_concepts = _concept_files(concepts_root / class_name)
        ignored += not_concepts
        if files and not set(files) & known:
            example = next(iter(next(iter(files.values())).values()))
            raise ConceptInputError(
                f"class {class_name!r}: none of its concept masks has an object mask (e.g. {example} has no "
                f"{object_folder / (example.name.rpartition(CONCEPT_SEPARATOR)[0] + '.png')})"
            )
        unmatched += sum(len(v) for stem, v in files.items() if stem not in known)
        found_concepts = sorted({k for by_concept in files.values() for k in by_concept})
        candidates = listed[class_name] if listed is not None else found_concepts
        if listed is not None:
            outside = [k for k in found_concepts if k not in candidates]
            if outside:
                file = next(f for v in files.values() for k, f in v.items() if k == outside[0])
                raise ConceptInputError(
                    f"{file}: concept {outside[0]!r} is not among class {class_name!r}'s candidates {candidates} "
                    f"in {cfg.candidates}"
                )
        sampled = sample_stems(stems, class_name, cfg.images_per_class, cfg.seed)
        if len(stems) < cfg.images_per_class:
            small.append(f"{class_name} ({len(stems)})")
        rows, coverage = validate_class(class_name, sampled, files, candidates, object_folder, cfg)
        result.rows += rows
        result.classes[class_name] = {"population": len(stems), "sampled": sampled, "coverage": coverage}
    if small:
        result.notes.append(f"{len(small)} class(es) had fewer than P images, all used: {', '.join(small[:5])}")
    if unmatched:
        result.notes.append(f"{unmatched} concept mask(s) of images without an object mask were not used")
    if ignored:
        result.notes.append(f"{len(ignored)} file(s) not named <stem>{CONCEPT_SEPARATOR}<concept>.png were ignored, "
                            f"e.g. {ignored[0]}")  # fmt: skip
    if listed is not None:
        extra = sorted(set(found) - set(listed))
        if extra:
            result.notes.append(f"{len(extra)} concept folder(s) not in the candidates file were left out: {extra[:5]}")
    return result


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 6)
    return value


def write_tables(result: ValidationResult, output: str | Path) -> tuple[Path, Path]:
    """Write ``concepts.csv`` (one row per class and candidate concept) and ``concepts.json`` (the settings, the
    rows, per class the sampled stems and coverage, and ``kept``: class -> kept concepts, what CFT's masks use)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        {"class": r.class_name, **{k: v for k, v in asdict(r).items() if k != "class_name"}} for r in result.rows
    ]
    csv_path = out / "concepts.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in record.items()} for record in records)
    json_path = out / "concepts.json"
    content = {
        "settings": asdict(result.config),
        "concepts": records,
        "classes": result.classes,
        "kept": result.kept(),
        "notes": result.notes,
    }
    json_path.write_text(json.dumps(content, indent=2) + "\n")
    return csv_path, json_path
