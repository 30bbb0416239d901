"""The protocol of a result: everything that shaped a number, so that numbers are only compared under equal protocols.

A protocol records the suite and its version, the model reference, the data (source, split, how many samples and
a SHA-256 of the sorted sample ids actually used), the preprocessing, the suite's parameters (corruption and
perturbation names, severities, sweep values, prompts), the seed and the definition and direction of every metric.
:func:`protocol_fingerprint` hashes the parts that must match for two results to be comparable (not the model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import robustfm
from robustfm.config.core import to_dict
from robustfm.config.run_record import git_sha
from robustfm.evals.data import PREPROCESSING, ids_hash
from robustfm.evals.metrics import MetricSpec

# Fields that describe the run, not the measurement: two results may differ in them and still be comparable.
_NOT_PART_OF_COMPARISON = ("model", "code", "counts")


def build_protocol(
    *,
    suite: str,
    version: str,
    model: Mapping[str, Any],
    data: Any,
    sample_ids: Sequence[str],
    image_size: int | None,
    seed: int,
    params: Mapping[str, Any],
    metric_specs: Sequence[MetricSpec],
    counts: Mapping[str, int],
) -> dict[str, Any]:
    """The protocol of one suite result, as plain JSON-serializable data (see the module docstring)."""
    data_section = to_dict(data)
    source = data_section["shards"] or "synthetic"
    protocol = {
        "suite": {"name": suite, "version": version},
        "model": dict(model),
        "data": {
            "source": source,
            "split": data_section["split"] if data_section["shards"] else None,
            "config": data_section,
            "num_samples": len(set(sample_ids)),
            "sample_ids_sha256": ids_hash(sample_ids),
        },
        "preprocessing": {"pipeline": PREPROCESSING, "image_size": image_size or "the model's native image_size"},
        "params": _plain(params),
        "seed": seed,
        "metrics": {spec.name: {"direction": spec.direction, "definition": spec.definition} for spec in metric_specs},
        "counts": dict(counts),
        "code": {"robustfm_version": robustfm.__version__, "git_sha": git_sha()},
    }
    protocol["fingerprint"] = protocol_fingerprint(protocol)
    return protocol


def protocol_fingerprint(protocol: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the comparable part of a protocol: equal fingerprints, comparable numbers."""
    comparable = {k: v for k, v in protocol.items() if k not in _NOT_PART_OF_COMPARISON and k != "fingerprint"}
    text = json.dumps(comparable, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    value = to_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value
