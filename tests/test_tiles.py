"""Tiling an archive into a store, and reading it back: counts, times, resume, ranks, bad audio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.store import TileDataset, TileStore, TileStream
from soundscape_ssl.core.stage import KILL_AT_WRITE_ENV, resolve_rank
from soundscape_ssl.tiles.tiling import TilingConfig, finalize_store, main, plan_tiling, tile_archive

REPO = Path(__file__).resolve().parents[1]
SHARED_SOUNDSCAPES = REPO.parent / "shared" / "data" / "soundscapes"
CONFIG = SpectrogramConfig()




def write_wav(path: Path, samples: np.ndarray, sample_rate_hz: int, subtype: str = "PCM_16",
              format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate_hz, subtype=subtype, format=format)
    return path


def noise(seconds: float, sample_rate_hz: int, seed: int, channels: int = 1) -> np.ndarray:
    shape = (round(seconds * sample_rate_hz),) + ((channels,) if channels > 1 else ())
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


def inventory(root: Path, paths: list[Path], habitat: str | None = "canopy") -> pd.DataFrame:
    """The files table as soundscape_ssl.recordings.archive documents it (headers via soundfile)."""
    rows = []
    for path in paths:
        relpath = path.relative_to(root).as_posix()
        recorder, _, rest = path.stem.partition("_")
        try:
            start_time = pd.to_datetime(rest, format="%Y%m%d_%H%M%S")
        except ValueError:
            start_time = pd.NaT
        info = sf.info(path)
        rows.append(dict(recorder=recorder, habitat=habitat, lat=np.nan, lon=np.nan, path=str(path),
                         relpath=relpath, start_time=start_time, duration_s=info.duration,
                         sample_rate_hz=info.samplerate, channels=info.channels,
                         format=info.format, subtype=info.subtype, frames=info.frames,
                         bytes=path.stat().st_size))
    table = pd.DataFrame(rows)
    table["start_time"] = table["start_time"].astype("datetime64[ns]")
    return table


def expected_tiles(frames: int, rate_hz: int, config: SpectrogramConfig = CONFIG) -> int:
    """Tiles by the window rule, from exact rational seconds (independent of the implementation's
    integers): tile k starts before the end and holds at least half a tile of audio, or is the
    file's first."""
    duration = Fraction(frames, rate_hz)
    tile, hop = Fraction(config.tile_s), Fraction(config.tile_hop_s)
    k = 0
    while k * hop < duration and (k == 0 or duration - k * hop >= tile / 2):
        k += 1
    return k


