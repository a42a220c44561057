"""Attention heads: per-head maps, DINO mass masks, scores against planted boxes, the energy baseline."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchaudio
from matplotlib.figure import Figure

from soundscape_ssl.tiles.spectrogram import frame_times_s, hz_to_mel_bin, mel_bin_centres_hz
from soundscape_ssl.analysis.attention import (
    ENERGY_SOURCE,
    RANKING_FILE,
    SCORES_FILE,
    AttentionConfig,
    attention_mass_mask,
    best_patch_iou,
    band_median_excess_db,
    box_masks_for_tiles,
    choose_head_on_half,
    energy_maps,
    energy_threshold_mask,
    head_attention_maps,
    mask_scores,
    patch_means,
    patch_loudness_db,
    rank_heads,
    save_attention_products,
    score_model_attention,
    score_tiles,
    split_groups_in_halves,
    upsample_to_tile,
    with_tile_groups,
)
from soundscape_ssl.report.attention_plots import plot_head_maps, plot_mask_overlays
from soundscape_ssl.report.figures import save_figure
from soundscape_ssl.pretrain.models import BackboneConfig, SpectrogramViT, build_backbone
from soundscape_ssl.pretrain.pooling import POOLINGS
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig

TINY = dict(arch="vit_tiny", depth=2, embed_dim=64, num_heads=4, patch_size=16, n_mels=128, n_frames=256,
            drop_path_rate=0.0)
SPECTROGRAM = SpectrogramConfig()  # 128 mel bins x 256 frames, 3 s, 50-15000 Hz


@pytest.fixture(scope="module")
def tiny_model() -> SpectrogramViT:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(**TINY)).eval()


def _noise_tiles_db(n_tiles: int, seed: int = 0) -> np.ndarray:
    """Stationary background: -80 dB with 3 dB cell-to-cell fluctuations."""
    rng = np.random.default_rng(seed)
    return (-80.0 + 3.0 * rng.standard_normal((n_tiles, SPECTROGRAM.n_mels, SPECTROGRAM.n_frames))).astype(np.float32)


def _annotations(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["file", "start_s", "end_s", "f_low_hz", "f_high_hz", "label", "kind", "snr_db"])


# --- spectrogram geometry ---------------------------------------------------------------------

@pytest.mark.parametrize("mel_scale, mel_norm", [("slaney", "slaney"), ("htk", None)])
def test_mel_bin_centres_are_the_peaks_of_the_front_ends_filters(mel_scale: str, mel_norm: str | None) -> None:
    config = SpectrogramConfig(mel_scale=mel_scale, mel_norm=mel_norm)
    # The front end's filterbank evaluated on a 1 Hz grid: each triangle peaks at its centre.
    filters = torchaudio.functional.melscale_fbanks(
        n_freqs=16001, f_min=config.f_min_hz, f_max=config.f_max_hz, n_mels=config.n_mels,
        sample_rate=32000, norm=mel_norm, mel_scale=mel_scale).numpy()
    peaks_hz = np.linspace(0.0, 16000.0, 16001)[filters.argmax(axis=0)]
    centres_hz = mel_bin_centres_hz(config)
    assert centres_hz.shape == (128,)
    np.testing.assert_allclose(centres_hz, peaks_hz, atol=0.51)
    np.testing.assert_allclose(hz_to_mel_bin(centres_hz, config), np.arange(128), atol=1e-9)
    assert np.all(np.diff(hz_to_mel_bin([config.f_min_hz, 1000.0, 5000.0, config.f_max_hz], config)) > 0)


def test_frame_times_are_centred_stft_frames() -> None:
    times_s = frame_times_s(SPECTROGRAM)
    assert times_s.shape == (256,)
    assert times_s[0] == 0.0
    assert times_s[1] == pytest.approx(375 / 32000)
    assert times_s[-1] < SPECTROGRAM.tile_s


def test_config_round_trips_through_json() -> None:
    config = AttentionConfig(attention_mass=0.5, n_bootstrap=10)
    restored = AttentionConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    with pytest.raises(ValueError, match="attention_mass"):
        AttentionConfig(attention_mass=0.0)
    with pytest.raises(ValueError, match="unknown"):
        AttentionConfig.from_dict({"mass": 0.6})


# --- head maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tile_hw, grid_hw", [((128, 256), (8, 16)), ((128, 96), (8, 6)), ((64, 96), (4, 6))])
def test_head_maps_are_distributions_over_the_patch_grid(tiny_model: SpectrogramViT, tile_hw: tuple[int, int],
                                                         grid_hw: tuple[int, int]) -> None:
    tiles = torch.randn(2, 1, *tile_hw, generator=torch.Generator().manual_seed(1))
    maps = head_attention_maps(tiny_model, tiles)
    assert maps.shape == (2, 4) + grid_hw
    assert maps.dtype == torch.float32
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 4))
    # Non-square grids are laid out frequency rows x time columns, as the model's own maps.
    torch.testing.assert_close(maps, tiny_model.cls_attention_maps(tiles))


def test_head_maps_run_in_eval_mode_and_restore_the_mode() -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**{**TINY, "drop_path_rate": 0.5})).train()
    tiles = torch.randn(2, 1, 128, 256, generator=torch.Generator().manual_seed(2))
    first, second = head_attention_maps(model, tiles), head_attention_maps(model, tiles)
    torch.testing.assert_close(first, second)  # stochastic depth would make these differ
    assert model.training
    with pytest.raises(ValueError, match="whole number"):
        head_attention_maps(model, tiles[..., :100])


def test_upsampling_repeats_each_patch_over_its_cells() -> None:
    maps = torch.arange(8, dtype=torch.float32).reshape(1, 2, 4)
    cells = upsample_to_tile(maps, (32, 64))
    assert isinstance(cells, torch.Tensor) and cells.shape == (1, 32, 64)
    assert cells[0, 0, 0] == 0 and cells[0, 15, 15] == 0 and cells[0, 16, 16] == 5 and cells[0, 31, 63] == 7
    # Dividing by the patch area gives a per-cell distribution with the same mass per patch.
    assert float(cells.sum() / 256) == pytest.approx(float(maps.sum()))
    mask = upsample_to_tile(np.array([[True, False]]), (4, 8))
    assert mask.dtype == bool and mask[:, :4].all() and not mask[:, 4:].any()
    assert upsample_to_tile(maps, (32, 64), mode="bilinear").shape == (1, 32, 64)
    with pytest.raises(ValueError, match="bilinear"):
        upsample_to_tile(np.ones((2, 4), dtype=bool), (32, 64), mode="bilinear")
    with pytest.raises(ValueError, match="whole number"):
        upsample_to_tile(maps, (31, 64))


# --- mass masks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mass", [0.3, 0.6, 0.9, 1.0])
def test_mass_mask_is_the_smallest_set_reaching_the_mass(mass: float) -> None:
    rng = np.random.default_rng(3)
    maps = rng.dirichlet(np.full(12, 0.5), size=5).reshape(5, 3, 4)
    masks = attention_mass_mask(maps, mass)
    assert masks.shape == (5, 3, 4) and masks.dtype == bool
    for head_map, mask in zip(maps.reshape(5, 12), masks.reshape(5, 12)):
        kept = head_map[mask].sum()
        assert kept >= mass - 1e-9
        # Brute force over all 4096 subsets: no smaller set holds the mass, none of that size holds more.
        subsets = np.array(list(itertools.product([False, True], repeat=12)))
        subset_mass, subset_size = subsets @ head_map, subsets.sum(axis=1)
        smallest = subset_size[subset_mass >= mass - 1e-9].min()
        assert mask.sum() == smallest
        assert kept == pytest.approx(subset_mass[subset_size == smallest].max())


def test_mass_mask_ties_and_scale() -> None:
    uniform = np.full((2, 5), 0.1)
    mask = attention_mass_mask(uniform, 0.6)  # 0.1 summed six times is 0.6 to within float error
    assert mask.reshape(-1).tolist() == [True] * 6 + [False] * 4  # ties: row-major order
    # Relative to each map's own total; tensors come back as tensors.
    tensor_mask = attention_mass_mask(torch.tensor([[[3.0, 1.0], [0.0, 6.0]]]), 0.6)
    assert isinstance(tensor_mask, torch.Tensor)
    assert tensor_mask.tolist() == [[[False, False], [False, True]]]
    with pytest.raises(ValueError, match="positive total"):
        attention_mass_mask(np.zeros((2, 2)), 0.6)
    with pytest.raises(ValueError, match="mass"):
        attention_mass_mask(uniform, 1.5)


# --- scores -------------------------------------------------------------------------------------

def test_iou_and_mass_against_a_hand_made_box() -> None:
    # 2 x 4 grid of 4 x 4-cell patches; the box covers patch (0, 0) and half of patch (0, 1).
    truth_cells = np.zeros((8, 16), dtype=bool)
    truth_cells[0:4, 0:6] = True
    coverage = patch_means(truth_cells, (4, 4))
    assert coverage.tolist() == [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    mask = np.zeros((2, 4), dtype=bool)
    mask[0, :2] = True
    head_map = np.zeros((2, 4))
    head_map[0, 0], head_map[0, 1], head_map[1, 0] = 0.5, 0.3, 0.2
    scores = mask_scores(mask, head_map, coverage)
    assert scores["iou"] == pytest.approx(24 / 32)  # overlap 24 cells, union 32 cells
    mask_cells = upsample_to_tile(mask, (8, 16))
    assert scores["iou"] == pytest.approx((mask_cells & truth_cells).sum() / (mask_cells | truth_cells).sum())
    assert scores["precision"] == pytest.approx(0.75) and scores["recall"] == pytest.approx(1.0)
    assert scores["mass_in_foreground"] == pytest.approx(0.5 + 0.3 * 0.5)
    assert scores["foreground_share"] == pytest.approx(24 / 128)
    assert scores["mask_share"] == pytest.approx(2 / 8)
    # Best patch-aligned IoU: {(0,0)} gives 16/24, {(0,0),(0,1)} gives 24/32.
    assert best_patch_iou(coverage) == pytest.approx(0.75)
    assert np.isnan(best_patch_iou(np.zeros((2, 4))))
    assert np.isnan(mask_scores(mask, head_map, np.zeros((2, 4)))["iou"])


def test_patch_means_on_rectangular_patches() -> None:
    # The same box on 2 mel bins x 8 frames patches: a 4 x 2 grid; the box fills 6 of the 8
    # frames of patches (0, 0) and (1, 0) and nothing else.
    truth_cells = np.zeros((8, 16), dtype=bool)
    truth_cells[0:4, 0:6] = True
    assert patch_means(truth_cells, (2, 8)).tolist() == [[0.75, 0.0], [0.75, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert patch_means(np.arange(16.0)[None, :].repeat(8, axis=0), (8, 2)).tolist() == [
        [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5]]  # frame means of 8 x 2 patches
    with pytest.raises(ValueError, match="2x6 patches"):
        patch_means(truth_cells, (2, 6))


def test_box_masks_follow_tile_offsets_and_split_kinds() -> None:
    annotations = _annotations([
        ("a/x.wav", 4.0, 5.0, 2000.0, 4000.0, "whistle", "bird", 20.0),
        ("a/x.wav", 0.0, 6.0, 5000.0, 6000.0, "cricket", "insect", 10.0),
        ("a/x.wav", 3.5, 3.6, 1000.0, 1200.0, "faint", "bird", -20.0),  # inaudible: does not count
    ])
    tiles = pd.DataFrame({"relpath": ["a/x.wav", "a/x.wav"], "offset_s": [0.0, 3.0]})
    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM)
    assert truth.foreground.shape == (2, 128, 256) and truth.foreground.dtype == bool
    assert truth.has_foreground.tolist() == [False, True]
    centres_hz, times_s = mel_bin_centres_hz(SPECTROGRAM), frame_times_s(SPECTROGRAM)
    expected_bins = (centres_hz >= 2000.0) & (centres_hz <= 4000.0)
    expected_frames = (times_s >= 1.0) & (times_s < 2.0)  # 4-5 s of the file is 1-2 s of tile 1
    np.testing.assert_array_equal(truth.foreground[1], expected_bins[:, None] & expected_frames[None, :])
    insect_bins = (centres_hz >= 5000.0) & (centres_hz <= 6000.0)
    assert (truth.other[:, insect_bins].all()) and truth.other.sum() == 2 * insect_bins.sum() * 256
    assert set(truth.boxes["label"]) == {"whistle", "cricket"}
    assert truth.boxes.loc[truth.boxes["label"] == "whistle", "foreground"].item()
    by_patch = box_masks_for_tiles(annotations, tiles, SPECTROGRAM, patch_hw=(16, 16))
    assert by_patch.foreground.shape == (2, 8, 16)
    np.testing.assert_allclose(by_patch.foreground, patch_means(truth.foreground, (16, 16)))
    np.testing.assert_allclose(truth.coverage((16, 16)).other, by_patch.other)


def _planted_tiles() -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Four noise tiles of two files; a loud bird box in tiles 0 and 2, an insect band in tile 3."""
    annotations = _annotations([
        ("r/a.wav", 1.0, 2.2, 2000.0, 5000.0, "whistle", "bird", 25.0),
        ("r/b.wav", 0.5, 1.5, 600.0, 1500.0, "trill", "bird", 25.0),
        ("r/b.wav", 3.0, 6.0, 7000.0, 9000.0, "cricket", "insect", 15.0),
    ])
    tiles = pd.DataFrame({"relpath": ["r/a.wav", "r/a.wav", "r/b.wav", "r/b.wav"], "offset_s": [0.0, 3.0, 0.0, 3.0],
                          "tile_id": [10, 11, 12, 13]})
    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM)
    tiles_db = _noise_tiles_db(4)
    tiles_db[truth.foreground] += 30.0
    tiles_db[truth.other] += 20.0
    return tiles_db, tiles, annotations


