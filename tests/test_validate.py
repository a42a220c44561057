"""Validation on labelled recordings: exact kNN on a hand-made example, no leak across folds,
window selection by in-band energy, synthetic call windows, the whole run (synthetic WAVs and the
xeno-canto Acrocephalus set when present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from sklearn import metrics as skm

from soundscape_ssl.analysis.birdnet import birdnet_available
from soundscape_ssl.pretrain.checkpoint import build_checkpoint, save_checkpoint
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.analysis.validate import (SCORE_COLUMNS, ValidateConfig, main, paired_against,
                                              paired_between_runs, recording_groups, score_space, select_windows,
                                              synthetic_call_windows, validate_labelled, window_table)

REPO = Path(__file__).resolve().parents[1]
ACROCEPHALUS = REPO.parent / "shared" / "data" / "labelled" / "xeno-canto-acrocephalus"
PHOEBE = REPO.parent / "shared" / "data" / "labelled" / "xeno-canto-phoebe-10sp"

# A small front end (3 s tiles of 32 mels x 64 frames at 16 kHz) and a 1-block ViT: milliseconds.
SPECTROGRAM = SpectrogramConfig(sample_rate_hz=16000, tile_s=3.0, tile_hop_s=3.0, n_fft=1024,
                                hop_length=750, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
BACKBONE = BackboneConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2, n_mels=32,
                          n_frames=64, drop_path_rate=0.0)
QUICK = {"n_bootstrap": 200, "progress": False, "device": "cpu", "include_birdnet": False}




def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised backbone with SPECTROGRAM's front end and a plausible normalisation."""
    torch.manual_seed(seed)
    model = build_backbone(BACKBONE)
    checkpoint = build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=BACKBONE, method_config={},
        train_config={}, spectrogram_config=SPECTROGRAM.to_dict(),
        normalization={"mean": -60.0, "std": 15.0}, model_state={},
        backbone_state=model.state_dict(), optimizer_state={})
    return save_checkpoint(path, checkpoint)


def assert_no_recording_on_both_sides(fold_of_row: np.ndarray, groups: np.ndarray) -> None:
    """Every group is tested in exactly one fold, so in every other fold all its rows train:
    no fold has the group both in its test rows and its training rows."""
    frame = pd.DataFrame({"fold": fold_of_row, "group": groups})
    assert (frame["fold"] >= 0).all()
    folds_per_group = frame.groupby("group")["fold"].nunique()
    assert (folds_per_group == 1).all(), folds_per_group[folds_per_group > 1]
    for fold in np.unique(fold_of_row):
        test_groups = set(groups[fold_of_row == fold])
        train_groups = set(groups[fold_of_row != fold])
        assert not test_groups & train_groups


# ----------------------------------------------------------------------------------------------
# Scores with known answers


