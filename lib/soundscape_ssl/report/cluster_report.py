"""What the clusters of an embedding contain: level-based naming, 2-D map panels, galleries, contingency.

Figures are `matplotlib.figure.Figure` objects saved by callers with `figures.save_figure`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..tiles.spectrogram import SpectrogramConfig
from .tile_plots import add_level_colorbar, draw_tile

MAX_LEGEND_ENTRIES = 20


def describe_clusters(index: pd.DataFrame, labels: np.ndarray, near_silent_rms_dbfs: float,
                      noise_flatness: float) -> pd.DataFrame:
    """One row per cluster from the tiles' cheap statistics, with a label-free verdict.

    `verdict` is "near-silent" when the cluster's median level is below `near_silent_rms_dbfs`,
    "broadband noise" when its median spectral flatness is at least `noise_flatness` (rain, wind,
    traffic: energy spread over the bands), else "signal" (something structured: calls, insect
    bands). Also: size, median level and flatness, its recorders' count and the share of its
    tiles from the busiest recorder (a cluster of one recorder may be a site, not a sound).
    """
    frame = pd.DataFrame({"cluster": np.asarray(labels), "rms_dbfs": index["rms_dbfs"].to_numpy(),
                          "flatness": index["spectral_flatness"].to_numpy(),
                          "recorder": index["recorder"].to_numpy()})
    grouped = frame.groupby("cluster")
    table = pd.DataFrame({
        "n_tiles": grouped.size(),
        "median_rms_dbfs": grouped["rms_dbfs"].median(),
        "median_flatness": grouped["flatness"].median(),
        "n_recorders": grouped["recorder"].nunique(),
        "top_recorder_share": grouped["recorder"].agg(lambda s: s.value_counts(normalize=True).iloc[0]),
    })
    verdict = np.where(table["median_rms_dbfs"] < near_silent_rms_dbfs, "near-silent",
                       np.where(table["median_flatness"] >= noise_flatness, "broadband noise", "signal"))
    return table.assign(verdict=verdict).reset_index()


def _category_colours(n_categories: int) -> np.ndarray:
    """Distinct colours: tab10 up to 10 categories, tab20 up to 20, evenly spaced hues beyond."""
    if n_categories <= 10:
        return colormaps["tab10"](np.arange(n_categories))
    if n_categories <= 20:
        return colormaps["tab20"](np.arange(n_categories) % 20)
    return colormaps["hsv"](np.linspace(0.0, 1.0, n_categories, endpoint=False))


def plot_map_panels(coords: np.ndarray, colour_by: Mapping[str, pd.Series], title: str,
                    point_size: float = 3.0) -> Figure:
    """The same 2-D map once per colouring (cluster, recorder, habitat, hour, level ...).

    Numeric values with more than 20 distinct values get a colour bar; anything else (strings,
    a categorical dtype, numbers with few values) counts as categories: distinct colours and, up to
    20 of them, a legend. Beyond that the panel says how many categories it colours instead (a
    legend of 100 clusters helps nobody; the report's overview page shows each cluster). Pass
    cluster ids as a categorical, or they read as a continuous scale.
    """
    n_panels = len(colour_by)
    columns = min(3, n_panels)
    rows = int(np.ceil(n_panels / columns))
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, (name, values) in zip(grid.flat, colour_by.items()):
        values = pd.Series(values).reset_index(drop=True)
        continuous = (pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype)
                      and values.nunique() > MAX_LEGEND_ENTRIES)
        if continuous:
            image = axes.scatter(coords[:, 0], coords[:, 1], c=values.to_numpy(dtype=float), s=point_size,
                                 cmap="viridis", rasterized=True, linewidths=0)
            figure.colorbar(image, ax=axes, shrink=0.8).set_label(name, fontsize=8)
            panel_title = name
        else:
            categories = pd.Categorical(values)  # natural order: hours 4 < 12, not "12" < "4"
            colours = _category_colours(len(categories.categories))
            axes.scatter(coords[:, 0], coords[:, 1], c=colours[categories.codes], s=point_size,
                         rasterized=True, linewidths=0)
            n_categories = len(categories.categories)
            panel_title = name
            if n_categories <= MAX_LEGEND_ENTRIES:
                handles = [Line2D([], [], marker="o", linestyle="", color=colours[i], label=str(label), markersize=4)
                           for i, label in enumerate(categories.categories)]
                axes.legend(handles=handles, fontsize=6, frameon=False, loc="best")
            else:
                panel_title = f"{name} ({n_categories} of them: too many for a legend)"
        axes.set_title(panel_title, fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    for axes in list(grid.flat)[n_panels:]:
        axes.axis("off")
    figure.suptitle(title)
    return figure


def plot_cluster_gallery(tiles_of: Sequence[Sequence[np.ndarray]], cluster_titles: Sequence[str],
                         config: SpectrogramConfig, suptitle: str | None = None) -> Figure:
    """One row per cluster: its most central tiles (nearest the centroid first), the cluster's
    title left of its row. Frequency (kHz) is labelled on the first column, time (s) on the bottom
    row; one colour bar serves every tile."""
    n_rows = len(tiles_of)
    n_cols = max((len(t) for t in tiles_of), default=1)
    figure = Figure(figsize=(2.0 * n_cols + 2.2, 1.35 * n_rows + 0.9), layout="constrained")
    grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for row, (tiles, title) in enumerate(zip(tiles_of, cluster_titles)):
        for col in range(n_cols):
            axes = grid[row, col]
            if col >= len(tiles):
                axes.axis("off")
                continue
            last_in_column = row == n_rows - 1 or col >= len(tiles_of[row + 1])
            draw_tile(axes, tiles[col], config, label_axes=False, time_tick_labels=last_in_column,
                      frequency_tick_labels=col == 0)
            axes.tick_params(labelsize=6, length=2)
            if col == 0:
                axes.set_ylabel(title, fontsize=7)
    figure.supxlabel("time (s)", fontsize=8)
    figure.supylabel("frequency (kHz)", fontsize=8)
    add_level_colorbar(figure, grid)
    if suptitle:
        figure.suptitle(suptitle)
    return figure


def plot_contingency_heatmap(table: pd.DataFrame, title: str, normalise_rows: bool = True) -> Figure:
    """Clusters (rows) x reference labels (columns); rows sorted by their majority label.

    With `normalise_rows` each row shows the share of the cluster's tiles per label, so a pure
    cluster is one bright cell whatever its size.
    """
    values = table.to_numpy(dtype=float)
    if normalise_rows:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1.0)
    order = np.lexsort((-values.max(axis=1), values.argmax(axis=1)))
    values = values[order]
    figure = Figure(figsize=(max(5.0, 0.35 * table.shape[1] + 2.5), max(4.0, 0.06 * table.shape[0] + 2.0)),
                    layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
    axes.set_xticks(range(table.shape[1]), labels=[str(c) for c in table.columns], rotation=90, fontsize=7)
    axes.set_ylabel(f"cluster ({table.shape[0]}, sorted by majority label)")
    axes.set_yticks([])
    figure.colorbar(image, ax=axes, label="share of the cluster's tiles" if normalise_rows else "tiles")
    axes.set_title(title)
    return figure