def test_energy_baseline_finds_a_planted_loud_box() -> None:
    tiles_db, tiles, annotations = _planted_tiles()
    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM, patch_hw=(16, 16))
    masks = energy_threshold_mask(tiles_db, (16, 16))
    assert masks.shape == (4, 8, 16) and masks.dtype == bool
    maps = energy_maps(tiles_db, (16, 16))
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    scores = mask_scores(masks, maps, truth.foreground, truth.other)
    ceiling = best_patch_iou(truth.foreground)
    for tile in (0, 2):
        # Every patch touched by the box is kept, and nothing else: the best a patch mask can do.
        assert scores["recall"][tile] == pytest.approx(1.0)
        assert scores["precision"][tile] > 0.6
        assert scores["iou"][tile] > 0.6 and scores["iou"][tile] >= ceiling[tile] - 0.1
        assert scores["mass_in_foreground"][tile] > 5 * scores["foreground_share"][tile]
    assert not masks[1].any()  # stationary noise only
    # An insect band over the whole tile is stationary in its mel bands: the band medians remove it.
    assert not masks[3].any()
    assert scores["mass_in_other"][3] < 1.5 * scores["other_share"][3]  # about chance level
    # A flat tile (no energy anywhere) gets a uniform map, not a division by zero.
    flat = energy_maps(np.full((1, 128, 256), -100.0, np.float32), (16, 16))
    np.testing.assert_allclose(flat, 1.0 / 128)
    assert not energy_threshold_mask(np.full((1, 128, 256), -100.0, np.float32), (16, 16)).any()


