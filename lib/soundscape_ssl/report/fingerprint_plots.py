"""Figures of notebook 08: activity fingerprints, diel curves, separation by output space, indices.

Each function returns a `matplotlib.figure.Figure`; callers save it with `figures.save_figure`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

MAX_PANELS = 12


def plot_activity_heatmaps(shares: pd.DataFrame, title: str, max_categories: int = 30) -> Figure:
    """One heatmap per value of the first index level (recorder, habitat): the second level (hour,
    week) across, categories (clusters or groups) down, colour = share of that cell's tiles.

    `shares`: `analysis.fingerprints.activity_shares` with a two-level index. Categories are the
    `max_categories` largest overall; panels beyond `MAX_PANELS` are left out (said in the title).
    """
    if shares.empty or shares.index.nlevels != 2:
        raise ValueError("need a non-empty share table with a two-level index (panel, column)")
    data = shares.drop(columns="n_tiles")
    weight = data.mul(shares["n_tiles"], axis=0).sum().sort_values(ascending=False)
    categories = weight.index[:max_categories].tolist()
    panels = list(dict.fromkeys(data.index.get_level_values(0)))
    shown = panels[:MAX_PANELS]
    columns = min(3, len(shown))
    rows = int(np.ceil(len(shown) / columns))
    figure = Figure(figsize=(4.6 * columns, 0.22 * len(categories) * rows + 1.6 * rows + 0.6),
                    layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axes, panel in zip(grid.flat, shown):
        part = data.xs(panel, level=0)[categories].T
        image = axes.imshow(part.to_numpy(float), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                            interpolation="nearest")
        axes.set_title(str(panel), fontsize=9)
        axes.set_xticks(range(part.shape[1]), [str(c) for c in part.columns], fontsize=6, rotation=90)
        axes.set_yticks(range(len(categories)), [str(c) for c in categories], fontsize=6)
        axes.set_xlabel(str(data.index.names[1] or ""), fontsize=8)
    for axes in list(grid.flat)[len(shown):]:
        axes.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=grid, shrink=0.7, label="share of the cell's tiles")
    left_out = f" ({len(panels) - len(shown)} more not shown)" if len(panels) > len(shown) else ""
    figure.suptitle(title + left_out, fontsize=10)
    return figure


def plot_diel_curves(curves: pd.DataFrame, title: str, ylabel: str = "share of the hour's tiles",
                     shares: bool = True) -> Figure:
    """The share of each hour's tiles in each group (lines) and the tiles per hour (grey bars);
    with `shares` False, any per-hour values (e.g. z-scored index medians) on a free axis."""
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axes = figure.subplots()
    counts = axes.twinx()
    hours = curves.index.to_numpy(dtype=float)
    counts.bar(hours, curves["n_tiles"].to_numpy(float), width=0.8, color="0.88", zorder=0)
    counts.set_ylabel("tiles per hour", color="0.5", fontsize=8)
    axes.set_zorder(counts.get_zorder() + 1)
    axes.patch.set_visible(False)
    colours = colormaps["tab10"](np.arange(10))
    for colour, name in zip(colours, [c for c in curves.columns if c != "n_tiles"]):
        axes.plot(hours, curves[name].to_numpy(float), marker="o", markersize=3, color=colour, label=name)
    axes.set_xlim(-0.5, 23.5)
    axes.set_xticks(range(0, 24, 3))
    if shares:
        axes.set_ylim(0, 1)
    axes.set_xlabel("hour of day")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8, loc="upper left", ncols=2)
    axes.set_title(title, fontsize=10)
    return figure


def plot_separation(table: pd.DataFrame, title: str) -> Figure:
    """Grouped kNN accuracy per task (groups of bars, one per space, with their intervals) and the
    majority-class share (chance) as a dashed line per task; tasks without a score are named."""
    tasks = list(dict.fromkeys(table["task"]))
    spaces = list(dict.fromkeys(table["space"]))
    figure = Figure(figsize=(1.8 + 1.6 * len(tasks), 3.8), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(1, len(spaces))
    colours = colormaps["tab10"](np.arange(10))
    for j, space in enumerate(spaces):
        part = table[table["space"] == space].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) - 0.4 + width * (j + 0.5)
        accuracy = part["accuracy"].to_numpy(float)
        error = np.vstack([accuracy - part["interval_low"].to_numpy(float),
                           part["interval_high"].to_numpy(float) - accuracy])
        axes.bar(x, np.nan_to_num(accuracy), width, color=colours[j % 10], label=space,
                 yerr=np.nan_to_num(error), capsize=2)
    chance = table.drop_duplicates("task").set_index("task").reindex(tasks)["majority_share"].to_numpy(float)
    for i, value in enumerate(chance):
        if np.isfinite(value):
            axes.hlines(value, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)
    grouping = table.drop_duplicates("task").set_index("task").reindex(tasks)["grouping"]
    labels = [f"{task}\n(by {group})" if isinstance(group, str) and group else task
              for task, group in zip(tasks, grouping)]
    scored = table.groupby("task", sort=False)["accuracy"].apply(lambda s: s.notna().any()).reindex(tasks)
    labels = [label if ok else f"{label}\nn/a" for label, ok in zip(labels, scored)]
    axes.set_xticks(range(len(tasks)), labels, fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("grouped kNN accuracy")
    axes.legend(fontsize=8, loc="upper right")
    axes.set_title(title + " (dashed: chance)", fontsize=10)
    return figure


def plot_index_effects(effects: pd.DataFrame, title: str, top_n: int = 15) -> Figure:
    """The indices that differ most between clusters (rank eta squared), largest at the top."""
    top = effects.dropna(subset=["eta_squared"]).head(top_n).iloc[::-1]
    figure = Figure(figsize=(6.0, 0.3 * len(top) + 1.2), layout="constrained")
    axes = figure.subplots()
    axes.barh(top["index"].astype(str), top["eta_squared"].to_numpy(float), color="tab:green")
    axes.set_xlim(0, 1)
    axes.set_xlabel("rank eta squared between clusters (0: none, 1: clusters fully ordered)")
    axes.tick_params(axis="y", labelsize=8)
    axes.set_title(title, fontsize=10)
    return figure
