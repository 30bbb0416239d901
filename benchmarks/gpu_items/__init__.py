"""The items of the GPU acceptance check (``benchmarks/gpu_acceptance.py``), each run in its own subprocess.

``ITEMS`` maps an item's name to the function that runs it (``module:function``, taking a
:class:`~gpu_items.common.Profile` and a scratch directory and returning an :class:`~gpu_items.common.ItemReport`),
its time limit on the GPU and in the dry run, and what it measures. The order is the order they run in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    target: str
    """``module:function`` under ``gpu_items``."""
    gpu_timeout_s: int
    """Limit on the GPU machine, where the whole run must fit in one device command."""
    dry_timeout_s: int
    """Limit in the dry run: generous, because a CI machine's two cores may be shared (every item starts Ray)."""
    title: str


ITEMS: dict[str, Item] = {
    "engine": Item("engine:engine", 150, 400, "engine (ddp, deepspeed ZeRO-2) vs bare loop, ViT-B/32 bf16"),
    "resume": Item("resume:resume", 150, 400, "exact resume of a killed DeepSpeed ZeRO-2 bf16 stage"),
    "corruptions": Item("corruptions_cuda:corruptions", 90, 150, "corruptions on CUDA: img/s, CPU-vs-CUDA agreement"),
    "data_path": Item("data_path:data_path", 150, 300, "CG-CLIP data path: decode -> corrupt -> VGG-16 GT map"),
    "eval_pool": Item("eval_pool:eval_pool", 120, 240, "evaluation suite on a fractional-GPU actor pool"),
    "cgclip": Item("cgclip_run:cgclip", 240, 480, "CG-CLIP, all three stages, through jobs/cgclip.py"),
    "attacks": Item("fare_attacks:attacks", 150, 240, "APGD vs torchattacks 3.5.1, ViT-B/32 bf16 batch 256"),
    "fare_step": Item("fare_attacks:fare_step", 150, 300, "FARE step through the engine vs the bare model"),
    # Last: Inductor's compilation time is the least predictable; it gets what the budget has left.
    "compile": Item("engine:compile_item", 240, 240, "torch.compile of the bare loop, MFU"),
}