def test_score_tiles_table_and_same_area_baseline() -> None:
    tiles_db, tiles, annotations = _planted_tiles()
    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM)
    # Two hand-made "heads": one ranking patches exactly as loudness does, one uniform.
    loudness = patch_loudness_db(tiles_db, (16, 16)).astype(np.float64)
    follows_loudness = np.exp(loudness - loudness.max(axis=(-2, -1), keepdims=True))
    follows_loudness /= follows_loudness.sum(axis=(-2, -1), keepdims=True)
    uniform = np.full_like(follows_loudness, 1.0 / 128)
    head_maps = np.stack([follows_loudness, uniform], axis=1)
    scores = score_tiles(head_maps, tiles_db, truth, (16, 16), tile_ids=tiles["tile_id"])
    assert len(scores) == 4 * 3
    assert scores["source"].tolist()[:3] == ["head_0", "head_1", ENERGY_SOURCE]
    assert scores["tile_id"].tolist()[::3] == [10, 11, 12, 13]
    assert scores["head"].isna().tolist()[:3] == [False, False, True]
    assert scores["has_foreground"].tolist()[::3] == [True, False, True, False]
    head_0 = scores[scores["source"] == "head_0"].set_index("tile")
    # A head that ranks patches by loudness is exactly the same-area baseline.
    np.testing.assert_allclose(head_0.loc[[0, 2], "energy_iou_same_area"], head_0.loc[[0, 2], "iou"])
    head_1 = scores[scores["source"] == "head_1"].set_index("tile")
    # A uniform map puts exactly the covered share of its mass inside the boxes (chance level).
    np.testing.assert_allclose(head_1["mass_in_foreground"], head_1["foreground_share"], atol=1e-12)
    assert (head_1["mask_share"] >= 0.6 - 1e-9).all() and (head_1["mask_share"] < 0.6 + 1 / 128).all()
    assert head_1.loc[3, "mass_in_other"] == pytest.approx(head_1.loc[3, "other_share"])
    energy = scores[scores["source"] == ENERGY_SOURCE].set_index("tile")
    expected = mask_scores(energy_threshold_mask(tiles_db, (16, 16)), energy_maps(tiles_db, (16, 16)),
                           patch_means(truth.foreground, (16, 16)))
    np.testing.assert_allclose(energy["iou"], expected["iou"])
    np.testing.assert_allclose(energy["mass_in_foreground"], expected["mass_in_foreground"], rtol=1e-6)
    assert energy["energy_iou_same_area"].isna().all()
    np.testing.assert_allclose(head_1["iou_ceiling"], best_patch_iou(patch_means(truth.foreground, (16, 16))))
    with pytest.raises(ValueError, match="same tiles"):
        score_tiles(head_maps[:3], tiles_db, truth, (16, 16))


