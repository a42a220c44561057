"""Tile galleries and statistics figures: example picking is deterministic and complete."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.report import tile_plots
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig


def _index() -> pd.DataFrame:
    return pd.DataFrame({
        "recorder": ["A"] * 5 + ["B"] * 2,
        "timestamp": pd.to_datetime(["2024-05-24 05:00"] * 3 + ["2024-05-25 05:00"] * 2
                                    + ["2024-05-24 06:00", None]),
        "rms_dbfs": np.linspace(-80, -20, 7),
        "spectral_flatness": np.linspace(0.1, 0.9, 7),
    })


def test_pick_examples_is_deterministic_and_capped_per_group() -> None:
    index = _index()
    first = tile_plots.pick_examples(index, "recorder", n_per_group=3, seed=1)
    again = tile_plots.pick_examples(index, "recorder", n_per_group=3, seed=1)
    assert first.index.tolist() == again.index.tolist()
    assert first.groupby("group").size().to_dict() == {"A": 3, "B": 2}
    labels = pd.Series(["x", "y", "x", "y", "x", "z", "z"])
    chosen = tile_plots.pick_examples(index, labels, n_per_group=1, groups=["z", "x", "missing"])
    assert chosen["group"].tolist() == ["z", "x"]
    assert set(labels[chosen.index]) == {"z", "x"}


def test_tiles_per_recorder_and_day_counts_every_tile() -> None:
    table = tile_plots.tiles_per_recorder_and_day(_index())
    assert table.loc["A", "2024-05-24"] == 3 and table.loc["A", "2024-05-25"] == 2
    assert table.loc["B", "no date"] == 1
    assert table.to_numpy().sum() == 7


def test_gallery_and_statistics_figures_draw() -> None:
    config = SpectrogramConfig()
    tiles = [np.random.default_rng(i).normal(-60, 10, (128, 256)).astype(np.float16) for i in range(5)]
    figure = tile_plots.plot_tile_gallery(tiles, [f"t{i}" for i in range(5)], config, n_cols=3)
    assert len(figure.axes) == 7 and figure.axes[0].get_title() == "t0"   # 6 panels + one colour bar
    labels = [t.get_text() for t in figure.axes[3].get_yticklabels()]
    assert labels == ["0.5", "1", "2", "4", "8", "12"]  # kHz at the bands' real centres
    assert figure.axes[-1].get_ylabel() == tile_plots.LEVEL_LABEL
    figure.canvas.draw()
    # time tick labels on the last tile of each column only (t3, t4 and t2 above the empty slot)
    has_time_labels = [any(t.get_text() for t in axes.get_xticklabels()) for axes in figure.axes[:5]]
    assert has_time_labels == [False, False, True, True, True]
    stats_figure = tile_plots.plot_tile_statistics(_index(), near_silent_rms_dbfs=-60)
    assert len(stats_figure.axes) == 3


def test_level_categories_from_statistics() -> None:
    index = pd.DataFrame({"rms_dbfs": [-80, -40, -40, -40, -40, -40],
                          "spectral_flatness": [0.5, 0.01, 0.2, 0.3, 0.4, 0.9]})
    categories = tile_plots.level_categories(index, near_silent_rms_dbfs=-60)
    assert categories.tolist() == ["near-silent", "tonal", "other", "other", "other", "broadband noise"]


def test_draw_tile_puts_time_in_seconds_and_overlays_in_the_same_coordinates() -> None:
    from matplotlib.figure import Figure

    from soundscape_ssl.tiles.spectrogram import hz_to_mel_bin

    config = SpectrogramConfig()  # 3 s, 256 frames of 375 samples at 32 kHz
    axes = Figure().subplots()
    tile = np.random.default_rng(0).normal(-60, 10, (128, 256))
    image = tile_plots.draw_tile(axes, tile, config, cmap="Greys")
    # drawn relative to the tile's own maximum, on the shared [-80, 0] dB scale
    assert image.get_clim() == (-80.0, 0.0)
    assert float(image.get_array().max()) == 0.0
    assert float(image.get_array().min()) == pytest.approx(float(tile.min() - tile.max()), abs=1e-3)
    frame_s = 375 / 32000
    assert tile_plots.tile_extent(config) == pytest.approx((-0.5 * frame_s, 255.5 * frame_s, -0.5, 127.5))
    assert axes.get_xlim() == pytest.approx((-0.5 * frame_s, 255.5 * frame_s))
    assert axes.get_xlabel() == "time (s)" and axes.get_ylabel() == "frequency (kHz)"
    # A 1 s long box from 2 to 4 kHz: drawn from x = 1 s, between the mel positions of its edges.
    boxes = pd.DataFrame({"start_s": [1.0, 0.0], "end_s": [2.0, 0.5], "f_low_hz": [2000.0, 500.0],
                          "f_high_hz": [4000.0, 800.0], "foreground": [True, False]})
    tile_plots.draw_event_boxes(axes, boxes, config)
    bird, other = axes.patches
    assert bird.get_x() == 1.0 and bird.get_width() == 1.0
    assert (bird.get_y(), bird.get_y() + bird.get_height()) == pytest.approx(tuple(hz_to_mel_bin([2000.0, 4000.0], config)))
    assert bird.get_linestyle() == "-" and other.get_linestyle() == "--"
    tile_plots.draw_cells(axes, np.zeros((128, 256)), config, alpha=0.5)
    assert axes.images[-1].get_extent() == pytest.approx(list(tile_plots.tile_extent(config)))


def test_thumbnails_drawn_over_a_saved_background_equal_a_full_draw(tmp_path) -> None:
    """`TileThumbnails` redraws only the tile, its frame and its title over a background drawn
    once; the result must be what a full draw of the same figure gives, but for the antialiased
    edges of the tick marks where they touch the tile (a few pixels of the frame's columns)."""
    import io

    from PIL import Image

    config = SpectrogramConfig()
    thumbnails = tile_plots.TileThumbnails(config, dpi=80)
    rng = np.random.default_rng(0)
    for k in range(3):
        tile = rng.normal(-50, 12, (128, 256)).astype(np.float32)
        fast = thumbnails.render(tile, f"tile {k}")
        thumbnails.canvas.draw()                                     # everything, the slow way
        full = np.asarray(thumbnails.canvas.buffer_rgba())[..., :3]
        assert fast.shape == (round(1.9 * 80), round(3.0 * 80), 3)
        differs = np.abs(fast.astype(int) - full.astype(int)).max(axis=2)
        rows, columns = np.nonzero(differs)
        assert differs.max() <= 12 and len(rows) <= 12, k
        frame = thumbnails.axes.get_window_extent()
        height = full.shape[0]
        assert set(columns) <= {int(frame.x0), int(frame.x0) + 1}, k     # the left frame, at tick marks
        assert all(height - frame.y1 - 2 <= r <= height - frame.y0 + 2 for r in rows), k
    buffer = io.BytesIO()
    thumbnails.write_png(tile, buffer, "tile 2")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "P" and image.size == (240, 152)            # a palette PNG of the thumbnail
    again = io.BytesIO()
    thumbnails.write_png(tile, again, "tile 2")
    assert again.getvalue() == buffer.getvalue()
