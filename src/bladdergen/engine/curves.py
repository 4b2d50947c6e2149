"""``curves.png``: a run's training curves from its ``metrics.jsonl`` (as nnU-Net's progress.png).

One small panel per logged quantity against step: training records as lines, validation records
(``"phase": "validation"``) as marked points, losses first. Drawn with matplotlib's non-interactive
Agg backend, so it works on a headless cluster node.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bladdergen.fileio import atomic_path

# Record fields that are bookkeeping, not curves.
NOT_CURVES = {"step", "seconds", "phase", "best", "lr"}
MAX_PANELS = 12


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a line cut by a kill is skipped)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def curve_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{quantity: {"train": [(step, value)...], "validation": [...]}}``, losses first."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record in records:
        group = "validation" if record.get("phase") == "validation" else "train"
        for key, value in record.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            series.setdefault(key, {"train": [], "validation": []})[group].append(
                (record["step"], float(value))
            )
    order = sorted(series, key=lambda k: (0 if "loss" in k else 1, k))
    return {k: series[k] for k in order[:MAX_PANELS]}


def write_curves(metrics_path: Path, out_path: Path, title: str | None = None) -> Path | None:
    """Draw every curve of ``metrics_path`` into the PNG ``out_path`` (atomic); None if empty."""
    series = curve_series(read_metrics(metrics_path))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    columns = min(3, len(series))
    rows = math.ceil(len(series) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.8 * rows), layout="constrained")
    for index, (name, groups) in enumerate(series.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        if groups["train"]:
            steps, values = zip(*groups["train"], strict=True)
            axes.plot(steps, values, linewidth=1.2, color="tab:blue", label="train")
        if groups["validation"]:
            steps, values = zip(*groups["validation"], strict=True)
            axes.plot(steps, values, "o-", markersize=3.5, color="tab:red", label="validation")
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if groups["train"] and groups["validation"]:
            axes.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    return out_path
