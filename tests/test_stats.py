"""The one statistics module: group bootstrap, intervals, paired differences, clustering agreement.

Known answers: the bootstrap's draws are checked against the exact law of drawing groups with
replacement (enumerated), its statistics against scikit-learn on the resampled rows themselves,
and the paired difference against hand-made pairs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as skm

from soundscape_ssl.core.stats import (BIASED_STATISTIC_NOTE, GroupBootstrap, Interval, agreement_from_contingency,
                                       agreement_intervals, codes, paired_accuracy, paired_agreement,
                                       paired_difference, percentile_interval, t_interval)


def resampled_rows(bootstrap: GroupBootstrap, resample: int) -> np.ndarray:
    """The row indices of one resample: every row of a group as often as the group was drawn."""
    counts = bootstrap.weights[resample].astype(int)
    return np.concatenate([np.repeat(np.flatnonzero(bootstrap.group_of_row == g), counts[g])
                           for g in range(bootstrap.n_groups) if counts[g]])


def exact_distribution(n_groups: int, statistic) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered draw of n_groups groups with replacement (equally likely): (values, probabilities)."""
    values = []
    for draw in itertools.product(range(n_groups), repeat=n_groups):
        values.append(statistic(np.bincount(draw, minlength=n_groups)))
    values = np.array(values)
    distinct, counts = np.unique(values, return_counts=True)
    return distinct, counts / counts.sum()


# --------------------------------------------------------------------------- the group bootstrap


def test_group_bootstrap_follows_the_exact_law_of_drawing_groups_with_replacement():
    # Four recordings: 3 of 3 windows right, 2 of 4, 0 of 2, 1 of 1. The accuracy of a resample
    # is (sum of draws x right) / (sum of draws x windows); its law is enumerated over the
    # 4^4 = 256 ordered draws.
    groups = np.repeat(["r0", "r1", "r2", "r3"], [3, 4, 2, 1])
    correct = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    right, windows = np.array([3, 2, 0, 1]), np.array([3, 4, 2, 1])
    values, probabilities = exact_distribution(4, lambda n: (n @ right) / (n @ windows))
    bootstrap = GroupBootstrap(groups, n_resamples=40_000, seed=1, unit="recording")
    resampled = bootstrap.resampled_accuracy(correct)

    assert bootstrap.weights.sum(axis=1).tolist() == [4] * 40_000
    observed = np.array([np.mean(np.isclose(resampled, v)) for v in values])
    assert observed.sum() == pytest.approx(1.0)
    # Each atom's frequency within 4.5 standard errors of its exact probability.
    np.testing.assert_array_less(np.abs(observed - probabilities),
                                 4.5 * np.sqrt(probabilities * (1 - probabilities) / 40_000) + 1e-12)
    # The exact 2.5 % and 97.5 % quantiles lie inside steps of the law (checked), so the
    # percentile interval of the resamples lands on them exactly.
    cdf = np.cumsum(probabilities)
    low_exact, high_exact = values[np.searchsorted(cdf, 0.025)], values[np.searchsorted(cdf, 0.975)]
    assert np.min(np.abs(cdf - 0.025)) > 0.004 and np.min(np.abs(cdf - 0.975)) > 0.004
    interval = bootstrap.interval(resampled, 0.95)
    assert interval.bounds == pytest.approx((low_exact, high_exact))
    assert interval.level == 0.95
    assert interval.method == "percentile bootstrap over 4 recordings, 40000 resamples"


def test_the_same_seed_gives_the_same_draws_and_paired_statistics_share_them():
    groups = np.repeat(np.arange(7), 3)
    first, again = GroupBootstrap(groups, 50, seed=3), GroupBootstrap(groups, 50, seed=3)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert not np.array_equal(first.weights, GroupBootstrap(groups, 50, seed=4).weights)
    # Sums per resample are the weighted per-group sums.
    values = np.arange(21.0)
    expected = first.weights @ values.reshape(7, 3).sum(axis=1)
    np.testing.assert_allclose(first.resampled_sums(values), expected)


