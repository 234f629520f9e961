"""Figures: confusion matrix and reliability diagram, together in one PNG (the label job's
`report.png`) or one at a time (PNG or SVG, for the HTML report), and a tune experiment's
metric-vs-step curves.

matplotlib is imported inside the functions and drawn through the object API with the Agg
canvas (no pyplot, no global backend switch), so it works in headless Ray drivers and
never touches a GUI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sentiment_ray.tune import results


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _encode(fig, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def draw_confusion(fig, ax, confusion: dict[str, Any]) -> None:
    """Rows = true, columns = predicted; counts and row share in each cell."""
    import numpy as np

    labels = list(confusion["labels"])
    matrix = np.asarray(confusion["matrix"], dtype=np.int64)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix shape {matrix.shape} does not match {len(labels)} labels")
    row_totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_totals, out=np.zeros(matrix.shape, dtype=float), where=row_totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{count}\n{share[i, j]:.0%}",
            ha="center",
            va="center",
            color="white" if share[i, j] > 0.6 else "black",
            fontsize=9,
        )
    ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (share of true row)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def draw_reliability(ax, calibration_bins: Sequence[dict[str, Any]], ece: float | None = None) -> None:
    """Accuracy per confidence bin against the diagonal, with each bin's row count."""
    filled = [b for b in calibration_bins if b["count"]]
    centers = [(b["lo"] + b["hi"]) / 2 for b in filled]
    widths = [b["hi"] - b["lo"] for b in filled]
    ax.bar(centers, [b["accuracy"] for b in filled], width=widths, edgecolor="black", alpha=0.75, label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(centers, [b["confidence"] for b in filled], "o", color="tab:red", markersize=4, label="mean confidence")
    for x, b in zip(centers, filled):
        ax.text(x, min(b["accuracy"] + 0.02, 0.97), str(b["count"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)


def render_report_png(
    confusion: dict[str, Any],
    calibration_bins: Sequence[dict[str, Any]] | None,
    *,
    title: str = "",
    ece: float | None = None,
) -> bytes:
    """PNG bytes: the confusion matrix and, when `calibration_bins` is given (scoring
    mode), the reliability diagram beside it.

    `confusion` is `metrics.classification_report(...)["confusion_matrix"]`;
    `calibration_bins` is `metrics.expected_calibration_error(...)["bins"]`."""
    panels = 2 if calibration_bins else 1
    fig = _figure(5.2 * panels, 4.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    draw_confusion(fig, axes[0], confusion)
    if calibration_bins:
        draw_reliability(axes[1], calibration_bins, ece)
    if title:
        fig.suptitle(title)
    return _encode(fig, "png")


def render_confusion(confusion: dict[str, Any], *, fmt: str = "svg") -> bytes:
    """The confusion matrix alone, as `fmt` (svg or png) bytes."""
    fig = _figure(5.2, 4.6)
    draw_confusion(fig, fig.add_subplot(), confusion)
    return _encode(fig, fmt)


def render_reliability(calibration_bins: Sequence[dict[str, Any]], *, ece: float | None = None, fmt: str = "svg") -> bytes:
    """The reliability diagram alone, as `fmt` (svg or png) bytes."""
    fig = _figure(5.2, 4.6)
    draw_reliability(fig.add_subplot(), calibration_bins, ece)
    return _encode(fig, fmt)


# ----------------------------------------------------------------------------- plot


def render_metric_plot(records: list[dict], metric: str, *, title: str = "", best_id: str | None = None) -> bytes:
    """PNG bytes: the metric against the training step, one line per trial. Dashed lines end
    where the scheduler stopped a trial (marked x); the best trial is drawn thicker."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for rec in records:
        series = results.metric_by_step(rec.get("history", []), metric)
        if not series:
            continue
        steps, values = zip(*series)
        outcome = results.outcome_of(rec)
        is_best = rec["trial_id"] == best_id
        label = f"{rec['trial_id']} ({outcome})" + (" best" if is_best else "")
        (line,) = ax.plot(
            steps,
            values,
            marker="o",
            markersize=3,
            linewidth=2.6 if is_best else 1.2,
            linestyle="--" if outcome in ("stopped_by_scheduler", "error", "unfinished") else "-",
            label=label,
        )
        if outcome in ("stopped_by_scheduler", "error"):
            ax.plot([steps[-1]], [values[-1]], marker="x", markersize=9, color=line.get_color())
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no trial reported {metric}", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by step")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