def store_files(store: Path) -> dict[str, bytes]:
    return {path.relative_to(store).as_posix(): path.read_bytes()
            for path in sorted(store.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Three recorders, 22.05-48 kHz, lengths on and off tile boundaries, a name without time.
    Every tail is shorter than half a tile (padded tails: test_audio.py); the file shorter than
    half a tile gives its one, padded, first tile."""
    root = tmp_path_factory.mktemp("archive")
    specs = [  # relpath stem, seconds, rate
        ("R2/R2_20190522_000000", 10.0, 22050),
        ("R1/R1_20190524_053000", 9.0, 44100),
        ("R1/R1_20190524_060000", 1.5 - 1 / 44100, 44100),   # one frame short of half a tile: one padded tile
        ("R1/R1_20190524_063000", 7.4, 44100),
        ("R1/unnamed", 6.0, 32000),
        ("R3/R3_20190601_120000", 4.0, 48000),
    ]
    paths = [write_wav(root / f"{stem}.wav", noise(seconds, rate, seed), rate)
             for seed, (stem, seconds, rate) in enumerate(specs)]
    return root, inventory(root, paths)


SMALL_UNITS = TilingConfig(unit_max_tiles=2, decode_block_s=1.3)


@pytest.fixture(scope="module")
def reference_store(archive, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("reference") / "tiles"
    summary = tile_archive(archive[1], store, tiling=SMALL_UNITS, rank=0, world_size=1,
                           show_progress=False)
    assert summary.finalized and summary.n_tiles_total == 12
    return store


def test_tile_counts_and_timestamps_match_the_archive(archive, reference_store):
    _, files = archive
    index = TileStore(reference_store).index
    assert index["tile_id"].tolist() == list(range(len(index)))
    assert index["relpath"].is_monotonic_increasing            # file order, then time
    for _, file in files.iterrows():
        tiles = index[index["relpath"] == file["relpath"]]
        n = expected_tiles(file["frames"], file["sample_rate_hz"])
        assert len(tiles) == n, file["relpath"]
        assert tiles["offset_s"].tolist() == [3.0 * k for k in range(n)]
        if n and pd.notna(file["start_time"]):
            expected = [file["start_time"] + pd.Timedelta(seconds=3.0 * k) for k in range(n)]
            assert tiles["timestamp"].tolist() == expected
            assert (tiles["file_start_time"] == file["start_time"]).all()
        if pd.isna(file["start_time"]):
            assert tiles["timestamp"].isna().all() and tiles["file_start_time"].isna().all()
        assert (tiles["recorder"] == file["recorder"]).all()
        assert (tiles["habitat"] == "canopy").all()
    config = json.loads((reference_store / "config.json").read_text())
    assert config["counts"]["n_tiles"] == 12
    assert config["counts"]["padded_tiles"] == 1
    assert config["counts"]["valid_audio_s"] == pytest.approx(11 * 3.0 + 1.5 - 1 / 44100)
    assert config["counts"]["skipped"] == {}
    assert config["counts"]["tail_remainders_dropped"] == 3       # 10, 7.4 and 4 s files
    assert config["counts"]["tail_audio_dropped_s"] == pytest.approx(1.0 + 1.4 + 1.0)
    index = TileStore(reference_store).index
    short = index["relpath"] == "R1/R1_20190524_060000.wav"       # its one, padded, first tile
    assert index.loc[short, "valid_s"].tolist() == pytest.approx([1.5 - 1 / 44100])
    assert index["padded"].tolist() == short.tolist() and (index.loc[~short, "valid_s"] == 3.0).all()
    assert SpectrogramConfig.from_dict(config["config"]) == CONFIG


def test_stored_tiles_equal_tiling_the_decoded_file(archive, reference_store, reference_tiles):
    """Streaming in 1.3 s decode blocks and 2-tile units gives the tiles of the whole signal
    resampled at once, to the bit (float16 as stored)."""
    _, files = archive
    store = TileStore(reference_store)
    for _, file in files.iterrows():
        samples, rate = sf.read(file["path"], dtype="float32")
        expected, _ = reference_tiles(samples, rate)
        expected = expected.astype(np.float16)
        rows = np.flatnonzero(store.index["relpath"].to_numpy() == file["relpath"])
        stored = np.stack([store[int(i)] for i in rows]) if len(rows) else expected[:0]
        assert stored.dtype == np.float16 and stored.shape == expected.shape
        assert stored.tobytes() == expected.tobytes(), file["relpath"]


def test_whole_tiles_of_a_whole_tile_file_are_the_known_answer(tmp_path, reference_tiles):
    """The demo's case: a 60 s, 44.1 kHz file is exactly 20 tiles. However the work is cut
    (decode blocks of 60 s, or 1.3 s across 7-tile units), every tile is the front end applied to
    the whole file resampled at once, byte for byte: the window rule and the reader change no
    whole tile (none is padded)."""
    path = write_wav(tmp_path / "R1" / "R1_20240524_050000.wav", noise(60.0, 44100, 5), 44100)
    files = inventory(tmp_path, [path])
    samples, rate = sf.read(path, dtype="float32")
    expected, grid = reference_tiles(samples, rate)
    assert len(expected) == 20 and not grid.padded.any()
    for name, tiling in (("default", TilingConfig()),
                         ("small", TilingConfig(unit_max_tiles=7, decode_block_s=1.3))):
        tile_archive(files, tmp_path / name, tiling=tiling, show_progress=False)
        store = TileStore(tmp_path / name)
        assert store.index["offset_s"].tolist() == [3.0 * k for k in range(20)]
        assert (store.index["valid_s"] == 3.0).all() and not store.index["padded"].any()
        stored = store.read_range(0, 20)
        assert stored.tobytes() == expected.astype(np.float16).tobytes(), name


def test_overlapping_tiles_carry_audio_across_decode_blocks(archive, tmp_path, reference_tiles):
    """Hop 1.5 s < tile 3 s: tiles straddle decode blocks and still equal in-memory tiling."""
    _, files = archive
    config = SpectrogramConfig(tile_hop_s=1.5)
    store = tmp_path / "tiles"
    tile_archive(files, store, config=config, tiling=TilingConfig(unit_max_tiles=4,
                                                                  decode_block_s=1.0),
                 show_progress=False)
    tiles = TileStore(store)
    assert tiles.config == config
    for _, file in files.iterrows():
        samples, rate = sf.read(file["path"], dtype="float32")
        expected, grid = reference_tiles(samples, rate, config)
        rows = np.flatnonzero(tiles.index["relpath"].to_numpy() == file["relpath"])
        assert len(rows) == expected_tiles(file["frames"], rate, config)
        assert tiles.index["offset_s"].to_numpy()[rows].tolist() == grid.offset_s.tolist()
        np.testing.assert_array_equal(tiles.index["valid_s"].to_numpy()[rows],
                                      grid.valid_s.astype(np.float32))
        for row, tile in zip(rows, expected):
            assert tiles[int(row)].tobytes() == tile.astype(np.float16).tobytes()


def test_readers_give_random_access_streaming_and_normalised_tensors(reference_store):
    store = TileStore(reference_store)
    everything = np.stack([store[i] for i in range(len(store))]).astype(np.float64)
    # the stored normalisation is the mean / std of every stored value
    assert store.normalization["mean"] == pytest.approx(everything.mean(), abs=1e-9)
    assert store.normalization["std"] == pytest.approx(everything.std(), rel=1e-9)
    np.testing.assert_array_equal(store[-1], store[len(store) - 1])
    np.testing.assert_array_equal(store.read_range(1, 7), np.stack([store[i] for i in range(1, 7)]))
    with pytest.raises(IndexError):
        store[len(store)]

    dataset = TileDataset(reference_store)
    item = dataset[3]
    assert item.shape == (1, 128, 256) and item.dtype == torch.float32
    stacked = torch.stack([dataset[i] for i in range(len(dataset))]).double()
    assert stacked.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert stacked.std(correction=0).item() == pytest.approx(1.0, abs=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=0)
    assert sum(len(batch) for batch in loader) == len(dataset)

    batches = list(TileStream(reference_store, batch_size=3, normalize=False))
    assert [len(b.tile_ids) for b in batches] == [3, 3, 3, 3]
    assert np.concatenate([b.tile_ids for b in batches]).tolist() == list(range(len(store)))
    assert torch.equal(batches[1].tiles[0, 0], torch.from_numpy(store[3].astype(np.float32)))
    halves = [np.concatenate([b.tile_ids for b in TileStream(reference_store, batch_size=4,
                                                             rank=r, world_size=2)])
              for r in (0, 1)]
    assert sorted(np.concatenate(halves).tolist()) == list(range(len(store)))
    assert not set(halves[0]) & set(halves[1])


def test_sequential_reads_keep_no_shard_mapped(reference_store):
    # a streaming pass must not pin every shard it read (their pages stay resident while mapped)
    streamed = TileStore(reference_store)
    whole = streamed.read_range(0, len(streamed))
    assert len(streamed._open) == 0
    random_access = TileStore(reference_store, max_open_shards=1)
    np.testing.assert_array_equal(whole, np.stack([random_access[i] for i in range(len(random_access))]))
    assert len(random_access._open) == 1   # random access keeps its LRU, which read_range reuses
    np.testing.assert_array_equal(random_access.read_range(0, len(random_access)), whole)
    # a random subsample, in its own order, negative ids counted from the end
    rows = np.random.default_rng(0).permutation(len(streamed))[:7]
    np.testing.assert_array_equal(streamed.read_rows(rows), whole[rows])
    np.testing.assert_array_equal(streamed.read_rows([-1, 0, 0]), whole[[-1, 0, 0]])
    assert streamed.read_rows([]).shape == (0,) + streamed.tile_shape
    assert len(streamed._open) == 0
    with pytest.raises(IndexError):
        streamed.read_rows([len(streamed)])


def _run_tiling_process(files_parquet: Path, store: Path, extra_env: dict[str, str],
                        ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO / "lib"), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1", **extra_env}
    command = [sys.executable, "-m", "soundscape_ssl.tiles.tiling", "--inventory", str(files_parquet),
               "--out", str(store), "--no-progress", "--threads", "1",
               "--unit-max-tiles", str(SMALL_UNITS.unit_max_tiles),
               "--decode-block-s", str(SMALL_UNITS.decode_block_s)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_killed_run_resumes_to_a_byte_identical_store(archive, reference_store, tmp_path):
    files_parquet = tmp_path / "files.parquet"
    archive[1].to_parquet(files_parquet)
    store = tmp_path / "tiles"
    # Writes: plan.json, then per unit its shard, skip table, tile index and done marker. After
    # 1 + 2 * 4 writes the process dies renaming unit 2's shard: mid-unit.
    killed = _run_tiling_process(files_parquet, store, {KILL_AT_WRITE_ENV: "9"})
    _, stderr = killed.communicate(timeout=120)
    assert killed.returncode == -9, stderr
    assert not (store / "config.json").exists()
    done = sorted(p.name for p in (store / "units").glob("unit-*.done"))
    assert done == ["unit-000000.done", "unit-000001.done"]
    assert len(list((store / "units").glob(".unit-000002.npy.*.tmp"))) == 1   # died mid-unit

    summary = tile_archive(archive[1], store, tiling=SMALL_UNITS, show_progress=False,
                           rank=0, world_size=1)
    assert (summary.units_already_done, summary.units_written) == (2, 4)
    assert store_files(store) == store_files(reference_store)


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_store(archive, reference_store, tmp_path):
    files_parquet = tmp_path / "files.parquet"
    archive[1].to_parquet(files_parquet)
    store = tmp_path / "tiles"
    ranks = [_run_tiling_process(files_parquet, store, {"RANK": str(r), "WORLD_SIZE": "2"})
             for r in (0, 1)]
    summaries = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [s["units_assigned"] for s in summaries] == [3, 3]    # units 0,2,4 and 1,3,5
    assert any(s["finalized"] for s in summaries)
    assert store_files(store) == store_files(reference_store)


def test_sequential_ranks_then_finalise(archive, reference_store, tmp_path):
    store = tmp_path / "tiles"
    first = tile_archive(archive[1], store, tiling=SMALL_UNITS, rank=1, world_size=3,
                         show_progress=False)
    assert not first.finalized and first.units_written == 2   # units 1 and 4
    with pytest.raises(RuntimeError, match="not done"):
        finalize_store(store)
    for rank in (2, 0):
        tile_archive(archive[1], store, tiling=SMALL_UNITS, rank=rank, world_size=3,
                     show_progress=False)
    assert store_files(store) == store_files(reference_store)
    again = tile_archive(archive[1], store, tiling=SMALL_UNITS, show_progress=False)
    assert again.units_written == 0 and again.finalized
    assert store_files(store) == store_files(reference_store)


def test_rank_comes_from_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4)
    assert resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError):
        resolve_rank(4, 4)


def test_work_units_do_not_depend_on_world_size(archive):
    plan = plan_tiling(archive[1], CONFIG, SMALL_UNITS)
    assert [unit.n_tiles for unit in plan.units] == [2, 2, 2, 2, 2, 2]
    for world_size in (1, 2, 3, 7):
        shares = [plan.units_for_rank(r, world_size) for r in range(world_size)]
        assert sorted(u.unit_id for share in shares for u in share) == list(range(6))


def test_a_store_refuses_a_different_plan(archive, reference_store, tmp_path):
    store = tmp_path / "tiles"
    tile_archive(archive[1].iloc[:2], store, tiling=SMALL_UNITS, show_progress=False)
    with pytest.raises(ValueError, match=r"a tile store of a different plan .*n_files: 2 -> 6"):
        tile_archive(archive[1], store, tiling=SMALL_UNITS, show_progress=False)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("bad")
    good = noise(10.0, 44100, 10)
    paths = {}
    paths["zero"] = root / "Z_20200101_000000.wav"
    paths["zero"].write_bytes(b"")
    paths["header_only"] = write_wav(root / "H_20200101_000000.wav", good[:0], 44100)
    paths["truncated"] = write_wav(root / "T_20200101_000000.wav", good, 44100)
    with_nan = noise(10.0, 44100, 11)
    with_nan[round(4.0 * 44100)] = np.nan                         # inside tile 1 (3-6 s)
    with_nan[round(9.5 * 44100)] = np.inf                         # in the dropped tail
    paths["nan"] = write_wav(root / "N_20200101_000000.wav", with_nan, 44100, subtype="FLOAT")
    paths["stereo"] = write_wav(root / "S_20200101_000000.wav", noise(6.0, 44100, 12, 2), 44100)
    paths["8k"] = write_wav(root / "E_20200101_000000.wav", noise(6.5, 8000, 13), 8000)
    paths["96k_float"] = write_wav(root / "F_20200101_000000.wav", noise(6.0, 96000, 14), 96000,
                                   subtype="FLOAT")
    paths["24bit"] = write_wav(root / "P_20200101_000000.wav", noise(6.0, 48000, 15), 48000,
                               subtype="PCM_24")
    paths["short"] = write_wav(root / "Q_20200101_000000.wav", noise(1.0, 44100, 16), 44100)
    paths["4k"] = write_wav(root / "L_20200101_000000.wav", noise(6.0, 4000, 17), 4000)
    paths["changed"] = write_wav(root / "M_20200101_000000.wav", noise(6.0, 48000, 20), 48000)
    paths["flac"] = write_wav(root / "C_20200101_000000.flac", noise(30.0, 44100, 18), 44100,
                              format="FLAC")
    files = inventory(root, [p for p in paths.values() if p.stat().st_size > 0])
    zero = dict(files.iloc[0])                  # what an inventory might still pass along
    zero.update(path=str(paths["zero"]), relpath=paths["zero"].name, recorder="Z", frames=0,
                sample_rate_hz=0, channels=0, duration_s=0.0)
    files = pd.concat([files, pd.DataFrame([zero])], ignore_index=True)
    files.loc[files["path"] == str(paths["changed"]), "sample_rate_hz"] = 44100  # stale inventory
    # damage after the scan: cut the WAV to 65 %, overwrite 20 kB inside the FLAC
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[:len(data) * 65 // 100])  # 6.5 s of 10
    flac = bytearray(paths["flac"].read_bytes())
    middle = len(flac) // 2
    garbage = np.random.default_rng(19).integers(0, 256, 20000, np.uint8).tobytes()
    flac[middle:middle + 20000] = garbage
    paths["flac"].write_bytes(bytes(flac))
    return root, files, paths


def test_bad_audio_is_skipped_with_reasons_and_good_tiles_are_kept(bad_corpus, tmp_path,
                                                                   reference_tiles):
    root, files, paths = bad_corpus
    store = tmp_path / "tiles"
    summary = tile_archive(files, store, show_progress=False, rank=0, world_size=1)
    assert summary.finalized
    tiles = TileStore(store)
    index, skipped = tiles.index, tiles.skipped

    def offsets(key: str) -> list[float]:
        return index.loc[index["path"] == str(paths[key]), "offset_s"].tolist()

    def reasons(key: str) -> list[str]:
        return skipped.loc[skipped["path"] == str(paths[key]), "reason"].tolist()

    assert reasons("zero") == ["unreadable"]
    assert reasons("header_only") == ["no_frames"]
    assert reasons("short") == [] and offsets("short") == [0.0]   # 1 s: its padded first tile
    assert reasons("4k") == ["unsupported_sample_rate"]
    assert reasons("changed") == ["header_mismatch"] and offsets("changed") == []
    assert offsets("truncated") == [0.0, 3.0] and reasons("truncated") == ["truncated"]
    assert offsets("nan") == [0.0, 6.0] and reasons("nan") == ["non_finite_samples"]
    nan_skip = skipped[skipped["path"] == str(paths["nan"])].iloc[0]
    assert (nan_skip["offset_s"], nan_skip["n_tiles_lost"]) == (3.0, 1)
    for key, n in (("stereo", 2), ("8k", 2), ("96k_float", 2), ("24bit", 2)):
        assert offsets(key) == [3.0 * k for k in range(n)] and reasons(key) == [], key
    # corrupt FLAC frames: lost tiles are reported, the tiles before them are kept
    flac_kept, flac_lost = offsets("flac"), skipped[skipped["path"] == str(paths["flac"])]
    assert set(flac_lost["reason"]) == {"decode_error"}
    assert flac_kept[:3] == [0.0, 3.0, 6.0]
    assert len(flac_kept) + flac_lost["n_tiles_lost"].sum() == 10
    # kept tiles are the real audio, e.g. the stereo file's channel mean
    stereo, _ = sf.read(paths["stereo"], dtype="float32")
    expected, _ = reference_tiles(stereo, 44100)
    row = int(index.index[index["path"] == str(paths["stereo"])][0])
    np.testing.assert_allclose(tiles[row].astype(np.float32), expected[0], atol=0.05)
    assert np.isfinite(np.stack([tiles[i] for i in range(len(tiles))]).astype(np.float32)).all()

    counts = json.loads((store / "config.json").read_text())["counts"]
    assert counts["skipped"]["non_finite_samples"] == {"records": 1, "tiles_lost": 1}
    assert counts["skipped"]["truncated"] == {"records": 1, "tiles_lost": 1}
    assert counts["skipped"]["unreadable"]["records"] == 1
    assert counts["n_tiles"] == len(index) == counts["n_tiles_planned"] - counts["tiles_lost"]


def test_command_line_tiles_an_inventory_and_finalises(archive, reference_store, tmp_path, capsys):
    inventory_dir = tmp_path / "inventory"
    inventory_dir.mkdir()
    archive[1].to_parquet(inventory_dir / "files.parquet")
    store = tmp_path / "tiles"
    assert main(["--inventory", str(inventory_dir), "--out", str(store), "--no-progress",
                 "--unit-max-tiles", "2", "--decode-block-s", "1.3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_tiles_total"] == 12
    assert main(["--out", str(store), "--finalize-only"]) == 0
    assert store_files(store) == store_files(reference_store)


@pytest.mark.realdata
def test_tiles_the_shared_real_recordings(tmp_path):
    if not SHARED_SOUNDSCAPES.is_dir():
        pytest.skip(f"{SHARED_SOUNDSCAPES} not present")
    paths = sorted(SHARED_SOUNDSCAPES.rglob("*.wav"))
    files = inventory(SHARED_SOUNDSCAPES, paths, habitat=None)
    store = tmp_path / "tiles"
    summary = tile_archive(files, store, show_progress=False, rank=0, world_size=1)
    index = TileStore(store).index
    planned = sum(expected_tiles(f, r) for f, r in zip(files["frames"], files["sample_rate_hz"]))
    assert summary.n_tiles_total == len(index) == planned
    sm4 = index[index["recorder"] == "S4A03895"]
    assert len(sm4) == 96 * 3                                      # 10 s files -> 3 tiles each
    first = sm4.iloc[1]
    assert first["timestamp"] == pd.Timestamp("2019-05-22 00:00:03")
    assert index["rms_dbfs"].between(-120, 0).all()
    assert index["spectral_flatness"].between(0, 1).all()


# -- background removal ---------------------------------------------------------------------------


def test_band_background_removal_keeps_only_what_rises_above_each_bands_median() -> None:
    from soundscape_ssl.tiles.store import remove_band_background

    # 3 bands x 5 frames: band 0 a flat floor, band 1 a floor with one loud call frame, band 2 a ramp.
    tiles = torch.tensor([[[-60.0, -60.0, -60.0, -60.0, -60.0],
                           [-50.0, -50.0, -20.0, -50.0, -50.0],
                           [-40.0, -30.0, -20.0, -10.0, 0.0]]])
    expected = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.0],
                              [0.0, 0.0, 30.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 10.0, 20.0]]])
    torch.testing.assert_close(remove_band_background(tiles), expected)
    # A gain or a different noise floor per band changes nothing: both are removed.
    torch.testing.assert_close(remove_band_background(tiles + torch.tensor([[[7.0], [-3.0], [12.0]]])), expected)


def test_band_median_is_the_lower_median_for_numpy_and_torch() -> None:
    from soundscape_ssl.tiles.store import band_median

    # An even number of frames: the lower of the two middle values (3 of 1, 3, 5, 9), not their mean.
    band = np.array([[1.0, 5.0, 3.0, 9.0]], dtype=np.float32)
    np.testing.assert_array_equal(band_median(band), [[3.0]])
    tiles = np.random.default_rng(1).normal(-60.0, 9.0, size=(3, 16, 256)).astype(np.float16)
    lower = np.sort(tiles.astype(np.float32), axis=-1)[..., 127:128]
    np.testing.assert_array_equal(band_median(tiles), lower)
    torch.testing.assert_close(band_median(torch.from_numpy(tiles.astype(np.float32))), torch.from_numpy(lower))
    assert band_median(tiles).dtype == np.float32


def test_normalize_tiles_applies_the_recorded_background_removal() -> None:
    from soundscape_ssl.tiles.store import input_normalization, normalize_tiles

    tiles_db = np.random.default_rng(0).normal(-50.0, 8.0, size=(4, 16, 32)).astype(np.float16)
    plain = normalize_tiles(tiles_db, {"mean": -50.0, "std": 8.0})
    removed = normalize_tiles(tiles_db, input_normalization({"mean": -50.0, "std": 8.0}, "band_median"))
    by_hand = torch.from_numpy(tiles_db.astype(np.float32))
    by_hand = ((by_hand - by_hand.median(dim=-1, keepdim=True).values) / 8.0).clamp_min(0.0)
    torch.testing.assert_close(removed, by_hand)
    assert not torch.equal(plain, removed) and removed.min() == 0.0
    # Without a "background" entry (checkpoints from before this option): plain normalisation.
    assert torch.equal(normalize_tiles(tiles_db, {"mean": -50.0, "std": 8.0, "background": "none"}), plain)
    with pytest.raises(ValueError, match="background removal must be one of"):
        input_normalization({"mean": 0.0, "std": 1.0}, "spectral_subtraction")
    with pytest.raises(ValueError, match="background removal must be one of"):
        normalize_tiles(tiles_db, {"mean": 0.0, "std": 1.0, "background": "wiener"})


def test_pcen_matches_its_recursive_definition_and_zeroes_a_steady_band() -> None:
    import math

    from soundscape_ssl.tiles.store import (PCEN_BIAS, PCEN_EPS, PCEN_GAIN, PCEN_POWER,
                                            PCEN_TIME_CONSTANT_FRAMES, band_median, pcen)

    tiles_db = 10.0 * torch.randn(2, 3, 64, dtype=torch.float64)
    tiles_db[0, 1, 20:30] += 30.0   # a call
    power = 10.0 ** (tiles_db / 10.0)
    t = PCEN_TIME_CONSTANT_FRAMES
    b = (math.sqrt(1 + 4 * t * t) - 1) / (2 * t * t)
    smoothed = band_median(power).squeeze(-1)
    expected = torch.empty_like(power)
    for k in range(64):   # the textbook recursion, frame by frame
        smoothed = (1 - b) * smoothed + b * power[..., k]
        ratio = power[..., k] / (PCEN_EPS + smoothed) ** PCEN_GAIN
        expected[..., k] = ((ratio + PCEN_BIAS) ** PCEN_POWER - PCEN_BIAS ** PCEN_POWER
                            - ((1 + PCEN_BIAS) ** PCEN_POWER - PCEN_BIAS ** PCEN_POWER))
    torch.testing.assert_close(pcen(tiles_db), expected.float(), atol=1e-5, rtol=1e-5)
    assert pcen(tiles_db)[0, 1, 20:30].mean() > pcen(tiles_db)[0, 1, 40:64].mean() + 1.0
    steady = pcen(torch.zeros(1, 2, 32))
    torch.testing.assert_close(steady, torch.zeros_like(steady), atol=1e-6, rtol=0)


def test_normalize_tiles_applies_pcen_relative_to_the_archive_level() -> None:
    from soundscape_ssl.tiles.store import normalize_tiles, pcen

    tiles_db = -60.0 + 8.0 * torch.randn(2, 16, 32)
    normalization = {"mean": -60.0, "std": 8.0, "background": "pcen"}
    torch.testing.assert_close(normalize_tiles(tiles_db, normalization), pcen(tiles_db + 60.0))


@pytest.mark.gpu
def test_tiling_on_cuda_matches_the_cpu_store(archive, reference_store, tmp_path):
    """Resampling and the log-mel on the GPU: the same tiles as the CPU store, each value within
    0.1 dB (one float16 step of the stored dB is 0.0625 at 64-128 dB), the same index."""
    summary = tile_archive(archive[1], tmp_path / "tiles", tiling=SMALL_UNITS, rank=0, world_size=1,
                           device="cuda", show_progress=False)
    assert summary.finalized and summary.device.startswith("cuda")
    cpu, gpu = TileStore(reference_store), TileStore(tmp_path / "tiles")
    columns = ["tile_id", "relpath", "offset_s", "recorder"]
    pd.testing.assert_frame_equal(gpu.index[columns], cpu.index[columns])
    np.testing.assert_allclose(gpu.read_range(0, len(gpu)).astype(np.float32),
                               cpu.read_range(0, len(cpu)).astype(np.float32), rtol=0, atol=0.1)
