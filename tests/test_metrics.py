"""Clustering agreement, BirdNET detection rates and grouped kNN scores, on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from soundscape_ssl.analysis.metrics import (KnnConfig, cluster_purity_table, clustering_agreement,
                                             contingency_table, detection_rate_per_cluster, grouped_folds,
                                             knn_cross_validate, paired_against, purity, score_space,
                                             score_spaces, spaces_table, summarize_detection_rates)

# ------------------------------------------------------------------ clustering agreement


def test_a_permuted_perfect_clustering_scores_one():
    rng = np.random.default_rng(0)
    reference = rng.choice(["wren", "robin", "rain", "cricket"], size=400)
    renaming = {"wren": 7, "robin": 2, "rain": 0, "cricket": 5}
    clusters = np.array([renaming[label] for label in reference])
    scores = clustering_agreement(clusters, reference)
    for name in ("nmi", "ari", "homogeneity", "completeness", "v_measure", "purity"):
        assert scores[name] == pytest.approx(1.0), name
    assert scores["n_clusters"] == 4 and scores["n_reference_labels"] == 4 and scores["n_rows"] == 400


def test_an_independent_clustering_scores_near_zero():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 5, size=20_000)
    clusters = rng.integers(0, 10, size=20_000)
    scores = clustering_agreement(clusters, reference)
    assert abs(scores["ari"]) < 0.002
    assert scores["nmi"] < 0.003
    assert scores["purity"] == pytest.approx(0.2, abs=0.02)


def test_purity_and_majority_labels_of_a_hand_made_contingency():
    clusters = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    reference = ["a", "a", "b", "b", "b", "c", "c", "a", "c"]
    table = contingency_table(clusters, reference)
    np.testing.assert_array_equal(table.to_numpy(), [[2, 1, 0], [0, 2, 0], [1, 0, 3]])
    assert list(table.columns) == ["a", "b", "c"]
    assert purity(clusters, reference) == pytest.approx(7 / 9)
    per_cluster = cluster_purity_table(clusters, reference)
    assert per_cluster["majority_label"].tolist() == ["a", "b", "c"]
    assert per_cluster["majority_count"].tolist() == [2, 2, 3]
    np.testing.assert_allclose(per_cluster["purity"], [2 / 3, 1.0, 3 / 4])


def test_rows_without_a_reference_label_are_left_out():
    clusters = [0, 0, 1, 1, 1]
    reference = np.array(["a", "a", None, "b", "b"], dtype=object)
    scores = clustering_agreement(clusters, reference)
    assert scores["n_rows"] == 4 and scores["n_rows_unlabelled"] == 1
    assert scores["nmi"] == pytest.approx(1.0) and scores["purity"] == 1.0


# ------------------------------------------------------------------ detection rate


def test_detection_rate_per_cluster_and_top_cluster_summary():
    clusters = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3])
    detected = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    rates = detection_rate_per_cluster(clusters, detected)
    assert rates["cluster"].tolist() == [3, 0, 2, 1]  # highest rate first
    assert rates["n_tiles"].tolist() == [1, 4, 5, 2]
    assert rates["n_detected"].tolist() == [1, 3, 1, 0]
    np.testing.assert_allclose(rates["detection_rate"], [1.0, 0.75, 0.2, 0.0])

    summary = summarize_detection_rates(rates, n_top=2, min_tiles=2)  # the 1-tile cluster 3 drops out
    assert summary["top_clusters"] == [0, 2]
    assert summary["overall_rate"] == pytest.approx(5 / 12)
    assert summary["top_mean_rate"] == pytest.approx(4 / 9)
    assert summary["top_lift"] == pytest.approx((4 / 9) / (5 / 12))
    assert summary["top_tile_share"] == pytest.approx(9 / 12)
    assert summary["top_detection_share"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="boolean"):
        detection_rate_per_cluster(clusters, detected.astype(float))


# ------------------------------------------------------------------ grouped kNN


def separated_groups_with_one_mislabelled(seed: int = 0):
    """Class a near (0, 0), class b near (10, 10), 4 recordings of 10 windows each; plus one
    2-window recording labelled b that sits among the a windows.

    With k=5 every a and b window is outvoted by at least 3 neighbours of its own class (each
    training fold keeps >= 2 recordings of each class, the stray recording adds at most 2 votes),
    and the stray windows, when tested, see only a neighbours: exactly 2 of 82 rows are wrong.
    """
    rng = np.random.default_rng(seed)
    embeddings, labels, groups = [], [], []
    for cls, centre in (("a", (0.0, 0.0)), ("b", (10.0, 10.0))):
        for recording in range(4):
            embeddings.append(np.array(centre) + 0.1 * rng.standard_normal((10, 2)))
            labels += [cls] * 10
            groups += [f"{cls}{recording}.wav"] * 10
    embeddings.append(0.1 * rng.standard_normal((2, 2)))
    labels += ["b", "b"]
    groups += ["stray.wav"] * 2
    return np.concatenate(embeddings), np.array(labels), np.array(groups)


@pytest.mark.parametrize("stratified", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_accuracy_is_exactly_known_on_a_hand_made_example(stratified, metric):
    embeddings, labels, groups = separated_groups_with_one_mislabelled()
    config = KnnConfig(k=5, n_folds=5, metric=metric, stratified=stratified, n_bootstrap=2000)
    result = knn_cross_validate(embeddings, labels, groups, config, grouping="recording")
    # precondition of the exact answer: every training fold keeps >= 2 recordings of each class
    for train, _ in grouped_folds(labels, groups, 5, stratified, config.seed):
        for cls in "ab":
            assert len({g for g in groups[train] if g.startswith(cls)}) >= 2
    assert result.accuracy == pytest.approx(80 / 82)
    # class a: 40 right + 2 stray windows predicted as a; class b: 40 of 42 found
    assert result.macro_f1 == pytest.approx(0.5 * (80 / 82 + 80 / 82))
    np.testing.assert_array_equal(result.predictions[groups == "stray.wav"], ["a", "a"])
    np.testing.assert_array_equal(result.predictions[groups != "stray.wav"], labels[groups != "stray.wav"])
    np.testing.assert_array_equal(result.confusion_matrix().to_numpy(), [[40, 0], [2, 40]])

    stray_fold = result.fold_of_row[groups == "stray.wav"][0]
    folds = result.fold_scores.set_index("fold")
    expected = np.ones(5)
    expected[stray_fold] = (folds.loc[stray_fold, "n_test"] - 2) / folds.loc[stray_fold, "n_test"]
    np.testing.assert_allclose(folds["accuracy"], expected)
    assert folds["n_test"].sum() == 82
    # t-interval of the fold accuracies, by hand
    half_width = stats.t.ppf(0.975, 4) * expected.std(ddof=1) / np.sqrt(5)
    assert result.accuracy_fold_interval.bounds == pytest.approx((expected.mean() - half_width,
                                                                  expected.mean() + half_width))
    assert result.accuracy_fold_interval.method == "t-interval over 5 folds"
    # Bootstrap over the 9 recordings: only s, the number of draws of the stray one, matters,
    # accuracy = 10 (9 - s) / (10 (9 - s) + 2 s) with s ~ Binomial(9, 1/9). P(s >= 4) = 1.2 % and
    # P(s >= 3) = 6.9 % put the 2.5th percentile at s = 3; P(s = 0) = 35 % puts the 97.5th at 1.
    assert result.accuracy_interval.bounds == pytest.approx((60 / 66, 1.0))
    assert result.accuracy_interval.method == ("percentile bootstrap over 9 recordings, 2000 resamples; "
                                               "fixed out-of-fold predictions")
    row = result.summary()
    assert row["knn_accuracy"] == result.accuracy and row["knn_k"] == 5
    assert row["knn_grouping"] == "recording" and row["knn_n_groups"] == 9
    assert row["knn_interval_level"] == 0.95 and row["knn_accuracy_interval_low"] == pytest.approx(60 / 66)


def test_grouped_folds_never_put_a_recording_on_both_sides():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 23, size=600).astype(str)
    labels = np.array([f"species{int(g) % 4}" for g in groups])
    for stratified in (True, False):
        folds = grouped_folds(labels, groups, n_folds=5, stratified=stratified, seed=1)
        assert len(folds) == 5
        tested_in = {}
        for fold, (train, test) in enumerate(folds):
            assert set(groups[train]).isdisjoint(groups[test])
            assert np.intersect1d(train, test).size == 0 and train.size + test.size == 600
            for group in set(groups[test]):
                assert tested_in.setdefault(group, fold) == fold
        assert sorted(tested_in) == sorted(set(groups))
        all_tested = np.sort(np.concatenate([test for _, test in folds]))
        np.testing.assert_array_equal(all_tested, np.arange(600))


def test_knn_perfectly_separable_data_gives_a_degenerate_interval():
    embeddings, labels, groups = separated_groups_with_one_mislabelled()
    keep = groups != "stray.wav"
    result = knn_cross_validate(embeddings[keep], labels[keep], groups[keep], KnnConfig(k=3))
    assert result.accuracy == 1.0 and result.macro_f1 == 1.0
    assert result.accuracy_interval.bounds == (1.0, 1.0)
    assert result.accuracy_fold_interval.bounds == (1.0, 1.0)
    no_bootstrap = knn_cross_validate(embeddings[keep], labels[keep], groups[keep], KnnConfig(k=3, n_bootstrap=0))
    assert np.isnan(no_bootstrap.accuracy_interval.low) and "n_bootstrap = 0" in no_bootstrap.accuracy_interval.method


def test_knn_edge_cases_give_clear_errors():
    embeddings, labels, groups = separated_groups_with_one_mislabelled()
    three_recordings = np.isin(groups, ["a0.wav", "b0.wav", "b1.wav"])
    with pytest.raises(ValueError, match="3 distinct groups cannot fill 5 folds when grouping by recorder"):
        knn_cross_validate(embeddings[three_recordings], labels[three_recordings],
                           groups[three_recordings], KnnConfig(n_folds=5), grouping="recorder")
    with pytest.raises(ValueError, match="at least 2 classes"):
        knn_cross_validate(embeddings[:40], labels[:40], groups[:40])
    broken = embeddings.copy()
    broken[5, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 82 embedding rows contain NaN"):
        knn_cross_validate(broken, labels, groups)
    with pytest.raises(ValueError, match="differ in length"):
        knn_cross_validate(embeddings, labels[:-1], groups)
    with pytest.raises(ValueError, match="metric"):
        KnnConfig(metric="manhattan")


def individuals_shared_across_files(seed: int = 0):
    """Four recorders, each with one individual of species a and one of b, heard in 3 files of
    8 windows each. An individual's calls sit at its own random point (spread 1 per dimension)
    plus a small species offset (0.4 in the first dimension) and noise of 0.05: individuals
    differ far more than species do, as in the synthetic archive, where a recorder reuses its
    individual birds in every file."""
    rng = np.random.default_rng(seed)
    embeddings, labels, files, recorders = [], [], [], []
    for recorder in range(4):
        for species, offset in (("a", 0.0), ("b", 0.4)):
            individual = rng.normal(0.0, 1.0, 8) + np.eye(8)[0] * offset
            for file in range(3):
                embeddings.append(individual + rng.normal(0.0, 0.05, (8, 8)))
                labels += [species] * 8
                files += [f"R{recorder}/{species}{file}.wav"] * 8
                recorders += [f"R{recorder}"] * 8
    return np.concatenate(embeddings), np.array(labels), np.array(files), np.array(recorders)


def test_grouping_by_file_leaks_the_individual_and_grouping_by_recorder_does_not():
    embeddings, labels, files, recorders = individuals_shared_across_files()
    config = KnnConfig(k=3, n_folds=4, metric="euclidean", n_bootstrap=200)
    by_file = knn_cross_validate(embeddings, labels, files, config, grouping="file")
    by_recorder = knn_cross_validate(embeddings, labels, recorders, config, grouping="recorder")
    # By file, a test window's neighbours are the same individual in its other files: always right.
    assert by_file.accuracy == 1.0
    # By recorder, the neighbours are other recorders' individuals, at chance in this space.
    assert by_recorder.accuracy < 0.75
    assert by_file.accuracy - by_recorder.accuracy > 0.25
    assert by_recorder.summary()["knn_grouping"] == "recorder" and by_recorder.n_groups == 4


def test_score_spaces_and_paired_against_a_reference():
    embeddings, labels, groups = separated_groups_with_one_mislabelled()
    knn_config = KnnConfig(k=5, n_bootstrap=300)
    noise = np.random.default_rng(0).normal(size=(82, 2))
    scored = score_spaces({"toy": embeddings, "random": noise}, labels, groups, "recording", knn_config,
                          progress=False)
    toy = scored["toy"]
    assert toy.knn.accuracy == pytest.approx(80 / 82)
    # KMeans with k = 2 classes splits by position: the stray windows join cluster "a".
    assert toy.agreement["n_clusters"] == 2 and toy.agreement["purity"] == pytest.approx(80 / 82)
    assert toy.agreement_intervals["nmi"].low <= toy.agreement["nmi"] <= 1.0
    table = spaces_table(scored)
    assert table.loc["toy", "knn_accuracy"] > table.loc["random", "knn_accuracy"]
    assert table.loc["toy", "knn_grouping"] == "recording" and table.loc["toy", "n_dims"] == 2
    assert "biased upwards" in table.loc["toy", "nmi_interval_method"]
    given = score_space("given", embeddings, labels, groups, "recording", knn_config,
                        cluster_labels=(labels == "b").astype(int), silhouette=0.5)
    assert given.agreement["nmi"] == pytest.approx(1.0) and given.silhouette == 0.5

    paired = paired_against(scored, "random", groups, "recording", n_bootstrap=300).set_index("metric")
    assert paired["output_space"].unique().tolist() == ["toy"]
    knn = paired.loc["knn_accuracy"]
    assert knn["value"] == pytest.approx(80 / 82) and knn["reference"] == scored["random"].knn.accuracy
    assert knn["difference"] == pytest.approx(knn["value"] - knn["reference"])
    assert knn["interval_low"] > 0 and knn["share_not_better"] == 0.0
    assert knn["interval_method"] == "percentile bootstrap over 9 recordings, 300 resamples"
    assert sorted(paired.index) == ["ari", "knn_accuracy", "nmi"]
    with pytest.raises(KeyError, match="no space"):
        paired_against(scored, "logmel", groups, "recording")


def test_scoring_subsamples_above_the_cap_and_says_how_many_rows_it_scored(tmp_path):
    from soundscape_ssl.analysis.cluster import subsample_indices

    embeddings, labels, groups = separated_groups_with_one_mislabelled()   # 82 rows
    noise = np.random.default_rng(0).normal(size=(82, 2))
    np.save(tmp_path / "toy.npy", embeddings)
    mapped = np.load(tmp_path / "toy.npy", mmap_mode="r")
    knn_config = KnnConfig(k=5, n_bootstrap=200, seed=4)
    # At or below the cap every row is scored, exactly as without a cap (the demo's case).
    capped = spaces_table(score_spaces({"toy": mapped, "random": noise}, labels, groups, "recording",
                                       knn_config, progress=False, max_rows=82))
    uncapped = spaces_table(score_spaces({"toy": embeddings, "random": noise}, labels, groups, "recording",
                                         knn_config, progress=False, max_rows=None))
    assert (capped["n_scored"] == 82).all() and (capped["n_rows"] == 82).all()
    assert capped.equals(uncapped)
    # Above the cap: one seeded subsample for every space, its size in the table.
    cluster_labels = (labels == "b").astype(int)
    scored = score_spaces({"toy": mapped, "random": noise}, labels, groups, "recording", knn_config,
                          cluster_labels={"toy": cluster_labels}, progress=False, max_rows=40)
    rows = subsample_indices(82, 40, knn_config.seed)
    table = spaces_table(scored)
    assert (table["n_scored"] == 40).all() and (table["n_rows"] == 82).all()
    for result in scored.values():
        np.testing.assert_array_equal(result.scored_rows, rows)
        np.testing.assert_array_equal(result.knn.true_labels, labels[rows])
        assert result.clusters.shape == (40,) and result.embeddings.shape == (40, 2)
    np.testing.assert_array_equal(scored["toy"].clusters, cluster_labels[rows])
    # ... and its scores are those of the subsample scored on its own
    alone = score_space("toy", embeddings[rows], labels[rows], groups[rows], "recording", knn_config,
                        cluster_labels=cluster_labels[rows], max_rows=None)
    assert scored["toy"].knn.accuracy == alone.knn.accuracy
    assert scored["toy"].agreement == alone.agreement
    # Pairing takes the groups of all rows and keeps those of the scored ones.
    paired = paired_against(scored, "random", groups, "recording", n_bootstrap=100).set_index("metric")
    n_groups = len(np.unique(groups[rows]))
    assert paired.loc["knn_accuracy", "interval_method"].startswith(f"percentile bootstrap over {n_groups} ")
    other = score_spaces({"toy": embeddings}, labels, groups, "recording", knn_config, progress=False,
                         max_rows=30)
    with pytest.raises(ValueError, match="different rows"):
        paired_against({**scored, "other": other["toy"]}, "random", groups, "recording", n_bootstrap=10)
