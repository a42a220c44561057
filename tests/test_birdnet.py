"""BirdNET V2.4 runner: real detections, tile alignment, batching, embeddings, location filter, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from soundscape_ssl.analysis import birdnet
from soundscape_ssl.analysis.birdnet import (BirdNetConfig, BirdNetRunner, file_windows_index, flat_sigmoid,
                                    load_results, run_on_files, run_on_tiles, shard_is_done,
                                    species_allowed, week_48)
from soundscape_ssl.core.audio import downmix, get_resampler

AVAILABLE, WHY_NOT = birdnet.birdnet_available()
if not AVAILABLE:
    pytest.skip(f"BirdNET is not installed here: {WHY_NOT}", allow_module_level=True)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "soundscapes"
JURA_DAWN = REAL_DATA / "scikit-maad" / "S4A03895_jura_24h" / "S4A03895_20190522_060000.wav"
SPINETAIL = REAL_DATA / "scikit-maad" / "spinetail_colombia" / "spinetail.wav"
# Approximate sites (SOURCES.md): a spruce forest in the Jura, France; Valle del Cauca, Colombia.
JURA_LAT_LON = (46.55, 6.15)
VALLE_DEL_CAUCA_LAT_LON = (3.6, -76.6)
CHIFFCHAFF = "Phylloscopus collybita_Common Chiffchaff"
RED_FACED_SPINETAIL = "Cranioleuca erythrops_Red-faced Spinetail"


@pytest.fixture(scope="module")
def runner() -> BirdNetRunner:
    return BirdNetRunner(BirdNetConfig(batch_size=4, num_threads=1))


def needs_real_data() -> None:
    if not (JURA_DAWN.exists() and SPINETAIL.exists()):
        pytest.skip(f"{REAL_DATA} is absent")


def windows_48k(path: Path, config: BirdNetConfig = BirdNetConfig()) -> np.ndarray:
    """All whole 3 s windows of a file, resampled in one piece by the one resampler with
    BirdNET's kernel (the reference for block decoding)."""
    samples, rate_hz = sf.read(path, dtype="float32", always_2d=True)
    audio = get_resampler(rate_hz, 48000, config.resample_lowpass_filter_width,
                          config.resample_rolloff).resample(torch.from_numpy(downmix(samples))).numpy()
    n = len(audio) // 144000
    return audio[:n * 144000].reshape(n, 144000)


