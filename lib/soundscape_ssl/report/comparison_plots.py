"""Figures of notebook 06: BirdNET's detections over the archive, and how output spaces gather them.

Each function takes the tables `analysis.compare` computes and returns a `matplotlib.figure.Figure`
(no pyplot state: pyplot's inline backend would show each figure a second time at the end of the
cell), saved by `report.figures.save_figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_detection_summary(labels: pd.DataFrame, max_species: int = 15, threshold: float | None = None) -> Figure:
    """Left: share of scored tiles with a detection by hour of day, one line per recorder.
    Right: the most detected species (tiles at or above the threshold)."""
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1.0]})
    scored = labels[labels["scored"] & labels["hour"].notna()]
    for recorder, part in scored.groupby(scored["recorder"].astype(object).fillna("unknown"), sort=True):
        rate = part.groupby(part["hour"].astype(int))["detected"].mean()
        left.plot(rate.index, rate.to_numpy(), marker="o", markersize=3, linewidth=1.0, label=str(recorder))
    left.set_xlim(-0.5, 23.5)
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("hour of day (recorder's local time)")
    left.set_ylabel("share of tiles with a detection")
    if len(scored):
        left.legend(fontsize=7, ncol=2)
    else:
        left.text(0.5, 0.5, "no timestamps", ha="center", va="center", transform=left.transAxes)
    counts = labels.loc[labels["detected"], "pseudo_label"].value_counts().head(max_species)
    if len(counts):
        names = [str(s).split("_", 1)[-1] for s in counts.index]  # the common name of "Scientific_Common"
        right.barh(np.arange(len(counts))[::-1], counts.to_numpy())
        right.set_yticks(np.arange(len(counts))[::-1])
        right.set_yticklabels(names, fontsize=7)
    else:
        right.text(0.5, 0.5, "no confident detection", ha="center", va="center", transform=right.transAxes)
        right.set_yticks([])
    right.set_xlabel("tiles with a confident detection")
    fig.suptitle("BirdNET detections" + (f" (top confidence >= {threshold:g})" if threshold is not None else ""),
                 fontsize=10)
    return fig


def plot_detection_rates(rates_by_space: Mapping[str, pd.DataFrame], overall_rate: float,
                         min_tiles: int = 1, title: str = "Per-cluster BirdNET detection rate, every output space"
                         ) -> Figure:
    """Per-cluster BirdNET detection rates, clusters ranked highest first, one line per space.

    rates_by_space: name -> `metrics.detection_rate_per_cluster` table. Clusters with fewer than
    `min_tiles` tiles are left out. The dashed line is the rate over all tiles: a space that
    gathers BirdNET's detections has a few clusters far above it and many near zero.
    """
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, rates in rates_by_space.items():
        eligible = rates[rates["n_tiles"] >= min_tiles].sort_values("detection_rate", ascending=False)
        ax.plot(np.arange(1, len(eligible) + 1), eligible["detection_rate"].to_numpy(), marker=".",
                markersize=4, linewidth=1.2, label=name)
    ax.axhline(overall_rate, color="black", linestyle="--", linewidth=0.8, label=f"all tiles ({overall_rate:.2f})")
    ax.set_xlabel(f"cluster rank by detection rate (clusters with >= {min_tiles} tiles)")
    ax.set_ylabel("share of the cluster's tiles with a BirdNET detection")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_cluster_species_heatmap(shares: pd.DataFrame, title: str = "",
                                 cluster_sizes: Mapping[Any, int] | None = None) -> Figure:
    """A clusters x pseudo-labels heatmap of `cluster_species_shares` (share of each cluster's tiles).

    cluster_sizes: tiles per cluster, shown beside each cluster (a share of 1.0 in a 3-tile
    cluster is not a finding)."""
    n_rows, n_cols = shares.shape
    width_in = float(np.clip(3.0 + 0.45 * n_cols, 6.0, 16.0))
    height_in = float(np.clip(2.0 + 0.3 * n_rows, 3.5, 14.0))
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(np.arange(n_cols))
    # "Scientific_Common" labels: the common name is the readable part
    ax.set_xticklabels([str(c).split("_", 1)[-1] for c in shares.columns], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels([f"{c} ({cluster_sizes[c]} tile{'' if cluster_sizes[c] == 1 else 's'})"
                        if cluster_sizes is not None else str(c) for c in shares.index], fontsize=7)
    ax.set_xlabel("BirdNET pseudo-label")
    ax.set_ylabel("cluster (most detections first)")
    if title:
        ax.set_title(textwrap.fill(title, width=int(12 * width_in)), fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the cluster's tiles")
    return fig
