"""Rendering :class:`robustfm.evals.suite.Plot` data to PNG with matplotlib's Agg backend (no display needed).

Several models' versions of the same plot are drawn on one axes (series labels prefixed with the model), which is
how the report card shows a pretrained model beside its robust fine-tune.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from robustfm.evals.suite import Plot


def render_plot(versions: Sequence[tuple[str | None, Plot]], path: str | Path) -> Path:
    """Draw one plot (from one or several models) into ``path`` (PNG).

    Args:
        versions: (model label or None, plot) pairs; all plots share name, axes and kind.
        path: output file; its directory is created.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    first = versions[0][1]
    series = [
        (f"{model}: {label}" if model else label, xs, ys)
        for model, plot in versions
        for label, (xs, ys) in plot.series.items()
    ]
    width = 6.4 if first.kind == "line" else max(6.4, 0.45 * max(len(xs) for _, xs, _ in series) * len(series))
    figure, axes = plt.subplots(figsize=(min(width, 16.0), 4.0))
    try:
        if first.kind == "bar":
            categories = list(dict.fromkeys(x for _, xs, _ in series for x in xs))
            bar_width = 0.8 / len(series)
            for index, (label, xs, ys) in enumerate(series):
                lookup = dict(zip(xs, ys, strict=True))
                heights = [lookup.get(c, np.nan) for c in categories]
                positions = np.arange(len(categories)) + (index - (len(series) - 1) / 2) * bar_width
                axes.bar(positions, heights, width=bar_width, label=label)
            axes.set_xticks(np.arange(len(categories)))
            axes.set_xticklabels([str(c) for c in categories], rotation=45, ha="right", fontsize=8)
        else:
            for label, xs, ys in series:
                axes.plot([float(x) for x in xs], ys, marker="o", label=label)
        axes.set_title(first.title)
        axes.set_xlabel(first.xlabel)
        axes.set_ylabel(first.ylabel)
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