def test_knn_hand_made_example_is_exact():
    """Six recordings of two windows on a line. Leave-one-recording-out (6 folds of 6 groups)
    makes the folds deterministic; with k = 1 each window takes the label of its nearest window
    in another recording. Recording r5 is labelled B but lies beside the A recordings, so its two
    windows are predicted A; every other window is right: accuracy 10 / 12 exactly."""
    values = {"r0": (0.0, 0.01), "r1": (1.0, 1.01), "r2": (2.0, 2.01),      # A
              "r3": (10.0, 10.01), "r4": (11.0, 11.01),                     # B
              "r5": (-5.0, -4.99)}                                          # B, among the A's
    label_of = {"r0": "A", "r1": "A", "r2": "A", "r3": "B", "r4": "B", "r5": "B"}
    groups = np.array([r for r in values for _ in range(2)])
    embeddings = np.array([[v] for r in values for v in values[r]])
    labels = np.array([label_of[r] for r in groups])
    config = ValidateConfig(n_folds=6, k_neighbours=1, knn_metric="euclidean", **QUICK)

    result = score_space("hand", "made", embeddings, labels, groups, config)

    assert result.knn.accuracy == 10 / 12
    assert result.knn.predictions.tolist() == ["A"] * 6 + ["B"] * 4 + ["A"] * 2
    assert len(result.knn.fold_scores) == 6
    assert_no_recording_on_both_sides(result.knn.fold_of_row, groups)
    # KMeans (k = 2 labels) splits the line at its big gap: {-5 .. 2.01} and {10 .. 11.01}.
    expected_clusters = np.array([0] * 6 + [1] * 4 + [0] * 2)
    assert skm.adjusted_rand_score(expected_clusters, result.clusters) == 1.0
    assert result.agreement["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, expected_clusters))


def test_score_rows_name_the_grouping_and_how_each_interval_was_made():
    from soundscape_ssl.analysis.validate import score_rows

    rng = np.random.default_rng(0)
    groups = np.repeat([f"r{i}" for i in range(6)], 4)
    labels = np.repeat(["A", "B"], 12)
    embeddings = np.where(labels[:, None] == "A", 0.0, 3.0) + rng.normal(0, 1, (24, 3))
    config = ValidateConfig(n_folds=3, k_neighbours=3, **QUICK)
    rows = pd.DataFrame(score_rows(score_space("s", "p", embeddings, labels, groups, config, "recordist"),
                                   n_recordings=6, window_selection="all"))
    assert list(rows.columns) == list(SCORE_COLUMNS)
    rows = rows.set_index("metric")
    assert (rows["grouping"] == "recordist").all() and (rows["n_groups"] == 6).all()
    assert (rows["interval_level"] == 0.95).all()
    assert rows.loc["knn_accuracy", "interval_method"] == ("percentile bootstrap over 6 recordists, 200 resamples; "
                                                           "fixed out-of-fold predictions")
    assert rows.loc["knn_accuracy_fold_mean", "interval_method"] == "t-interval over 3 folds"
    assert "not a confidence interval" in rows.loc["kmeans_nmi", "interval_method"]
    assert "not a confidence interval" not in rows.loc["kmeans_ari", "interval_method"]


# ----------------------------------------------------------------------------------------------
# Windows


def write_wav(path: Path, samples: np.ndarray, sample_rate_hz: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), sample_rate_hz, subtype="PCM_16")
    return path


