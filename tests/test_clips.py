"""The report's clips: the tile's own audio through the one reader, faded and levelled, resumable."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from soundscape_ssl.core.audio import downmix, get_resampler
from soundscape_ssl.core.stage import PlanMismatchError, file_sha256
from soundscape_ssl.report import clips as clips_module
from soundscape_ssl.report.clips import ClipConfig, cut_clips, fade_in_out, prepare_clip
from soundscape_ssl.tiles.store import TileStore

FLAC = ClipConfig(audio_format="flac")


def test_fade_rises_from_zero_and_falls_to_zero() -> None:
    gains = fade_in_out(10, 4)
    expected_rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(4) / 4)      # 0, 0.146, 0.5, 0.854
    np.testing.assert_allclose(gains[:4], expected_rise, atol=1e-7)
    np.testing.assert_allclose(gains[4:6], 1.0)
    np.testing.assert_allclose(gains[6:], expected_rise[::-1], atol=1e-7)
    assert gains[0] == 0.0 and gains[-1] == 0.0
    assert fade_in_out(3, 10).tolist() == [0.0, 1.0, 0.0]               # a fade never exceeds half


def test_level_is_raised_to_the_target_at_most_by_the_cap() -> None:
    rate = 1000
    sine = np.sin(2 * np.pi * 50 * np.arange(rate) / rate).astype(np.float32)
    config = ClipConfig(fade_s=0.01, target_peak_dbfs=-3.0, max_gain_db=30.0)
    loud, peak_dbfs, gain_db = prepare_clip(0.5 * sine, rate, config)
    assert peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=1e-3)
    assert gain_db == pytest.approx(-3.0 - 20 * math.log10(0.5), abs=1e-3)
    assert np.abs(loud).max() == pytest.approx(10 ** (-3 / 20), rel=1e-3)
    quiet, peak_dbfs, gain_db = prepare_clip(0.001 * sine, rate, config)   # -60 dBFS: capped at +30 dB
    assert (round(peak_dbfs, 3), gain_db) == (-60.0, 30.0)
    assert np.abs(quiet).max() == pytest.approx(0.001 * 10 ** 1.5, rel=1e-3)
    silent, peak_dbfs, gain_db = prepare_clip(np.zeros(100, np.float32), rate, config)
    assert peak_dbfs == -math.inf and gain_db == 0.0 and not silent.any()


def _reference_window(path: str, offset_s: float, valid_s: float, rate_out: int, config) -> np.ndarray:
    """The known answer: the whole file resampled at once (no blocks), the tile's span cut from it."""
    samples, rate_in = sf.read(path, dtype="float32", always_2d=True)
    resampled = get_resampler(rate_in, rate_out, config.resample_lowpass_filter_width,
                              config.resample_rolloff).resample(torch.from_numpy(downmix(samples))).numpy()
    start = round(offset_s * rate_out)
    return resampled[start:start + round(valid_s * rate_out)]


def test_clips_are_the_tiles_own_audio_faded_and_levelled(stage_inputs, tmp_path) -> None:
    store = TileStore(stage_inputs["store"])
    index = store.index
    # a whole tile, the padded last tile of a 7.7 s file, the only tile of a 0.5 s file
    padded = index[index["padded"]]
    wanted = [int(index["tile_id"].iloc[3])] + padded["tile_id"].astype(int).tolist()
    table = cut_clips(stage_inputs["store"], wanted, tmp_path / "clips", FLAC, show_progress=False)
    assert table["tile_id"].tolist() == sorted(wanted) and (table["loss_reason"] == "").all()
    rate = store.config.sample_rate_hz
    for row in table.itertuples():
        tile = index.iloc[row.tile_id]
        assert row.clip_s == pytest.approx(tile["valid_s"])             # the padding is not played
        clip, clip_rate = sf.read(tmp_path / "clips" / row.clip, dtype="float32")
        assert clip_rate == rate and len(clip) == round(tile["valid_s"] * rate)
        reference = _reference_window(tile["path"], tile["offset_s"], tile["valid_s"], rate, store.config)
        expected, peak_dbfs, gain_db = prepare_clip(reference, rate, FLAC)
        assert (row.peak_dbfs, row.gain_db) == (pytest.approx(peak_dbfs, abs=0.01), pytest.approx(gain_db, abs=0.01))
        np.testing.assert_allclose(clip, expected, atol=2.0 / 32768)     # 16-bit FLAC
        assert clip[0] == 0.0 and clip[-1] == 0.0
        thumbnail = tmp_path / "clips" / row.thumbnail
        assert thumbnail.read_bytes().startswith(b"\x89PNG")
    assert sf.info(str(tmp_path / "clips" / table["clip"].iloc[0])).format == "FLAC"


