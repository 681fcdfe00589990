"""Pictures for the run pages: the label distribution by stage and training curves.

    label_distribution_png({"before top-up": {...}, "after top-up": {...},
                            "after quota": {...}}, labels, "out/plots/labels.png")
    curves_png([("SFT", "loss", {"train loss": [(10, 1.9), (20, 1.2)]})], "out/plots/sft.png")

Plain matplotlib on the Agg canvas (a `Figure`, never pyplot's global state, so tasks in
threads can draw at once); no Prefect, no MLflow: the caller logs the files.
"""

from __future__ import annotations

from pathlib import Path

Series = list[tuple[int, float]]  # (step, value)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def label_distribution_png(stages: dict[str, dict[str, int]], labels: list[str],
                           path: str | Path, title: str = "Labels of the accepted examples"
                           ) -> Path:
    """Grouped bars: one group per label, one bar per stage (counts written on the bars)."""
    names = list(stages)
    extra = sorted({k for counts in stages.values() for k in counts} - set(labels))
    columns = [*labels, *extra]
    fig = _figure(max(6.0, 1.3 * len(columns) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        counts = [stages[name].get(label, 0) for label in columns]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(columns))]
        bars = ax.bar(xs, counts, width, label=f"{name} ({sum(counts)})")
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 6 else 0)
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.margins(y=0.12)
    return _save(fig, path)


def curves_png(panels: list[tuple[str, str, dict[str, Series]]], path: str | Path,
               highlight: str | None = None) -> Path:
    """One subplot per (title, y label, {series name: [(step, value)]}), side by side.

    The series named `highlight` is drawn thicker (e.g. the chosen tuning trial)."""
    fig = _figure(max(6.0, 5.0 * len(panels)), 3.8)
    for n, (title, ylabel, series) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), n)
        for name, points in series.items():
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            thick = name == highlight
            ax.plot(steps, values, label=name, linewidth=2.6 if thick else 1.3,
                    marker="o" if len(points) < 3 else None, zorder=3 if thick else 2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(series.values()):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no points logged", ha="center", va="center",
                    transform=ax.transAxes)
    return _save(fig, path)
