"""Drawing log-mel tiles for people: galleries with time and frequency axes, tile statistics.

Figures are `matplotlib.figure.Figure` objects (no pyplot state), saved by the caller with
`soundscape_ssl.report.figures.save_figure`. `draw_tile` is the one spectrogram panel of the project:
time in seconds, and frequency labelled in kHz at the mel bands' real centre frequencies, so a
4 kHz call reads as 4 kHz on every tile; maps, masks and event boxes are drawn over it in the
same coordinates (`draw_cells`, `draw_event_boxes`).

One colour scale for every panel: a tile is drawn as its level in dB relative to its own
maximum, from -`dynamic_range_db` (darkest) to 0 dB (brightest). A quiet tile then shows its own
structure rather than a dark square, and every panel of a figure shares the scale, so one colour
bar (`add_level_colorbar`) reads for all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from ..tiles.spectrogram import SpectrogramConfig, hz_to_mel_bin, mel_bin_centres_hz

FREQUENCY_TICKS_KHZ = (0.5, 1, 2, 4, 8, 12)
DYNAMIC_RANGE_DB = 80.0
LEVEL_LABEL = "level (dB re the tile's maximum)"
THUMBNAIL_SIZE_IN = (3.0, 1.9)


def tile_extent(config: SpectrogramConfig) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) of a tile drawn by `draw_tile`: time in seconds, so that frame
    j's centre lies at j * hop / sample rate, and frequency in mel-bin units, so that bin m's
    centre lies at m (`spectrogram.hz_to_mel_bin` places any frequency on that axis)."""
    frame_s = config.hop_length / config.sample_rate_hz
    return (-0.5 * frame_s, (config.n_frames - 0.5) * frame_s, -0.5, config.n_mels - 0.5)


def relative_level_db(tile_db: np.ndarray) -> np.ndarray:
    """A tile's level in dB relative to its own maximum (0 dB at the maximum), as `draw_tile` draws it."""
    tile_db = np.asarray(tile_db, dtype=np.float32)
    return tile_db - float(tile_db.max())


def draw_tile(axes: Axes, tile_db: np.ndarray, config: SpectrogramConfig, title: str | None = None,
              dynamic_range_db: float = DYNAMIC_RANGE_DB, label_axes: bool = True,
              cmap: str = "magma", time_tick_labels: bool | None = None,
              frequency_tick_labels: bool | None = None) -> AxesImage:
    """One log-mel tile (n_mels x n_frames, dB) with time in s and frequency in kHz: the one
    spectrogram panel of every figure (galleries, attention maps, masks, the report's thumbnails).

    The tile is drawn relative to its own maximum, on the scale [-dynamic_range_db, 0] dB that
    every panel shares (module docstring); returns the image, for `add_level_colorbar`. Overlays
    go on top with `draw_cells` (maps, masks) and `draw_event_boxes` (time-frequency boxes), in the
    same coordinates. `label_axes` False keeps the ticks but drops their labels and the axis titles
    (for inner panels of a grid); `time_tick_labels` / `frequency_tick_labels` override it for the
    tick labels of one axis (a grid's bottom row, its first column).
    """
    image = axes.imshow(relative_level_db(tile_db), origin="lower", aspect="auto", cmap=cmap,
                        interpolation="nearest", vmin=-dynamic_range_db, vmax=0.0,
                        extent=tile_extent(config))
    centres_hz = mel_bin_centres_hz(config)
    ticks = [khz for khz in FREQUENCY_TICKS_KHZ if centres_hz[0] <= khz * 1000 <= centres_hz[-1]]
    frequency_tick_labels = label_axes if frequency_tick_labels is None else frequency_tick_labels
    axes.set_yticks(hz_to_mel_bin([khz * 1000 for khz in ticks], config),
                    labels=[f"{khz:g}" for khz in ticks] if frequency_tick_labels else [])
    if label_axes:
        axes.set_xlabel("time (s)")
        axes.set_ylabel("frequency (kHz)")
    if not (label_axes if time_tick_labels is None else time_tick_labels):
        axes.set_xticklabels([])
    if title:
        axes.set_title(title, fontsize=8)
    return image


