"""Evaluation figure: confusion matrix + reliability diagram in one PNG.

matplotlib is imported inside the function and drawn through the object API with the Agg
canvas (no pyplot, no global backend switch), so it works in headless Ray drivers and
never touches a GUI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_report_png(
    confusion: dict[str, Any],
    calibration_bins: Sequence[dict[str, Any]] | None,
    *,
    title: str = "",
    ece: float | None = None,
) -> bytes:
    """PNG bytes: the confusion matrix (rows = true, columns = predicted, counts and row
    share in each cell) and, when `calibration_bins` is given (scoring mode), a
    reliability diagram: accuracy per confidence bin against the diagonal, with each
    bin's row count.

    `confusion` is `metrics.classification_report(...)["confusion_matrix"]`;
    `calibration_bins` is `metrics.expected_calibration_error(...)["bins"]`."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(confusion["labels"])
    matrix = np.asarray(confusion["matrix"], dtype=np.int64)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix shape {matrix.shape} does not match {len(labels)} labels")

    panels = 2 if calibration_bins else 1
    fig = Figure(figsize=(5.2 * panels, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    ax = axes[0]
    row_totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_totals, out=np.zeros(matrix.shape, dtype=float), where=row_totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j, i, f"{count}\n{share[i, j]:.0%}", ha="center", va="center",
            color="white" if share[i, j] > 0.6 else "black", fontsize=9,
        )
    ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (share of true row)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)

    if calibration_bins:
        ax = axes[1]
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

    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