def test_rank_heads_means_intervals_and_background_check() -> None:
    rows = []
    for tile, (has_bird, ious) in enumerate([(True, (0.8, 0.2)), (True, (0.6, 0.4)), (True, (0.7, 0.3)),
                                             (False, (np.nan, np.nan))]):
        for source, head, iou in (("head_0", 0, ious[0]), ("head_1", 1, ious[1])):
            rows.append({"tile": tile, "source": source, "head": head, "has_foreground": has_bird, "iou": iou,
                         "mass_in_foreground": 0.1 if source == "head_0" else 0.5, "foreground_share": 0.1,
                         "precision": 0.5, "recall": 0.5, "mask_share": 0.2, "iou_ceiling": 0.9,
                         "energy_iou_same_area": 0.5, "mass_in_other": 0.9 if source == "head_1" else 0.0,
                         "other_share": 0.3})
    scores = pd.DataFrame(rows)
    ranking = rank_heads(scores, n_bootstrap=500, seed=0)
    assert ranking["source"].tolist() == ["head_0", "head_1"]
    assert ranking["rank"].tolist() == [1, 2]
    best = ranking.iloc[0]
    assert best["n_tiles"] == 3 and best["mean_iou"] == pytest.approx(0.7)
    assert best["iou_se"] == pytest.approx(0.1 / np.sqrt(3))
    assert 0.6 - 1e-9 <= best["iou_interval_low"] <= 0.7 <= best["iou_interval_high"] <= 0.8 + 1e-9
    assert best["interval_method"] == "percentile bootstrap over 3 tiles, 500 resamples"
    assert best["mean_iou_minus_energy_same_area"] == pytest.approx(0.2)
    assert best["mass_lift"] == pytest.approx(1.0)
    assert ranking.iloc[1]["background_mass_in_other"] == pytest.approx(0.9)
    assert ranking.iloc[1]["n_background_tiles"] == 1
    by_mass = rank_heads(scores, by="mass_in_foreground", n_bootstrap=0)
    assert by_mass["source"].tolist() == ["head_1", "head_0"]
    assert by_mass["iou_interval_low"].isna().all()
    # Resampling recorders, not tiles: tiles 0 and 2 share a recorder, so they are drawn together.
    grouped = rank_heads(scores.assign(recorder=scores["tile"].map({0: "R1", 1: "R2", 2: "R1", 3: "R2"})),
                         n_bootstrap=500, seed=0, group_column="recorder").iloc[0]
    assert grouped["interval_method"] == "percentile bootstrap over 2 recorders, 500 resamples"
    # Head 0's IoU: R1 holds tiles 0 and 2 (0.8, 0.7), R2 tile 1 (0.6); the resampled means are
    # 0.75 (R1 twice), 0.7 (once each) or 0.6 (R2 twice), each extreme with probability 1/4.
    assert (grouped["iou_interval_low"], grouped["iou_interval_high"]) == pytest.approx((0.6, 0.75))
    with pytest.raises(ValueError, match="lack columns"):
        rank_heads(scores.drop(columns="iou"))


