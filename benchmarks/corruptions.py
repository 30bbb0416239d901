"""Throughput of robustfm's batched torch corruptions against imagecorruptions 1.1.2, same images, same run, one core.

    python benchmarks/corruptions.py                  # all 19 at severity 3 on 224 px photos
    python benchmarks/corruptions.py --names fog,snow --batch-size 64

For each corruption: images/s of the reference (numpy/OpenCV, one image at a time, as it is used) and of ours
(``corrupt_batch``, random draws included), both pinned to one thread and timed in process CPU time, and their
ratio: the median over alternating rounds (>= 5) of each round's ratio, with its min and max, to damp a shared
machine's noise; PASS / FAIL is decided on the medians. The reference's output is turned
into an array (``np.asarray``), as any user of it does: its jpeg_compression returns a lazily decoded PIL image, and
timing it without the decode would leave out half of its work. Our batch is a contiguous float32 (N, 3, H, W) tensor,
as the data pipeline hands it over.

The photos are scikit-learn's two sample photos and scikit-image's stereo motorcycle pair (and their mirror images),
none of which the parity tests use. Prints the table, every corruption slower than the reference, the arithmetic and
geometric means of the ratios, and the whole-pass ratio: one image through all the listed corruptions, i.e. the sum
of the reference's per-image times over the sum of ours. Parity itself is tested in
tests/unit/test_corruptions_parity.py. With a CUDA device it also prints images/s on the GPU for each seen corruption
and a mixed seen batch (batch of ``--gpu-batch-size``, draws made on the GPU).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load: one core per side

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))  # the reference's compat fixes

from robustfm.corruptions import CORRUPTION_SETS, corrupt_batch  # noqa: E402


def photos(size: int, count: int) -> list[np.ndarray]:
    """``count`` square crops of photos the parity tests do not use (mirrored copies when more are needed)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = [*load_sample_images().images, *skimage.data.stereo_motorcycle()[:2]]  # china, flower, two motorcycles
    out = []
    for i in range(count):
        pixels = sources[i % len(sources)]
        side = min(pixels.shape[:2])
        top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
        img = np.asarray(Image.fromarray(pixels[top : top + side, left : left + side]).resize((size, size)))
        out.append(img[:, ::-1].copy() if (i // len(sources)) % 2 else img)
    return out


def rate(fn, items: int, min_time: float, clock=time.process_time) -> float:
    """Items per second of ``fn``, repeated until ``min_time`` seconds of ``clock`` (at least one call).

    The CPU benchmark counts this process's CPU time: with one thread per side it is the cost on one core, and it
    does not charge either side for time the scheduler gave to other processes of a shared machine.
    """
    calls, start = 0, clock()
    while True:
        fn()
        calls += 1
        elapsed = clock() - start
        if elapsed >= min_time:
            return calls * items / elapsed


def paired_rates(reference_fn, our_fn, our_items: int, min_time: float, rounds: int) -> tuple[list[float], list[float]]:
    """Each side's rate in each of ``rounds`` alternating rounds (after one warm-up call each).

    A round times the reference, then ours, back to back: a burst of load from elsewhere hits both sides of a round
    alike, so the per-round ratios are what to compare; the median of them decides.
    """
    reference_fn()
    our_fn()
    ref_rates, our_rates = [], []
    for _ in range(rounds):
        ref_rates.append(rate(reference_fn, 1, min_time / rounds))
        our_rates.append(rate(our_fn, our_items, min_time / rounds))
    return ref_rates, our_rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default="all", help="comma-separated corruptions, or a set name (default: all)")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="our batch (the reference runs image by image)")
    parser.add_argument("--min-time", type=float, default=1.5, help="seconds of timing per side and corruption")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (>= 5); the median decides")
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    from _imagecorruptions_compat import load_reference

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    reference = load_reference()
    names = CORRUPTION_SETS.get(args.names) or tuple(args.names.split(","))
    images = photos(args.size, args.batch_size)
    batch = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255).contiguous()
    seeds = list(range(args.batch_size))
    pil_images = [Image.fromarray(img) for img in images]

    print(f"corruptions at severity {args.severity}, {args.size} px, one thread each side, CPU time")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'corruption':<18} {'reference img/s':>16} {'robustfm img/s':>15} {'ratio':>8}  {'min - max':>13}")
    ref_rates, our_rates, median_ratios = [], [], []
    for name in names:
        ref_fn = getattr(reference, name)
        state = {"i": 0}

        def run_reference(ref_fn=ref_fn, state=state):
            np.random.seed(state["i"])
            np.asarray(ref_fn(pil_images[state["i"] % len(pil_images)], args.severity))
            state["i"] += 1

        def run_ours(name=name):
            corrupt_batch(batch, [name] * len(seeds), [args.severity] * len(seeds), seeds)

        refs, ours = paired_rates(run_reference, run_ours, len(seeds), args.min_time, args.rounds)
        ratios = [o / r for r, o in zip(refs, ours, strict=True)]
        ref_rates.append(statistics.median(refs))
        our_rates.append(statistics.median(ours))
        ratio = statistics.median(ratios)
        flag = "  <- SLOWER than the reference" if ratio < 1 else ""
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        row = f"{name:<18} {ref_rates[-1]:>16.1f} {our_rates[-1]:>15.1f} {ratio:>7.2f}x  {spread:>13}{flag}"
        print(row, flush=True)
        median_ratios.append(ratio)
    print(f"(median of {args.rounds} alternating rounds per side; the ratio is the median of the rounds' ratios)")
    print_summary(names, median_ratios, ref_rates, our_rates)

    if torch.cuda.is_available():
        gpu_benchmark(args)


