"""Tests of the synthetic recorder archive: layout, determinism, and that what is annotated is
really planted (in time, frequency, habitat and diel pattern)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.signal
import soundfile as sf

from soundscape_ssl.recordings import synth
from soundscape_ssl.recordings.synth import SynthConfig, generate_archive, read_annotations, species_table

# A tiny archive: 3 recorders (1 grassland), one rainy day, three 10 s recordings.
TINY = dict(seed=0, recorders=3, grassland_recorders=1, days=1, recording_start_hours=(1.0, 5.5, 12.0),
            file_s=10.0, rainy_days=(0,))
# A modest archive over which every species is heard: 4 recorders, night/dawn/midday/dusk, 20 s.
MODEST = dict(seed=0, recorders=4, grassland_recorders=2, days=1, recording_start_hours=(0.5, 5.5, 12.0, 21.5),
              file_s=20.0, rainy_days=())
GRASSLAND_ONLY = {s.label for s in synth.BIRD_SPECIES if s.canopy_weight == 0}
CANOPY_ONLY = {s.label for s in synth.BIRD_SPECIES if s.grassland_weight == 0}


def _archive_bytes(root: Path) -> dict[str, bytes]:
    """Every file of an archive by relative path; config.json without the `workers` field."""
    contents = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "config.json":
            payload = json.loads(data)
            payload["config"].pop("workers")
            data = json.dumps(payload, sort_keys=True).encode()
        contents[path.relative_to(root).as_posix()] = data
    return contents


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_archive(tmp_path_factory.mktemp("tiny") / "archive", SynthConfig(**TINY))


@pytest.fixture(scope="module")
def modest_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_archive(tmp_path_factory.mktemp("modest") / "archive", SynthConfig(**MODEST))


def test_layout_matches_the_contract(tiny_archive: Path) -> None:
    config = SynthConfig(**TINY)
    wavs = sorted(tiny_archive.glob("*/*.wav"))
    assert len(wavs) == 3 * 1 * 3
    assert sorted(p.name for p in tiny_archive.iterdir() if p.is_dir()) == ["S4A10001", "S4A10002", "S4A10003"]
    for wav in wavs:
        assert re.fullmatch(rf"{wav.parent.name}_20240524_(010000|053000|120000)\.wav", wav.name)
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (44100, 1, "PCM_16", "WAV")
        assert info.frames == int(config.file_s * 44100)
    assert not list(tiny_archive.rglob("*.tmp"))

    sites = pd.read_csv(tiny_archive / "sites.csv")
    assert list(sites.columns) == ["recorder", "habitat", "lat", "lon"]
    assert sites["habitat"].tolist() == ["grassland", "canopy", "canopy"]
    assert np.allclose(sites["lat"], config.site_lat, atol=0.01)
    assert np.allclose(sites["lon"], config.site_lon, atol=0.01)

    annotations = read_annotations(tiny_archive)
    assert list(annotations.columns[:8]) == ["file", "recorder", "start_s", "end_s", "f_low_hz", "f_high_hz",
                                             "label", "kind"]
    assert set(annotations["kind"]) <= set(synth.EVENT_KINDS)
    assert {"bird", "rain"} <= set(annotations["kind"])  # the only day is a rainy day
    assert set(annotations["file"]) <= {p.relative_to(tiny_archive).as_posix() for p in wavs}

    written = json.loads((tiny_archive / "config.json").read_text())
    assert written["stage"] == synth.STAGE and written["status"] == "complete"
    assert written["n_annotations"] == len(annotations)
    assert SynthConfig(**written["config"]) == config


def test_same_config_is_byte_identical_and_workers_do_not_matter(tiny_archive: Path, tmp_path: Path) -> None:
    again = generate_archive(tmp_path / "parallel", SynthConfig(**TINY, workers=2))
    assert _archive_bytes(again) == _archive_bytes(tiny_archive)


def test_rerun_into_same_folder_is_identical_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    small = dict(TINY, recorders=1, grassland_recorders=0, recording_start_hours=(5.5,), file_s=4.0)
    out = generate_archive(tmp_path / "a", SynthConfig(**small))
    before = _archive_bytes(out)
    generate_archive(out, SynthConfig(**small))
    assert _archive_bytes(out) == before
    with pytest.raises(FileExistsError, match="different archive"):
        generate_archive(out, SynthConfig(**dict(small, seed=1)))
    foreign = tmp_path / "field_recordings"
    foreign.mkdir()
    (foreign / "S4A03895_20190522_060000.wav").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_archive(foreign, SynthConfig(**small))


def test_different_seed_gives_a_different_archive(tiny_archive: Path, tmp_path: Path) -> None:
    other = generate_archive(tmp_path / "seed1", SynthConfig(**dict(TINY, seed=1)))
    first, second = _archive_bytes(tiny_archive), _archive_bytes(other)
    wavs = [name for name in first if name.endswith(".wav")]
    assert wavs and all(first[name] != second[name] for name in wavs)
    assert first["annotations.csv"] != second["annotations.csv"]


def test_annotations_lie_inside_their_files_and_below_nyquist(modest_archive: Path, tiny_archive: Path) -> None:
    for archive, file_s in ((modest_archive, MODEST["file_s"]), (tiny_archive, TINY["file_s"])):
        annotations = read_annotations(archive)
        assert len(annotations) > 50
        assert (annotations["start_s"] >= 0).all() and (annotations["end_s"] <= file_s).all()
        assert (annotations["start_s"] < annotations["end_s"]).all()
        assert (annotations["f_low_hz"] >= synth.PLANT_F_MIN_HZ).all()
        assert (annotations["f_low_hz"] < annotations["f_high_hz"]).all()
        assert (annotations["f_high_hz"] <= synth.PLANT_F_MAX_HZ).all()
        assert (annotations["f_high_hz"] < 44100 / 2).all()
        assert annotations["snr_db"].notna().all()
        birds = annotations[annotations["kind"] == "bird"]
        expected_prefix = birds["recorder"] + "-" + birds["label"] + "-"
        assert all(i.startswith(p) for i, p in zip(birds["individual_id"], expected_prefix))
        assert (birds["distance_m"] > 0).all()


def test_every_species_is_heard_and_habitat_preferences_hold(modest_archive: Path) -> None:
    annotations = read_annotations(modest_archive)
    birds = annotations[annotations["kind"] == "bird"]
    assert set(birds["label"]) == {s.label for s in synth.BIRD_SPECIES}
    assert len(synth.BIRD_SPECIES) >= 8
    assert "insect" in set(annotations["kind"])
    assert GRASSLAND_ONLY and CANOPY_ONLY
    assert not set(birds.loc[birds["habitat"] == "canopy", "label"]) & GRASSLAND_ONLY
    assert not set(birds.loc[birds["habitat"] == "grassland", "label"]) & CANOPY_ONLY
    sites = pd.read_csv(modest_archive / "sites.csv").set_index("recorder")["habitat"]
    assert (annotations["recorder"].map(sites) == annotations["habitat"]).all()


def test_dawn_chorus_outsings_midday_and_night(modest_archive: Path) -> None:
    annotations = read_annotations(modest_archive)
    birds = annotations[annotations["kind"] == "bird"]
    hours_recorded = MODEST["recorders"] * MODEST["file_s"] / 3600  # per recording slot
    per_hour = birds["file"].str.extract(r"_(\d{6})\.wav$")[0].value_counts() / hours_recorded
    assert per_hour["053000"] > 2 * per_hour.get("120000", 0.0)
    assert per_hour["053000"] > 2 * per_hour.get("003000", 0.0)
    nocturnal = birds[birds["label"].isin({"hooter", "churrer"})]
    assert set(nocturnal["file"].str[-10:-4]) <= {"003000", "213000", "053000"}


def test_individuals_keep_their_own_pitch(modest_archive: Path) -> None:
    """Individuals differ (fixed offsets) more than one individual's renditions do (jitter)."""
    birds = read_annotations(modest_archive)
    birds = birds[birds["label"].isin({"upsweeper", "downsweeper", "songster", "chipper"})]
    spread_within = birds.groupby(["label", "individual_id"])["f_high_hz"].std().groupby("label").mean()
    spread_between = birds.groupby(["label", "individual_id"])["f_high_hz"].mean().groupby("label").std()
    assert (spread_between > 1.5 * spread_within).all(), (spread_between, spread_within)