def test_resampled_statistics_equal_scikit_learn_on_the_resampled_rows():
    rng = np.random.default_rng(0)
    n_rows = 300
    groups = rng.integers(0, 17, n_rows)
    labels = rng.choice(list("abcd"), n_rows)
    predictions = np.where(rng.random(n_rows) < 0.6, labels, rng.choice(list("abcde"), n_rows))
    clusters = rng.integers(0, 6, n_rows)
    bootstrap = GroupBootstrap(groups, n_resamples=25, seed=2)
    classes = np.unique(np.concatenate([labels, predictions]))
    true_codes, predicted_codes = np.searchsorted(classes, labels), np.searchsorted(classes, predictions)

    accuracy = bootstrap.resampled_accuracy(labels == predictions)
    macro_f1 = bootstrap.resampled_macro_f1(true_codes, predicted_codes, len(classes))
    agreement = bootstrap.resampled_agreement(codes(labels), codes(clusters))
    for resample in range(bootstrap.n_resamples):
        rows = resampled_rows(bootstrap, resample)
        assert accuracy[resample] == pytest.approx(skm.accuracy_score(labels[rows], predictions[rows]))
        assert macro_f1[resample] == pytest.approx(
            skm.f1_score(labels[rows], predictions[rows], average="macro", zero_division=0))
        assert agreement["nmi"][resample] == pytest.approx(
            skm.normalized_mutual_info_score(labels[rows], clusters[rows]), abs=1e-12)
        assert agreement["v_measure"][resample] == pytest.approx(
            skm.v_measure_score(labels[rows], clusters[rows]), abs=1e-12)
        assert agreement["ari"][resample] == pytest.approx(
            skm.adjusted_rand_score(labels[rows], clusters[rows]), abs=1e-12)


