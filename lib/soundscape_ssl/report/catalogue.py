"""What each figure of the study answers: the question, a one-line caption, and the published set.

One home for the words around the figures: the run report (`report.site`) groups every figure a
run saved under its notebook and its question with this caption, and `make figures`
(`report.published`) copies the published figures of the demo's reference run into `figures/`
with a README table made from the same entries.

Entries match figure names (the file name without .png) as shell patterns, so one entry covers a
figure per method (`05_head_maps_*`). A figure no entry matches is still shown, under its
notebook, with the title `save_figure` recorded beside it (`<name>.json`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class FigureEntry:
    pattern: str        # figure name, or a shell pattern over names
    question: str       # the question the figure answers
    caption: str        # one line on what it shows


FIGURES: tuple[FigureEntry, ...] = (
    FigureEntry("01_coverage_recorder_by_day", "When did each recorder run?",
                "Recorded hours per recorder and calendar day; a gap is a day the recorder was off."),
    FigureEntry("01_hours_by_hour_of_day", "At which hours of the day was the archive recorded?",
                "Recorded hours by hour of day, per habitat: the recording schedule as it was kept."),
    FigureEntry("01_hours_per_recorder", "How much audio does each recorder contribute?",
                "Recorded hours per recorder, coloured by habitat."),
    FigureEntry("01_planted_events_by_label_and_habitat", "What did the synthetic archive plant, and where?",
                "Planted calls, songs and noise events by label and habitat: the ground truth later notebooks "
                "try to recover without labels."),
    FigureEntry("02_example_tiles_per_recorder", "What does a tile look like?",
                "Random 3 s log-mel tiles of each recorder, frequency in kHz, level in dB below each tile's "
                "maximum."),
    FigureEntry("02_example_tiles_per_label", "What does each planted source look like as a tile?",
                "Example tiles per dominant planted label: the structure a self-supervised model should find."),
    FigureEntry("02_tile_statistics", "How loud and how noisy are the tiles?",
                "Tile level (RMS dBFS) and spectral flatness, with the near-silence threshold."),
    FigureEntry("03_training_curves", "Did each method's loss fall?",
                "Loss and learning rate against optimizer step, one column per SSL method."),
    FigureEntry("03_throughput", "How fast did pretraining run on this machine?",
                "Tiles per second per method; a property of the hardware, not of the training."),
    FigureEntry("03_monitors_*", "Did training come close to collapse?",
                "The method's collapse monitors against step (DINO: teacher entropy and marginal; VICReg: "
                "spread, variance, covariance; MAE: hidden share)."),
    FigureEntry("04_map_panels",
                "Does the embedding sort tiles by what they contain, or by where and when they were recorded?",
                "UMAP of the main space coloured by cluster, recorder, habitat, hour, level and planted label."),
    FigureEntry("04_cluster_gallery", "What do the largest clusters contain?",
                "The tiles nearest each centroid of the largest clusters, with size and level-based verdict."),
    FigureEntry("04_outlier_gallery", "Which tiles resemble nothing else in the archive?",
                "The top outliers of the main space (mean cosine distance to their nearest tiles), most "
                "outlying first: where rare species, machines and shots should surface."),
    FigureEntry("04_contingency_planted", "Do the clusters match the planted sources?",
                "Clusters x planted labels, each row the share of a cluster's tiles per label."),
    FigureEntry("05_head_maps_*", "Where does each attention head look?",
                "Last-block CLS attention of every head over example tiles, planted boxes on top."),
    FigureEntry("05_masks_*", "Does the best head segment calls better than an energy threshold?",
                "The chosen head's 60%-mass mask beside the energy-threshold mask over the example tiles."),
    FigureEntry("06_birdnet_detections", "What does BirdNET hear in the archive?",
                "Share of tiles with a confident BirdNET detection by hour and recorder; the most detected "
                "species."),
    FigureEntry("06_detection_rate_per_cluster", "Do some clusters gather BirdNET's detections?",
                "Per-cluster detection rate, clusters ranked, one line per output space, against the rate "
                "over all tiles."),
    FigureEntry("06_clusters_vs_species_*", "Which species does each cluster hold, according to BirdNET?",
                "Clusters with the most detections against the most detected species (share of the "
                "cluster's tiles)."),
    FigureEntry("07_knn_accuracy", "Which output space separates the labelled species best?",
                "kNN accuracy with its bootstrap interval for every space, folds grouped by recording or "
                "recorder; chance dotted."),
    FigureEntry("07_umap_labelled_windows", "How do labelled windows lie in the best SSL space and in BirdNET's?",
                "UMAP of the scored windows coloured by label, with each space's kNN accuracy and NMI."),
    FigureEntry("07_knn_confusion", "Which species are confused with which?",
                "Out-of-fold kNN confusion matrices, rows normalised: the diagonal is each label's recall."),
    FigureEntry("08_fingerprint_recorder_hour", "What is each recorder's acoustic fingerprint over the day?",
                "Share of each recorder's tiles per cluster group and hour of day: the diel fingerprint."),
    FigureEntry("08_fingerprint_habitat_week", "Does a habitat's soundscape change from week to week?",
                "Share of each habitat's tiles per cluster group and week, where the archive spans weeks."),
    FigureEntry("08_fingerprint_habitat_hour", "How does each habitat's soundscape change over the day?",
                "Share of each habitat's tiles per cluster group and hour of day."),
    FigureEntry("08_diel_curves", "When are birds, insects, rain and silence heard?",
                "Diel activity curves: the share of each hour's tiles in bird, insect, rain and silence "
                "cluster groups."),
    FigureEntry("08_separation", "Do embeddings or acoustic indices tell recorder, habitat, hour and week apart?",
                "Grouped kNN accuracy of each task read off the SSL space, the index vector and log-mel "
                "statistics, with intervals; chance dotted."),
    FigureEntry("08_index_cluster_effects", "Which acoustic indices differ most between clusters?",
                "Rank effect size (eta squared) of each scikit-maad index across the main space's clusters."),
    FigureEntry("08_index_diel_profiles", "Do the classic indices follow the bird clusters over the day?",
                "Hourly medians of six classic indices (z-scored) beside the bird clusters' diel curve."),
)

# The published set: figure names of the demo's reference run copied into `figures/` by
# `make figures` (one or two per notebook; the demo's main space is VICReg with band pooling).
PUBLISHED: tuple[str, ...] = (
    "01_coverage_recorder_by_day",
    "01_planted_events_by_label_and_habitat",
    "02_example_tiles_per_label",
    "03_training_curves",
    "04_map_panels",
    "04_cluster_gallery",
    "05_masks_vicreg",
    "06_detection_rate_per_cluster",
    "07_knn_accuracy",
    "07_knn_confusion",
    "08_fingerprint_recorder_hour",
    "08_separation",
)


def entry_for(name: str) -> FigureEntry | None:
    """The catalogue entry of figure `name` (the first whose pattern matches), or None."""
    for entry in FIGURES:
        if fnmatch.fnmatchcase(name, entry.pattern):
            return entry
    return None


def notebook_key(name: str) -> str:
    """The notebook a figure belongs to, by its name's two-digit prefix ("04_map_panels" -> "04")."""
    prefix = name[:2]
    return prefix if prefix.isdigit() and name[2:3] == "_" else ""
