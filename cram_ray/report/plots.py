"""PNG plots of a stream's results: accuracy matrix, rank map, routing confusion, method bars, Pareto.

Figures are built with matplotlib's object API on an Agg canvas, never through ``pyplot``: no
global figure registry, no GUI backend, nothing left open after a call, safe in workers and tests.
Every writer creates the parent directory, saves one PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from cram_ray.eval.metrics import to_square

PathLike = Union[str, Path]
DPI = 120
MAX_ANNOTATED_CELLS = 400  # above this, cell values are left to the colour bar


def _figure(width: float, height: float, layout: Optional[str] = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.clear()
    return path


def _annotate(ax: Any, values: np.ndarray, fmt: str, vmin: float, vmax: float, fontsize: int = 8) -> None:
    if values.size > MAX_ANNOTATED_CELLS:
        return
    mid = (vmin + vmax) / 2
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if v < mid else "black")


def _short(names: Sequence[str], width: int = 14) -> list[str]:
    return [n if len(n) <= width else n[: width - 1] + "\u2026" for n in names]


def accuracy_heatmap_figure(matrix: Any, task_names: Sequence[str],
                            title: str = "Accuracy after each task") -> Figure:
    """The figure of :func:`accuracy_heatmap`, for callers that embed or inspect it."""
    a = to_square(matrix)
    n = a.shape[0]
    if len(task_names) != n:
        raise ValueError(f"accuracy_heatmap: expected {n} task names for a {n}-task matrix, got {len(task_names)}")
    fig = _figure(1.2 + 0.7 * n, 1.0 + 0.6 * n)
    ax = fig.add_subplot()
    # a fixed scale: a stream where every score is near 0 must not look like one where they are near 100
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=0.0, vmax=100.0)
    _annotate(ax, a, ".1f", 0.0, 100.0)
    names = _short(task_names)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    return fig


def accuracy_heatmap(matrix: Any, task_names: Sequence[str], path: PathLike,
                     title: str = "Accuracy after each task") -> Path:
    """Heat map of the lower-triangular accuracy matrix (percent): row t = after training task t.

    The colour scale is always 0-100.
    """
    return _save(accuracy_heatmap_figure(matrix, task_names, title), path)


def ranks_by_layer(per_task: Sequence[Mapping[str, int]]) -> dict[str, list[float]]:
    """``[{layer: rank} per task]`` -> ``{layer: [rank per task]}``; NaN where a task added no expert there."""
    layers: list[str] = []
    for ranks in per_task:
        layers.extend(k for k in ranks if k not in layers)
    return {layer: [float(r[layer]) if layer in r else float("nan") for r in per_task] for layer in layers}


def layer_grid(names: Sequence[str]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Lay adapted-linear names out as (row = block, column = module) cells.

    ``model.language_model.layers.12.self_attn.q_proj`` is row ``12``, column ``q_proj``: the first
    all-digit component is the block index, what follows it the module. Names without an index
    (a projector's ``linear_1``) get a row of their parent module. Rows carry their stack's name
    only when the names come from several stacks (e.g. vision and language layers); a column keeps
    the module's full path when its last component alone would be ambiguous.
    Returns ``(row_labels, column_labels, cell per name)``.
    """
    parsed = []  # (stack, block index or None, module)
    for name in names:
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            parsed.append((".".join(parts[:-1]), None, parts[-1]))
        else:
            parsed.append((".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:])))
    stacks = list(dict.fromkeys(s for s, _, _ in parsed))
    rows = sorted(dict.fromkeys((s, k) for s, k, _ in parsed),
                  key=lambda r: (stacks.index(r[0]), -1 if r[1] is None else r[1]))
    modules = list(dict.fromkeys(m for _, _, m in parsed))
    tails = [m.split(".")[-1] for m in modules]
    col_labels = tails if len(set(tails)) == len(tails) else modules

    def row_label(stack: str, index: Optional[int]) -> str:
        parts = [p for p in stack.split(".") if p not in ("model", "layers", "layer", "h", "blocks", "encoder")]
        where = parts[-1] if parts else (stack or "model")
        if index is None:
            return where
        return str(index) if len(stacks) == 1 else f"{where} {index}"

    row_labels = [row_label(s, k) for s, k in rows]
    cells = [(rows.index((s, k)), modules.index(m)) for s, k, m in parsed]
    return row_labels, col_labels, cells


RANK_PANELS_PER_ROW = 4


def rank_map_figure(ranks: Union[Mapping[str, Sequence[float]], np.ndarray, Sequence[Sequence[float]]], *,
                    layer_names: Optional[Sequence[str]] = None, task_names: Optional[Sequence[str]] = None,
                    title: str = "Expert rank per block and module") -> Figure:
    """The figure of :func:`rank_map`: one panel per task, rows = blocks, columns = adapted modules."""
    if isinstance(ranks, Mapping):
        layer_names = list(ranks)
        rows = [list(v) for v in ranks.values()]
    else:
        rows = [list(r) for r in ranks]
        layer_names = list(layer_names) if layer_names is not None else [f"layers.{i}.linear" for i in range(len(rows))]
    if not rows:
        raise ValueError("rank_map: expected at least one layer, got none")
    if len(layer_names) != len(rows):
        raise ValueError(f"rank_map: expected {len(rows)} layer names, got {len(layer_names)}")
    n_tasks = max(len(r) for r in rows)
    task_names = list(task_names) if task_names is not None else [f"task {t}" for t in range(n_tasks)]
    if len(task_names) != n_tasks:
        raise ValueError(f"rank_map: expected {n_tasks} task names, got {len(task_names)}")
    row_labels, col_labels, cells = layer_grid(layer_names)
    grid = np.full((n_tasks, len(row_labels), len(col_labels)), np.nan)  # (tasks, blocks, modules)
    for (r, c), values in zip(cells, rows):
        for t, v in enumerate(values):
            grid[t, r, c] = np.nan if v is None else float(v)
    vmax = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1.0)
    n_cols = min(n_tasks, RANK_PANELS_PER_ROW)
    n_rows = -(-n_tasks // n_cols)
    label_width = 0.08 * max(len(c) for c in col_labels)  # column labels are rotated: their length is height
    panel_w = 0.6 + 0.3 * len(col_labels)
    panel_h = 0.7 + label_width + 0.16 * len(row_labels)
    # constrained: the suptitle, panel titles and the shared colour bar never overlap
    fig = _figure(0.8 + panel_w * n_cols, 0.5 + panel_h * n_rows, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    font = 8 if len(row_labels) <= 16 else 6
    im = None
    for t in range(n_rows * n_cols):
        ax = axes[t // n_cols][t % n_cols]
        if t >= n_tasks:
            ax.set_axis_off()
            continue
        im = ax.imshow(np.ma.masked_invalid(grid[t]), cmap="magma", vmin=0.0, vmax=vmax, aspect="auto")
        _annotate(ax, grid[t], ".0f", 0.0, vmax, fontsize=font)
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=font)
        ax.set_title(task_names[t], fontsize=9)
        if t % n_cols == 0:
            ax.set_ylabel("block")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label="rank")
    return fig


def rank_map(ranks: Union[Mapping[str, Sequence[float]], np.ndarray, Sequence[Sequence[float]]],
             path: PathLike, *, layer_names: Optional[Sequence[str]] = None,
             task_names: Optional[Sequence[str]] = None, title: str = "Expert rank per block and module") -> Path:
    """The rank each task's expert received in each adapted linear, as a block x module grid per task.

    ``ranks`` is either ``{layer_name: [rank per task]}`` (rows may be ragged; missing entries are
    blank) or a 2-D array ``[layers, tasks]`` with ``layer_names``. Per-task dicts convert with
    :func:`ranks_by_layer`; names are laid out by :func:`layer_grid`.
    """
    return _save(rank_map_figure(ranks, layer_names=layer_names, task_names=task_names, title=title), path)


def routing_confusion(conf: Any, task_names: Sequence[str], path: PathLike,
                      title: str = "Routing: own task (rows) -> expert used (columns)") -> Path:
    """Confusion of task-agnostic routing, ``conf[true][routed]`` counts; colour = share of the row."""
    counts = np.asarray(conf, dtype=float)
    if counts.ndim != 2 or counts.shape[1] != len(task_names):
        raise ValueError(f"routing_confusion: expected a [rows, {len(task_names)}] count matrix, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    rows, cols = counts.shape
    fig = _figure(1.2 + 0.7 * cols, 1.0 + 0.6 * rows)
    ax = fig.add_subplot()
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if counts.size <= MAX_ANNOTATED_CELLS:
        for (r, c), v in np.ndenumerate(counts):
            ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if shares[r, c] > 0.5 else "black")
    names = _short(task_names)
    ax.set_xticks(range(cols), names, rotation=45, ha="right")
    ax.set_yticks(range(rows), names[:rows])
    ax.set_xlabel("routed to expert of task")
    ax.set_ylabel("sample of task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    return _save(fig, path)


def _mean_std(value: Any) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        std = value[1] if len(value) > 1 and value[1] is not None else 0.0
        return float(value[0]), float(std)
    return float(value), 0.0


def grouped_bars(table: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], path: PathLike,
                 title: str = "Methods compared", ylabel: str = "score") -> Path:
    """Bars grouped by metric, one bar per method, error bars = std.

    ``table[method][metric]`` is ``(mean, std)`` or a plain mean; a missing metric leaves a gap.
    """
    methods = list(table)
    if not methods or not metrics:
        raise ValueError("grouped_bars: expected at least one method and one metric")
    width = 0.8 / len(methods)
    x = np.arange(len(metrics))
    fig = _figure(2.0 + 0.5 * len(metrics) * max(2, len(methods)) / 2, 3.5)
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        stats = [_mean_std(table[method][m]) if m in table[method] else (np.nan, 0.0) for m in metrics]
        means = [s[0] for s in stats]
        stds = [s[1] for s in stats]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, list(metrics))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # below the axes: inside them it covers the tallest bars
    ax.legend(fontsize=8, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return _save(fig, path)


def pareto_front(points: Sequence[Mapping[str, Any]], x: str, y: str) -> list[int]:
    """Indices of the points no other point dominates (x minimised, y maximised), sorted by x.

    A point dominates another if its x is <= and its y is >=, one of them strictly; equal points
    do not dominate each other, so duplicates on the front are all kept.
    """
    xy = [(float(p[x]), float(p[y])) for p in points]
    front = [
        i for i, (xi, yi) in enumerate(xy)
        if not any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for xj, yj in xy)
    ]
    return sorted(front, key=lambda i: (xy[i][0], -xy[i][1]))


def pareto_plot_figure(points: Sequence[Mapping[str, Any]], x: str, y: str, title: Optional[str] = None,
                       label: str = "label") -> Figure:
    """The figure of :func:`pareto_plot`."""
    if not points:
        raise ValueError("pareto_plot: expected at least one point, got none")
    front = pareto_front(points, x, y)
    xs = np.array([float(p[x]) for p in points])
    ys = np.array([float(p[y]) for p in points])
    on_front = np.zeros(len(points), dtype=bool)
    on_front[front] = True
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    ax.scatter(xs[~on_front], ys[~on_front], color="0.6", label="dominated")
    ax.scatter(xs[on_front], ys[on_front], color="tab:red", zorder=3, label="Pareto front")
    ax.step(xs[front], ys[front], where="post", color="tab:red", linewidth=1.0)
    for p, px, py in zip(points, xs, ys):
        if label in p:
            ax.annotate(str(p[label]), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # parameter counts run to millions: SI prefixes and a few ticks keep the labels apart
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title(title or f"{y} vs {x}")
    ax.legend(fontsize=8)
    return fig


def pareto_plot(points: Sequence[Mapping[str, Any]], x: str, y: str, path: PathLike,
                title: Optional[str] = None, label: str = "label") -> Path:
    """Scatter of ``points`` (dicts with keys ``x``, ``y`` and optionally ``label``, drawn beside its
    point as is) with the Pareto front (minimise x, maximise y) highlighted and joined as a staircase."""
    return _save(pareto_plot_figure(points, x, y, title, label), path)
