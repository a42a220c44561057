"""The labelled validation's figures, drawn from a small hand-made result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from soundscape_ssl.analysis.metrics import KnnConfig, score_space
from soundscape_ssl.report import validation_plots


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    labels = np.repeat(["Acrocephalus palustris", "Acrocephalus scirpaceus", "Locustella naevia"], 20)
    groups = np.repeat([f"r{i}" for i in range(12)], 5)
    centres = {"Acrocephalus palustris": 0.0, "Acrocephalus scirpaceus": 4.0, "Locustella naevia": 8.0}
    embeddings = np.array([centres[label] for label in labels])[:, None] + rng.normal(0, 1, (60, 4))
    config = KnnConfig(k=3, n_folds=3, n_bootstrap=100)
    return labels, {"good": score_space("good", embeddings, labels, groups, "recording", config),
                    "noise": score_space("noise", rng.normal(size=(60, 4)), labels, groups, "recording", config)}


def test_knn_accuracy_figure_says_how_folds_and_intervals_were_made():
    scores = pd.DataFrame({"space": ["a", "b", "c"], "pooling": ["p"] * 3, "metric": ["knn_accuracy"] * 2 + ["kmeans_nmi"],
                           "value": [0.7, 0.5, 0.3], "interval_low": [0.6, 0.4, 0.2], "interval_high": [0.8, 0.6, 0.4],
                           "interval_level": [0.95] * 3, "grouping": ["recordist"] * 3,
                           "interval_method": ["percentile bootstrap over 26 recordists, 2000 resamples"] * 3})
    figure = validation_plots.plot_knn_accuracy(scores, chance=0.3)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["b · p", "a · p"]      # lowest first, NMI left out
    assert "grouped by recordist" in axes.get_xlabel()
    assert "95% percentile bootstrap over 26 recordists" in axes.get_xlabel()
    with pytest.raises(ValueError, match="no knn_accuracy"):
        validation_plots.plot_knn_accuracy(scores[scores["metric"] != "knn_accuracy"])


def test_label_maps_and_confusion_matrices_draw_one_panel_per_space(scored):
    labels, spaces = scored
    maps = validation_plots.plot_label_maps(spaces, labels, seed=0)
    assert isinstance(maps, Figure) and len(maps.axes) == 2
    assert maps.axes[0].get_title().startswith(f"good\nkNN {spaces['good'].knn.accuracy:.2f}")
    confusion = validation_plots.plot_knn_confusion(spaces, shorten={"Acrocephalus ": "A. "})
    panels = [axes for axes in confusion.axes if axes.get_title()]
    assert len(panels) == 2
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["A. palustris", "A. scirpaceus", "Locustella naevia"]
    # The diagonal of the first panel is the per-label recall of the good space.
    recall = np.diag(spaces["good"].knn.confusion_matrix(normalize="true").to_numpy())
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in panels[0].texts}
    assert [texts[(i, i)] for i in range(3)] == [f"{r:.2f}" for r in recall]
    assert len(validation_plots.label_colours(["b", "a", "b"])) == 2
