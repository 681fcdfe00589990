"""Pictures for the run pages: the label distribution by stage and training curves.

    paths = draw_run_plots(client, mlflow_run_id, spec, stages, folder, sft, dpo, tuned,
                           attempt)   # drawn, logged under plots/ on the parent run

    label_distribution_png({"before top-up": {...}, "after top-up": {...},
                            "after quota": {...}}, labels, "out/plots/labels.png")
    curves_png([("SFT", "loss", {"train loss": [(10, 1.9), (20, 1.2)]})], "out/plots/sft.png")

Plain matplotlib on the Agg canvas (a `Figure`, never pyplot's global state, so tasks in
threads can draw at once). The drawing functions know nothing of Prefect or MLflow;
`draw_run_plots` reads the training curves from MLflow and logs each picture there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.spec import Spec

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


# ── the run's plots, drawn and logged ─────────────────────────────────────────────────────────
def metric_series(client: MlflowClient, run_id: str | None, key: str) -> Series:
    """A run's metric history as (step, value), by step; [] for no run or no such metric."""
    if not run_id:
        return []
    history = client.get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in history)


def draw_run_plots(client: MlflowClient, mlflow_run_id: str, spec: Spec,
                   stages: dict[str, dict], folder: Path, train_result: dict,
                   dpo_result: dict | None, tuned: dict | None,
                   attempt: Callable[[str, Callable[[], object]], object]) -> list[str]:
    """Label distribution by stage, SFT loss, DPO curves (DPO ran), tuning trials (tuning
    ran): each drawn, logged under `plots/` on the parent run, its path returned; each
    through `attempt`, so one that fails is reported and the others still drawn."""
    logged: list[str] = []

    def log_plot(path: Path) -> str:
        client.log_artifact(mlflow_run_id, str(path), "plots")
        logged.append(f"plots/{path.name}")
        return f"plots/{path.name}"

    if spec.task.labels:  # answers written as text have no label to count
        attempt("plot label distribution", lambda: log_plot(label_distribution_png(
            stages, spec.task.labels, folder / "label_distribution.png",
            title=f"{spec.name}: labels of the accepted examples by stage")))
    sft_run = train_result.get("mlflow_run_id")

    def sft_plot() -> str:
        series = {"train loss": metric_series(client, sft_run, "loss")}
        if evals := metric_series(client, sft_run, "eval_loss"):
            series["eval loss"] = evals
        return log_plot(curves_png([(f"{spec.name}: SFT", "loss", series)],
                                   folder / "sft_loss.png"))

    attempt("plot SFT loss", sft_plot)
    if dpo_result:
        dpo_run = dpo_result.get("mlflow_run_id")
        attempt("plot DPO curves", lambda: log_plot(curves_png([
            ("DPO loss", "loss", {
                "train loss": metric_series(client, dpo_run, "loss"),
                "held-out loss": metric_series(client, dpo_run, "eval_loss")}),
            ("DPO rewards", "reward accuracy / margin", {
                "accuracy": metric_series(client, dpo_run, "rewards/accuracies"),
                "margin": metric_series(client, dpo_run, "rewards/margins"),
                "held-out accuracy": metric_series(client, dpo_run, "eval_rewards/accuracies")}),
        ], folder / "dpo.png")))
    if tuned and tuned.get("trials"):
        chosen = tuned.get("chosen_trial")

        def trials_plot() -> str:
            names = {t["trial"]: f"trial {t['trial']} ({t.get('source', '')})"
                     + (", chosen" if t["trial"] == chosen else "") for t in tuned["trials"]}
            series = {names[t["trial"]]: metric_series(client, t.get("mlflow_run_id"), "loss")
                      for t in tuned["trials"]}
            return log_plot(curves_png([("tuning trials: train loss", "loss", series)],
                                       folder / "tuning_trials.png",
                                       highlight=names.get(chosen)))

        attempt("plot tuning trials", trials_plot)
    return logged
