"""Prepare the GPU acceptance check on a CPU machine with a package index: build the offline bundle the GPU machine
needs into ``.gpu/``, check it, and print the one command to run there.

    python benchmarks/prepare_gpu_bundle.py            # build (or reuse) .gpu/, check it, print the command
    python benchmarks/prepare_gpu_bundle.py --simulate # also run the dry run with only the GPU image's packages

The GPU machine (Python 3.12, its own PyTorch and CUDA, no package index) lacks Ray, DeepSpeed, open_clip and a few
of their dependencies. ``.gpu/`` gets (adapted from shared/tools/airgap-bundle.sh): ``ray.tar.xz`` (the cp312 Ray
wheel unpacked without its Java jars and xz-compressed: ~28 MB instead of 79), ``wheels/`` (the other missing
packages at the versions ``constraints.txt`` pins, cp312 or pure; a pure package published only as a source archive
is built into a wheel here), DeepSpeed's source archive (built on the machine itself with ``DS_BUILD_OPS=0``, so that
it records that machine's torch, CUDA and accelerator) and ``install.sh``.

Checks: (0) Ray's native programs are in the archive and executable; (1) every requirement of every bundled package
(and Ray's train/tune/data extras) is bundled at a version that satisfies it, or is a package the GPU image has
(:data:`IMAGE_PACKAGES`, as read there); (2) importing what the acceptance check imports works when only those
packages are visible (a ``sitecustomize`` that hides every other installed distribution, in this machine's
environment); (3) the working tree that travels plus ``.gpu/`` stays under the device tool's 64 MiB. ``--simulate``
runs the whole ``--dry-run`` under the same hiding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20
# The GPU image's Python packages, as a session listed them there on 2026-11-17 (.library/device/KINDS.md).
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
    joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
    regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# Distributions here that stand for one the image has: the image has the headless OpenCV build, and its older
# huggingface-hub uses httpx where this machine's newer one uses the renamed httpx2 and adds truststore.
SAME_AS = {
    "opencv-python": "opencv-python-headless",
    "httpx2": "httpx",
    "httpcore2": "httpcore",
    "truststore": "huggingface-hub",
}
# What the image lacks and the check needs (the versions come from constraints.txt).
BUNDLED = (
    "open_clip_torch ftfy wcwidth pydantic pydantic_core annotated-types typing-inspection hjson jsonschema "
    "jsonschema-specifications referencing rpds-py tensorboardX miniball imagecorruptions"
).split()
RAY_EXTRAS = ("train", "tune", "data")  # not "default": the dashboard's packages stay out (no dashboard there)
PLATFORM = [
    "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--platform", "any",
]  # fmt: skip
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}
TARGET_ENV.update({"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"})
INSTALL_SH = """#!/usr/bin/env bash
# Install the offline bundle into a folder, without any package index: bash .gpu/install.sh /tmp/site
# then: export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); site=${1:-/tmp/site}
mkdir -p "$site"
tar xJf "$here/ray.tar.xz" -C "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \\
  "$here"/wheels/*.whl
# DeepSpeed built here, so it records this machine's torch, CUDA and accelerator; its ops stay JIT (DS_BUILD_OPS=0).
DS_BUILD_OPS=0 PYTHONPATH="$site" python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \\
  --target "$site" "$here"/deepspeed-*.tar.gz
echo "installed the bundle into $site"
"""
IMPORT_CHECK = (
    "import ray, ray.train, ray.train.torch, ray.data, ray.tune, deepspeed, open_clip, miniball, pydantic;"
    "import deepspeed.runtime.zero, deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine;"
    "import robustfm.train.launchers, robustfm.train.strategies, robustfm.data.corruption_stages;"
    "import robustfm.evals.runner, robustfm.evals.suites.corruption_detection, robustfm.evals.suites.zero_shot;"
    "import robustfm.recipes.cgclip, robustfm.gtmaps.vgg, robustfm.corruptions, robustfm.corruptions.weather;"
    "import gpu_items.engine, gpu_items.resume, gpu_items.corruptions_cuda, gpu_items.data_path, gpu_items.eval_pool;"
    "import gpu_items.cgclip_run, eval_scaling;"
    "from robustfm.corruptions import frost_image_dir; frost_image_dir();"
    "from robustfm.models import create_model; create_model('open_clip/tiny-vit');"
    "print('imports ok')"
)
HIDER = '''"""Written by benchmarks/prepare_gpu_bundle.py: hide each installed distribution the GPU machine lacks."""
import importlib.abc, importlib.metadata, re, sys

_ALLOWED = {ALLOWED!r}
_OWNERS = importlib.metadata.packages_distributions()


def _name(dist):
    return {SAME_AS!r}.get(re.sub(r"[-_.]+", "-", dist).lower(), re.sub(r"[-_.]+", "-", dist).lower())


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        owners = _OWNERS.get(fullname.partition(".")[0])
        if owners and not any(_name(d) in _ALLOWED for d in owners):
            raise ModuleNotFoundError(f"{{fullname}} (from {{owners}}) is not on the GPU machine", name=fullname)
        return None


sys.meta_path.insert(0, _Hide())
'''


def pins() -> dict[str, str]:
    """Canonical name -> version pinned by constraints.txt."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            found[canonicalize_name(name)] = version.strip()
    return found


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download_wheels(out: Path, versions: dict[str, str]) -> None:
    """Each bundled package as a cp312 or pure wheel (a pure one built here when only a source archive exists)."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED:
        spec = f"{name}=={versions[canonicalize_name(name)]}"
        if _wheel_of(wheels, name) is not None:
            continue
        try:
            pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(wheels), spec)
        except subprocess.CalledProcessError:
            print(f"{spec}: no wheel for cp312; building one from its source archive", flush=True)
            pip("wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", str(wheels), spec)
            built = _wheel_of(wheels, name)
            if built is None or not built.name.endswith("-none-any.whl"):
                raise SystemExit(
                    f"{spec}: the wheel built here is not pure Python ({built}); it cannot travel"
                ) from None


def _wheel_of(folder: Path, name: str) -> Path | None:
    wanted = canonicalize_name(name)
    return next((p for p in folder.glob("*.whl") if canonicalize_name(p.name.split("-")[0]) == wanted), None)


def download_ray(out: Path, version: str) -> None:
    """The cp312 Ray wheel, unpacked without ray/jars, as ray.tar.xz (skipped when that version is there)."""
    marker = out / "ray.version"
    if (out / "ray.tar.xz").is_file() and marker.is_file() and marker.read_text().strip() == version:
        if not check_ray_archive(out):
            return
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", tmp, f"ray=={version}")
        wheel = next(Path(tmp).glob("ray-*.whl"))
        unpacked = Path(tmp) / "unpacked"
        extract_with_modes(wheel, unpacked)
        shutil.rmtree(unpacked / "ray" / "jars", ignore_errors=True)
        print("compressing Ray (xz, a minute or two)", flush=True)
        with open(out / "ray.tar.xz", "wb") as target:
            tar = subprocess.Popen(["tar", "cf", "-", "-C", str(unpacked), "."], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-6", "-T0"], stdin=tar.stdout, stdout=target, check=True)
            if tar.wait() != 0:
                raise SystemExit("tar of the Ray wheel failed")
    marker.write_text(version)


def extract_with_modes(wheel: Path, target: Path) -> None:
    """Unzip keeping each member's Unix permissions (zipfile drops them: Ray's gcs_server and raylet binaries would
    arrive without their executable bit and Ray could not start)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = Path(archive.extract(info, target))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


def check_ray_archive(out: Path) -> list[str]:
    """Ray's native programs must be in the archive and executable."""
    listing = subprocess.run(["tar", "tvJf", str(out / "ray.tar.xz")], capture_output=True, text=True, check=True)
    problems = []
    for program in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
        line = next((row for row in listing.stdout.splitlines() if row.endswith(f"./{program}")), None)
        if line is None or "x" not in line.split()[0]:
            problems.append(f"ray.tar.xz: {program} is missing or not executable ({line})")
    return problems


def download_deepspeed(out: Path, version: str) -> None:
    if not list(out.glob(f"deepspeed-{version}.tar.gz")):
        for old in out.glob("deepspeed-*.tar.gz"):
            old.unlink()
        pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(out), f"deepspeed=={version}")


def requirements_of(out: Path) -> dict[str, list[Requirement]]:
    """Distribution -> its requirements that apply on the GPU machine (Ray with the extras the check uses)."""
    found: dict[str, list[Requirement]] = {}
    metadata = {p: zipfile.ZipFile(p).read(_metadata_name(p)).decode() for p in (out / "wheels").glob("*.whl")}
    ray_meta = subprocess.run(
        ["tar", "xJf", str(out / "ray.tar.xz"), "-O", "--wildcards", "./ray-*.dist-info/METADATA"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    metadata[out / "ray"] = ray_meta
    for text in metadata.values():
        name = canonicalize_name(_field(text, "Name"))
        reqs = []
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            extras = RAY_EXTRAS if name == "ray" else ()
            if req.marker is None or any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in ("", *extras)):
                reqs.append(req)
        found[name] = reqs
    found["deepspeed"] = [Requirement(r) for r in _deepspeed_requirements(out)]
    return found


def _metadata_name(wheel: Path) -> str:
    return next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))


def _field(text: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{key}:"))


def _deepspeed_requirements(out: Path) -> list[str]:
    sdist = next(out.glob("deepspeed-*.tar.gz"))
    text = subprocess.run(
        ["tar", "xzf", str(sdist), "-O", "--wildcards", "*/requirements/requirements.txt"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def check_closure(out: Path, versions: dict[str, str]) -> list[str]:
    """Requirements neither bundled (at a satisfying version) nor in the GPU image: each as a line of text."""
    bundled = {canonicalize_name(n): Version(versions[canonicalize_name(n)]) for n in BUNDLED}
    bundled["ray"] = Version(versions["ray"])
    bundled["deepspeed"] = Version(versions["deepspeed"])
    problems = []
    for owner, reqs in requirements_of(out).items():
        for req in reqs:
            name = canonicalize_name(req.name)
            name = SAME_AS.get(name, name)
            if name in bundled:
                if not req.specifier.contains(bundled[name], prereleases=True):
                    problems.append(f"{owner} needs {req}, the bundle has {name} {bundled[name]}")
            elif name not in IMAGE_PACKAGES:
                problems.append(f"{owner} needs {req}: neither bundled nor in the GPU image")
    return problems