def _hand_scores(iou_by_head: dict[int, list[float]], recorders: list[str]) -> pd.DataFrame:
    """A score_tiles-like table: one bird tile per recorder, heads with the given IoUs, and an
    energy baseline at 0.45 everywhere."""
    rows = []
    for tile, recorder in enumerate(recorders):
        sources = [(f"head_{h}", h, ious[tile]) for h, ious in iou_by_head.items()] + [(ENERGY_SOURCE, None, 0.45)]
        for source, head, iou in sources:
            rows.append({"tile": tile, "source": source, "head": head, "has_foreground": True, "iou": iou,
                         "mass_in_foreground": iou / 2, "foreground_share": 0.1, "precision": 0.5, "recall": 0.5,
                         "mask_share": 0.2, "iou_ceiling": 0.9,
                         "energy_iou_same_area": np.nan if head is None else 0.4, "recorder": recorder})
    frame = pd.DataFrame(rows)
    frame["head"] = pd.array(frame["head"], dtype="Int64")
    return frame


def test_choosing_the_best_head_on_the_reported_tiles_is_optimistic_and_the_half_split_is_not() -> None:
    # Three heads with the same mean IoU (0.5) over four recorders: no head is better. Chosen on
    # recorders A and B, head 1 looks best there (0.8); on C and D, which took no part in the
    # choice, it scores 0.2, below head 0's 0.5 and below the baseline's 0.45.
    scores = _hand_scores({0: [0.5, 0.5, 0.5, 0.5], 1: [0.9, 0.7, 0.3, 0.1], 2: [0.4, 0.4, 0.6, 0.6]},
                          ["A", "B", "C", "D"])
    same_tiles = rank_heads(scores[scores["recorder"].isin(["A", "B"])], n_bootstrap=0)
    assert same_tiles.iloc[0]["source"] == "head_1" and same_tiles.iloc[0]["mean_iou"] == pytest.approx(0.8)

    choice = choose_head_on_half(scores, "recorder", choose_groups=["A", "B"], n_bootstrap=200)
    assert (choice.head, choice.choose_groups, choice.report_groups) == (1, ["A", "B"], ["C", "D"])
    assert choice.chosen_score_on_choosing_half == pytest.approx(0.8)
    assert choice.reported["mean_iou"] == pytest.approx(0.2)
    summary = choice.summary()
    assert summary["best_head"] == 1 and summary["best_head_iou"] == pytest.approx(0.2)
    assert summary["best_head_iou_on_choosing_half"] == pytest.approx(0.8)
    assert summary["energy_iou"] == pytest.approx(0.45)
    assert summary["heads_beating_energy"] == 2 and summary["n_heads"] == 3    # heads 0 and 2 on C, D
    assert (summary["chosen_on"], summary["reported_on"], summary["split_by"]) == ("A, B", "C, D", "recorder")
    assert summary["n_tiles_choosing"] == summary["n_tiles_reporting"] == 2
    assert summary["interval_method"] == "percentile bootstrap over 2 recorders, 200 resamples"

    # A seeded split: a partition of the groups, the same for the same seed.
    choose, report = split_groups_in_halves(scores["recorder"], seed=3)
    assert sorted(choose + report) == ["A", "B", "C", "D"] and len(choose) == len(report) == 2
    assert split_groups_in_halves(scores["recorder"], seed=3) == (choose, report)
    seeded = choose_head_on_half(scores, "recorder", seed=3, n_bootstrap=0)
    assert seeded.choose_groups == choose
    assert split_groups_in_halves(["A", "B", "C"], seed=0)[0].__len__() == 2
    with pytest.raises(ValueError, match="at least 2"):
        split_groups_in_halves(["A", "A"])
    no_bird = scores.assign(has_foreground=scores["recorder"].isin(["A", "B"]))
    with pytest.raises(ValueError, match="reporting half .* no tile with a foreground event"):
        choose_head_on_half(no_bird, "recorder", choose_groups=["A", "B"])


