"""A tiny Revisited Oxford/Paris tree for tests: each landmark is a picture; the database holds near copies of it
(easy, easy, hard) and one junk image per landmark; each query shows its landmark inside a noisy frame that its
``bbx`` crops away. The ground truth is pickled as revisitop's is (protocol 2, numpy arrays)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustfm.data.demo_images import save_image
from robustfm.data.demo_two_afc import near_copy, triplet_pictures


@dataclass
class RevisitopTree:
    root: Path
    ground_truth: dict


def make_revisitop_tree(
    root: Path, landmarks: int = 4, size: int = 48, seed: int = 0, name: str = "rtiny"
) -> RevisitopTree:
    rng = np.random.default_rng(seed)
    pictures = triplet_pictures(landmarks, size, seed)
    imlist, qimlist, gnd = [], [], []
    for index, picture in enumerate(pictures):
        first = len(imlist)
        for kind in ("easy0", "easy1", "hard", "junk"):
            image_name = f"l{index}_{kind}"
            pixels = near_copy(picture, rng) if kind != "junk" else np.ascontiguousarray(picture[::-1])
            if kind == "hard":
                pixels = np.ascontiguousarray(pixels[:, ::-1])  # mirrored: harder to match
            save_image(pixels, root / "jpg" / f"{image_name}.jpg", quality=95)
            imlist.append(image_name)
        frame = rng.integers(0, 256, size=(size + 16, size + 24, 3), dtype=np.uint8)
        frame[8 : 8 + size, 12 : 12 + size] = picture
        query = f"q{index}"
        save_image(frame, root / "jpg" / f"{query}.jpg", quality=95)
        qimlist.append(query)
        gnd.append(
            {
                "bbx": [12.0, 8.0, 12.0 + size, 8.0 + size],
                "easy": np.array([first, first + 1]),
                "hard": np.array([first + 2]),
                "junk": np.array([first + 3]),
            }
        )
    ground_truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(ground_truth, protocol=2))
    return RevisitopTree(root, ground_truth)


def make_safety_folder(root: Path, per_class: int = 10, size: int = 48, seed: int = 0, buffer: bool = False) -> Path:
    """An ``image_folder`` of ``safe/`` (near copies of two real photos), ``unsafe/`` (near copies of one generated
    shape picture) and optionally ``buffer/`` (plain gradients): classes a random network tells apart by their looks."""
    from robustfm.data.demo_images import generated_image, real_photos

    rng = np.random.default_rng(seed)
    photos = list(real_photos(size).values())
    sources = {
        "safe": lambda k: photos[k % 2],
        "unsafe": lambda k: generated_image(0, size, seed),
    }
    if buffer:
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        sources["buffer"] = lambda k: np.stack([np.tile(ramp, (size, 1))] * 3, axis=-1).astype(np.uint8) // (1 + k % 3)
    for name, picture in sources.items():
        for k in range(per_class):
            save_image(near_copy(picture(k), rng), root / name / f"{name}_{k:03d}.png")
    return root