def synthetic_wav(path: Path, seconds: float, seed: int, sample_rate_hz: int = 44100) -> Path:
    """Noise with a few tonal chirps: enough structure to give distinct, finite outputs."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate_hz)) / sample_rate_hz
    audio = 0.02 * rng.standard_normal(len(t))
    for start_s in rng.uniform(0, max(seconds - 0.5, 0.1), size=max(1, int(seconds))):
        span = (t >= start_s) & (t < start_s + 0.3)
        audio[span] += 0.3 * np.sin(2 * np.pi * (3000 + 4000 * (t[span] - start_s)) * (t[span] - start_s))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), sample_rate_hz, subtype="PCM_16")
    return path


# ---------------------------------------------------------------------------------------------

def test_week_48_follows_birdnets_four_weeks_per_month() -> None:
    assert week_48(pd.Timestamp("2019-01-01")) == 1
    assert week_48(pd.Timestamp("2019-01-08")) == 2
    assert week_48(pd.Timestamp("2019-05-22 06:00")) == 20   # May, days 22-31 -> 4th week of May
    assert week_48(pd.Timestamp("2018-09-19")) == 35
    assert week_48(pd.Timestamp("2020-02-29")) == 8
    assert week_48(pd.Timestamp("2019-12-31")) == 48
    assert week_48(pd.NaT) == -1 and week_48(None) == -1


def test_flat_sigmoid_matches_birdnet() -> None:
    logits = np.array([-40.0, -1.0, 0.0, 2.0, 40.0], np.float32)
    expected = 1.0 / (1.0 + np.exp(-np.clip(logits, -15, 15)))
    np.testing.assert_allclose(flat_sigmoid(logits), expected, rtol=1e-6)
    assert flat_sigmoid(np.array([2.0]), 1.5)[0] > flat_sigmoid(np.array([2.0]), 1.0)[0]


def test_config_rejects_what_the_model_cannot_do() -> None:
    with pytest.raises(ValueError, match="3.0 s at 48000 Hz"):
        BirdNetConfig(window_s=5.0)
    with pytest.raises(ValueError, match="week_48"):
        BirdNetConfig(week_48=49)
    with pytest.raises(ValueError, match="both latitude and longitude"):
        BirdNetConfig(latitude=46.5)


def test_batched_equals_one_window_at_a_time(runner: BirdNetRunner, tmp_path: Path) -> None:
    windows = windows_48k(synthetic_wav(tmp_path / "a.wav", 27.0, seed=1))  # 9 windows: 2 batches + 1
    confidences, embeddings = runner.score_windows(windows)
    assert confidences.shape == (9, birdnet.N_CLASSES) and embeddings.shape == (9, 1024)
    for i in range(len(windows)):
        single_confidences, single_embeddings = runner.score_windows(windows[i])
        np.testing.assert_allclose(confidences[i], single_confidences[0], atol=1e-5)
        np.testing.assert_allclose(embeddings[i], single_embeddings[0], atol=1e-4, rtol=1e-4)
    # Different audio gives different outputs (the rows are not copies of one another).
    assert np.abs(embeddings[0] - embeddings[1]).max() > 1e-2
    with pytest.raises(ValueError, match="144000"):
        runner.score_windows(windows[:, :1000])


def test_embeddings_are_the_layer_birdnet_analyzer_reads(runner: BirdNetRunner, tmp_path: Path) -> None:
    """Our second graph output equals BirdNET-Analyzer's embedding: tensor "output index - 1" of
    the unmodified model, read from the plain (non-XNNPACK) interpreter that materialises it."""
    from ai_edge_litert import interpreter as litert

    windows = windows_48k(synthetic_wav(tmp_path / "b.wav", 6.0, seed=2))
    _, embeddings = runner.score_windows(windows)
    assert embeddings.shape == (2, 1024) and np.isfinite(embeddings).all()
    assert (embeddings >= 0).all() and embeddings.max() > 0  # global average of ReLU activations
    plain = litert.Interpreter(model_path=str(runner.model_path), num_threads=1,
                               experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.resize_tensor_input(0, [2, 144000])
    plain.allocate_tensors()
    plain.set_tensor(plain.get_input_details()[0]["index"], windows)
    plain.invoke()
    output_index = plain.get_output_details()[0]["index"]
    assert runner.embedding_tensor_index == output_index - 1
    np.testing.assert_allclose(embeddings, plain.get_tensor(output_index - 1), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(runner.logits_and_embeddings(windows)[0], plain.get_tensor(output_index),
                               atol=1e-3, rtol=1e-3)


def test_location_filter_gives_a_plausible_species_list() -> None:
    jura_june = species_allowed(*JURA_LAT_LON, week=23)
    colombia = species_allowed(*VALLE_DEL_CAUCA_LAT_LON, week=35)
    assert 50 < len(jura_june) < 1000 and 50 < len(colombia) < 2000
    assert CHIFFCHAFF in jura_june and "Turdus merula_Eurasian Blackbird" in jura_june
    assert RED_FACED_SPINETAIL not in jura_june        # a Neotropical spinetail, not in Europe
    assert RED_FACED_SPINETAIL in colombia and CHIFFCHAFF not in colombia
    # A stricter threshold keeps a subset; the year-round list holds the June one's residents.
    assert species_allowed(*JURA_LAT_LON, week=23, threshold=0.3) < jura_june
    assert "Turdus merula_Eurasian Blackbird" in species_allowed(*JURA_LAT_LON, week=-1)


@pytest.mark.realdata
def test_confident_known_species_keyed_by_tile_id(runner: BirdNetRunner, tmp_path: Path) -> None:
    """Real recordings, tiles given in shuffled order, the location filter on: the Jura dawn file
    holds a singing Common Chiffchaff at 3-6 s, the Colombian clip (annotated "spinetail") a
    Red-faced Spinetail; every row matches a direct score of that tile's own span."""
    needs_real_data()
    tiles = pd.concat([
        pd.DataFrame({"path": str(JURA_DAWN), "offset_s": [0.0, 3.0, 6.0], "lat": JURA_LAT_LON[0],
                      "lon": JURA_LAT_LON[1], "file_start_time": pd.Timestamp("2019-05-22 06:00")}),
        pd.DataFrame({"path": str(SPINETAIL), "offset_s": 3.0 * np.arange(6), "lat": VALLE_DEL_CAUCA_LAT_LON[0],
                      "lon": VALLE_DEL_CAUCA_LAT_LON[1], "file_start_time": pd.Timestamp("2018-09-19 11:00")}),
    ], ignore_index=True)
    # Tile ids in an order unrelated to (file, time), and rows handed over shuffled.
    tiles.insert(0, "tile_id", np.random.default_rng(3).permutation(len(tiles)) + 100)
    shuffled = tiles.sample(frac=1.0, random_state=3)
    config = BirdNetConfig(location_filter=True, top_k=3, shard_max_windows=4)
    table = run_on_tiles(shuffled, tmp_path / "out", config, runner=runner, progress=False)

    expected = tiles.sort_values("tile_id").reset_index(drop=True)
    assert table["tile_id"].tolist() == expected["tile_id"].tolist() == sorted(expected["tile_id"])
    assert table["path"].tolist() == expected["path"].tolist()
    assert table["offset_s"].tolist() == expected["offset_s"].tolist()
    assert table["skip_reason"].isna().all() and table["location_filter_applied"].all()
    assert (table["week_48"] == np.where(table["path"] == str(JURA_DAWN), 20, 35)).all()
    jura_song = table[(table["path"] == str(JURA_DAWN)) & (table["offset_s"] == 3.0)].iloc[0]
    assert jura_song["top_species"] == CHIFFCHAFF and jura_song["top_confidence"] >= 0.8
    spinetail = table[table["path"] == str(SPINETAIL)]
    assert (spinetail["top_species"] == RED_FACED_SPINETAIL).sum() >= 3
    assert spinetail["top_confidence"].max() >= 0.7

    _, embeddings = load_results(tmp_path / "out")
    for path in (JURA_DAWN, SPINETAIL):
        direct_confidences, direct_embeddings = runner.score_windows(windows_48k(path))
        rows = table.index[table["path"] == str(path)].to_numpy()
        spans = np.round(table.loc[rows, "offset_s"].to_numpy() / 3.0).astype(int)  # window k of the file
        label_index = [runner.labels.index(label) for label in table.loc[rows, "top_species"]]
        np.testing.assert_allclose(table.loc[rows, "top_confidence"], direct_confidences[spans, label_index],
                                   atol=2e-3)
        np.testing.assert_allclose(embeddings[rows].astype(np.float32), direct_embeddings[spans],
                                   atol=2e-2, rtol=2e-3)


