"""Figures of attention heads over spectrograms: every head's map, and masks against the event boxes.

Each panel is `tile_plots.draw_tile` (grey, so the coloured overlays read), with the planted
event boxes of `analysis.attention.TileTruth.boxes` on top (birds solid cyan, other events
dashed white). Colour bars give the spectrogram's level scale (shared by every panel) and the
attention scale. Figures are `matplotlib.figure.Figure` objects, saved with `figures.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..analysis.attention import upsample_to_tile
from ..tiles.spectrogram import SpectrogramConfig
from .tile_plots import add_level_colorbar, draw_cells, draw_event_boxes, draw_tile

# Orange masks: distinct from the cyan truth boxes.
MASK_RGBA = np.array([1.0, 0.55, 0.0, 0.45])


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _tile_boxes(boxes: pd.DataFrame | None, tile: int) -> pd.DataFrame | None:
    return None if boxes is None else boxes[boxes["tile"] == tile]


SPECTROGRAM_CMAP = "Greys"
ATTENTION_CMAP = "inferno"


def _panel(axes, tile_db: np.ndarray, config: SpectrogramConfig, labelled: bool, tile_title: str | None) -> None:
    draw_tile(axes, tile_db, config, label_axes=labelled, cmap=SPECTROGRAM_CMAP)
    axes.tick_params(labelsize=6, length=2)
    if tile_title is not None:
        axes.set_ylabel(f"{tile_title}\nfrequency (kHz)" if labelled else str(tile_title), fontsize=6)
    elif labelled:
        axes.set_ylabel("frequency (kHz)", fontsize=7)
    if labelled:
        axes.set_xlabel("time (s)", fontsize=7)


def plot_head_maps(tiles_db: np.ndarray, head_maps: np.ndarray | torch.Tensor, spectrogram_config: SpectrogramConfig,
                   boxes: pd.DataFrame | None = None, tile_titles: Sequence[str] | None = None,
                   heads: Sequence[int] | None = None, upsample: str = "nearest",
                   panel_size_in: tuple[float, float] = (2.0, 1.2), title: str | None = None) -> Figure:
    """Tiles x heads grid: each tile's spectrogram, then every head's attention map over it.

    `tiles_db` (N, n_mels, n_frames) in dB; `head_maps` (N, heads, rows, columns); `boxes` as
    `TileTruth.boxes` (tile = position in these N tiles), drawn on every panel. Maps are shown
    relative to each map's maximum; `title` (which checkpoint) becomes the suptitle.
    """
    tiles_db = np.asarray(tiles_db)
    head_maps = _as_numpy(head_maps)
    n_tiles = len(tiles_db)
    heads = list(range(head_maps.shape[1])) if heads is None else list(heads)
    if head_maps.shape[0] != n_tiles:
        raise ValueError(f"{n_tiles} tiles but maps for {head_maps.shape[0]}")
    columns = 1 + len(heads)
    figure = Figure(figsize=(panel_size_in[0] * columns + 1.6, panel_size_in[1] * n_tiles + 0.6),
                    layout="constrained")
    grid = figure.subplots(n_tiles, columns, squeeze=False)
    for tile in range(n_tiles):
        for column in range(columns):
            axes = grid[tile, column]
            _panel(axes, tiles_db[tile], spectrogram_config, labelled=column == 0 and tile == n_tiles - 1,
                   tile_title=tile_titles[tile] if tile_titles is not None and column == 0 else None)
            if column > 0:
                head_map = head_maps[tile, heads[column - 1]]
                shown = upsample_to_tile(head_map / max(float(head_map.max()), 1e-12), tiles_db.shape[-2:], upsample)
                draw_cells(axes, shown, spectrogram_config, cmap=ATTENTION_CMAP, alpha=0.65, vmin=0.0, vmax=1.0)
            draw_event_boxes(axes, _tile_boxes(boxes, tile), spectrogram_config)
            if tile == 0:
                axes.set_title("spectrogram" if column == 0 else f"head {heads[column - 1]}", fontsize=8)
    add_level_colorbar(figure, grid[:, 0], cmap=SPECTROGRAM_CMAP, location="left", label="dB re tile max")
    if columns > 1:
        attention = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), ATTENTION_CMAP), ax=grid[:, 1:],
                                    shrink=0.8, aspect=30)
        attention.set_label("attention (share of the map's maximum)", fontsize=8)
        attention.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_mask_overlays(tiles_db: np.ndarray, masks: np.ndarray | torch.Tensor, spectrogram_config: SpectrogramConfig,
                       boxes: pd.DataFrame | None = None, source_names: Sequence[str] | None = None,
                       tile_titles: Sequence[str] | None = None,
                       panel_size_in: tuple[float, float] = (2.0, 1.2), title: str | None = None) -> Figure:
    """Tiles x sources grid of patch masks (translucent orange) over the spectrogram, with the event boxes.

    `masks` (N, sources, rows, columns) bool, e.g. `attention_mass_mask` of head maps with the
    energy baseline's mask appended; `source_names` titles the columns; `title` the figure.
    """
    tiles_db = np.asarray(tiles_db)
    masks = _as_numpy(masks).astype(bool)
    n_tiles, n_sources = masks.shape[:2]
    if len(tiles_db) != n_tiles:
        raise ValueError(f"{len(tiles_db)} tiles but masks for {n_tiles}")
    names = [f"source {s}" for s in range(n_sources)] if source_names is None else list(source_names)
    figure = Figure(figsize=(panel_size_in[0] * n_sources + 1.0, panel_size_in[1] * n_tiles + 0.6),
                    layout="constrained")
    grid = figure.subplots(n_tiles, n_sources, squeeze=False)
    for tile in range(n_tiles):
        for source in range(n_sources):
            axes = grid[tile, source]
            _panel(axes, tiles_db[tile], spectrogram_config, labelled=source == 0 and tile == n_tiles - 1,
                   tile_title=tile_titles[tile] if tile_titles is not None and source == 0 else None)
            cells = upsample_to_tile(masks[tile, source], tiles_db.shape[-2:], "nearest")
            draw_cells(axes, cells[..., None] * MASK_RGBA, spectrogram_config)
            draw_event_boxes(axes, _tile_boxes(boxes, tile), spectrogram_config)
            if tile == 0:
                axes.set_title(names[source], fontsize=8)
    add_level_colorbar(figure, grid, cmap=SPECTROGRAM_CMAP, label="dB re tile max (orange: mask)")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
