"""Figures of the labelled validation (notebook 07): kNN accuracy per space with its interval,
2-D maps of the labelled windows, and the kNN confusion matrices.

Each function returns a `matplotlib.figure.Figure` (no pyplot state), saved with
`figures.save_figure`. The spaces are `analysis.validate.SpaceResult`s (or any
`analysis.metrics.SpaceScores`): their embeddings, out-of-fold kNN predictions and KMeans scores.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.cluster import ClusterConfig, umap_2d
from ..analysis.metrics import SpaceScores


def label_colours(labels: Sequence[Any]) -> dict[Any, np.ndarray]:
    """One colour per distinct label, in sorted order: tab10 up to 10 labels, tab20 beyond."""
    names = sorted(set(labels), key=str)
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: np.asarray(palette(i % palette.N)) for i, name in enumerate(names)}


def plot_knn_accuracy(scores: pd.DataFrame, chance: float | None = None,
                      title: str = "kNN accuracy of every output space") -> Figure:
    """kNN accuracy of every scored space (rows of `validate` scores with metric "knn_accuracy"),
    lowest first, with its interval; `chance` (e.g. the most frequent label's share) dotted.

    The x label says how the folds were grouped and how the intervals were made, from the rows.
    """
    knn = scores[scores["metric"] == "knn_accuracy"].sort_values("value", kind="mergesort")
    if knn.empty:
        raise ValueError("no knn_accuracy rows to draw")
    figure = Figure(figsize=(7.0, 0.45 * len(knn) + 1.4), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(knn))
    errors = [knn["value"] - knn["interval_low"], knn["interval_high"] - knn["value"]]
    axes.errorbar(knn["value"], positions, xerr=np.clip(np.nan_to_num(errors), 0, None), fmt="o",
                  color="black", capsize=3)
    if chance is not None:
        axes.axvline(chance, color="grey", linestyle=":", label="most frequent label")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_yticks(positions, knn["space"] + " · " + knn["pooling"])
    first = knn.iloc[0]
    interval = textwrap.fill(f"{first['interval_level']:.0%} {first['interval_method']}", 80)
    axes.set_xlabel(f"kNN accuracy, folds grouped by {first['grouping']}\n{interval}", fontsize=8)
    axes.set_xlim(0, 1)
    figure.suptitle(title, fontsize=10)
    return figure


def plot_label_maps(spaces: Mapping[str, SpaceScores], labels: Sequence[Any], seed: int = 0,
                    n_neighbors: int = 15, title: str = "UMAP of the labelled windows") -> Figure:
    """A UMAP of each space's rows (title -> space), coloured by label, with the space's kNN
    accuracy and NMI in its title. A map is a picture of neighbourhoods, not a score."""
    labels = np.asarray(labels)
    colours = label_colours(labels)
    figure = Figure(figsize=(5.5 * max(1, len(spaces)), 5.0), layout="constrained")
    grid = figure.subplots(1, max(1, len(spaces)), squeeze=False)[0]
    for axes, (title, space) in zip(grid, spaces.items()):
        coordinates = umap_2d(space.embeddings, ClusterConfig(seed=seed, umap_n_neighbors=n_neighbors))
        for name, colour in colours.items():
            rows = labels == name
            axes.scatter(coordinates[rows, 0], coordinates[rows, 1], s=10, color=colour, label=str(name), alpha=0.8)
        axes.set_title(f"{title}\nkNN {space.knn.accuracy:.2f}, NMI {space.agreement['nmi']:.2f}", fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    if spaces:
        grid[len(spaces) - 1].legend(fontsize=7, markerscale=1.5, loc="best")
    figure.suptitle(title, fontsize=10)
    return figure


def plot_knn_confusion(spaces: Mapping[str, SpaceScores], shorten: Mapping[str, str] | None = None,
                       title: str = "Out-of-fold kNN confusion") -> Figure:
    """Each space's out-of-fold kNN confusion matrix (title -> space), rows normalised: the
    diagonal is each label's recall. `shorten` replaces prefixes of label names for the ticks
    (e.g. {"Acrocephalus ": "A. "})."""
    shorten = dict(shorten or {})
    figure = Figure(figsize=(4.2 * max(1, len(spaces)) + 1.8, 4.6), layout="constrained")
    grid = figure.subplots(1, max(1, len(spaces)), squeeze=False)[0]
    image = None
    for position, (axes, (title, space)) in enumerate(zip(grid, spaces.items())):
        matrix = space.knn.confusion_matrix(normalize="true")
        values = matrix.to_numpy()
        image = axes.imshow(values, vmin=0, vmax=1, cmap="Blues")
        names = [str(name) for name in matrix.index]
        for prefix, short in shorten.items():
            names = [name.replace(prefix, short) for name in names]
        ticks = np.arange(len(matrix))
        axes.set_xticks(ticks, names, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(ticks, names if position == 0 else [], fontsize=7)
        for i in ticks:
            for j in ticks:
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] > 0.6 else "black")
        axes.set_xlabel("predicted")
        if position == 0:
            axes.set_ylabel("true")
        axes.set_title(title, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=list(grid), shrink=0.8, label="share of the true label's windows")
    figure.suptitle(title, fontsize=10)
    return figure