def _spectrogram_db(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectrogram power (dB) of a file, its frequencies and frame times."""
    samples, sr = sf.read(path, dtype="float64")
    freqs, times, power = scipy.signal.spectrogram(samples, fs=sr, nperseg=1024, noverlap=512)
    return freqs, times, 10 * np.log10(power + 1e-20)


def test_planted_events_are_really_in_the_audio(modest_archive: Path) -> None:
    """In the box of a clearly audible bird, the band is louder than the same band where no
    event of any kind covers it."""
    annotations = read_annotations(modest_archive)
    audible = annotations[(annotations["kind"] == "bird") & (annotations["snr_db"] >= 10)
                          & (annotations["end_s"] - annotations["start_s"] >= 0.1)]
    assert len(audible) >= 20
    gains_db, snrs = [], []
    for file, events in audible.groupby("file"):
        freqs, times, power_db = _spectrogram_db(modest_archive / file)
        everything = annotations[annotations["file"] == file]
        for event in events.itertuples():
            band = (freqs >= event.f_low_hz) & (freqs <= event.f_high_hz)
            inside = (times >= event.start_s) & (times <= event.end_s)
            covered = np.zeros_like(times, dtype=bool)
            for other in everything.itertuples():
                if other.f_low_hz < event.f_high_hz and other.f_high_hz > event.f_low_hz:
                    covered |= (times >= other.start_s - 0.05) & (times <= other.end_s + 0.05)
            if not (~covered).any():
                continue
            box_db = 10 * np.log10(np.mean(10 ** (power_db[np.ix_(band, inside)] / 10)))
            quiet_db = 10 * np.log10(np.mean(10 ** (power_db[np.ix_(band, ~covered)] / 10)))
            gains_db.append(box_db - quiet_db)
            snrs.append(event.snr_db)
    gains_db = np.array(gains_db)
    assert len(gains_db) >= 15
    assert np.mean(gains_db > 6.0) >= 0.95, np.sort(gains_db)[:10]
    assert np.corrcoef(snrs, gains_db)[0, 1] > 0.3  # louder by annotation is louder in the audio


def test_rendered_calls_stay_inside_their_boxes_without_clicks() -> None:
    sr = 44100
    rng = np.random.default_rng(7)
    for species in synth.BIRD_SPECIES:
        for variant in (0, 1):
            individual = synth.Individual(species.label, "test", freq_scale=1.08, tempo_scale=0.85,
                                          rate_scale=1.1, variant=variant, distance_m=20.0, level_offset_db=0.0)
            for call in species.render(individual, rng, sr):
                spectrum = np.abs(np.fft.rfft(call.signal.astype(np.float64))) ** 2
                freqs = np.fft.rfftfreq(call.signal.size, 1 / sr)
                in_box = spectrum[(freqs >= call.f_low_hz) & (freqs <= call.f_high_hz)].sum() / spectrum.sum()
                assert in_box > 0.995, (species.label, in_box)
                assert np.max(np.abs(call.signal)) == pytest.approx(1.0, abs=1e-5)
                assert max(abs(call.signal[0]), abs(call.signal[-1])) < 1e-3, species.label


def test_species_table_describes_every_planted_label(modest_archive: Path) -> None:
    table = species_table()
    assert table["label"].is_unique
    assert (table["kind"] == "bird").sum() >= 8
    assert set(read_annotations(modest_archive)["label"]) <= set(table["label"])
    assert ((table["f_low_hz"] >= 50) & (table["f_high_hz"] <= 15000) & (table["f_low_hz"] < table["f_high_hz"])).all()
    habitat = table.set_index("label")["habitat_preference"]
    assert all(habitat[label] == "grassland only" for label in GRASSLAND_ONLY)
    assert all(habitat[label] == "canopy only" for label in CANOPY_ONLY)


def test_diel_patterns_peak_where_they_should() -> None:
    def activity(pattern: str, hour: float) -> float:
        return synth.diel_activity(pattern, hour, sunrise_hour=5.25, sunset_hour=21.25)

    assert activity("dawn", 5.6) > 4 * activity("dawn", 12.0) > 4 * activity("dawn", 1.0)
    assert activity("dawn", 20.8) > activity("dawn", 12.0)  # the smaller evening peak
    assert activity("nocturnal", 1.0) > 10 * activity("nocturnal", 12.0)
    assert activity("afternoon_insect", 15.5) > 0.8 and activity("afternoon_insect", 1.0) < 0.01
    with pytest.raises(ValueError, match="unknown diel pattern"):
        activity("sometimes", 3.0)


def test_config_validation_and_list_fields() -> None:
    config = SynthConfig(recording_start_hours=[5.5, 1.0], rainy_days=[0])
    assert config.recording_start_hours == (5.5, 1.0) and config.rainy_days == (0,)
    assert config.sorted_start_hours == (1.0, 5.5)
    for bad in (dict(recorders=0), dict(grassland_recorders=10), dict(sample_rate_hz=22050),
                dict(recording_start_hours=(25.0,)), dict(recording_start_hours=(5.0, 5.0)),
                dict(recording_start_hours=(5.0, 5.01), file_s=60.0),
                dict(start_date="24/05/2024"), dict(workers=0), dict(file_s=0.0)):
        with pytest.raises(ValueError, match="invalid SynthConfig"):
            SynthConfig(**bad)


def _rare_tiles_touched(config: SynthConfig, tile_s: float = 3.0) -> tuple[list[str], set[tuple[str, int]]]:
    """The planned rare events' labels and every (file, tile) a rare event could touch (its
    longest rendition), on the tile grid from 0 s, without rendering anything."""
    labels, tiles = [], set()
    for plan in synth.plan_files(config):
        for label, start_s in synth.plan_rare_events(config, plan):
            labels.append(label)
            end_s = start_s + synth._RARE_BY_LABEL[label].max_duration_s
            tiles.update((plan.relpath, k) for k in range(int(start_s // tile_s), math.ceil(end_s / tile_s)))
    return labels, tiles


def test_default_archive_has_every_rare_event_on_at_most_half_a_percent_of_tiles() -> None:
    config = SynthConfig()   # the demo's archive: 9 recorders x 2 days x 8 x 60 s = 2,880 tiles of 3 s
    n_tiles = config.recorders * config.days * len(config.recording_start_hours) * int(config.file_s // 3.0)
    labels, tiles = _rare_tiles_touched(config)
    assert n_tiles == 2880
    assert set(labels) == set(synth.RARE_LABELS) == {"bellbird", "chainsaw", "gunshot"}
    assert 5 <= len(labels) and len(tiles) <= 0.005 * n_tiles, (len(labels), len(tiles))
    assert _rare_tiles_touched(SynthConfig(rare_events_per_hour=0.0)) == ([], set())


def test_rare_events_are_annotated_and_change_nothing_else(tmp_path: Path) -> None:
    small = dict(seed=0, recorders=1, grassland_recorders=0, days=1, recording_start_hours=(5.5, 12.0),
                 file_s=20.0, rainy_days=())
    with_rare = generate_archive(tmp_path / "rare", SynthConfig(**small, rare_events_per_hour=600.0))
    without = generate_archive(tmp_path / "none", SynthConfig(**small, rare_events_per_hour=0.0))
    annotated, plain = read_annotations(with_rare), read_annotations(without)
    is_rare = annotated["label"].isin(synth.RARE_LABELS)
    rare = annotated[is_rare]
    assert len(rare) >= 3 and rare["label"].nunique() >= 2
    kinds = {s.label: s.kind for s in synth.RARE_SOURCES}
    assert (rare["kind"] == rare["label"].map(kinds)).all() and set(kinds.values()) <= set(synth.EVENT_KINDS)
    assert (rare["start_s"] >= 0).all() and (rare["end_s"] <= small["file_s"]).all()
    assert rare["snr_db"].notna().all() and (rare["snr_db"] > 0).any()
    # Every other event is drawn exactly as before (their SNRs may change where a rare event overlaps).
    keep = [c for c in synth.ANNOTATION_COLUMNS if c != "snr_db"]
    pd.testing.assert_frame_equal(annotated.loc[~is_rare, keep].reset_index(drop=True), plain[keep])
    # The audio differs only inside the rare events' spans, and there it does.
    for wav in sorted(without.glob("*/*.wav")):
        relpath = wav.relative_to(without).as_posix()
        a, sr = sf.read(with_rare / relpath, dtype="int32")
        b, _ = sf.read(wav, dtype="int32")
        inside = np.zeros(a.size, dtype=bool)
        for event in rare[rare["file"] == relpath].itertuples():
            inside[int(event.start_s * sr) - 1:int(event.end_s * sr) + 1] = True
        assert np.array_equal(a[~inside], b[~inside]), relpath
        assert inside.any() == (a != b).any(), relpath


def test_rare_sounds_stay_inside_their_boxes_without_clicks() -> None:
    rng = np.random.default_rng(3)
    for source in synth.RARE_SOURCES:
        for _ in range(3):
            signal, f_low, f_high = source.render(rng, 44100)
            spectrum = np.abs(np.fft.rfft(signal.astype(np.float64))) ** 2
            freqs = np.fft.rfftfreq(signal.size, 1 / 44100)
            assert spectrum[(freqs >= f_low) & (freqs <= f_high)].sum() / spectrum.sum() > 0.995, source.label
            assert synth.PLANT_F_MIN_HZ <= f_low < f_high <= synth.PLANT_F_MAX_HZ
            assert signal.size / 44100 <= source.max_duration_s, source.label
            assert max(abs(signal[0]), abs(signal[-1])) < 1e-3, source.label
