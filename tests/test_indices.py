"""The acoustic-indices stage: scikit-maad's values, aligned with tile ids, resumable; the known answer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundscape_ssl.analysis import indices
from soundscape_ssl.analysis.indices import INDEX_NAMES, IndicesConfig
from soundscape_ssl.core.stage import PlanMismatchError

REPO = Path(__file__).resolve().parents[1]
JURA = REPO.parent / "shared" / "data" / "soundscapes" / "scikit-maad" / "S4A03895_jura_24h"
RATE_HZ = 16000


def _maad_direct(samples: np.ndarray, rate_hz: int, config: IndicesConfig) -> np.ndarray:
    """scikit-maad called as its example does: detrended float64 audio, the two all_* functions."""
    from maad import features, sound

    samples = samples.astype(np.float64) - samples.astype(np.float64).mean()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        temporal = features.all_temporal_alpha_indices(samples, rate_hz, gain=config.gain_db,
                                                       sensitivity=config.sensitivity_dbv,
                                                       dB_threshold=3, rejectDuration=0.01)
        power, times_s, freqs_hz, _ = sound.spectrogram(samples, rate_hz, window="hann", nperseg=1024,
                                                        noverlap=512)
        spectral, _ = features.all_spectral_alpha_indices(
            power, times_s, freqs_hz, flim_low=[0, 1500], flim_mid=[1500, 8000], flim_hi=[8000, 20000],
            gain=config.gain_db, sensitivity=config.sensitivity_dbv, R_compatible=config.r_compatible)
    values = np.concatenate([temporal.to_numpy(float)[0], spectral.to_numpy(float)[0]])
    return np.where(np.isfinite(values), values, np.nan)


def _tone(seconds: float, freq_hz: float, seed: int, amplitude: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    return (amplitude * np.sin(2 * np.pi * freq_hz * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _write_pcm16(path: Path, samples: np.ndarray) -> np.ndarray:
    """Write 16-bit PCM and return the float values a reader gets back (int16 / 2**15)."""
    sf.write(path, samples, RATE_HZ, subtype="PCM_16")
    return sf.read(path, dtype="int16")[0].astype(np.float64) / 2 ** 15


def test_window_indices_are_scikit_maads_own_values_in_the_documented_order():
    config = IndicesConfig(sample_rate_hz=RATE_HZ, window_s=2.0)
    samples = _tone(2.0, 3000.0, seed=1)
    ours = indices.window_indices(samples, RATE_HZ, config)
    assert ours.shape == (len(INDEX_NAMES),) == (60,)
    np.testing.assert_array_equal(ours, _maad_direct(samples, RATE_HZ, config))
    # A known answer independent of scikit-maad's code: a 3 kHz tone crosses zero 6000 times a second.
    assert ours[INDEX_NAMES.index("ZCR")] == pytest.approx(6000, rel=0.01)
    # Its energy is in the biophony band (1.5-8 kHz): NDSI > 0; a 700 Hz tone's is anthropophony: NDSI < 0.
    low = indices.window_indices(_tone(2.0, 700.0, seed=1), RATE_HZ, config)
    assert ours[INDEX_NAMES.index("NDSI")] > 0.5 and low[INDEX_NAMES.index("NDSI")] < -0.5


def test_silence_gives_nan_where_maad_has_no_value_and_never_fails():
    config = IndicesConfig(sample_rate_hz=RATE_HZ, window_s=1.0)
    values = indices.window_indices(np.zeros(RATE_HZ, np.float32), RATE_HZ, config)
    assert np.isnan(values).any() and not np.isinf(values).any()
    assert values[INDEX_NAMES.index("ZCR")] == 0


@pytest.fixture()
def recordings(tmp_path):
    """Two 16-bit files (4 s and 3 s) and a windows table of 1 s spans, tile ids out of file order, one
    window half past the end of its file (zero-padded) and one of a missing file."""
    first = _write_pcm16(tmp_path / "a.wav", _tone(4.0, 2000.0, seed=2))
    second = _write_pcm16(tmp_path / "b.wav", _tone(3.0, 5000.0, seed=3, amplitude=0.05))
    rows = [(10, "a.wav", 0.0), (11, "a.wav", 1.0), (12, "a.wav", 2.5), (13, "b.wav", 0.0),
            (14, "b.wav", 2.0), (15, "missing.wav", 0.0), (9, "a.wav", 3.5)]
    windows = pd.DataFrame(rows, columns=["tile_id", "path", "offset_s"])
    windows["path"] = [str(tmp_path / name) for name in windows["path"]]
    audio = {str(tmp_path / "a.wav"): first, str(tmp_path / "b.wav"): second}
    return windows, audio


def test_stage_rows_follow_tile_ids_and_hold_the_windows_own_indices(tmp_path, recordings):
    windows, audio = recordings
    config = IndicesConfig(sample_rate_hz=RATE_HZ, window_s=1.0, unit_max_tiles=3)
    summary = indices.compute_indices(windows, tmp_path / "out", config, show_progress=False)
    assert summary.finalized and summary.n_units == 3
    table = indices.read_indices(tmp_path / "out")
    assert table["tile_id"].tolist() == [9, 10, 11, 12, 13, 14, 15]
    by_id = table.set_index("tile_id")
    for tile_id, path, offset_s in windows.itertuples(index=False):
        if path not in audio:
            assert by_id.loc[tile_id, "skip_reason"] == "unreadable"
            assert by_id.loc[tile_id, list(INDEX_NAMES)].isna().all()
            continue
        start = round(offset_s * RATE_HZ)
        span = audio[path][start:start + RATE_HZ]
        expected = _maad_direct(np.pad(span, (0, RATE_HZ - len(span))), RATE_HZ, config)   # padded past the end
        assert pd.isna(by_id.loc[tile_id, "skip_reason"])
        np.testing.assert_allclose(by_id.loc[tile_id, list(INDEX_NAMES)].to_numpy(float), expected,
                                   rtol=1e-12, atol=1e-15, equal_nan=True)
    # The 5 kHz file is quieter than the 2 kHz one, and its tone sits above the 2 kHz one in frequency.
    assert by_id.loc[13, "LEQt"] < by_id.loc[10, "LEQt"] - 10


def test_stage_resumes_a_damaged_unit_with_the_same_bytes_and_refuses_another_plan(tmp_path, recordings):
    windows, _ = recordings
    config = IndicesConfig(sample_rate_hz=RATE_HZ, window_s=1.0, unit_max_tiles=3)
    out = tmp_path / "out"
    indices.compute_indices(windows, out, config, show_progress=False)
    reference = (out / indices.INDICES_FILE).read_bytes()
    (out / "config.json").unlink()
    (out / indices.INDICES_FILE).unlink()
    unit = out / indices.UNITS_DIR / "unit-000001.parquet"
    unit.write_bytes(b"\0" * unit.stat().st_size)          # a unit whose bytes no longer match its marker
    summary = indices.compute_indices(windows, out, config, show_progress=False)
    assert summary.units_written == 1 and summary.finalized
    assert (out / indices.INDICES_FILE).read_bytes() == reference
    with pytest.raises(PlanMismatchError, match="nperseg: 1024 -> 2048"):
        indices.compute_indices(windows, out, IndicesConfig(sample_rate_hz=RATE_HZ, window_s=1.0, nperseg=2048),
                                show_progress=False)


def test_store_windows_take_the_stores_rate_and_tile_length(stage_inputs, tmp_path, capsys):
    store = stage_inputs["store"]
    windows, rate_hz, tile_s = indices.store_windows(store)
    assert (rate_hz, tile_s) == (16000, 1.0) and len(windows) == stage_inputs["n_tiles"]
    # The command (as torchrun would run it): every tile of the store, in tile order, computed.
    arguments = indices.command_arguments(store, tmp_path / "indices", IndicesConfig(unit_max_tiles=8))
    assert indices.main(arguments) == 0
    table = indices.read_indices(tmp_path / "indices")
    assert table["tile_id"].tolist() == windows["tile_id"].tolist()
    assert table["skip_reason"].isna().all() and table["ZCR"].gt(0).all()


def test_command_fails_with_one_line_on_a_missing_store(tmp_path, capsys):
    assert indices.main(["--store", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("soundscape-ssl indices: error:") and "nope" in error[0]


# -- the known answer: scikit-maad's own indices.csv for the 96 Jura files ------------------------------

# Equal, within rtol 1e-12 (atol 1e-15 for MEANt, the mean of a detrended signal: 0 up to rounding).
KNOWN_EQUAL = ("ZCR", "MEANt", "VARt", "SKEWt", "KURTt", "BGNt", "SNRt", "MED", "Ht", "ACTtFraction",
               "ACTtCount", "ACTtMean", "EVNtCount", "MEANf", "VARf", "SKEWf", "KURTf", "NBPEAKS", "ENRf",
               "Hf", "ACI", "NDSI", "rBA", "AnthroEnergy", "BioEnergy", "BI", "ROU")
# Different, each for a reason the test checks or the module docstring of the stage states.
KNOWN_DIFFERENT = ("LEQt", "LEQf", "TFSD", "EVNtFraction", "EVNtMean", "ADI", "AEI", "EPS", "EAS", "ECU",
                   "ECV", "EPS_KURT", "EPS_SKEW", "BGNf", "SNRf", "LFC", "MFC", "HFC", "ACTspFract",
                   "ACTspCount", "ACTspMean", "EVNspFract", "EVNspMean", "EVNspCount", "H_Havrda",
                   "H_Renyi", "H_pairedShannon", "H_gamma", "H_GiniSimpson", "RAOQ", "AGI")
OLD_NAMES = {"AUDIO_MEAN": "MEANt", "AUDIO_VAR": "VARt", "AUDIO_SKEW": "SKEWt", "AUDIO_KURT": "KURTt",
             "SPEC_MEAN": "MEANf", "SPEC_VAR": "VARf", "SPEC_SKEW": "SKEWf", "SPEC_KURT": "KURTf"}


def read_reference_csv(path: Path) -> tuple[list[str], pd.DataFrame]:
    """scikit-maad's indices.csv: its rows alternate (values of file k, then file k's name, the first
    row holding both: the example's DataFrame.append misaligned them); returns file names and values
    in file order, with today's index names."""
    table = pd.read_csv(path)
    names = [Path(name).name for name in table["file"].dropna()]
    values = table[table["ACI"].notna()].drop(columns=["Date", "file"]).rename(columns=OLD_NAMES)
    assert len(names) == len(values) == 96
    return names, values.reset_index(drop=True)


