"""Run one item and write its result as JSON: ``python -m gpu_items.run_item NAME PROFILE WORKDIR RESULT_JSON``.

The JSON holds ``status`` ("ok", or "error" with the traceback), the item's report and its wall time. A crash that
kills this process writes nothing: the caller then reports the item from its exit code and output.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gpu_items import ITEMS
from gpu_items.common import Profile


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, tuples lists, other objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def main(argv: list[str]) -> int:
    name, profile_name, workdir, result_path = argv
    module_name, function_name = ITEMS[name].target.split(":")
    started = time.perf_counter()
    try:
        function = getattr(importlib.import_module(f"gpu_items.{module_name}"), function_name)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        report = function(Profile(profile_name), Path(workdir))
        result = {"status": "ok", **dataclasses.asdict(report)}
    except Exception:
        result = {"status": "error", "error": traceback.format_exc(limit=20)}
        print(result["error"], file=sys.stderr)
    result["seconds"] = time.perf_counter() - started
    Path(result_path).write_text(json.dumps(_plain(result), indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
