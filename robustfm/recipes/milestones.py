"""What a recipe measures at a milestone (the pretrained model, the end of a stage, a WiSE-FT mix).

Milestones read exported weights, never a live trainer: the recipe loads a stage's saved state into a model on the
driver and hands it to the evaluation suites (which copy it to their actor pool) and to the t-SNE plot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustfm.evals.config import EvalConfig


def with_eval_data(cfg: EvalConfig, shards: str, split: str, max_samples: int | None) -> EvalConfig:
    """Point every suite whose ``data.shards`` is unset at ``shards``/``split`` (suites keep explicit settings; suites
    that need data of their own, ``needs_shards``, such as landmark retrieval with its ground truth, are left as
    they are)."""
    from robustfm.evals import SUITES

    suites = dict(cfg.suites)
    for name, section in cfg.suites.items():
        data = section.data
        if data.shards is None and not SUITES.get(name).needs_shards:
            limit = data.max_samples if data.max_samples is not None else max_samples
            suites[name] = dataclasses.replace(
                section, data=dataclasses.replace(data, shards=shards, split=split, max_samples=limit)
            )
    return dataclasses.replace(cfg, suites=type(cfg.suites)(suites))


def embeddings_of(model: Any, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """L2-normalized image embeddings, computed on CPU in eval mode without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model.encode_image(images[start : start + batch_size], normalize=True).float().cpu())
    return torch.cat(out).numpy()


def tsne_plot(clean: np.ndarray, corrupted: np.ndarray, path: str | Path, title: str, seed: int = 0) -> Path:
    """2-d t-SNE of clean vs corrupted embeddings as a PNG (paper 000, figure 3). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    points = np.concatenate([clean, corrupted])
    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*xy[: len(clean)].T, s=10, label="clean", c="tab:blue")
    ax.scatter(*xy[len(clean) :].T, s=10, label="corrupted", c="tab:red")
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tradeoff_plot(rows: list[dict[str, float]], x: str, y: str, path: str | Path, title: str) -> Path:
    """One point per WiSE-FT coefficient: ``y`` against ``x``, each labelled with its alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = [r[x] for r in rows], [r[y] for r in rows]
    ax.plot(xs, ys, marker="o")
    for row in rows:
        ax.annotate(f"α={row['alpha']:g}", (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=x, ylabel=y, title=title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a markdown table (floats with 4 decimals)."""
    if not rows:
        return "_empty_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in (row.get(h, "") for h in header)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