def hiding_environment(tmp: Path) -> dict[str, str]:
    """This machine's environment with a sitecustomize that hides what the GPU machine lacks (Ray workers inherit
    PYTHONPATH, so they are hidden from too)."""
    allowed = sorted(IMAGE_PACKAGES | {canonicalize_name(n) for n in BUNDLED} | {"ray", "deepspeed", "robustfm"})
    (tmp / "sitecustomize.py").write_text(HIDER.format(ALLOWED=set(allowed), SAME_AS=SAME_AS))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), str(REPO / "benchmarks"), str(REPO), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def travelling_bytes(out: Path) -> tuple[int, int]:
    """(bytes of the working tree the device tool sends: tracked and untracked-not-ignored files, bytes of out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / os.fsdecode(p)).stat().st_size for p in listed if p and (REPO / os.fsdecode(p)).is_file())
    bundle = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return tree, bundle


def exclude_bundle(out: Path) -> None:
    """Add ``/<out>/`` to .git/info/exclude (the bundle travels as a carried path, never as project files)."""
    exclude = Path(
        subprocess.run(
            ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    exclude = exclude if exclude.is_absolute() else REPO / exclude
    line = f"/{out.relative_to(REPO)}/"
    text = exclude.read_text() if exclude.is_file() else ""
    if line not in text.splitlines():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def command(out: Path) -> str:
    rel = out.relative_to(REPO)
    return (
        f"bash {rel}/install.sh /tmp/site && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH; "
        "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_acceptance.py $OUT"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu", help="bundle folder inside the repository")
    parser.add_argument("--simulate", action="store_true", help="also run the dry run with the image's packages only")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    versions = pins()
    exclude_bundle(out)
    out.mkdir(parents=True, exist_ok=True)
    download_wheels(out, versions)
    download_ray(out, versions["ray"])
    download_deepspeed(out, versions["deepspeed"])
    (out / "install.sh").write_text(INSTALL_SH)
    (out / "install.sh").chmod(0o755)
    problems = check_closure(out, versions) + check_ray_archive(out)
    for problem in problems:
        print(f"MISSING on the GPU machine: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        env = hiding_environment(Path(tmp))
        imported = subprocess.run(
            [sys.executable, "-c", IMPORT_CHECK], cwd=REPO, env=env, capture_output=True, text=True
        )
        print(
            f"imports with the GPU image's packages only: {imported.stdout.strip() or imported.stderr.strip()[-3000:]}"
        )
        if args.simulate and imported.returncode == 0:
            simulated = subprocess.run(
                [sys.executable, "benchmarks/gpu_acceptance.py", f"{tmp}/simulated", "--dry-run"], cwd=REPO, env=env
            )
            print(f"dry run with the GPU image's packages only: exit status {simulated.returncode}")
            problems += [] if simulated.returncode == 0 else ["the simulated dry run failed (see its report above)"]
    tree, bundle = travelling_bytes(out)
    total = tree + bundle
    print(
        f"travels: working tree {tree / 2**20:.1f} MiB + bundle {bundle / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
        f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)"
    )
    ok = imported.returncode == 0 and not problems and total <= LIMIT_BYTES
    rel = out.relative_to(REPO)
    print("\nOn the GPU machine, with the device tool's run (timeout_s 600):")
    print(f'  carry: ["{rel}"]')
    print(f"  command: {command(out)}")
    print("It writes gpu_acceptance.json, gpu_acceptance.md and gpu_acceptance.log into $OUT (three files).")
    if not ok:
        print("\nNOT READY: fix the problems above first.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