def test_with_tile_groups_and_the_band_median() -> None:
    scores = pd.DataFrame({"tile": [0, 0, 1, 2], "source": ["head_0", ENERGY_SOURCE, "head_0", "head_0"]})
    grouped = with_tile_groups(scores, "recorder", np.array(["R1", "R2", "R1"]))
    assert grouped["recorder"].tolist() == ["R1", "R1", "R2", "R1"]
    with pytest.raises(ValueError, match="groups are given for 2"):
        with_tile_groups(scores, "recorder", ["R1", "R2"])
    # The band median is the lower median (as the model's background removal): for the band
    # [1, 5, 3, 9] it is 3, not numpy's 4 (the mean of the two middle values).
    tile = np.array([[1.0, 5.0, 3.0, 9.0], [2.0, 2.0, 2.0, 2.0]], dtype=np.float16)
    np.testing.assert_array_equal(band_median_excess_db(tile), [[-2.0, 2.0, 0.0, 6.0], [0.0, 0.0, 0.0, 0.0]])


# --- end to end ---------------------------------------------------------------------------------

def test_end_to_end_from_a_saved_checkpoint(tmp_path, tiny_model: SpectrogramViT) -> None:
    from soundscape_ssl.pretrain.checkpoint import build_checkpoint, load_backbone, save_checkpoint

    tiles_db, tiles, annotations = _planted_tiles()
    normalization = {"mean": float(tiles_db.mean()), "std": float(tiles_db.std())}
    state = tiny_model.state_dict()
    checkpoint_path = save_checkpoint(tmp_path / "pretrain" / "dino" / "checkpoint.pth", build_checkpoint(
        method="dino", step=0, epoch=0, world_size=1, backbone_config=tiny_model.config, method_config={},
        train_config={}, spectrogram_config=SPECTROGRAM, normalization=normalization, model_state=state,
        backbone_state=state, optimizer_state={}))
    model, metadata = load_backbone(checkpoint_path)

    config = AttentionConfig(batch_size=3, n_bootstrap=50)
    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM, patch_hw=model.config.patch_hw)
    result = score_model_attention(model, tiles_db, truth, metadata["normalization"], config,
                                   tile_ids=tiles["tile_id"], show_progress=False)
    assert result.maps.shape == (4, 4, 8, 16)
    np.testing.assert_allclose(result.maps.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    expected_maps = head_attention_maps(tiny_model, torch.from_numpy(
        (tiles_db[:, None] - normalization["mean"]) / normalization["std"]))
    np.testing.assert_allclose(result.maps, expected_maps.numpy(), rtol=1e-4, atol=1e-7)
    assert len(result.scores) == 4 * 5
    # Batches of 3 give the same table as scoring all 4 tiles at once.
    pd.testing.assert_frame_equal(result.scores, score_tiles(result.maps, tiles_db, truth, (16, 16), config,
                                                             tile_ids=tiles["tile_id"]))

    ranking = rank_heads(result.scores, n_bootstrap=config.n_bootstrap)
    assert set(ranking["source"]) == {"head_0", "head_1", "head_2", "head_3", ENERGY_SOURCE}
    assert (ranking["n_tiles"] == 2).all() and (ranking["n_background_tiles"] == 2).all()
    assert ranking["mean_iou"].is_monotonic_decreasing
    # On loud planted boxes in stationary noise the energy baseline is the one to beat.
    assert ranking.iloc[0]["source"] == ENERGY_SOURCE
    out_dir = save_attention_products(tmp_path / "attention", result.scores, ranking, config,
                                      checkpoint=str(checkpoint_path))
    assert pd.read_parquet(out_dir / SCORES_FILE).shape == result.scores.shape
    assert pd.read_csv(out_dir / RANKING_FILE)["source"].tolist() == ranking["source"].tolist()
    assert json.loads((out_dir / "config.json").read_text())["config"]["attention_mass"] == 0.6

    pixel_truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM)
    figure = plot_head_maps(tiles_db, result.maps, SPECTROGRAM, boxes=pixel_truth.boxes, heads=[0, 2],
                            tile_titles=tiles["tile_id"].astype(str).tolist())
    assert isinstance(figure, Figure) and len(figure.axes) == 4 * 3 + 2   # + level and attention colour bars
    assert [axes.get_ylabel() for axes in figure.axes[-2:]] == ["dB re tile max",
                                                                "attention (share of the map's maximum)"]
    masks = np.concatenate([attention_mass_mask(result.maps, 0.6), energy_threshold_mask(tiles_db, (16, 16))[:, None]],
                           axis=1)
    overlay = plot_mask_overlays(tiles_db, masks, SPECTROGRAM, boxes=pixel_truth.boxes,
                                 source_names=["head 0", "head 1", "head 2", "head 3", "energy"])
    assert len(overlay.axes) == 4 * 5 + 1   # + the level colour bar
    # Truth boxes are drawn as rectangles on every panel: tile 0 has one (the whistle), in 5 panels.
    assert sum(len(axes.patches) for axes in overlay.axes[:5]) == 5
    png_path, pdf_path = save_figure(overlay, tmp_path / "figures", "attention_masks")
    assert png_path.stat().st_size > 0 and pdf_path.stat().st_size > 0


