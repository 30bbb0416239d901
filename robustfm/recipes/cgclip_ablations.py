"""CG-CLIP's ablations as config presets, run under one base config and gathered into one table (paper 000, table 1).

Each preset (``configs/cgclip/ablations/*.yaml``) changes the base config, usually only its ``curriculum``; every
variant keeps the base's name and output folder, so variants that share a prefix of the curriculum (FLYP-only,
w/o Tune, CG-CLIP all start with Adapt) train that prefix once. The CLIP + linear-probe baseline is the pretrained
model's probe detector, measured at the "pretrained" milestone of every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from robustfm.config import ConfigError, from_dict, to_dict
from robustfm.config.core import deep_merge
from robustfm.recipes.cgclip_config import CGClipRecipeConfig

COLUMNS = {
    "seen AUROC (zero-shot)": "corruption_detection/zero_shot/set/seen/auroc",
    "unseen AUROC (zero-shot)": "corruption_detection/zero_shot/set/unseen/auroc",
    "seen AUROC (probe)": "corruption_detection/probe/set/seen/auroc",
    "unseen AUROC (probe)": "corruption_detection/probe/set/unseen/auroc",
    "seen accuracy (zero-shot)": "corruption_detection/zero_shot/set/seen/accuracy",
    "seen F1 (zero-shot)": "corruption_detection/zero_shot/set/seen/f1",
    "zero-shot top-1 (classes)": "zero_shot/clean/top1",
}
OOD_COLUMNS = {
    "seen AUROC (zero-shot)": "corruption_detection/zero_shot/set/seen/auroc",
    "unseen AUROC (zero-shot)": "corruption_detection/zero_shot/set/unseen/auroc",
}
"""Added to the table for each out-of-domain set of ``data.ood`` (``<name> seen AUROC (zero-shot)``, ...)."""
PROBE_BASELINE = {
    "seen AUROC (probe)": "corruption_detection/probe/set/seen/auroc",
    "unseen AUROC (probe)": "corruption_detection/probe/set/unseen/auroc",
}


def load_variants(
    base: CGClipRecipeConfig, preset_dir: Path, names: Sequence[str] | None = None
) -> dict[str, CGClipRecipeConfig]:
    """``{"cgclip": base, preset: base + preset}``, each validated. Presets' ``extends`` is ignored: the base wins."""
    paths = {p.stem: p for p in sorted(preset_dir.glob("*.yaml"))}
    chosen = list(paths) if names is None else list(names)
    variants = {"cgclip": dataclasses.replace(base, export=dataclasses.replace(base.export, wise_ft_alphas=()))}
    for name in chosen:
        if name not in paths:
            raise ConfigError("presets", f"unknown ablation {name!r} (presets: {', '.join(paths)})")
        change = {k: v for k, v in _preset_data(paths[name]).items() if k != "extends"}
        merged = deep_merge(to_dict(variants["cgclip"]), change)
        try:
            variants[name] = from_dict(CGClipRecipeConfig, merged)
        except ConfigError as err:
            raise ConfigError(err.field, f"{err.message} (ablation preset {paths[name]})") from None
    return variants


def _preset_data(path: Path) -> dict:
    # read_yaml would follow ``extends`` to the preset's own base; the ablation job applies presets to its --config.
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def run_ablations(base: CGClipRecipeConfig, variants: dict[str, CGClipRecipeConfig]) -> str:
    """Run every variant and write the table (``<output_dir>/<name>/ablations.md``, also logged to MLflow)."""
    from robustfm.recipes.cgclip import run
    from robustfm.recipes.milestones import markdown_table
    from robustfm.tracking import create_tracker, resolve_tracking_uri

    columns = dict(COLUMNS)
    for ood_name in base.data.ood:
        columns.update({f"{ood_name} {col}": f"ood/{ood_name}/{key}" for col, key in OOD_COLUMNS.items()})
    rows, pretrained = [], {}
    for name, cfg in variants.items():
        result = run(cfg)
        # (a milestone that eval.milestones leaves out shows as nan)
        final = result.milestones.get("-".join(cfg.curriculum), {})
        pretrained = result.milestones.get("pretrained", {})
        rows.append(
            {
                "variant": f"{name} ({' > '.join(cfg.curriculum)})",
                **{col: final.get(key, float("nan")) for col, key in columns.items()},
            }
        )
    baseline = {col: pretrained.get(key, float("nan")) for col, key in PROBE_BASELINE.items()}
    rows.insert(
        0, {"variant": "CLIP + linear probe (pretrained)", **{col: baseline.get(col, float("nan")) for col in columns}}
    )
    table = markdown_table(rows)
    out = Path(base.output_dir).resolve() / base.name / "ablations.md"
    out.write_text(table)
    tracker = create_tracker(base.tracking, resolve_tracking_uri(base.tracking))
    with tracker.start_run(f"{base.name}-ablations", tags={"recipe": "cgclip", "kind": "ablation-table"}) as run_:
        run_.log_text(table, "ablations.md")
        for row in rows:
            variant = row["variant"].split(" ")[0].replace("+", "_")
            run_.log_metrics({f"{variant}/{columns[col]}": v for col, v in row.items() if col in columns})
    tracker.close()
    print("\nCG-CLIP ablations:\n")
    print(table)
    print(f"written to {out}")
    return table