def test_ogg_clips_decode_and_start_in_silence(stage_inputs, tmp_path) -> None:
    table = cut_clips(stage_inputs["store"], [0, 1], tmp_path / "ogg", ClipConfig(fade_s=0.02),
                      show_progress=False)
    for clip_name in table["clip"]:
        samples, rate = sf.read(tmp_path / "ogg" / clip_name, dtype="float32")
        assert sf.info(str(tmp_path / "ogg" / clip_name)).subtype == "VORBIS"
        assert len(samples) / rate == pytest.approx(1.0, abs=0.01)
        edge = round(0.003 * rate)                                      # the first 3 ms of a 20 ms fade
        rms = lambda x: float(np.sqrt(np.mean(np.square(x))))           # noqa: E731
        assert rms(samples[:edge]) < 0.05 * rms(samples[len(samples) // 4:3 * len(samples) // 4])


def test_an_interrupted_cut_resumes_to_the_same_files_on_any_number_of_threads(stage_inputs, tmp_path, monkeypatch) -> None:
    wanted = list(range(0, 30, 2))
    reference = tmp_path / "reference"
    cut_clips(stage_inputs["store"], wanted, reference, FLAC, show_progress=False, threads=1)
    write_unit, calls = clips_module._write_unit, []

    def write_then_die(run, unit_id, *args):
        calls.append(unit_id)
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        write_unit(run, unit_id, *args)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(clips_module, "_write_unit", write_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        cut_clips(stage_inputs["store"], wanted, out, FLAC, show_progress=False, threads=1)
    monkeypatch.setattr(clips_module, "_write_unit", write_unit)
    assert len(list((out / "units").glob("*.done"))) == 2 and not (out / "clips.csv").exists()
    resumed = cut_clips(stage_inputs["store"], wanted, out, FLAC, show_progress=False, threads=2)
    media = sorted(p.name for p in (reference / "media").iterdir())
    assert media == sorted(p.name for p in (out / "media").iterdir()) and len(media) == 2 * len(wanted)
    for name in media:
        assert file_sha256(reference / "media" / name) == file_sha256(out / "media" / name), name
    assert (reference / "clips.csv").read_bytes() == (out / "clips.csv").read_bytes()
    assert len(resumed) == len(wanted)
    with pytest.raises(PlanMismatchError, match="different plan"):   # other tiles: refused, not mixed in
        cut_clips(stage_inputs["store"], wanted[:3], out, FLAC, show_progress=False)


def test_unreadable_audio_leaves_the_thumbnail_and_says_why(stage_inputs, tmp_path) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(stage_inputs["store"], store_dir)
    index = pd.read_parquet(store_dir / "index.parquet")
    moved = index["relpath"] == index["relpath"].iloc[0]
    index.loc[moved, "path"] = str(tmp_path / "gone.wav")
    index.to_parquet(store_dir / "index.parquet", index=False)
    first_other = int(index.loc[~moved, "tile_id"].iloc[0])
    table = cut_clips(store_dir, [0, first_other], tmp_path / "clips", show_progress=False).set_index("tile_id")
    assert table.loc[0, "clip"] == "" and table.loc[0, "loss_reason"].startswith("unreadable")
    assert (tmp_path / "clips" / table.loc[0, "thumbnail"]).is_file()
    assert table.loc[first_other, "clip"].endswith(".ogg") and table.loc[first_other, "loss_reason"] == ""


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="audio_format"):
        ClipConfig(audio_format="mp3")
    with pytest.raises(ValueError, match="fade_s"):
        ClipConfig(fade_s=2.0)
