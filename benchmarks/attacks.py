"""Throughput of robustfm's APGD against torchattacks 3.5.1's APGD: same model, batch, eps, seed, same run.

    python benchmarks/attacks.py                                   # CPU: open_clip/tiny-vit, batch 32
    python benchmarks/attacks.py --model timm/tiny-vit --steps 10
    python benchmarks/attacks.py --device cuda --model open_clip/ViT-B-32 --batch 256 --bf16

torchattacks is a benchmark-only dependency; install it without its dependencies (it pins an old ``requests``)::

    .venv/bin/pip install --no-deps torchattacks==3.5.1

Setup, for a fair comparison: Linf eps 4/255, 1 restart, no early stop, labels = the model's own predictions (so
torchattacks, which attacks only correctly classified rows, attacks every row as ours does). ``open_clip/*`` models
classify zero-shot: logits = 100 * normalized image embedding @ normalized text embeddings of ``--classes`` prompts.
torchattacks is timed on ``attack_single_run`` (its per-batch core, which also returns the best loss), which spares
it the extra clean forward and reseeding of its public call: the ratio is, if anything, in its favour.

With ``--bf16`` ours runs the model under bf16 autocast (``precision="bf16"``, fp32 perturbation). torchattacks has no
precision option: it is timed as shipped (fp32) and, for reference, on the same model wrapped in a bf16 autocast
region (what a user could do by hand). Each side gets one warm-up call, then ``--rounds`` alternating timed calls;
the best round of each side counts (CUDA: synchronized wall clock; CPU: process CPU time, one thread by default).
Prints img/s, the ratio, success rates and mean best loss (CE) for each number of iterations.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustfm.attacks import AttackConfig, apgd  # noqa: E402
from robustfm.models import ClipModel, create_model  # noqa: E402

INSTALL_HINT = (
    "torchattacks is not installed: it is a benchmark-only dependency. Install it with\n"
    "    .venv/bin/pip install --no-deps torchattacks==3.5.1\n"
    "(--no-deps: it pins requests~=2.25.1, which conflicts with mlflow and friends; it needs only torch, numpy, scipy)"
)
OURS = "robustfm apgd"
CLASS_NAMES = ("dog", "cat", "car", "airplane", "bird", "ship", "horse", "truck", "frog", "deer")


class ZeroShotHead(nn.Module):
    """[0,1] pixels -> 100 * cosine logits against fixed text embeddings (RobustVLM's zero-shot classifier).

    ``bf16=True`` runs the image tower under bf16 autocast inside ``forward`` and returns fp32 logits: the way to give
    an attack without a precision option (torchattacks) the same arithmetic as ours.
    """

    def __init__(self, model: nn.Module, text: torch.Tensor | None, bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text", text)
        self.bf16 = bf16

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        region = torch.autocast(pixels.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with region:
            if self.text is None:
                return self.model(pixels).float()
            image = F.normalize(self.model(pixels).float(), dim=-1)
        return 100.0 * image @ self.text.T


def build_classifier(name: str, pretrained: str | None, classes: int, device: torch.device) -> tuple[nn.Module, ...]:
    """(classifier, classifier under bf16 autocast, image size), in eval mode on ``device``."""
    model = create_model(name, pretrained).to(device).eval()
    text = None
    if isinstance(model, ClipModel):
        prompts = [f"a photo of a {CLASS_NAMES[i % len(CLASS_NAMES)]} {i // len(CLASS_NAMES)}" for i in range(classes)]
        with torch.no_grad():
            text = model.encode_text(prompts, normalize=True).float()
    return ZeroShotHead(model, text).eval(), ZeroShotHead(model, text, bf16=True).eval(), model.image_size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Best time of each call over ``rounds`` alternating rounds, after one warm-up call each.

    CUDA: wall clock between synchronizations. CPU: this process's CPU time, which does not charge either side for
    time the scheduler gave to other processes of a shared machine (with ``--threads 1``, the cost on one core).
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in calls.values():
        fn()
    synchronize(device)
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            best[name] = min(best[name], clock() - start)
    return best


def compare(
    steps: int,
    eps: float,
    args: argparse.Namespace,
    classifier: nn.Module,
    classifier_bf16: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    torchattacks: object | None,
) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Best seconds per call and (success, best loss) of each side, for ``steps`` iterations."""
    config = AttackConfig(eps=eps, steps=steps, objective="ce", precision="bf16" if args.bf16 else "fp32")
    outcomes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def ours() -> None:
        result = apgd(classifier, images, {"labels": labels}, config)
        outcomes[OURS] = (result.success, result.loss)

    calls = {OURS: ours}
    if torchattacks is not None:
        sides = [("torchattacks 3.5.1 (fp32)", classifier)]
        if args.bf16:
            sides.append(("torchattacks 3.5.1 (bf16 wrap)", classifier_bf16))
        for side, model in sides:
            attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss="ce")

            def theirs(attack=attack, side=side) -> None:
                torch.manual_seed(0)  # what its public call does: the global RNG is the source of its starts
                _, still_correct, loss_best, _ = attack.attack_single_run(images, labels)
                outcomes[side] = (~still_correct, loss_best)

            calls[side] = theirs
    return best_seconds(calls, args.rounds, images.device), outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="open_clip/tiny-vit", help="open_clip/<arch> (zero-shot) or timm/<arch>")
    parser.add_argument("--pretrained", default=None, help="weights path or tag (default: random init)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10, help="zero-shot classes (open_clip models)")
    parser.add_argument("--steps", default="10,100", help="comma-separated APGD iterations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="ours under bf16 autocast; torchattacks also wrapped")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    args = parser.parse_args(argv)

    try:
        import torchattacks
    except ImportError:
        torchattacks = None
        print(INSTALL_HINT + "\nTiming robustfm's APGD alone.\n", file=sys.stderr)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)  # the same random-init model in every run (the attacks themselves never use this RNG)
    classifier, classifier_bf16, size = build_classifier(args.model, args.pretrained, args.classes, device)
    images = torch.rand((args.batch, 3, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        labels = classifier(images).argmax(dim=1)
    eps = 4 / 255

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"APGD Linf eps 4/255, 1 restart, no early stop, labels = predictions; {args.model} (random init unless "
        f"--pretrained), batch {args.batch}, {size} px, {device.type} ({where}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, ours in {'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    header = f"{'iters':>5} {'side':<30} {'img/s':>9} {'ratio':>7} {'success':>8} {'mean best CE':>13}"
    print(header)
    for steps in (int(s) for s in args.steps.split(",")):
        seconds, outcomes = compare(steps, eps, args, classifier, classifier_bf16, images, labels, torchattacks)
        for side, (success, loss) in outcomes.items():
            ratio = seconds[side] / seconds[OURS]
            print(
                f"{steps:>5} {side:<30} {args.batch / seconds[side]:>9.1f} {ratio:>6.2f}x "
                f"{success.float().mean().item():>8.1%} {loss.float().mean().item():>13.4f}",
                flush=True,
            )
    print("ratio = that side's time / ours (> 1: ours is faster); success = share of rows fooled at any iterate")


if __name__ == "__main__":
    main()