def print_summary(
    names: Sequence[str], ratios: Sequence[float], ref_rates: Sequence[float], our_rates: Sequence[float]
) -> None:
    """The slower-than-reference list (median ratios), the mean and geometric mean of the ratios, the whole-pass
    ratio, and PASS / FAIL: no corruption below 1.0x."""
    slower = [f"{name} {ratio:.2f}x" for name, ratio in zip(names, ratios, strict=True) if ratio < 1]
    print(f"below 1.0x: {', '.join(slower) if slower else 'none'}")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    # One image through every corruption: the per-image times add up, so slow corruptions weigh in by their cost.
    whole = sum(1 / r for r in ref_rates) / sum(1 / r for r in our_rates)
    print(
        f"mean ratio {sum(ratios) / len(ratios):.2f}x, geometric mean {geo:.2f}x, "
        f"whole pass {whole:.2f}x over {len(ratios)} corruptions"
    )
    print(f"{'FAIL' if slower else 'PASS'}: no corruption below 1.0x of the reference (decided on median ratios)")


def gpu_benchmark(args: argparse.Namespace) -> None:
    """Images/s on the GPU for each seen corruption and for a mixed seen batch (draws included)."""
    device = torch.device("cuda")
    n = args.gpu_batch_size
    images = torch.rand((n, 3, args.size, args.size), device=device)
    seeds = list(range(n))
    print(f"\nGPU {torch.cuda.get_device_name(device)}: batch {n}, severity {args.severity}, {args.size} px")
    seen = CORRUPTION_SETS["seen"]
    for name in seen:

        def run(name=name):
            corrupt_batch(images, [name] * n, [args.severity] * n, seeds, draw_device=device)
            torch.cuda.synchronize()

        run()
        print(f"{name:<18} {rate(run, n, args.min_time, time.perf_counter):>12.0f} img/s", flush=True)
    mixed = [seen[i % len(seen)] for i in range(n)]

    def run_mixed():
        corrupt_batch(images, mixed, [args.severity] * n, seeds, draw_device=device)
        torch.cuda.synchronize()

    run_mixed()
    print(f"{'mixed seen batch':<18} {rate(run_mixed, n, args.min_time, time.perf_counter):>12.0f} img/s")


if __name__ == "__main__":
    main()