@pytest.mark.realdata
def test_known_answer_scikit_maads_indices_csv_of_the_jura_recorder(tmp_path):
    if not (JURA / "indices.csv").is_file():
        pytest.skip(f"{JURA} not present")
    from maad import features, sound

    names, reference = read_reference_csv(JURA / "indices.csv")
    windows = pd.DataFrame({"tile_id": range(96), "path": [str(JURA / name) for name in names], "offset_s": 0.0})
    # Whole 10 s files at their own 22 kHz (no resampling), the example's settings; NDSI, rBA, the two
    # energies and BI in the CSV are scikit-maad's own formulas, not soundecology's (equal to 1e-15 with
    # r_compatible "maad", 70-1000 % off with "soundecology"), so the CSV's code did not apply them.
    config = IndicesConfig(sample_rate_hz=22000, window_s=10.0, r_compatible="maad")
    indices.compute_indices(windows, tmp_path / "jura", config, show_progress=False)
    ours = indices.read_indices(tmp_path / "jura")
    assert ours["skip_reason"].isna().all()
    assert set(KNOWN_EQUAL) | set(KNOWN_DIFFERENT) == set(reference.columns) & set(INDEX_NAMES)

    for name in KNOWN_EQUAL:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-12, atol=1e-15, err_msg=name)
    for name in KNOWN_DIFFERENT:
        gap = np.abs(ours[name] - reference[name]) / np.maximum(np.abs(reference[name]), 1e-12)
        assert np.nanmax(gap) > 1e-3, f"{name} now matches the CSV: move it to KNOWN_EQUAL"

    # LEQ: scikit-maad 1.5.1 fixed wav2pressure (Vadc / 2): levels are 20 log10(2) dB lower, exactly.
    for name in ("LEQt", "LEQf"):
        np.testing.assert_allclose(reference[name] - ours[name], 20 * math.log10(2), rtol=0, atol=1e-9)
    # Temporal events: the same events (EVNtCount equal); the CSV's events hold at most one envelope
    # frame fewer per file (e.g. 56 against 57 of 429 frames), an edge rule of the code that wrote it.
    frames = (ours["ACTtCount"] / ours["ACTtFraction"]).where(ours["ACTtFraction"] > 0)
    frame_gap = ((ours["EVNtFraction"] - reference["EVNtFraction"]) * frames).dropna().round(6)
    assert set(frame_gap) <= {0.0, 1.0} and (frame_gap == 1.0).any()
    # ADI is 0 for all 96 files in the CSV (the Shannon index of band occupancy: at most one 1 kHz band
    # over the threshold), 0.002-2.08 here; AEI, the Gini of the same band occupancy, differs with it.
    assert (reference["ADI"] == 0).all() and (ours["ADI"] > 0).all()
    # EPS is 1 for every file in the CSV (as in scikit-maad 1.1-1.4); 1.5 changed EPS (its docstring's
    # example went from 1.00 to 0.25).
    assert (reference["EPS"] == 1).all() and (ours["EPS"] < 1).all()
    # TFSD: all_spectral_alpha_indices now takes log10 of the spectrogram first (log=True, fixed in
    # the call); scikit-maad's tfsd with log=False on the same audio gives the CSV's values.
    for k in (0, 40, 95):
        samples, rate_hz = sound.load(str(JURA / names[k]), detrend=True)
        power, times_s, freqs_hz, _ = sound.spectrogram(samples, rate_hz, window="hann", nperseg=1024,
                                                        noverlap=512)
        old_tfsd = features.tfsd(np.sqrt(power), freqs_hz, times_s, flim=(1500, 8000), log=False)
        assert old_tfsd == pytest.approx(reference.loc[k, "TFSD"], rel=1e-12)
    # The rest (EAS ... AGI, BGNf, SNRf, cover, activity and events per bin, the order-3 entropies,
    # RAOQ) read the noise-reduced spectrogram or the noise estimate, which scikit-maad changed
    # before its first release that names the indices as today (1.1): the CSV's columns AUDIO_MEAN,
    # SPEC_MEAN ... come from a pre-1.1 development version; the released 1.1 and 1.3.12 already
    # give 1.5.2's values for these (compared by hand on the first files).
