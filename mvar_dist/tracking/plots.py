"""Drawing the PNG plots of ``mvar-dist compare`` with matplotlib (Agg, no display): a grid of
panels, one line per run in each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


def _figure(count: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_panels(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: Path, xlabel: str) -> Path | None:
    """One panel per key of ``panels`` ({key: {line label: (x, y)}}), one line per label."""
    panels = {key: lines for key, lines in panels.items() if lines}
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (key, lines) in zip(axes, panels.items()):
        for label, (x, y) in lines.items():
            ax.plot(x, y, label=label, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)
