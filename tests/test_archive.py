"""Tests of the archive inventory: names, headers, quarantine reasons, sites join, round trip."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundscape_ssl.recordings import archive
from soundscape_ssl.recordings.archive import (
    FILES_COLUMNS, QUARANTINE_COLUMNS, QUARANTINE_REASONS, ArchiveInventory, parse_recording_name,
    read_wav_header, scan_archive,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "soundscapes"


# --------------------------------------------------------------------------- helpers


def riff_chunk(chunk_id: bytes, body: bytes, size: int | None = None, pad: bool = True) -> bytes:
    """One RIFF chunk; `size` overrides the declared size (to make lying headers)."""
    declared = len(body) if size is None else size
    padding = b"\x00" if pad and len(body) % 2 else b""
    return chunk_id + struct.pack("<I", declared) + body + padding


def fmt_pcm(channels: int = 1, rate_hz: int = 8000, bits: int = 16, tag: int = 1) -> bytes:
    block_align = channels * ((bits + 7) // 8)
    return riff_chunk(b"fmt ", struct.pack("<HHIIHH", tag, channels, rate_hz,
                                           rate_hz * block_align, block_align, bits))


def wav_bytes(*chunks: bytes, riff_size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def tone(n_frames: int, channels: int = 1) -> np.ndarray:
    t = np.arange(n_frames) / 8000.0
    signal = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    return np.repeat(signal[:, None], channels, axis=1)


def scan(root: Path, **kwargs) -> ArchiveInventory:
    return scan_archive(root, show_progress=False, **kwargs)


def quarantined(inventory: ArchiveInventory, relpath: str) -> pd.Series:
    rows = inventory.quarantine[inventory.quarantine["relpath"] == relpath]
    assert len(rows) == 1, f"{relpath} not quarantined: {inventory.quarantine}"
    assert relpath not in set(inventory.files["relpath"])
    return rows.iloc[0]


def file_row(inventory: ArchiveInventory, relpath: str) -> pd.Series:
    rows = inventory.files[inventory.files["relpath"] == relpath]
    assert len(rows) == 1, f"{relpath} not in files; quarantine: {inventory.quarantine}"
    return rows.iloc[0]


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize("stem, parent, recorder, start", [
    ("S4A03895_20190522_060000", "jura", "S4A03895", "2019-05-22 06:00:00"),
    ("SMM01234_20200101_235959", "x", "SMM01234", "2020-01-01 23:59:59"),
    ("S4A-0123_0+1_20190522_001500", "x", "S4A-0123", "2019-05-22 00:15:00"),
    ("SM4BAT_1_20210301_120000", "x", "SM4BAT", "2021-03-01 12:00:00"),
    ("20210524_053000", "AM07", "AM07", "2021-05-24 05:30:00"),
    ("S4A03895_20191340_000000", "x", "S4A03895", None),  # month 13: recorder kept, no time
    ("birds_10s", "opensoundscape", "opensoundscape", None),
    ("BirdVox-full-night_unit03_00-19-45_01min", "birdvox", "birdvox", None),
    ("S4A03895_20190522_0600", "jura", "jura", None),  # HHMM only: not a Song Meter name
])
def test_parse_recording_name(stem, parent, recorder, start):
    got_recorder, got_start = parse_recording_name(stem, parent)
    assert got_recorder == recorder
    assert got_start == (None if start is None else pd.Timestamp(start).to_pydatetime())


def test_names_through_scan_with_uppercase_audiomoth_extension(tmp_path):
    (tmp_path / "AM07").mkdir()
    (tmp_path / "site_b").mkdir()
    sf.write(tmp_path / "AM07" / "20210524_053000.WAV", tone(800), 8000, subtype="PCM_16")
    sf.write(tmp_path / "site_b" / "S4A03895_0+1_20190522_001500.wav", tone(400), 8000)
    sf.write(tmp_path / "site_b" / "dawn chorus.wav", tone(400), 8000)
    inventory = scan(tmp_path)
    assert list(inventory.files["relpath"]) == [
        "AM07/20210524_053000.WAV", "site_b/S4A03895_0+1_20190522_001500.wav",
        "site_b/dawn chorus.wav"]
    assert list(inventory.files["recorder"]) == ["AM07", "S4A03895", "site_b"]
    starts = inventory.files["start_time"]
    assert starts.iloc[0] == pd.Timestamp("2021-05-24 05:30:00")
    assert starts.iloc[1] == pd.Timestamp("2019-05-22 00:15:00")
    assert pd.isna(starts.iloc[2])
    assert inventory.files["duration_s"].tolist() == [0.1, 0.05, 0.05]


# --------------------------------------------------------------------------- valid formats


@pytest.mark.parametrize("name, fmt, subtype, channels, expected_format, bit_depth", [
    ("pcm16.wav", "WAV", "PCM_16", 1, "WAV", 16),
    ("pcm24.wav", "WAV", "PCM_24", 1, "WAV", 24),
    ("pcm32.wav", "WAV", "PCM_32", 1, "WAV", 32),
    ("u8.wav", "WAV", "PCM_U8", 1, "WAV", 8),
    ("float.wav", "WAV", "FLOAT", 1, "WAV", 32),  # libsndfile adds fact + PEAK chunks
    ("double.wav", "WAV", "DOUBLE", 1, "WAV", 64),
    ("ulaw.wav", "WAV", "ULAW", 1, "WAV", 8),
    ("ima_adpcm.wav", "WAV", "IMA_ADPCM", 1, "WAV", None),  # codec left to libsndfile
    ("stereo.wav", "WAV", "PCM_16", 2, "WAV", 16),
    ("extensible.wav", "WAVEX", "PCM_24", 2, "WAV", 24),
    ("rf64.wav", "RF64", "PCM_16", 1, "RF64", 16),
    ("wave64_named.wav", "W64", "PCM_16", 1, "W64", 16),  # not RIFF: read via libsndfile
    ("lossless.flac", "FLAC", "PCM_16", 1, "FLAC", 16),
    ("lossless24.flac", "FLAC", "PCM_24", 2, "FLAC", 24),
])
def test_valid_files_match_libsndfile(tmp_path, name, fmt, subtype, channels, expected_format,
                                      bit_depth):
    path = tmp_path / "rec" / name
    path.parent.mkdir()
    sf.write(path, tone(1234, channels), 8000, format=fmt, subtype=subtype)
    inventory = scan(tmp_path)
    assert inventory.quarantine.empty, inventory.quarantine["detail"].tolist()
    row = file_row(inventory, f"rec/{name}")
    info = sf.info(str(path))
    assert row["frames"] == info.frames
    # ADPCM stores whole blocks: libsndfile reports the padded length of the last block.
    assert info.frames == 1234 or (subtype == "IMA_ADPCM" and 1234 < info.frames < 1234 + 505)
    assert row["sample_rate_hz"] == 8000
    assert row["channels"] == channels
    assert row["subtype"] == info.subtype == subtype
    assert row["format"] == expected_format
    assert pd.isna(row["bit_depth"]) if bit_depth is None else row["bit_depth"] == bit_depth
    assert row["duration_s"] == pytest.approx(info.frames / 8000)
    assert row["bytes"] == path.stat().st_size
    assert row["path"] == str(path)


def test_mp3_read_from_its_header_and_checked_for_truncation(tmp_path, caplog):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    rec = tmp_path / "rec"
    rec.mkdir()
    path = rec / "S4A00001_20200101_000000.mp3"
    sf.write(path, tone(8000 * 2).astype("float32"), 8000, format="MP3",
             subtype="MPEG_LAYER_III")
    mp3 = path.read_bytes()
    write(rec / "cut.mp3", mp3[: len(mp3) // 2])
    # Without its first frame (the Xing header) the length can only be estimated.
    second_frame = mp3.find(mp3[:2], 4)
    write(rec / "no_xing.mp3", mp3[second_frame:])
    inventory = scan(tmp_path)
    row = file_row(inventory, "rec/S4A00001_20200101_000000.mp3")
    assert row["format"] == "MP3"
    assert row["subtype"] == "MPEG_LAYER_III"
    assert pd.isna(row["bit_depth"])
    assert row["frames"] == sf.info(str(path)).frames == 16000  # exact: LAME writes a Xing header
    assert row["recorder"] == "S4A00001"
    # Cut in half: listed with the frames that decode (what every stage reads) and a note.
    cut = file_row(inventory, "rec/cut.mp3")
    decoded = len(sf.read(rec / "cut.mp3", dtype="float32")[0])
    assert 0.3 * 16000 < decoded < 0.6 * 16000           # about half (LAME pads its first frames)
    assert (cut["frames"], cut["duration_s"]) == (decoded, decoded / 8000)
    assert cut["damage"] == "truncated" and "about 50% of the audio" in cut["damage_detail"]
    assert f"{decoded} frames ({decoded / 8000:.3f} s) are readable" in cut["damage_detail"]
    assert pd.isna(row["damage"])
    assert file_row(inventory, "rec/no_xing.mp3")["frames"] > 0
    assert "1 MP3 files have no Xing/Info/VBRI header" in caplog.text


def test_hand_built_headers_odd_chunk_and_valid_bits(tmp_path):
    samples = np.arange(-50, 50, dtype="<i2").tobytes()  # 100 frames, 16-bit mono
    # A LIST chunk of odd size, padded as RIFF requires, and a wamd-like chunk before fmt.
    padded = wav_bytes(riff_chunk(b"wamd", b"SM4 metadata!"), fmt_pcm(),
                       riff_chunk(b"LIST", b"INFOICMT\x05\x00\x00\x00hello"),
                       riff_chunk(b"data", samples), riff_size=0xFFFFFFFF)
    # EXTENSIBLE: 20 valid bits in a 24-bit container, sub-format PCM.
    extensible_fmt = riff_chunk(b"fmt ", struct.pack(
        "<HHIIHHHHI16s", 0xFFFE, 1, 8000, 8000 * 3, 3, 24, 22, 20, 4,
        b"\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"))
    extensible = wav_bytes(extensible_fmt, riff_chunk(b"data", bytes(3 * 100)))
    write(tmp_path / "r" / "padded.wav", padded)
    write(tmp_path / "r" / "extensible.wav", extensible)
    inventory = scan(tmp_path)
    assert inventory.quarantine.empty, inventory.quarantine["detail"].tolist()
    row = file_row(inventory, "r/padded.wav")
    assert (row["frames"], row["subtype"], row["bit_depth"]) == (100, "PCM_16", 16)
    assert sf.info(str(tmp_path / "r" / "padded.wav")).frames == 100
    row = file_row(inventory, "r/extensible.wav")
    assert (row["frames"], row["subtype"], row["bit_depth"]) == (100, "PCM_24", 20)
    header = read_wav_header(tmp_path / "r" / "padded.wav")
    assert header.data_offset_bytes == len(padded) - len(samples)


# --------------------------------------------------------------------------- quarantine


@pytest.fixture()
def bad_archive(tmp_path) -> Path:
    """An archive with one good file and one file per quarantine reason."""
    rec = tmp_path / "REC01"
    rec.mkdir()
    sf.write(rec / "good.wav", tone(800), 8000)
    samples = tone(800)
    pcm = (samples[:, 0] * 32767).astype("<i2").tobytes()  # 800 frames, 1600 B
    write(rec / "empty.wav", b"")
    write(rec / "random.wav", b"\x13\x37" + np.random.default_rng(0).bytes(4094))
    write(rec / "notes.flac", b"field notes, not audio\n" * 20)
    write(rec / "notes.mp3", b"field notes, not audio\n" * 20)
    write(rec / "movie.wav", b"RIFF" + struct.pack("<I", 100) + b"AVI " + bytes(100))
    # data chunk claims 1600 B, the file holds 600 B of them: 300 frames readable (listed)
    write(rec / "cut.wav", wav_bytes(fmt_pcm(), riff_chunk(b"data", pcm[:600], size=1600)))
    # header only, data size 0
    write(rec / "header_only.wav", wav_bytes(fmt_pcm(), riff_chunk(b"data", b"")))
    # header claims audio, none is present
    write(rec / "claims_only.wav", wav_bytes(fmt_pcm(), riff_chunk(b"data", b"", size=1600)))
    # recorder died before finalising the header: RIFF and data sizes are placeholders
    write(rec / "unfinalised.wav", wav_bytes(fmt_pcm(), riff_chunk(b"data", pcm, size=0xFFFFFFFF),
                                             riff_size=0xFFFFFFFF))
    write(rec / "unfinalised_zero.wav", wav_bytes(fmt_pcm(), riff_chunk(b"data", pcm, size=0),
                                                  riff_size=0))
    write(rec / "no_fmt.wav", wav_bytes(riff_chunk(b"data", pcm)))
    # an odd-sized chunk without its pad byte: the chunk walk derails (libsndfile fails too)
    write(rec / "unpadded.wav", wav_bytes(fmt_pcm(), riff_chunk(b"junk", b"abc", pad=False),
                                          riff_chunk(b"data", pcm)))
    write(rec / "zero_channels.wav", wav_bytes(fmt_pcm(channels=0), riff_chunk(b"data", pcm)))
    # MPEG-in-WAV (format tag 0x55) with a garbage payload: nothing can decode it
    write(rec / "mpeg_in_wav.wav", wav_bytes(fmt_pcm(tag=0x55, bits=0),
                                             riff_chunk(b"data", bytes(400))))
    # a FLAC whose second half is missing
    sf.write(rec / "full.flac", np.random.default_rng(1).uniform(-0.5, 0.5, 80000), 8000)
    flac = (rec / "full.flac").read_bytes()
    (rec / "full.flac").unlink()
    write(rec / "cut.flac", flac[: len(flac) // 2])
    os.symlink(rec / "gone.wav", rec / "dangling.wav")
    write(rec / "._good.wav", b"\x00\x05\x16\x07 AppleDouble")  # macOS companion: skipped
    write(rec / "notes.txt", b"not an audio extension: ignored")
    return tmp_path


EXPECTED_REASONS = {
    "REC01/empty.wav": "empty_file",
    "REC01/random.wav": "not_audio",
    "REC01/notes.flac": "not_audio",
    "REC01/notes.mp3": "not_audio",
    "REC01/movie.wav": "not_audio",
    "REC01/header_only.wav": "no_frames",
    "REC01/claims_only.wav": "no_frames",
    "REC01/unfinalised_zero.wav": "truncated",   # libsndfile reads a data size of 0 as empty
    "REC01/no_fmt.wav": "bad_header",
    "REC01/zero_channels.wav": "bad_header",
    "REC01/unpadded.wav": "bad_header",
    "REC01/mpeg_in_wav.wav": "unsupported_format",
    "REC01/dangling.wav": "unreadable",
}
# Cut short but readable up to the break: listed with their readable frames and a damage note.
DAMAGED = ("REC01/cut.flac", "REC01/cut.wav", "REC01/unfinalised.wav")


def test_every_bad_file_is_quarantined_with_its_reason(bad_archive):
    inventory = scan(bad_archive)
    assert list(inventory.files["relpath"]) == sorted(("REC01/good.wav",) + DAMAGED)
    got = dict(zip(inventory.quarantine["relpath"], inventory.quarantine["reason"]))
    assert got == EXPECTED_REASONS
    assert set(got.values()) <= set(QUARANTINE_REASONS)
    assert list(inventory.quarantine["relpath"]) == sorted(EXPECTED_REASONS)
    details = dict(zip(inventory.quarantine["relpath"], inventory.quarantine["detail"]))
    assert "800 frames (0.100 s) are present" in details["REC01/unfinalised_zero.wav"]
    assert "no frame of it can be decoded" in details["REC01/unfinalised_zero.wav"]
    assert "0x0055" in details["REC01/mpeg_in_wav.wav"]
    assert "broken symbolic link" in details["REC01/dangling.wav"]
    sizes = dict(zip(inventory.quarantine["relpath"], inventory.quarantine["bytes"]))
    assert sizes["REC01/empty.wav"] == 0
    assert sizes["REC01/random.wav"] == 4096


def test_files_cut_short_are_listed_with_their_readable_frames(bad_archive):
    """A truncated WAV, an unfinalised one and a FLAC missing its second half are read up to the
    break by every stage: listed with the frames really there and a note, not quarantined."""
    inventory = scan(bad_archive)
    files = inventory.files.set_index("relpath")
    assert pd.isna(files.loc["REC01/good.wav", "damage"])
    assert (files.loc[list(DAMAGED), "damage"] == "truncated").all()
    cut, unfinalised = files.loc["REC01/cut.wav"], files.loc["REC01/unfinalised.wav"]
    assert (cut["frames"], cut["duration_s"]) == (300, 300 / 8000)
    assert cut["damage_detail"] == ("data chunk claims 800 frames (0.100 s) but only 300 frames "
                                    "(0.037 s) are present; read up to the break: 300 frames "
                                    "(0.037 s) are readable")
    assert unfinalised["frames"] == 800 and "0xFFFFFFFF" in unfinalised["damage_detail"]
    assert sf.info(str(bad_archive / "REC01" / "cut.wav")).frames == 300    # libsndfile agrees
    flac = files.loc["REC01/cut.flac"]
    assert 30000 < flac["frames"] < 45000 and flac["format"] == "FLAC"    # of 80000
    assert "last frame cannot be decoded" in flac["damage_detail"]
    with sf.SoundFile(str(bad_archive / "REC01" / "cut.flac")) as handle:   # those frames decode
        assert len(handle.read(int(flac["frames"]), dtype="float32")) == flac["frames"]


def test_unreadable_file_is_quarantined_not_raised(bad_archive, monkeypatch):
    real_open = archive._open_for_reading

    def refuse_good(path):
        if path.endswith("good.wav"):
            raise PermissionError(13, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(archive, "_open_for_reading", refuse_good)
    inventory = scan(bad_archive)
    assert list(inventory.files["relpath"]) == list(DAMAGED)
    row = quarantined(inventory, "REC01/good.wav")
    assert row["reason"] == "unreadable"
    assert "Permission denied" in row["detail"]
    assert row["bytes"] == (bad_archive / "REC01" / "good.wav").stat().st_size


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_directory_and_file_by_permissions(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    sf.write(locked / "a.wav", tone(100), 8000)
    sf.write(tmp_path / "b.wav", tone(100), 8000)
    os.chmod(tmp_path / "b.wav", 0)
    os.chmod(locked, 0)
    try:
        inventory = scan(tmp_path)
    finally:
        os.chmod(locked, 0o755)
    assert dict(zip(inventory.quarantine["relpath"], inventory.quarantine["reason"])) == {
        "b.wav": "unreadable", "locked": "unreadable"}


def test_read_wav_header_raises_value_error_with_reason(bad_archive):
    with pytest.raises(ValueError, match="truncated"):
        read_wav_header(bad_archive / "REC01" / "cut.wav")
    header = read_wav_header(bad_archive / "REC01" / "good.wav")
    assert (header.frames, header.sample_rate_hz, header.subtype) == (800, 8000, "PCM_16")


# --------------------------------------------------------------------------- tables


def test_tables_follow_the_contract_and_threads_do_not_change_them(bad_archive):
    single = scan(bad_archive, num_threads=1)
    threaded = scan(bad_archive, num_threads=4)
    pd.testing.assert_frame_equal(single.files, threaded.files)
    pd.testing.assert_frame_equal(single.quarantine, threaded.quarantine)
    assert tuple(single.files.columns) == FILES_COLUMNS
    assert tuple(single.quarantine.columns) == QUARANTINE_COLUMNS
    assert str(single.files["start_time"].dtype) == "datetime64[ns]"
    assert str(single.files["bit_depth"].dtype) == "Int64"
    for column in ("sample_rate_hz", "channels", "frames", "bytes"):
        assert single.files[column].dtype == np.int64
    assert single.quarantine["bytes"].dtype == np.int64


def test_empty_archive_gives_empty_typed_tables(tmp_path):
    inventory = scan(tmp_path)
    assert inventory.files.empty and inventory.quarantine.empty
    assert tuple(inventory.files.columns) == FILES_COLUMNS
    assert str(inventory.files["start_time"].dtype) == "datetime64[ns]"


def test_sites_join_auto_and_explicit(tmp_path):
    for recorder in ("S4A00001", "S4A00002", "S4A00003"):
        (tmp_path / recorder).mkdir()
        sf.write(tmp_path / recorder / f"{recorder}_20210601_050000.wav", tone(80), 8000)
    (tmp_path / "sites.csv").write_text(
        "recorder,habitat,lat,lon\nS4A00001,grassland,46.5,6.1\nS4A00002, canopy,46.6,6.2\n"
        "S4A09999,canopy,0,0\n")
    inventory = scan(tmp_path)
    assert inventory.config.sites_csv == str(tmp_path / "sites.csv")
    files = inventory.files.set_index("recorder")
    assert files.loc["S4A00001", "habitat"] == "grassland"
    assert files.loc["S4A00002", "habitat"] == "canopy"  # whitespace after the comma ignored
    assert files.loc["S4A00002", "lat"] == 46.6 and files.loc["S4A00002", "lon"] == 6.2
    assert pd.isna(files.loc["S4A00003", "habitat"]) and np.isnan(files.loc["S4A00003", "lat"])

    other = tmp_path.parent / f"{tmp_path.name}_other_sites.csv"
    other.write_text("recorder,habitat,lat,lon\nS4A00003,wetland,1.5,2.5\n")
    explicit = scan(tmp_path, sites_csv=other).files.set_index("recorder")
    assert explicit.loc["S4A00003", "habitat"] == "wetland"
    assert pd.isna(explicit.loc["S4A00001", "habitat"])

    with pytest.raises(FileNotFoundError):
        scan(tmp_path, sites_csv=tmp_path / "missing.csv")
    other.write_text("recorder,habitat,lat,lon\nS4A00003,a,1,2\nS4A00003,b,1,2\n")
    with pytest.raises(ValueError, match="more than once"):
        scan(tmp_path, sites_csv=other)


def test_save_and_load_round_trip(bad_archive, tmp_path_factory):
    (bad_archive / "sites.csv").write_text("recorder,habitat,lat,lon\nREC01,canopy,1.0,2.0\n")
    inventory = scan(bad_archive)
    out_dir = inventory.save(tmp_path_factory.mktemp("run") / "inventory")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json", "files.parquet", "quarantine.parquet"]
    loaded = ArchiveInventory.load(out_dir)
    pd.testing.assert_frame_equal(loaded.files, inventory.files)
    pd.testing.assert_frame_equal(loaded.quarantine, inventory.quarantine)
    assert loaded.config == inventory.config
    payload = json.loads((out_dir / "config.json").read_text())
    assert payload["stage"] == "inventory"
    assert payload["n_files"] == 1 + len(DAMAGED) and payload["n_damaged"] == len(DAMAGED)
    assert payload["n_quarantined"] == len(EXPECTED_REASONS)
    assert payload["quarantine_reasons"]["truncated"] == 1


# --------------------------------------------------------------------------- real recordings


@pytest.mark.realdata
def test_real_soundscapes_folder():
    if not (REAL_DATA / "manifest.csv").is_file():
        pytest.skip(f"{REAL_DATA} is absent")
    inventory = scan(REAL_DATA)
    manifest = pd.read_csv(REAL_DATA / "manifest.csv")
    # Every file of the manifest is a valid recording: nothing may be quarantined.
    assert inventory.quarantine.empty, inventory.quarantine[["relpath", "detail"]]
    files = inventory.files.set_index("relpath")
    assert sorted(files.index) == sorted(manifest["path"])
    for entry in manifest.itertuples():
        row = files.loc[entry.path]
        assert row["sample_rate_hz"] == entry.samplerate
        assert row["channels"] == entry.channels
        assert row["subtype"] == entry.subtype
        assert row["bytes"] == entry.bytes
        assert row["duration_s"] == pytest.approx(entry.duration_s, abs=1e-3)
        assert row["frames"] == sf.info(str(REAL_DATA / entry.path)).frames

    sm4 = inventory.files[inventory.files["recorder"] == "S4A03895"]
    assert len(sm4) == 96
    expected_starts = pd.date_range("2019-05-22 00:00:00", "2019-05-22 23:45:00", freq="15min")
    assert (sm4["start_time"].to_numpy() == expected_starts.to_numpy()).all()
    assert set(sm4["sample_rate_hz"]) == {22000}
    assert set(sm4["duration_s"]) == {10.0}
    others = inventory.files[inventory.files["recorder"] != "S4A03895"]
    assert others["start_time"].isna().all()  # none of the other names carries a timestamp
    assert set(others["recorder"]) == {"birdvox", "opensoundscape", "spinetail_colombia"}
