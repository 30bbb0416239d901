"""The GPU acceptance check: everything a reviewer needs from one short window on one CUDA device, in one command.

    python benchmarks/gpu_acceptance.py OUTPUT_DIR                    # on the GPU machine (see prepare_gpu_bundle.py)
    python benchmarks/gpu_acceptance.py OUTPUT_DIR --dry-run          # every item on CPU, tiny sizes (CI runs this)
    python benchmarks/gpu_acceptance.py OUTPUT_DIR --only engine resume

Items (benchmarks/gpu_items/, in this order): ``engine`` (open_clip ViT-B/32 contrastive step, batch 256, bf16: bare
loop vs the engine's ddp and deepspeed ZeRO-2 through Ray, img/s, ratio, MFU), ``resume`` (a killed DeepSpeed ZeRO-2
bf16 stage resumes to the uninterrupted weights), ``corruptions`` (seen set on CUDA: img/s; CPU-vs-CUDA agreement),
``data_path`` (decode -> corrupt -> VGG-16 GT map against the trainer's need), ``eval_pool`` (a suite on
fractional-GPU actors), ``cgclip`` (the three-stage recipe through jobs/cgclip.py), ``compile`` (torch.compile of the
bare loop, MFU; last, as its compilation time is the least predictable).

Each item runs in its own subprocess with its own time limit (and the whole run within ``--budget-s``), so a failure
or a hang is reported and the remaining items still run. The items share one Ray, started here (see
``start_shared_ray``). After every item, OUTPUT_DIR gets the results so far:
``gpu_acceptance.json`` (everything), ``gpu_acceptance.md`` (the tables) and ``gpu_acceptance.log`` (each item's
output, tail-truncated): three files, so the device tool's 8-file limit is never reached. Exit status 0 when every
item ran to completion ("ok"), whether or not its goal was met (the report says).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from gpu_items import ITEMS  # noqa: E402
from gpu_items.data_path import compare_with_trainer  # noqa: E402

from robustfm.testing.processes import stop_process_group  # noqa: E402

LOG_TAIL_BYTES = 200_000
STARTUP_RESERVE_S = 20  # an item is not started with less time than this left in the budget
PROBE = r"""
import json, platform, sys
from importlib import metadata
out = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "ray", "deepspeed", "open_clip_torch", "timm", "numpy", "pyarrow", "pydantic"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
import torch
out["cuda_available"] = torch.cuda.is_available()
out["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    out["device"] = props.name
    out["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    out["multiprocessors"] = props.multi_processor_count
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
print(json.dumps(out))
"""


def item_environment(dry_run: bool = False) -> dict[str, str]:
    """The items' environment: this repository and benchmarks/ importable (also in Ray workers, which inherit it),
    no model hub, no usage stats, unbuffered output; in the dry run one thread per process (as in Ray's workers: on
    a small shared CPU, threads of several processes spinning against each other slow everything down)."""
    env = dict(os.environ)
    if dry_run:
        env["OMP_NUM_THREADS"] = "1"
    paths = [str(BENCHMARKS), str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    # cuBLAS's deterministic workspace (the resume item's bitwise comparison needs it), read when a process makes its
    # first cuBLAS handle: in the environment of the shared Ray, so every worker has it.
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env


def start_shared_ray(profile: str, env: dict[str, str]) -> str:
    """Start the Ray every item joins (its address goes into ``env`` as ``$RAY_ADDRESS``); returns the address.

    One Ray for the whole check instead of one per item: a Ray start takes ~5 s of a short GPU window, and ~10 CPU-s
    per item in the dry run on CI's two cores. Ray's processes (and so every worker) inherit this process's
    environment, so it takes the items' environment first. An item killed for its time limit takes its Ray job with
    it (Ray ends a driver's actors and placement groups when the driver exits); the next item starts clean.
    """
    import ray
    from gpu_items.common import Profile, start_ray

    os.environ.update(env)
    start_ray(Profile(profile))
    address = ray.get_runtime_context().gcs_address
    env["RAY_ADDRESS"] = address
    # What starting Ray put into this environment: the State API address and the token authentication Ray turns on
    # for a new local cluster (the token itself is in ~/.ray/auth_token, which the items read too).
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return address


def probe_environment(env: dict[str, str]) -> dict[str, Any]:
    """Versions and the device, read in a subprocess (this process never touches CUDA)."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr}
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        found = {"error": repr(err)}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        found["nvidia_smi"] = None
    found["cpus"] = os.cpu_count()
    return found


def run_item(name: str, profile: str, workdir: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one item in its own process group; a timeout ends the whole group (its Ray processes too)."""
    result_file = workdir / "results" / f"{name}.json"
    log_file = workdir / "logs" / f"{name}.log"
    # A fresh scratch folder: a training run left there by an earlier check would be resumed, not run.
    shutil.rmtree(workdir / name, ignore_errors=True)
    for path in (result_file, log_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "gpu_items.run_item", name, profile, str(workdir / name), str(result_file)]
    started = time.perf_counter()
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
            status = None
        except subprocess.TimeoutExpired:
            stop_process_group(process, term_grace_s=10, kill_grace_s=5)
            code, status = None, "timeout"
    seconds = time.perf_counter() - started
    if status is None and result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        result = {"status": status or "crashed", "error": _tail(log_file, 3000), "summary": ""}
        if status == "timeout":
            result["summary"] = f"stopped after its limit of {timeout:.0f} s"
        else:
            result["summary"] = f"the item's process exited with {code} before writing a result"
    result.update({"item": name, "title": ITEMS[name].title, "profile": profile, "seconds": seconds})
    result.setdefault("goal_met", None)
    return result


def _tail(path: Path, size: int) -> str:
    if not path.is_file():
        return ""
    data = path.read_bytes()
    return data[-size:].decode(errors="replace")


def derive(results: dict[str, dict[str, Any]]) -> None:
    """Numbers that need two items: the data path against the trainer's img/s (the engine's ddp rate)."""
    engine, data = results.get("engine"), results.get("data_path")
    if data is not None and engine is not None and engine.get("status") == "ok":
        compare_with_trainer(data, engine["metrics"]["ddp"]["samples_per_s"])


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    device = env.get("device") or env.get("nvidia_smi") or "no CUDA device"
    lines = [
        f"# GPU acceptance check ({report['profile']} profile)",
        "",
        f"- device: {device}; {env.get('cpus')} CPUs; python {env.get('python')}, torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), ray {env.get('ray')}, deepspeed {env.get('deepspeed')}, "
        f"open_clip {env.get('open_clip_torch')}",
        f"- started {report['started']}, {report['seconds']:.0f} s in all (budget {report['budget_s']:.0f} s)",
        "",
        "| item | status | goal met | result | s |",
        "|---|---|---|---|---|",
    ]
    for result in report["items"].values():
        met = {True: "yes", False: "**NO**", None: "-"}[result.get("goal_met")]
        summary = str(result.get("summary", "")).replace("|", "/")
        lines.append(f"| {result['item']} | {result['status']} | {met} | {summary} | {result['seconds']:.0f} |")
    for result in report["items"].values():
        lines += ["", f"## {result['item']}: {result['title']}", ""]
        if result.get("goal"):
            lines.append(f"Goal: {result['goal']}.")
        for title, rows in (result.get("tables") or {}).items():
            if rows:
                lines += ["", f"{title}:", "", *_table(rows)]
        notes = result.get("notes") or []
        lines += [""] * bool(notes) + [f"- {note}" for note in notes]
        if result["status"] != "ok":
            lines += ["", "```", str(result.get("error", "")).strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(rows[0])

    def cells(values: list[Any]) -> str:
        return "| " + " | ".join(str(value).replace("|", "/") for value in values) + " |"

    return [cells(keys), "|" + "---|" * len(keys), *(cells([row.get(k, "") for k in keys]) for row in rows)]


def write_outputs(output_dir: Path, report: dict[str, Any], workdir: Path) -> None:
    derive(report["items"])
    (output_dir / "gpu_acceptance.json").write_text(json.dumps(report, indent=2))
    (output_dir / "gpu_acceptance.md").write_text(markdown(report))
    with open(output_dir / "gpu_acceptance.log", "w") as log:
        for name in report["items"]:
            log.write(f"\n===== {name} =====\n{_tail(workdir / 'logs' / f'{name}.log', LOG_TAIL_BYTES)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="where gpu_acceptance.{json,md,log} go (e.g. $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every item on CPU with tiny sizes")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), metavar="ITEM", help=f"among {', '.join(ITEMS)}")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 480 on GPU, 2400 dry)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    profile = "dry" if args.dry_run else "gpu"
    budget = args.budget_s or (2400.0 if args.dry_run else 480.0)
    names = [name for name in ITEMS if not args.only or name in args.only]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    env = item_environment(args.dry_run)
    environment = probe_environment(env)
    if profile == "gpu" and not environment.get("cuda_available"):
        print(f"no CUDA device here ({environment}); use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    report: dict[str, Any] = {"profile": profile, "started": started, "budget_s": budget, "environment": environment}
    report.update({"seconds": 0.0, "items": {}, "workdir": str(workdir)})
    print(f"gpu_acceptance ({profile}): {', '.join(names)}; device {environment.get('device', 'CPU')}", flush=True)
    address = start_shared_ray(profile, env)
    environment["ray_start_s"] = round(time.perf_counter() - clock, 1)
    print(f"Ray for every item at {address} (started in {environment['ray_start_s']} s)", flush=True)
    for name in names:
        item = ITEMS[name]
        left = budget - (time.perf_counter() - clock)
        limit = min(item.gpu_timeout_s if profile == "gpu" else item.dry_timeout_s, left)
        if limit < STARTUP_RESERVE_S:
            result = {"item": name, "title": item.title, "status": "skipped", "goal_met": None, "seconds": 0.0}
            result["summary"] = f"not started: {left:.0f} s left of the {budget:.0f} s budget"
        else:
            result = run_item(name, profile, workdir, limit, env)
        report["items"][name] = result
        report["seconds"] = time.perf_counter() - clock
        write_outputs(args.output_dir, report, workdir)
        print(f"[{result['status']:>7}] {name} ({result['seconds']:.0f} s): {result.get('summary', '')}", flush=True)
    import ray

    ray.shutdown()
    print(markdown(report))
    print(f"results: {args.output_dir.resolve()}/gpu_acceptance.{{json,md,log}}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in report["items"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
