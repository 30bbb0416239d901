"""Per-sample seeds: every random draw is a function of (run seed, sample id, epoch, purpose).

A sample therefore gets the same crop, corruption and noise in any batch, on any worker and on every rerun,
whatever the batch composition or the number of workers.
"""

from __future__ import annotations

import hashlib


def sample_seed(sample_id: str | int, epoch: int, purpose: str, run_seed: int = 0) -> int:
    """A 63-bit seed for one sample's draws of one kind (``purpose``: "crop", "corruption", ...) in one epoch."""
    key = f"{run_seed}\x1f{sample_id}\x1f{epoch}\x1f{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def epoch_seed(run_seed: int, epoch: int, purpose: str) -> int:
    """A seed shared by the whole run for one epoch (shuffles), independent of any sample."""
    return sample_seed("__epoch__", epoch, purpose, run_seed)