def test_agreement_from_contingency_equals_scikit_learn_on_random_labelings():
    rng = np.random.default_rng(0)
    for n_labels, n_clusters, n_rows in ((4, 4, 200), (3, 7, 50), (1, 1, 10), (2, 1, 10), (1, 3, 10), (5, 5, 5)):
        labels = rng.integers(0, n_labels, n_rows)
        clusters = (labels + rng.integers(0, 2, n_rows) * rng.integers(0, n_clusters, n_rows)) % n_clusters
        scores = agreement_from_contingency(pd.crosstab(labels, clusters).to_numpy())
        assert scores["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, clusters), abs=1e-12)
        assert scores["v_measure"] == pytest.approx(skm.v_measure_score(labels, clusters), abs=1e-12)
        assert scores["ari"] == pytest.approx(skm.adjusted_rand_score(labels, clusters), abs=1e-12)
        # ARI through scikit-learn's pair counts, the form the contingency version follows.
        (tn, fp), (fn, tp) = skm.pair_confusion_matrix(labels, clusters)
        if not (fn == fp == 0):
            assert scores["ari"] == pytest.approx(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def test_agreement_intervals_bracket_a_perfect_and_a_random_clustering_and_say_what_they_are():
    groups = np.repeat(np.arange(12), 5)
    labels = np.repeat(np.array(list("ABCD")), 15)
    bootstrap = GroupBootstrap(groups, 300, seed=0, unit="recording")
    perfect = agreement_intervals(bootstrap, labels, labels)
    assert perfect["nmi"].bounds == pytest.approx((1.0, 1.0)) and perfect["ari"].bounds == pytest.approx((1.0, 1.0))
    assert BIASED_STATISTIC_NOTE in perfect["nmi"].method and BIASED_STATISTIC_NOTE not in perfect["ari"].method
    noisy = agreement_intervals(bootstrap, labels, np.random.default_rng(1).integers(0, 4, len(labels)))
    assert noisy["ari"].low < 0.05 < noisy["nmi"].high < 0.5


# --------------------------------------------------------------------------- intervals


def test_t_interval_by_hand_and_its_method():
    values = np.array([0.6, 0.7, 0.8, 0.65, 0.75])
    half_width = scipy_stats.t.ppf(0.975, 4) * values.std(ddof=1) / math.sqrt(5)
    interval = t_interval(values, 0.95, unit="fold")
    assert interval.bounds == pytest.approx((0.7 - half_width, 0.7 + half_width))
    assert interval.method == "t-interval over 5 folds"
    single = t_interval([0.5], 0.9)
    assert math.isnan(single.low) and single.method == "t-interval over 1 fold" and single.level == 0.9


def test_percentile_interval_leaves_out_undefined_resamples_and_says_so():
    interval = percentile_interval([np.nan, 1.0, 2.0, 3.0, np.nan], 0.5, "bootstrap")
    assert interval.bounds == pytest.approx((1.5, 2.5))
    assert interval.method == "bootstrap; 2 of 5 resamples gave no value"
    none = percentile_interval([np.nan, np.nan], 0.95, "bootstrap")
    assert math.isnan(none.low) and "no resample gave a value" in none.method
    with pytest.raises(ValueError, match="level"):
        percentile_interval([1.0], 95, "bootstrap")
    assert Interval(0.1, 0.2, 0.95, "m").columns("knn_") == {
        "knn_interval_low": 0.1, "knn_interval_high": 0.2, "knn_interval_level": 0.95, "knn_interval_method": "m"}


def test_resampled_means_leave_out_rows_where_a_score_is_undefined():
    groups = np.array(["a", "a", "b"])
    values = np.array([[1.0, 5.0], [3.0, np.nan], [10.0, 7.0]])
    bootstrap = GroupBootstrap(groups, 200, seed=0)
    present = np.isfinite(values)
    means = bootstrap.resampled_means(np.where(present, values, 0.0), present)
    drawn_a = bootstrap.weights[:, 0]
    # column 0: group a holds 1 and 3, group b holds 10; column 1: a holds 5 only, b holds 7
    np.testing.assert_allclose(means[:, 0], (4 * drawn_a + 10 * (2 - drawn_a)) / (2 * drawn_a + (2 - drawn_a)))
    np.testing.assert_allclose(means[:, 1], (5 * drawn_a + 7 * (2 - drawn_a)) / 2)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="every row needs a group"):
        GroupBootstrap(np.array(["a", None], dtype=object), 10)
    with pytest.raises(ValueError, match="non-empty"):
        GroupBootstrap(np.array([]), 10)
    with pytest.raises(ValueError, match="rows"):
        GroupBootstrap(np.array(["a", "b"]), 10).resampled_sums(np.ones(3))


# --------------------------------------------------------------------------- paired differences


def test_paired_accuracy_is_exact_for_a_known_pair():
    groups = np.repeat(np.arange(4), 2)
    labels = np.array(list("ABABABAB"))
    always_right = labels.copy()
    right_on_two_groups = np.where(groups < 2, labels, "C")
    bootstrap = GroupBootstrap(groups, 8000, seed=0, unit="recording")
    result = paired_accuracy(labels, always_right, right_on_two_groups, bootstrap)
    assert (result.value, result.reference, result.difference) == (1.0, 0.5, 0.5)
    # A resample differs by the share of its rows drawn from groups 2 and 3; it is 0 only when all
    # four draws are groups 0 or 1, with probability (1/2)^4.
    assert result.share_not_better == pytest.approx(1 / 16, abs=0.01)
    assert result.interval.bounds == (0.0, 1.0)
    assert result.interval.method == "percentile bootstrap over 4 recordings, 8000 resamples"
    row = result.row()
    assert row["metric"] == "knn_accuracy" and row["interval_level"] == 0.95 and "share_not_better" in row
    same = paired_accuracy(labels, right_on_two_groups, right_on_two_groups, bootstrap)
    assert (same.difference, *same.interval.bounds) == (0.0, 0.0, 0.0) and same.share_not_better == 1.0
    with pytest.raises(ValueError, match="same rows"):
        paired_accuracy(labels, always_right[:4], right_on_two_groups, bootstrap)


def test_share_not_better_equals_the_enumerated_probability():
    # Three recordings; space A is right on r0 (2 windows) and r1 (1), B on r2 (2 windows) and r1.
    # A - B in a resample with draws (n0, n1, n2) is 2 (n0 - n2) / (2 n0 + n1 + 2 n2): not
    # positive when n2 >= n0, which the enumeration counts exactly.
    groups = np.array(["r0", "r0", "r1", "r2", "r2"])
    labels = np.array(list("xxxxx"))
    a = np.array(list("xxxyy"))
    b = np.array(list("yyxxx"))
    values, probabilities = exact_distribution(3, lambda n: float(n[2] >= n[0]))
    exact = probabilities[values == 1.0].sum()
    assert exact == pytest.approx(17 / 27)
    result = paired_accuracy(labels, a, b, GroupBootstrap(groups, 40_000, seed=5))
    assert result.difference == 0.0
    assert result.share_not_better == pytest.approx(exact, abs=4.5 * math.sqrt(exact * (1 - exact) / 40_000))


def test_paired_agreement_of_a_known_pair_and_lower_is_better():
    groups = np.repeat(np.arange(12), 5)
    labels = np.repeat(np.array(list("ABCD")), 15)
    noisy_clusters = np.random.default_rng(1).integers(0, 4, len(labels))
    bootstrap = GroupBootstrap(groups, 300, seed=0)
    estimates = {"nmi": 1.0, "v_measure": 1.0, "ari": 1.0}
    noisy = {"nmi": skm.normalized_mutual_info_score(labels, noisy_clusters),
             "v_measure": skm.v_measure_score(labels, noisy_clusters),
             "ari": skm.adjusted_rand_score(labels, noisy_clusters)}
    table = {d.metric: d for d in paired_agreement(labels, labels, noisy_clusters, bootstrap, estimates, noisy)}
    assert table["nmi"].difference == pytest.approx(1.0 - noisy["nmi"])
    assert 0 < table["nmi"].interval.low <= 1.0 - noisy["nmi"] <= table["nmi"].interval.high <= 1.0
    assert table["ari"].share_not_better == 0.0
    assert BIASED_STATISTIC_NOTE in table["nmi"].interval.method
    # Lower is better (e.g. an error rate): A, always lower, is never "not better".
    lower = paired_difference("error", 0.1, 0.3, np.full(300, 0.1), np.full(300, 0.3), bootstrap,
                              higher_is_better=False)
    assert lower.share_not_better == 0.0 and lower.difference == pytest.approx(-0.2)
