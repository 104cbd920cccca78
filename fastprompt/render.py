"""Markdown tables and grouped bar charts: the one drawing code behind `fastprompt report` (the
accuracy of runs) and `fastprompt bench report` (training speed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .atomic_io import atomic_write_bytes

__all__ = ["markdown_table", "figure", "grouped_bars", "save_figure"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str) -> list[str]:
    """The lines of a Markdown table; `align` holds one letter per column: l (text) or r (numbers)."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} must give one letter per column of {list(header)}")

    def line(cells) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", *map(line, rows)]


def figure(rows: int, cols: int, *, panel_size: tuple[float, float]):
    """A figure of rows x cols panels drawn off-screen (files only, no display needed); (fig, axes[r][c])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]], *, value_format: Optional[str] = None,
                 bar_labels: Optional[dict[str, Sequence[str]]] = None, label_size: int = 7, tick_size: int = 8,
                 tick_rotation: float = 0) -> None:
    """One group of bars per entry of `groups`, one bar per series in each (side by side, 0.8 wide
    in all); bars labelled with their value (`value_format`, e.g. "%.1f") or with `bar_labels`."""
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, list(values), width, label=name)
        if value_format is not None:
            ax.bar_label(bars, fmt=value_format, fontsize=label_size)
        elif bar_labels is not None:
            ax.bar_label(bars, labels=list(bar_labels[name]), fontsize=label_size)
    ax.set_xticks(range(len(groups)), list(groups), rotation=tick_rotation, fontsize=tick_size)


def save_figure(fig, path: str | Path, *, dpi: int) -> Path:
    """Write `fig` as a PNG at `path` atomically (a full disk leaves the old file, WriteError)."""
    import io

    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path
