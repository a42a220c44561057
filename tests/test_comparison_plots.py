"""Notebook 06's figures draw what their tables hold."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from soundscape_ssl.report.comparison_plots import (plot_cluster_species_heatmap, plot_detection_rates,
                                                    plot_detection_summary)


def test_detection_summary_draws_one_line_per_recorder_and_one_bar_per_species():
    labels = pd.DataFrame({
        "recorder": ["A", "A", "B", "B", "B"], "hour": [5, 6, 5, 5, 7],
        "scored": [True] * 5, "detected": [True, False, True, True, False],
        "pseudo_label": ["Turdus merula_Eurasian Blackbird", "none", "Parus major_Great Tit",
                         "Turdus merula_Eurasian Blackbird", "none"]})
    fig = plot_detection_summary(labels, max_species=5, threshold=0.5)
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines()] == ["A", "B"]
    np.testing.assert_allclose(left.get_lines()[1].get_ydata(), [1.0, 0.0])   # B at 5 h and 7 h
    assert [tick.get_text() for tick in right.get_yticklabels()] == ["Eurasian Blackbird", "Great Tit"]
    assert sorted(patch.get_width() for patch in right.patches) == [1, 2]


def test_detection_rates_rank_clusters_and_draw_the_overall_rate():
    rates = pd.DataFrame({"cluster": [0, 1, 2], "n_tiles": [10, 1, 10], "detection_rate": [0.2, 1.0, 0.7]})
    fig = plot_detection_rates({"ssl": rates}, overall_rate=0.3, min_tiles=2)
    ssl, overall = fig.axes[0].get_lines()
    np.testing.assert_allclose(ssl.get_ydata(), [0.7, 0.2])        # the 1-tile cluster left out
    np.testing.assert_allclose(overall.get_ydata(), [0.3, 0.3])


def test_cluster_species_heatmap_shows_the_shares_with_cluster_sizes():
    shares = pd.DataFrame([[0.5, 0.25], [0.0, 1.0]], index=[3, 7],
                          columns=["Turdus merula_Eurasian Blackbird", "Parus major_Great Tit"])
    fig = plot_cluster_species_heatmap(shares, "test", cluster_sizes={3: 4, 7: 1})
    image = fig.axes[0].get_images()[0]
    np.testing.assert_allclose(image.get_array(), shares.to_numpy())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["3 (4 tiles)", "7 (1 tile)"]