def test_resume_sharding_and_bad_files(runner: BirdNetRunner, tmp_path: Path, monkeypatch) -> None:
    paths = [synthetic_wav(tmp_path / "audio" / f"r{i}.wav", seconds, seed=i)
             for i, seconds in enumerate([9.0, 7.7, 3.0])]
    broken = tmp_path / "audio" / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    cut = tmp_path / "audio" / "cut.wav"                         # 9 s file cut to 4.6 s after tiling
    cut.write_bytes(paths[0].read_bytes()[:44 + 2 * round(4.6 * 44100)])
    tiles = file_windows_index(paths)
    assert tiles.groupby("path").size().tolist() == [3, 3, 1]     # 7.7 s: two whole + 1.7 s partial
    tiles = pd.concat([tiles, pd.DataFrame({"tile_id": [99, 100, 101, 102], "path": [str(broken)] + [str(cut)] * 3,
                                            "offset_s": [0.0, 0.0, 3.0, 6.0]})], ignore_index=True)
    config = BirdNetConfig(shard_max_windows=3, save_confidences=True, embedding_dtype="float32")
    out = tmp_path / "run"

    scored: list[int] = []
    score = runner.logits_and_embeddings
    monkeypatch.setattr(runner, "logits_and_embeddings", lambda w: (scored.append(len(w)), score(w))[1])

    # Two ranks: rank 1 alone cannot finish; rank 0 then completes and finalises.
    assert run_on_tiles(tiles, out, config, rank=1, world_size=2, runner=runner, progress=False) is None
    assert [shard_is_done(out, k) for k in range(4)] == [False, True, False, True]
    table = run_on_tiles(tiles, out, config, rank=0, world_size=2, runner=runner, progress=False)
    assert sum(scored) == 9                                        # bad spans are never scored
    assert table["tile_id"].tolist() == list(range(7)) + [99, 100, 101, 102]
    reasons = table.set_index("tile_id")["skip_reason"]
    # broken.wav: the inventory's reason; 6 s of cut.wav lies past the break of a file cut short
    assert reasons[99] == "not_audio" and reasons[102] == "truncated"
    assert reasons.notna().sum() == 2
    np.testing.assert_allclose(table.set_index("tile_id").loc[[100, 101], "audio_s"], [3.0, 1.6], atol=1e-3)
    np.testing.assert_allclose(table.loc[table["path"].str.endswith("r1.wav"), "audio_s"], [3.0, 3.0, 1.7],
                               atol=1e-4)
    frame, embeddings = load_results(out)
    assert embeddings.shape == (11, 1024) and np.isnan(embeddings[[7, 10]]).all()
    assert np.isfinite(embeddings[[0, 1, 2, 3, 4, 5, 6, 8, 9]]).all()
    confidences = np.load(out / "confidences.npy", mmap_mode="r")
    labels = (out / "labels.txt").read_text().splitlines()
    top_index = [labels.index(label) for label in frame["top_species"][:7]]
    np.testing.assert_allclose(confidences[np.arange(7), top_index], frame["top_confidence"][:7], atol=1e-3)
    written = json.loads((out / "config.json").read_text())
    assert written["stage"] == "birdnet" and written["n_skipped"] == 2 and written["model"]["model_sha256"]

    # A finished run is read back, not recomputed.
    scored.clear()
    again = run_on_tiles(tiles, out, config, runner=runner, progress=False)
    assert scored == [] and again["top_species"].equals(table["top_species"])

    # A run killed after some shards: only the missing shard is redone, with the same result.
    (out / "config.json").unlink()
    redo = pd.read_parquet(out / "shards" / "shard-000001.parquet")
    (out / "shards" / "shard-000001.parquet").unlink()
    mtime_shard0 = (out / "shards" / "shard-000000.parquet").stat().st_mtime_ns
    resumed = run_on_tiles(tiles, out, config, runner=runner, progress=False)
    assert sum(scored) == redo["skip_reason"].isna().sum() > 0
    assert (out / "shards" / "shard-000000.parquet").stat().st_mtime_ns == mtime_shard0
    pd.testing.assert_frame_equal(resumed, table)

    # Other settings or tiles for the same folder are refused, not mixed in.
    with pytest.raises(ValueError, match="BirdNET results of a different plan .*config.top_k: 5 -> 2"):
        run_on_tiles(tiles, out, BirdNetConfig(shard_max_windows=3, top_k=2), runner=runner, progress=False)


def test_run_on_files_scores_every_span(runner: BirdNetRunner, tmp_path: Path) -> None:
    path = synthetic_wav(tmp_path / "clip.wav", 7.0, seed=5, sample_rate_hz=32000)   # last 1.0 s dropped
    table = run_on_files([path], tmp_path / "out", BirdNetConfig(top_k=2, min_confidence=0.0),
                         runner=runner, progress=False)
    assert table["offset_s"].tolist() == [0.0, 3.0]
    assert table["audio_s"].tolist() == [3.0, 3.0]
    assert table["species"].map(len).tolist() == [2, 2]
    assert (np.diff(np.stack(table["confidences"].to_numpy()), axis=1) <= 0).all()  # best first
    assert not table["location_filter_applied"].any() and table["week_48"].isna().all()