def add_level_colorbar(figure: Figure, axes: Axes | Sequence[Axes], cmap: str = "magma",
                       dynamic_range_db: float = DYNAMIC_RANGE_DB, label: str = LEVEL_LABEL,
                       **colorbar_options: Any) -> Any:
    """The one colour bar of the tiles drawn by `draw_tile` in `axes` (they share its scale)."""
    mappable = ScalarMappable(Normalize(-dynamic_range_db, 0.0), cmap)
    options = {"shrink": 0.8, "aspect": 30, **colorbar_options}
    colorbar = figure.colorbar(mappable, ax=axes, **options)
    colorbar.set_label(label, fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    return colorbar


def plot_tile_thumbnail(tile_db: np.ndarray, config: SpectrogramConfig, title: str | None = None,
                        size_in: tuple[float, float] = THUMBNAIL_SIZE_IN) -> Figure:
    """One tile as a small labelled figure (time in s, frequency in kHz, its level colour bar):
    the report's thumbnail beside each audio clip."""
    figure = Figure(figsize=size_in, layout="constrained")
    axes = figure.subplots()
    draw_tile(axes, tile_db, config)
    axes.tick_params(labelsize=6, length=2)
    axes.xaxis.label.set_fontsize(7)
    axes.yaxis.label.set_fontsize(7)
    axes.set_title(title or "", fontsize=7)
    add_level_colorbar(figure, axes, label="dB re max", pad=0.01, aspect=15, shrink=1.0)
    return figure


class TileThumbnails:
    """Many thumbnails (`plot_tile_thumbnail`) drawn on one figure, laid out and rendered once:
    each tile only replaces the image and the title, which are drawn over a saved background
    (blitting), twenty times faster than a figure per tile (a report has hundreds). `write_png`
    saves a 128-colour palette PNG: a third of the size of a full-colour one, no visible loss on a
    colour-mapped spectrogram, the same bytes every time."""

    def __init__(self, config: SpectrogramConfig, dpi: int = 100, size_in: tuple[float, float] = THUMBNAIL_SIZE_IN,
                 colours: int = 128) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        self.figure = plot_tile_thumbnail(np.zeros((config.n_mels, config.n_frames), np.float32), config,
                                          title="tile", size_in=size_in)
        self.figure.set_dpi(dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        self.canvas.draw()
        self.figure.set_layout_engine("none")   # freeze the layout: every thumbnail has the same frame
        self.axes = self.figure.axes[0]
        self.image, self.title, self.colours = self.axes.images[0], self.axes.title, colours
        # The background: everything but the tile, its frame and its title, drawn once; a draw
        # moves a hidden title out of the way, so its laid-out place is put back. The ticks stay in
        # the background (redrawing their labels would double the cost): where a tick mark's
        # antialiased edge touches the tile's first column, a full draw differs by a few levels.
        self.foreground = [self.image, *self.axes.spines.values(), self.title]
        title_position = self.title.get_position()
        for artist in self.foreground:
            artist.set_visible(False)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist in self.foreground:
            artist.set_visible(True)
        self.title.set_position(title_position)

    def render(self, tile_db: np.ndarray, title: str = "") -> np.ndarray:
        """The thumbnail of `tile_db` as an RGB array (height, width, 3)."""
        self.canvas.restore_region(self.background)
        self.image.set_data(relative_level_db(tile_db))
        self.title.set_text(title)
        for artist in self.foreground:   # in a full draw's order (zorder)
            self.axes.draw_artist(artist)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()

    def write_png(self, tile_db: np.ndarray, path: Any, title: str = "") -> None:
        """The thumbnail as a palette PNG into `path` (a path or an open binary file)."""
        from PIL import Image

        image = Image.fromarray(self.render(tile_db, title))
        image.quantize(self.colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            path, format="png")


def draw_cells(axes: Axes, cells: np.ndarray, config: SpectrogramConfig, **imshow_options: Any) -> None:
    """An (n_mels, n_frames) array, or RGBA (n_mels, n_frames, 4), over a tile drawn by `draw_tile`."""
    axes.imshow(cells, origin="lower", aspect="auto", interpolation="nearest", extent=tile_extent(config),
                **imshow_options)


def draw_event_boxes(axes: Axes, boxes: pd.DataFrame | None, config: SpectrogramConfig) -> None:
    """Time-frequency boxes (start_s, end_s tile-relative; f_low_hz, f_high_hz) over a tile drawn by
    `draw_tile`: those with `foreground` True (all, without the column) solid cyan, the others
    dashed white."""
    if boxes is None or boxes.empty:
        return
    foreground = boxes["foreground"] if "foreground" in boxes.columns else pd.Series(True, index=boxes.index)
    for (start_s, end_s, f_low_hz, f_high_hz), is_foreground in zip(
            boxes[["start_s", "end_s", "f_low_hz", "f_high_hz"]].itertuples(index=False), foreground):
        low, high = hz_to_mel_bin([f_low_hz, f_high_hz], config)
        axes.add_patch(Rectangle((start_s, low), end_s - start_s, high - low, fill=False,
                                 linewidth=0.9 if is_foreground else 0.6,
                                 edgecolor="cyan" if is_foreground else "white",
                                 linestyle="-" if is_foreground else "--"))


def plot_tile_gallery(tiles: Sequence[np.ndarray], titles: Sequence[str], config: SpectrogramConfig,
                      n_cols: int = 4, row_labels: Sequence[str] | None = None,
                      suptitle: str | None = None) -> Figure:
    """A grid of tiles, filled row by row; with `row_labels`, one row per label of `n_cols` tiles.
    Time and frequency are labelled on the bottom-left panel; one colour bar serves all."""
    n_rows = max(1, int(np.ceil(len(tiles) / n_cols)))
    figure = Figure(figsize=(2.4 * n_cols + 1.4, 1.7 * n_rows + 0.6), layout="constrained")
    grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for i, axes in enumerate(grid.flat):
        if i >= len(tiles):
            axes.axis("off")
            continue
        row, col = divmod(i, n_cols)
        draw_tile(axes, tiles[i], config, title=titles[i], label_axes=(col == 0 and row == n_rows - 1),
                  time_tick_labels=i + n_cols >= len(tiles), frequency_tick_labels=col == 0)
        axes.tick_params(labelsize=7)
        if row_labels is not None and col == 0:
            axes.set_ylabel(row_labels[row], fontsize=8)
    add_level_colorbar(figure, grid)
    if suptitle:
        figure.suptitle(suptitle)
    return figure


def pick_examples(index: pd.DataFrame, by: str | pd.Series, n_per_group: int, seed: int = 0,
                  groups: Sequence[str] | None = None) -> pd.DataFrame:
    """Up to `n_per_group` random rows per group (deterministic for a seed), groups in order.

    `by` is a column of `index` or a Series aligned with it; returns the chosen rows with a
    `group` column, ordered by group and then by position in `index`.
    """
    keys = index[by] if isinstance(by, str) else pd.Series(by, index=index.index)
    order = list(groups) if groups is not None else sorted(keys.dropna().unique(), key=str)
    rng = np.random.default_rng(seed)
    chosen = []
    for group in order:
        rows = np.flatnonzero((keys == group).to_numpy())
        if len(rows) == 0:
            continue
        picked = np.sort(rng.choice(rows, size=min(n_per_group, len(rows)), replace=False))
        chosen.append(index.iloc[picked].assign(group=group))
    if not chosen:
        return index.iloc[:0].assign(group=pd.Series(dtype=object))
    return pd.concat(chosen)


def level_categories(index: pd.DataFrame, near_silent_rms_dbfs: float,
                     flatness_quantiles: tuple[float, float] = (0.1, 0.9)) -> pd.Series:
    """A label-free category per tile from its statistics, to pick contrasting examples on real audio.

    "near-silent" below the level threshold; among the rest, "broadband noise" in the top
    flatness quantile (rain, wind, traffic), "tonal" in the bottom one (whistles, insect bands),
    "other" in between.
    """
    flatness = index["spectral_flatness"]
    audible = index["rms_dbfs"] >= near_silent_rms_dbfs
    low, high = flatness[audible].quantile(list(flatness_quantiles)) if audible.any() else (np.nan, np.nan)
    categories = pd.Series("other", index=index.index)
    categories[audible & (flatness >= high)] = "broadband noise"
    categories[audible & (flatness <= low)] = "tonal"
    categories[~audible] = "near-silent"
    return categories


def tiles_per_recorder_and_day(index: pd.DataFrame) -> pd.DataFrame:
    """Tile counts, recorders x calendar days of the tile's own timestamp (untimed tiles: 'no date')."""
    days = index["timestamp"].dt.strftime("%Y-%m-%d").fillna("no date")
    table = pd.crosstab(index["recorder"], days)
    table.columns.name = "day"
    return table


def plot_tile_statistics(index: pd.DataFrame, near_silent_rms_dbfs: float) -> Figure:
    """Histograms of tile level (RMS dBFS) and spectral flatness, with the near-silence threshold."""
    figure = Figure(figsize=(10.0, 3.2), layout="constrained")
    level_axes, flatness_axes, joint_axes = figure.subplots(1, 3)
    level = index["rms_dbfs"].to_numpy(dtype=float)
    flatness = index["spectral_flatness"].to_numpy(dtype=float)
    level_axes.hist(level, bins=60, color="C0")
    level_axes.axvline(near_silent_rms_dbfs, color="C3", linestyle="--",
                       label=f"near-silent < {near_silent_rms_dbfs:g} dBFS")
    level_axes.set_xlabel("tile RMS level (dBFS)")
    level_axes.set_ylabel("tiles")
    level_axes.legend(frameon=False, fontsize=8)
    flatness_axes.hist(flatness, bins=60, color="C1")
    flatness_axes.set_xlabel("spectral flatness (mel bands; 1 = white noise)")
    joint_axes.scatter(level, flatness, s=3, alpha=0.4, color="C2", rasterized=True)
    joint_axes.axvline(near_silent_rms_dbfs, color="C3", linestyle="--")
    joint_axes.set_xlabel("tile RMS level (dBFS)")
    joint_axes.set_ylabel("spectral flatness")
    figure.suptitle("Cheap per-tile statistics: level and noisiness")
    return figure