def test_rectangular_patches_end_to_end(tmp_path) -> None:
    """8 mel bins x 32 frames: maps, energy masks and truth on the 16 x 8 grid, from a checkpoint
    that reloads to the same model."""
    from soundscape_ssl.pretrain.checkpoint import build_checkpoint, load_backbone, save_checkpoint

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**{**TINY, "patch_size": 8, "patch_frames": 32})).eval()
    tiles_db, tiles, annotations = _planted_tiles()
    normalization = {"mean": float(tiles_db.mean()), "std": float(tiles_db.std())}
    state = model.state_dict()
    checkpoint_path = save_checkpoint(tmp_path / "checkpoint.pth", build_checkpoint(
        method="vicreg", step=0, epoch=0, world_size=1, backbone_config=model.config, method_config={},
        train_config={}, spectrogram_config=SPECTROGRAM, normalization=normalization, model_state=state,
        backbone_state=state, optimizer_state={}))
    reloaded, metadata = load_backbone(checkpoint_path)
    assert metadata["backbone_config"]["patch_frames"] == 32
    assert reloaded.config == model.config and reloaded.config.patch_hw == (8, 32)
    normalized = torch.from_numpy((tiles_db[:, None] - normalization["mean"]) / normalization["std"])
    for name in POOLINGS:
        torch.testing.assert_close(getattr(reloaded.embed(normalized), name), getattr(model.embed(normalized), name),
                                   rtol=0, atol=0)

    truth = box_masks_for_tiles(annotations, tiles, SPECTROGRAM, patch_hw=reloaded.config.patch_hw)
    assert truth.foreground.shape == truth.other.shape == (4, 16, 8)
    with pytest.raises(ValueError, match="8x32 patches, not 16x16"):
        truth.coverage((16, 16))
    masks = energy_threshold_mask(tiles_db, (8, 32))
    assert masks.shape == (4, 16, 8)
    # The planted whistle (2-5 kHz, 1-2.2 s of tile 0) is found on the rectangular grid too.
    scores = mask_scores(masks, energy_maps(tiles_db, (8, 32)), truth.foreground)
    assert scores["recall"][0] == pytest.approx(1.0) and scores["iou"][0] > 0.6
    config = AttentionConfig(batch_size=3, n_bootstrap=20)
    result = score_model_attention(reloaded, tiles_db, truth, metadata["normalization"], config,
                                   tile_ids=tiles["tile_id"], show_progress=False)
    assert result.maps.shape == (4, 4, 16, 8)
    np.testing.assert_allclose(result.maps, head_attention_maps(model, normalized).numpy(), rtol=1e-5, atol=1e-7)
    energy = result.scores[result.scores["source"] == ENERGY_SOURCE].reset_index(drop=True)
    np.testing.assert_allclose(energy["iou"], scores["iou"])
    with pytest.raises(ValueError, match="16x16 patches"):
        score_tiles(result.maps, tiles_db, truth, (16, 16))
    with pytest.raises(ValueError, match="8x32 patches"):
        head_attention_maps(model, normalized[..., :80])  # 80 frames: not whole 32-frame patches