def tone_recording(sample_rate_hz: int, seconds: float, loud_windows: dict[int, float],
                   frequency_hz: float, seed: int, rumble_windows: tuple[int, ...] = ()) -> np.ndarray:
    """Quiet noise; a tone of the given amplitude in each 3 s window of `loud_windows`; loud
    200 Hz rumble (outside the 1-8 kHz band) in `rumble_windows`."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate_hz)
    t = np.arange(n) / sample_rate_hz
    signal = 0.002 * rng.standard_normal(n)
    window = (t // 3.0).astype(int)
    for index, amplitude in loud_windows.items():
        signal += np.where(window == index, amplitude * np.sin(2 * np.pi * frequency_hz * t), 0.0)
    for index in rumble_windows:
        signal += np.where(window == index, 0.8 * np.sin(2 * np.pi * 200.0 * t), 0.0)
    return signal


def test_top_k_energy_ranks_windows_by_in_band_energy(tmp_path):
    # 16.5 s: five whole windows and a padded one (1.5 s of audio, half a window: kept by the
    # window rule, listed, never scored). Window 3 holds the loudest tone of the whole windows,
    # window 1 a quieter one, window 4 loud rumble below the band (must not rank high); the
    # padded window 5 is louder still and takes no rank.
    path = write_wav(tmp_path / "a.wav", tone_recording(22050, 16.5, {3: 0.3, 1: 0.05, 5: 0.6},
                                                        3000.0, 0, rumble_windows=(4,)), 22050)
    recordings = pd.DataFrame({"recording": ["a.wav"], "path": [str(path)], "label": ["x"],
                               "group": ["a.wav"]})
    config = ValidateConfig(window_selection="top_k_energy", top_k=2, **QUICK)
    windows, logmel, skipped = window_table(recordings, config)

    assert windows["offset_s"].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
    assert windows["valid_s"].tolist() == [3.0] * 5 + [1.5]
    assert windows["padded"].tolist() == [False] * 5 + [True]
    assert windows["in_band_db"].idxmax() == 5 and pd.isna(windows["energy_rank"].iloc[5])
    assert windows.set_index("offset_s")["energy_rank"].loc[[9.0, 3.0]].tolist() == [1, 2]
    assert windows["offset_s"][select_windows(windows, config)].tolist() == [3.0, 9.0]
    assert select_windows(windows, ValidateConfig(window_selection="all", **QUICK)).tolist() == \
        [True] * 5 + [False]
    assert logmel.shape == (6, 2 * 128) and np.isfinite(logmel).all() and skipped.empty


def test_synthetic_call_windows_from_annotations(tmp_path):
    for name in ("R1/R1_a.wav", "R1/R1_b.wav", "R2/R2_a.wav"):
        write_wav(tmp_path / name, np.zeros(round(10.0 * 8000)), 8000)   # 10 s: 3 whole windows
    rows = [  # file, start_s, end_s, label, kind, snr_db
        ("R1/R1_a.wav", 0.5, 1.0, "whistler", "bird", 20.0),     # window 0
        ("R1/R1_a.wav", 1.5, 2.0, "whistler", "bird", 15.0),     # window 0 again: one window
        ("R1/R1_a.wav", 3.5, 4.0, "chipper", "bird", 25.0),      # window 1 ...
        ("R1/R1_a.wav", 4.5, 5.0, "hooter", "bird", 12.0),       # ... with a second species: out
        ("R1/R1_a.wav", 6.5, 7.0, "hooter", "bird", 3.0),        # too faint
        ("R1/R1_b.wav", 2.0, 5.0, "chipper", "bird", 30.0),      # midpoint 3.5 s: window 1
        ("R1/R1_b.wav", 9.2, 9.6, "chipper", "bird", 30.0),      # window 3 is not whole
        ("R2/R2_a.wav", 6.0, 9.0, "rain", "rain", 30.0),         # not a bird
        ("R2/R2_a.wav", 7.0, 7.5, "whistler", "bird", 11.0),     # window 2
    ]
    frame = pd.DataFrame(rows, columns=["file", "start_s", "end_s", "label", "kind", "snr_db"])
    frame["recorder"] = frame["file"].str.split("/").str[0]
    frame["individual_id"] = ""
    frame.to_csv(tmp_path / "annotations.csv", index=False)

    windows = synthetic_call_windows(tmp_path, window_s=3.0, min_snr_db=10.0, group_by="recorder")
    got = list(zip(windows["recording"], windows["offset_s"], windows["label"], windows["group"],
                   windows["n_calls"]))
    assert got == [("R1/R1_a.wav", 0.0, "whistler", "R1", 2), ("R1/R1_b.wav", 3.0, "chipper", "R1", 1),
                   ("R2/R2_a.wav", 6.0, "whistler", "R2", 1)]
    by_file = synthetic_call_windows(tmp_path, window_s=3.0, min_snr_db=10.0, group_by="file")
    assert by_file["group"].tolist() == by_file["recording"].tolist()


def test_recording_groups_from_the_labels_table_or_metadata_and_their_errors(tmp_path):
    table = pd.DataFrame({"path": ["a.wav", "b.wav", "c.wav"], "label": ["x", "y", "x"],
                          "recordist": ["Ann", "Ann", "Bo"], "date": ["d1", "d2", "d1"]})
    by = lambda **options: recording_groups(table, ValidateConfig(**options)).tolist()  # noqa: E731
    assert by() == ["a.wav", "b.wav", "c.wav"]
    assert by(group_by="recordist") == ["Ann", "Ann", "Bo"]
    assert by(group_by="recordist+date") == ["Ann | d1", "Ann | d2", "Bo | d1"]
    metadata = tmp_path / "metadata.csv"
    pd.DataFrame({"path": ["c.wav", "a.wav", "b.wav"], "site": ["S2", "S1", "S1"]}).to_csv(metadata, index=False)
    assert by(group_by="site", metadata_csv=str(metadata)) == ["S1", "S1", "S2"]
    with pytest.raises(ValueError, match="lacks \\['site'\\].*no metadata_csv"):
        by(group_by="site")
    with pytest.raises(ValueError, match="lacks \\['weather'\\]"):
        by(group_by="weather", metadata_csv=str(metadata))
    pd.DataFrame({"path": ["a.wav", "b.wav"], "site": ["S1", "S1"]}).to_csv(metadata, index=False)
    with pytest.raises(ValueError, match="1 recording\\(s\\) have no value, e.g. 'c.wav'"):
        by(group_by="site", metadata_csv=str(metadata))
    with pytest.raises(ValueError, match="group_by"):
        ValidateConfig(group_by="recordist+")


# ----------------------------------------------------------------------------------------------
# Labels files: paths stay inside the audio folder, one label per file


def labels_folder(tmp_path: Path) -> tuple[Path, Path]:
    """audio/ with a.wav and b.wav, and outside.wav beside the folder."""
    audio = tmp_path / "audio"
    for name in ("a.wav", "b.wav"):
        write_wav(audio / name, np.zeros(8000), 8000)
    write_wav(tmp_path / "outside.wav", np.zeros(8000), 8000)
    return audio, tmp_path / "outside.wav"


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(path, index=False)
    return path


def test_labels_may_not_name_files_outside_the_audio_folder(tmp_path):
    """Defect 17.7: `../`, absolute paths and symbolic links leading out of --audio-dir were
    opened. Each is refused, naming its line, unless allow_outside_paths."""
    from soundscape_ssl.analysis.validate import read_labelled_recordings

    audio, outside = labels_folder(tmp_path)
    (audio / "link.wav").symlink_to(outside)
    config = ValidateConfig(**QUICK)
    for hostile in ("../../../../etc/passwd", "../outside.wav", str(outside), "link.wav",
                    "sub/../../outside.wav"):
        labels = write_labels(tmp_path / "labels.csv", [("a.wav", "A"), (hostile, "B")])
        with pytest.raises(ValueError, match=r"outside the audio folder .*line 3 of "
                                             r".*labels.csv names") as error:
            read_labelled_recordings(labels, audio, config)
        assert repr(hostile) in str(error.value)
    labels = write_labels(tmp_path / "labels.csv", [("a.wav", "A"), ("../outside.wav", "B"),
                                                    ("b.wav", "B")])
    recordings, skipped = read_labelled_recordings(
        labels, audio, ValidateConfig(allow_outside_paths=True, **QUICK))
    assert recordings["path"].tolist() == [str(audio / "a.wav"), str(outside), str(audio / "b.wav")]
    assert skipped.empty
    # Inside the folder, `..` that stays inside is fine.
    labels = write_labels(tmp_path / "labels.csv", [("sub/../a.wav", "A")])
    assert read_labelled_recordings(labels, audio, config)[0]["path"].tolist() == [str(audio / "a.wav")]


def test_a_file_with_two_labels_is_an_error_and_a_repeated_row_a_duplicate(tmp_path):
    """Defect 17.7: one file under two labels was dropped as a mere duplicate."""
    from soundscape_ssl.analysis.validate import read_labelled_recordings

    audio, _ = labels_folder(tmp_path)
    config = ValidateConfig(**QUICK)
    labels = write_labels(tmp_path / "labels.csv", [("a.wav", "A"), ("b.wav", "B"),
                                                    ("./a.wav", "B")])
    with pytest.raises(ValueError, match=r"line 2 of .*labels.csv labels .*a.wav 'A' but line 4 "
                                         r"of .*labels.csv labels it 'B'"):
        read_labelled_recordings(labels, audio, config)
    labels = write_labels(tmp_path / "labels.csv", [("a.wav", "A"), ("b.wav", "B"),
                                                    ("./a.wav", "A")])
    recordings, skipped = read_labelled_recordings(labels, audio, config)
    assert recordings["recording"].tolist() == ["a.wav", "b.wav"]
    assert skipped.values.tolist() == [["./a.wav", "duplicate", f"line 4 of {labels}"]]


# ----------------------------------------------------------------------------------------------
# The whole run


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory) -> tuple[Path, Path]:
    """Six 9.5 s recordings at 22.05 kHz, three per label: A sings at 2.5 kHz, B at 5.5 kHz,
    loudest in a different window each time. labels.csv paths are relative to the folder."""
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for i in range(6):
        label, frequency = ("A", 2500.0) if i < 3 else ("B", 5500.0)
        loud = {i % 3: 0.3, (i + 1) % 3: 0.1}
        write_wav(root / "audio" / f"rec{i}.wav", tone_recording(22050, 9.5, loud, frequency, i), 22050)
        rows.append({"path": f"rec{i}.wav", "species": label, "recordist": f"p{i // 2}"})
    rows.append({"path": "missing.wav", "species": "A", "recordist": "p9"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "audio"


def test_validate_writes_tidy_scores_and_never_leaks(labelled_set, tmp_path):
    labels_csv, audio_dir = labelled_set
    checkpoint = tiny_checkpoint(tmp_path / "ckpt" / "mae" / "checkpoint.pth")
    config = ValidateConfig(window_selection="top_k_energy", top_k=2, n_folds=3, k_neighbours=3, **QUICK)
    result = validate_labelled(labels_csv, audio_dir, [checkpoint], tmp_path / "out", config)
    scores = result.scores

    assert list(scores.columns) == list(SCORE_COLUMNS)
    assert set(scores["space"] + "/" + scores["pooling"]) == {
        "ssl_mae/mean", "ssl_mae/cls", "ssl_mae/band", "ssl_mae/band_active",
        "logmel_stats/mean_std_over_time"}
    assert (scores["window_selection"] == "top_2_energy_1000-8000Hz").all()
    assert (scores["n_windows"] == 12).all() and (scores["n_recordings"] == 6).all()
    # The two tones are far apart in frequency: the log-mel baseline separates them perfectly.
    logmel = scores[scores["space"] == "logmel_stats"].set_index("metric")["value"]
    assert logmel["knn_accuracy"] == 1.0 and logmel["kmeans_ari"] == 1.0
    for space in result.spaces.values():
        assert_no_recording_on_both_sides(space.knn.fold_of_row, result.selected["group"].to_numpy())
        assert np.isfinite(space.embeddings).all()
    knn_of = {(s.space, s.pooling): s.knn.accuracy for s in result.spaces.values()}
    best = result.best("ssl_")
    assert best.space == "ssl_mae" and best.knn.accuracy == max(
        value for (space, _), value in knn_of.items() if space == "ssl_mae")
    assert result.best("ssl_", exclude_prefix="ssl_mae") is None
    assert result.best("logmel").space == "logmel_stats"
    paired = paired_against(result, "logmel_stats/mean_std_over_time", n_bootstrap=200)
    assert set(paired["space"] + "/" + paired["pooling"]) == {"ssl_mae/mean", "ssl_mae/cls", "ssl_mae/band",
                                                                   "ssl_mae/band_active"}
    assert sorted(paired["metric"].unique()) == ["ari", "knn_accuracy", "nmi"]
    knn_rows = paired[paired["metric"] == "knn_accuracy"].set_index("pooling")
    assert (knn_rows["reference"] == 1.0).all()
    for pooling, row in knn_rows.iterrows():
        assert row["difference"] == pytest.approx(knn_of[("ssl_mae", pooling)] - 1.0)
    with pytest.raises(KeyError, match="no space"):
        paired_against(result, "birdnet_v2.4/global_avg_pool")

    out = tmp_path / "out"
    windows = pd.read_csv(out / "windows.csv")
    assert len(windows) == 18 and windows["selected"].sum() == 12     # 3 whole windows each
    assert (windows.loc[windows["selected"], "energy_rank"] <= 2).all()
    assert pd.read_csv(out / "skipped.csv")["reason"].tolist() == ["not_found"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 12 * 5                                   # 4 poolings and log-mel
    assert_no_recording_on_both_sides(
        predictions.query("space == 'ssl_mae' and pooling == 'mean'")["knn_fold"].to_numpy(),
        windows.set_index("window").loc[predictions.query("space == 'ssl_mae' and pooling == 'mean'")
                                        ["window"], "group"].to_numpy())
    assert np.load(out / "embeddings" / "ssl_mae__cls.npy").shape == (12, 32)
    # 32 mels in 16-bin patches: two frequency rows of 32 dims side by side.
    assert np.load(out / "embeddings" / "ssl_mae__band.npy").shape == (12, 64)
    assert np.load(out / "embeddings" / "ssl_mae__band_active.npy").shape == (12, 64)
    summary = json.loads((out / "scores.json").read_text())
    assert len(summary["scores"]) == len(scores) and summary["n_labels"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["top_k"] == 2
    assert pd.read_csv(out / "scores.csv").shape == scores.shape


def test_two_runs_pair_over_the_same_windows_and_refuse_different_ones(labelled_set, tmp_path):
    labels_csv, audio_dir = labelled_set
    config = ValidateConfig(window_selection="top_k_energy", top_k=2, n_folds=3, k_neighbours=3, **QUICK)
    runs = {}
    for seed in (0, 1):      # one "recipe", two seeds: differently initialised backbones
        checkpoint = tiny_checkpoint(tmp_path / f"seed{seed}" / "mae" / "checkpoint.pth", seed=seed)
        runs[seed] = validate_labelled(labels_csv, audio_dir, [checkpoint], tmp_path / f"out{seed}", config)
    logmel, key = "logmel_stats/mean_std_over_time", "ssl_mae/mean"

    # Within one run, read back from its products, the pairing is the in-memory one exactly.
    within = paired_between_runs(tmp_path / "out0", key, tmp_path / "out0", logmel, n_bootstrap=200)
    expected = paired_against(runs[0], logmel, n_bootstrap=200).query("pooling == 'mean'").reset_index(drop=True)
    pd.testing.assert_frame_equal(within, expected.drop(columns=["space", "pooling"]))

    across = paired_between_runs(tmp_path / "out1", key, tmp_path / "out0", key, n_bootstrap=200).set_index("metric")
    knn = {seed: runs[seed].spaces[key].knn.accuracy for seed in runs}
    assert across.loc["knn_accuracy", "value"] == pytest.approx(knn[1])
    assert across.loc["knn_accuracy", "difference"] == pytest.approx(knn[1] - knn[0])
    for metric, name in (("nmi", "nmi"), ("ari", "ari")):
        assert across.loc[metric, "difference"] == pytest.approx(
            runs[1].spaces[key].agreement[name] - runs[0].spaces[key].agreement[name])
    assert across["interval_method"].str.startswith("percentile bootstrap over 6 recordings").all()

    itself = paired_between_runs(tmp_path / "out1", key, tmp_path / "out1", key, n_bootstrap=200)
    assert (itself["difference"] == 0).all() and (itself["interval_low"] == 0).all()
    assert (itself["share_not_better"] == 1).all()

    fewer = validate_labelled(labels_csv, audio_dir, [], tmp_path / "fewer",
                              ValidateConfig(window_selection="top_k_energy", top_k=1, n_folds=3,
                                             k_neighbours=3, **QUICK))
    assert len(fewer.selected) == 6
    with pytest.raises(ValueError, match="did not score the same windows"):
        paired_between_runs(tmp_path / "out0", logmel, tmp_path / "fewer", logmel)
    with pytest.raises(KeyError, match="scored no space 'ssl_mae/mean'"):
        paired_between_runs(tmp_path / "fewer", key, tmp_path / "out0", key)


def test_grouping_by_a_column_or_a_metadata_table_and_command_line(labelled_set, tmp_path, capsys):
    labels_csv, audio_dir = labelled_set
    # Groups by recordist: p0 = rec0, rec1; p1 = rec2, rec3 (two labels in one group); p2 = rec4, rec5.
    config = ValidateConfig(group_by="recordist", n_folds=3, include_logmel=True, **QUICK)
    result = validate_labelled(labels_csv, audio_dir, [], tmp_path / "grouped", config)
    assert result.scores["n_groups"].unique().tolist() == [3]
    assert result.scores["grouping"].unique().tolist() == ["recordist"]
    assert result.scores["n_recordings"].unique().tolist() == [6]
    assert_no_recording_on_both_sides(result.spaces["logmel_stats/mean_std_over_time"].knn.fold_of_row,
                                      result.selected["group"].to_numpy())
    assert json.loads((tmp_path / "grouped" / "scores.json").read_text())["grouping"] == "recordist"

    # The same grouping from a metadata table joined on the path (as xeno-canto-phoebe-10sp's
    # metadata.csv), the labels table holding only path and label.
    table = pd.read_csv(labels_csv)
    metadata = tmp_path / "metadata.csv"
    table[["path", "recordist"]].iloc[::-1].to_csv(metadata, index=False)   # any row order
    joined = ValidateConfig(group_by="recordist", metadata_csv=str(metadata), n_folds=3, **QUICK)
    result = validate_labelled(table[["path", "species"]], audio_dir, [], tmp_path / "joined", joined)
    assert result.scores["grouping"].unique().tolist() == ["recordist"]
    assert sorted(result.selected.groupby("group")["recording"].nunique().tolist()) == [2, 2, 2]

    # Three recordists cannot fill five folds: said, not silently lowered.
    with pytest.raises(ValueError, match="grouping by recordist gives 3 groups, fewer than n_folds=5"):
        validate_labelled(labels_csv, audio_dir, [], tmp_path / "five", ValidateConfig(group_by="recordist", **QUICK))

    assert main(["--labels", str(labels_csv), "--audio-dir", str(audio_dir), "--out",
                 str(tmp_path / "cli"), "--window-selection", "all", "--n-folds", "3",
                 "--include-birdnet", "false", "--n-bootstrap", "100", "--progress", "false"]) == 0
    assert "logmel_stats" in capsys.readouterr().out
    assert (pd.read_csv(tmp_path / "cli" / "scores.csv")["window_selection"] == "all").all()


# ----------------------------------------------------------------------------------------------
# The real test: four congeneric warblers from xeno-canto


@pytest.mark.realdata
def test_acrocephalus_validation_runs_without_leaks(tmp_path):
    if not (ACROCEPHALUS / "labels.csv").is_file():
        pytest.skip(f"labelled recordings not found at {ACROCEPHALUS}")
    table = pd.read_csv(ACROCEPHALUS / "labels.csv")
    # The two shortest recordings of each species keep the test quick.
    subset = table.sort_values("duration_s").groupby("species").head(2).reset_index(drop=True)
    assert len(subset) == 8 and subset["species"].nunique() == 4
    checkpoint = tiny_checkpoint(tmp_path / "random" / "checkpoint.pth")
    config = ValidateConfig(top_k=3, n_folds=2, k_neighbours=3, n_bootstrap=200, progress=False,
                            device="cpu", include_birdnet=True)
    result = validate_labelled(subset, ACROCEPHALUS, {"random": checkpoint}, tmp_path / "out", config)

    spaces = set(result.spaces)
    assert {"ssl_random/mean", "ssl_random/cls", "logmel_stats/mean_std_over_time"} <= spaces
    if birdnet_available()[0]:
        assert "birdnet_v2.4/global_avg_pool" in spaces, result.skipped_spaces
        assert result.spaces["birdnet_v2.4/global_avg_pool"].embeddings.shape == (8 * 3, 1024)
    else:
        assert "birdnet_v2.4" in result.skipped_spaces
    selected = result.selected
    assert len(selected) == 8 * 3 and selected.groupby("recording").size().eq(3).all()
    for space in result.spaces.values():
        assert_no_recording_on_both_sides(space.knn.fold_of_row, selected["group"].to_numpy())
        assert 0.0 <= space.knn.accuracy <= 1.0
    assert result.scores["value"].notna().all()
    assert (result.scores["n_labels"] == 4).all() and (result.scores["n_recordings"] == 8).all()


@pytest.mark.realdata
def test_real_labelled_sets_give_recordist_groups():
    """Both shared labelled sets name a recordist per recording: Acrocephalus in labels.csv,
    phoebe-10sp in metadata.csv, joined on the path. Every recording gets one, and grouping by
    recordist merges recordings (fewer groups than recordings) without merging everything."""
    phoebe = PHOEBE / "labels.csv"
    if not phoebe.is_file() or not (ACROCEPHALUS / "labels.csv").is_file():
        pytest.skip(f"labelled sets not found at {PHOEBE} and {ACROCEPHALUS}")
    groups = recording_groups(pd.read_csv(phoebe), ValidateConfig(group_by="recordist",
                                                                  metadata_csv=str(PHOEBE / "metadata.csv")))
    assert len(groups) == 100 and 10 < groups.nunique() < 100
    acrocephalus = pd.read_csv(ACROCEPHALUS / "labels.csv")
    groups = recording_groups(acrocephalus, ValidateConfig(group_by="recordist"))
    assert len(groups) == 48 and 10 < groups.nunique() < 48
    # Every species is held by at least 5 recordists: 5 grouped folds stay possible.
    assert acrocephalus.assign(group=groups).groupby("species")["group"].nunique().min() >= 5
