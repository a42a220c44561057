"""Embedding a tile store and audio files: alignment, determinism, ranks, resume, the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from soundscape_ssl.analysis import embed as embed_module
from soundscape_ssl.pretrain.checkpoint import build_checkpoint, save_checkpoint
from soundscape_ssl.analysis.embed import (EmbedConfig, embed_audio_files, embed_store, embeddings_file_name,
                                  load_embeddings, main, read_embeddings_metadata)
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.store import TileDataset, TileStore, remove_band_background
from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

REPO = Path(__file__).resolve().parents[1]
SHARED_SOUNDSCAPES = REPO.parent / "shared" / "data" / "soundscapes"
SHARED_LABELLED = REPO.parent / "shared" / "data" / "labelled" / "xeno-canto-acrocephalus"

# A small front end (1 s tiles of 32 mels x 64 frames at 16 kHz) and a 2-block ViT keep every
# forward pass in milliseconds.
SPECTROGRAM = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512,
                                hop_length=250, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
BACKBONE = BackboneConfig(arch="vit_tiny", depth=2, embed_dim=32, num_heads=2, n_mels=32,
                          n_frames=64, drop_path_rate=0.0)
EMBED_DIM = 32
# Chunks of 5 tiles cut across the store's shards of 7 tiles; batches of 2 across neither.
CPU_CONFIG = EmbedConfig(pooling="both", batch_size=2, chunk_tiles=5, device="cpu", num_workers=0)
# (relative path, sample rate, seconds, seed): whole tiles 9 + 7 + 6 = 22; the tails (0.4 s,
# 0.2 s) are under half a tile, so the window rule adds no padded tile.
ARCHIVE_FILES = (("R1/R1_20210524_050000.wav", 16000, 9.0, 1),
                 ("R1/R1_20210524_050010.wav", 22050, 7.4, 2),
                 ("R2/R2_20210524_050000.wav", 44100, 6.2, 3))




def soundscape(seconds: float, sample_rate_hz: int, seed: int) -> np.ndarray:
    """Noise whose level changes every half second, plus a tone: every tile differs."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate_hz)
    t = np.arange(n) / sample_rate_hz
    level = 10 ** (rng.uniform(-3, -1, size=int(np.ceil(seconds * 2)) + 1)[(t * 2).astype(int)])
    tone = 0.05 * np.sin(2 * np.pi * rng.uniform(500, 4000) * t)
    return (level * rng.standard_normal(n) + tone).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate_hz: int, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate_hz, subtype=subtype)
    return path


def files_table(root: Path) -> pd.DataFrame:
    rows = []
    for relpath, _, _, _ in ARCHIVE_FILES:
        path = root / relpath
        info = sf.info(path)
        recorder, _, stamp = path.stem.partition("_")
        rows.append(dict(recorder=recorder, habitat="canopy", path=str(path), relpath=relpath,
                         start_time=pd.to_datetime(stamp, format="%Y%m%d_%H%M%S"),
                         sample_rate_hz=info.samplerate, frames=info.frames,
                         duration_s=info.duration, channels=info.channels))
    return pd.DataFrame(rows)


def save_test_checkpoint(path: Path, seed: int, spectrogram: dict | None,
                         normalization: dict[str, float] | None) -> Path:
    torch.manual_seed(seed)
    model = build_backbone(BACKBONE)
    checkpoint = build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=BACKBONE, method_config={},
        train_config={}, spectrogram_config=spectrogram, normalization=normalization,
        model_state={}, backbone_state=model.state_dict(), optimizer_state={})
    return save_checkpoint(path, checkpoint)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    """(archive folder, tile store) of the three ARCHIVE_FILES, in shards of 7 tiles."""
    root = tmp_path_factory.mktemp("embed_data")
    archive = root / "archive"
    for relpath, rate, seconds, seed in ARCHIVE_FILES:
        write_wav(archive / relpath, soundscape(seconds, rate, seed), rate)
    store_dir = root / "store"
    tile_archive(files_table(archive), store_dir, config=SPECTROGRAM,
                 tiling=TilingConfig(unit_max_tiles=7), rank=0, world_size=1, show_progress=False)
    return archive, store_dir


@pytest.fixture(scope="module")
def checkpoint(store, tmp_path_factory) -> Path:
    """A checkpoint 'trained' on the store: its spectrogram config and normalisation."""
    tiles = TileStore(store[1])
    return save_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth", 0,
                                tiles.config.to_dict(), tiles.normalization)


@pytest.fixture(scope="module")
def reference(store, checkpoint, tmp_path_factory) -> Path:
    """A finished single-process embedding of the store."""
    out = tmp_path_factory.mktemp("reference") / "embeddings"
    summary = embed_store(store[1], checkpoint, out, CPU_CONFIG, rank=0, world_size=1,
                          show_progress=False)
    assert summary.finished and summary.tiles_embedded == 22 and summary.n_chunks == 5
    return out


def array_bytes(out_dir: Path) -> dict[str, bytes]:
    return {name: (out_dir / embeddings_file_name(name)).read_bytes() for name in ("mean", "cls")}


def one_tile_embeddings(checkpoint: Path, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, cls) embeddings of normalised tiles (n, 1, n_mels, n_frames), one tile per forward."""
    from soundscape_ssl.pretrain.checkpoint import load_backbone

    model, _ = load_backbone(checkpoint)
    with torch.inference_mode():
        pooled = [model.embed(tile[None]) for tile in tiles]
    return (torch.cat([p.mean for p in pooled]).numpy(),
            torch.cat([p.cls for p in pooled]).numpy())


def test_row_i_is_the_embedding_of_tile_i(store, checkpoint, reference):
    dataset = TileDataset(store[1])
    expected_mean, expected_cls = one_tile_embeddings(
        checkpoint, torch.stack([dataset[i] for i in range(len(dataset))]))
    mean, cls = load_embeddings(reference), load_embeddings(reference, "cls")
    assert isinstance(mean, np.memmap) and mean.shape == (22, EMBED_DIM) and mean.dtype == np.float32
    assert cls.shape == (22, EMBED_DIM)
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=2e-5)
    np.testing.assert_allclose(cls, expected_cls, rtol=0, atol=2e-5)
    # Alignment, not just closeness: each row's nearest single-tile embedding is its own tile's.
    distances = np.linalg.norm(mean[:, None, :] - expected_mean[None, :, :], axis=-1)
    assert (distances.argmin(axis=1) == np.arange(22)).all()
    assert np.median(np.sort(distances, axis=1)[:, 1]) > 100 * distances.diagonal().max()

    metadata = read_embeddings_metadata(reference)
    assert metadata["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert metadata["store"]["n_tiles"] == 22 and metadata["default_pooling"] == "mean"
    assert metadata["arrays"]["cls"] == {"file": "embeddings_cls.npy", "shape": [22, EMBED_DIM],
                                         "dtype": "float32"}
    assert metadata["precision"] == "fp32"
    assert not (reference / "chunks").exists()


def test_embeddings_are_deterministic_across_runs_workers_and_ranks(store, checkpoint, reference,
                                                                    tmp_path):
    expected = array_bytes(reference)
    again = tmp_path / "again"
    embed_store(store[1], checkpoint, again, CPU_CONFIG, rank=0, world_size=1, show_progress=False)
    assert array_bytes(again) == expected

    with_reader_thread = tmp_path / "worker"
    embed_store(store[1], checkpoint, with_reader_thread,
                EmbedConfig(pooling="both", batch_size=2, chunk_tiles=5, device="cpu", num_workers=1),
                show_progress=False)
    assert array_bytes(with_reader_thread) == expected

    ranks = tmp_path / "ranks"
    first = embed_store(store[1], checkpoint, ranks, CPU_CONFIG, rank=1, world_size=2,
                        show_progress=False)
    assert (first.chunks_assigned, first.tiles_embedded, first.finished) == (2, 10, False)
    assert sorted(p.name for p in (ranks / "chunks").glob("*.npy")) == [
        "chunk-000001.npy", "chunk-000003.npy"]
    with pytest.raises(FileNotFoundError, match="no finished embeddings"):
        load_embeddings(ranks)
    last = embed_store(store[1], checkpoint, ranks, CPU_CONFIG, rank=0, world_size=2,
                       show_progress=False)
    assert (last.chunks_assigned, last.tiles_embedded, last.finished) == (3, 12, True)
    assert array_bytes(ranks) == expected


def test_an_interrupted_run_resumes_to_the_same_arrays(store, checkpoint, reference, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "interrupted"
    commit = embed_module._commit_chunk
    calls = []

    def commit_then_die(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("simulated kill while writing chunk")
        commit(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_commit_chunk", commit_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        embed_store(store[1], checkpoint, out, CPU_CONFIG, show_progress=False)
    monkeypatch.setattr(embed_module, "_commit_chunk", commit)
    assert sorted(p.name for p in (out / "chunks").glob("*.npy")) == [
        "chunk-000000.npy", "chunk-000001.npy"]
    assert not (out / "config.json").exists()
    stale = out / "chunks" / ".chunk-000002.npy.0123abcd.999999999@elsewhere.tmp"
    stale.write_bytes(b"half a chunk")           # the temporary file of a killed writer

    resumed = embed_store(store[1], checkpoint, out, CPU_CONFIG, show_progress=False)
    assert (resumed.chunks_already_done, resumed.chunks_written, resumed.tiles_embedded) == (2, 3, 12)
    assert resumed.finished and array_bytes(out) == array_bytes(reference)
    assert not stale.exists() and not (out / "chunks").exists()

    finished = embed_store(store[1], checkpoint, out, CPU_CONFIG, show_progress=False)
    assert (finished.chunks_written, finished.tiles_embedded, finished.finished) == (0, 0, True)


def test_pooling_names_and_the_band_array(store, checkpoint, reference, tmp_path):
    assert EmbedConfig(pooling="both").poolings == ("mean", "cls")
    assert EmbedConfig(pooling="all").poolings == ("mean", "cls", "band", "band_active")
    assert EmbedConfig(pooling="band, mean").poolings == ("mean", "band")
    with pytest.raises(ValueError, match="pooling"):
        EmbedConfig(pooling="mean,max")
    out = tmp_path / "all"
    config = EmbedConfig(pooling="all", batch_size=2, chunk_tiles=5, device="cpu", num_workers=0)
    embed_store(store[1], checkpoint, out, config, show_progress=False)
    band = load_embeddings(out, "band")
    rows = BACKBONE.n_mels // BACKBONE.patch_hw[0]
    assert band.shape == (22, rows * EMBED_DIM)
    assert read_embeddings_metadata(out)["arrays"]["band"]["shape"] == [22, rows * EMBED_DIM]
    assert load_embeddings(out, "band_active").shape == (22, rows * EMBED_DIM)
    # Same numbers as the two-pooling run, and the band rows average to the mean pooling.
    assert array_bytes(out) == array_bytes(reference)
    np.testing.assert_allclose(band.reshape(22, rows, EMBED_DIM).mean(axis=1),
                               load_embeddings(reference), rtol=0, atol=1e-5)


def test_store_command_line(store, checkpoint, reference, tmp_path, capsys):
    out = tmp_path / "cli"
    arguments = ["--checkpoint", str(checkpoint), "--store", str(store[1]), "--out", str(out),
                 "--device", "cpu", "--batch-size", "2", "--chunk-tiles", "5", "--num-workers", "0",
                 "--no-progress", "--pooling", "both"]
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and summary["n_tiles"] == 22 and summary["tiles_embedded"] == 22
    assert array_bytes(out) == array_bytes(reference)
    assert main(arguments + ["--pooling", "max"]) == 2  # a usage error: one line, exit 2


def test_a_folder_refuses_a_different_plan(store, checkpoint, reference, tmp_path):
    with pytest.raises(ValueError, match="poolings"):
        embed_store(store[1], checkpoint, reference,
                    EmbedConfig(pooling="cls", batch_size=2, chunk_tiles=5, device="cpu",
                                num_workers=0), show_progress=False)
    other = save_test_checkpoint(tmp_path / "other.pth", 1, TileStore(store[1]).config.to_dict(),
                                 TileStore(store[1]).normalization)
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        embed_store(store[1], other, reference, CPU_CONFIG, show_progress=False)


def test_tiles_are_normalised_with_the_checkpoints_statistics(store, tmp_path):
    tiles = TileStore(store[1])
    shifted = {"mean": tiles.normalization["mean"] + 12.0, "std": tiles.normalization["std"] * 1.5}
    checkpoint = save_test_checkpoint(tmp_path / "shifted.pth", 0, tiles.config.to_dict(), shifted)
    config = EmbedConfig(pooling="mean", batch_size=8, chunk_tiles=8, device="cpu", num_workers=0,
                         output_dtype="float16")
    summary = embed_store(store[1], checkpoint, tmp_path / "shifted", config, show_progress=False)
    assert summary.finished
    raw = torch.from_numpy(tiles.read_range(0, 22).astype(np.float32))
    expected, _ = one_tile_embeddings(checkpoint, ((raw - shifted["mean"]) / shifted["std"])[:, None])
    with_store_statistics, _ = one_tile_embeddings(
        checkpoint, torch.stack([TileDataset(store[1])[i] for i in range(22)]))
    embeddings = load_embeddings(tmp_path / "shifted")
    assert embeddings.dtype == np.float16
    np.testing.assert_allclose(embeddings, expected, rtol=2e-3, atol=2e-3)
    assert np.abs(embeddings - with_store_statistics).max() > 0.1

    # A checkpoint trained with background removal gets it at inference too, in both modes.
    removed = save_test_checkpoint(tmp_path / "removed.pth", 0, tiles.config.to_dict(),
                                   {**tiles.normalization, "background": "band_median"})
    embed_store(store[1], removed, tmp_path / "removed", config, show_progress=False)
    normalised = (raw - tiles.normalization["mean"]) / tiles.normalization["std"]
    expected_removed, _ = one_tile_embeddings(removed, remove_band_background(normalised)[:, None])
    np.testing.assert_allclose(load_embeddings(tmp_path / "removed"), expected_removed, rtol=2e-3, atol=2e-3)
    assert embed_module._audio_configs(embed_module._load_checkpoint(removed))[1]["background"] == "band_median"

    unnormalised = save_test_checkpoint(tmp_path / "none.pth", 0, tiles.config.to_dict(), None)
    with pytest.raises(ValueError, match="normalization='store'"):
        embed_store(store[1], unnormalised, tmp_path / "none", config, show_progress=False)
    store_statistics = EmbedConfig(pooling="mean", batch_size=8, chunk_tiles=8, device="cpu",
                                   num_workers=0, normalization="store")
    embed_store(store[1], unnormalised, tmp_path / "store_stats", store_statistics,
                show_progress=False)
    np.testing.assert_allclose(load_embeddings(tmp_path / "store_stats"), with_store_statistics,
                               rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="records no normalisation"):
        embed_audio_files([store[0]], unnormalised, tmp_path / "audio.npy", config,
                          show_progress=False)


def test_a_store_made_with_another_front_end_is_refused(store, tmp_path):
    tiles = TileStore(store[1])
    trained_on = {**tiles.config.to_dict(), "f_min_hz": 150.0}
    checkpoint = save_test_checkpoint(tmp_path / "other_front_end.pth", 0, trained_on,
                                      tiles.normalization)
    with pytest.raises(ValueError, match="f_min_hz"):
        embed_store(store[1], checkpoint, tmp_path / "out", CPU_CONFIG, show_progress=False)


def test_audio_command_embeds_every_span_of_files_of_any_rate_and_length(store, checkpoint,
                                                                         reference, tmp_path,
                                                                         capsys):
    archive = store[0]
    clips = tmp_path / "clips"
    short = soundscape(0.6, 16000, 7)
    write_wav(clips / "a_short_16k.wav", short, 16000)
    by_hand = np.concatenate([short, np.zeros(6400, np.float32)])       # to 1.0 s
    write_wav(clips / "b_short_padded_by_hand_16k.wav", by_hand, 16000)
    write_wav(clips / "c_stereo_48k.wav", np.stack([soundscape(0.7, 48000, 8)] * 2, axis=1), 48000)
    write_wav(clips / "c_shorter_than_half_16k.wav", soundscape(0.4, 16000, 13), 16000)   # < half a tile: kept, the first
    write_wav(clips / "sub" / "d_8k.wav", soundscape(2.2, 8000, 9), 8000)
    with_nan = soundscape(4.0, 16000, 10)
    with_nan[40000] = np.nan                                   # at 2.5 s: span [2, 3) is lost
    write_wav(clips / "e_nan_float_16k.wav", with_nan, 16000, subtype="FLOAT")
    write_wav(clips / "f_7k.wav", soundscape(2.0, 7000, 11), 7000)   # below the accepted rates
    (clips / "g_broken.wav").write_bytes(b"RIFF....WAVEfmt garbage, not audio")
    (clips / "notes.txt").write_text("not audio, not looked at")
    out = tmp_path / "out" / "EMB.npy"

    code = main(["--checkpoint", str(checkpoint), "--audio", str(clips), str(archive), "--out",
                 str(out), "--device", "cpu", "--batch-size", "4", "--no-progress", "--pooling", "both"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = pd.read_csv(out.with_suffix(".csv"))
    skipped = pd.read_csv(tmp_path / "out" / "EMB.skipped.csv")
    embeddings, cls = np.load(out), np.load(tmp_path / "out" / "EMB.cls.npy")

    assert list(rows.columns) == ["row", "path", "relpath", "offset_s", "valid_s", "padded"]
    per_file = {relpath: group for relpath, group in rows.groupby("relpath", sort=False)}
    # The window rule: every span from 0 s; one that runs past the end is padded and kept when
    # at least half of it (0.5 s) is audio, or when it is the file's first.
    expected_spans = {
        "a_short_16k.wav": ([0.0], [0.6]),
        "c_shorter_than_half_16k.wav": ([0.0], [0.4]),
        "b_short_padded_by_hand_16k.wav": ([0.0], [1.0]),
        "c_stereo_48k.wav": ([0.0], [0.7]),
        "sub/d_8k.wav": ([0.0, 1.0], [1.0, 1.0]),
        "e_nan_float_16k.wav": ([0.0, 1.0, 3.0], [1.0, 1.0, 1.0]),
        "R1/R1_20210524_050000.wav": (list(np.arange(9.0)), [1.0] * 9),
        "R1/R1_20210524_050010.wav": (list(np.arange(7.0)), [1.0] * 7),
        "R2/R2_20210524_050000.wav": (list(np.arange(6.0)), [1.0] * 6),
    }
    assert set(per_file) == set(expected_spans)
    for relpath, (offsets, valid) in expected_spans.items():
        group = per_file[relpath]
        np.testing.assert_allclose(group["offset_s"], offsets, err_msg=relpath)
        np.testing.assert_allclose(group["valid_s"], valid, atol=1e-9, err_msg=relpath)
        assert (group["padded"] == (np.asarray(valid) < 1.0)).all(), relpath
    assert (rows["row"] == np.arange(len(rows))).all() and len(rows) == 31
    assert rows["path"].is_monotonic_increasing                     # files in path order
    assert embeddings.shape == cls.shape == (31, EMBED_DIM) and np.isfinite(embeddings).all()
    assert summary["n_rows"] == 31 and summary["n_padded_rows"] == 3

    # Bad files get the inventory's reasons (g_broken.wav: a RIFF header with a 14 B fmt chunk).
    reasons = dict(zip(skipped["relpath"], skipped["reason"]))
    assert reasons == {"e_nan_float_16k.wav": "non_finite_samples",
                       "f_7k.wav": "unsupported_sample_rate", "g_broken.wav": "bad_header"}
    nan_skip = skipped[skipped["reason"] == "non_finite_samples"].iloc[0]
    assert (nan_skip["offset_s"], nan_skip["n_spans_lost"]) == (2.0, 1)

    # A short file is zero-padded exactly: the same row as the file padded with zeros by hand.
    short_row, by_hand_row = (per_file[name]["row"].iloc[0] for name in
                              ("a_short_16k.wav", "b_short_padded_by_hand_16k.wav"))
    np.testing.assert_allclose(embeddings[short_row], embeddings[by_hand_row], rtol=0, atol=1e-6)

    # Spans of files that are also in the store get the store's tiles' embeddings: the same
    # decoding, resampling, front end, float16 rounding and normalisation as training (measured
    # equal to the last bit; the tolerances allow for BLAS kernels that depend on the batch size).
    index = TileStore(store[1]).index
    stored = load_embeddings(reference)
    for relpath, tolerance in (("R1/R1_20210524_050000.wav", 1e-5), ("R1/R1_20210524_050010.wav", 1e-4),
                               ("R2/R2_20210524_050000.wav", 1e-4)):
        tiles = index[index["relpath"] == relpath]
        ours = per_file[relpath].iloc[:len(tiles)]
        np.testing.assert_allclose(ours["offset_s"], tiles["offset_s"])
        np.testing.assert_allclose(embeddings[ours["row"]], stored[tiles["tile_id"]], rtol=0,
                                   atol=tolerance, err_msg=relpath)

    record = json.loads((tmp_path / "out" / "EMB.json").read_text())
    assert record["arrays"]["mean"]["file"] == "EMB.npy" and record["arrays"]["cls"]["file"] == "EMB.cls.npy"
    assert record["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["counts"]["files"] == 11


class _FailingSoundFile(sf.SoundFile):
    """A decoder that fails after `fail_after_frames` frames, as a damaged MP3 does."""

    fail_after_frames = 0

    def read(self, frames=-1, *args, **kwargs):
        if self.tell() + frames > self.fail_after_frames:
            raise sf.LibsndfileError(0, prefix="simulated decoder error: ")
        return super().read(frames, *args, **kwargs)


def test_a_decoder_error_keeps_the_spans_before_it(checkpoint, tmp_path, monkeypatch):
    path = write_wav(tmp_path / "long.wav", soundscape(130.0, 16000, 12), 16000)
    monkeypatch.setattr(_FailingSoundFile, "fail_after_frames", 16000 * 70)
    monkeypatch.setattr(sf, "SoundFile", _FailingSoundFile)
    summary = embed_audio_files([path], checkpoint, tmp_path / "EMB.npy",
                                EmbedConfig(pooling="cls", device="cpu", batch_size=64),
                                show_progress=False)
    rows = pd.read_csv(tmp_path / "EMB.csv")
    skipped = pd.read_csv(tmp_path / "EMB.skipped.csv")
    # The first decode block (60 s) decodes; the second fails and is retried in 1 s pieces
    # (one tile hop), which keep everything before the fault at 70 s.
    assert summary.n_rows == 70 and np.load(tmp_path / "EMB.npy").shape == (70, EMBED_DIM)
    np.testing.assert_allclose(rows["offset_s"], np.arange(70.0))
    assert not (tmp_path / "EMB.cls.npy").exists()
    assert skipped[["reason", "offset_s", "n_spans_lost"]].values.tolist() == [["decode_error", 70.0, 60]]


def test_spans_embed_only_the_requested_windows_and_equal_the_whole_file(checkpoint, tmp_path):
    long_path = write_wav(tmp_path / "a_long.wav", soundscape(20.0, 16000, 21), 16000)
    other = write_wav(tmp_path / "b_other_48k.wav", soundscape(5.0, 48000, 22), 48000)
    config = EmbedConfig(pooling="mean,band", device="cpu", batch_size=4)
    embed_audio_files([long_path, other], checkpoint, tmp_path / "whole" / "EMB.npy", config, show_progress=False)
    whole = pd.read_csv(tmp_path / "whole" / "EMB.csv")
    # three spans of the long file, unordered, one twice, one past its end; the other file whole
    spans = {str(long_path): [17.0, 3.0, 4.0, 3.0, 40.0]}
    embed_audio_files([long_path, other], checkpoint, tmp_path / "part" / "EMB.npy", config, show_progress=False,
                      spans=spans)
    part = pd.read_csv(tmp_path / "part" / "EMB.csv")
    assert part.loc[part["path"] == str(long_path), "offset_s"].tolist() == [3.0, 4.0, 17.0]
    assert part.loc[part["path"] == str(other), "offset_s"].tolist() == \
        whole.loc[whole["path"] == str(other), "offset_s"].tolist()
    keys = list(zip(whole["path"], whole["offset_s"]))
    rows = [keys.index(key) for key in zip(part["path"], part["offset_s"])]
    for name in ("EMB.npy", "EMB.band.npy"):
        # the same tiles; only the batches differ (BLAS may sum a row differently in another batch)
        np.testing.assert_allclose(np.load(tmp_path / "part" / name), np.load(tmp_path / "whole" / name)[rows],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="offset 2.5 s is not a span of the grid"):
        embed_audio_files([long_path], checkpoint, tmp_path / "bad" / "EMB.npy", config, show_progress=False,
                          spans={str(long_path): [2.5]})


@pytest.mark.realdata
def test_audio_command_on_real_recorder_files_and_labelled_mp3s(tmp_path):
    if not SHARED_SOUNDSCAPES.exists() or not SHARED_LABELLED.exists():
        pytest.skip(f"{SHARED_SOUNDSCAPES} or {SHARED_LABELLED} not found")
    recordings = sorted(SHARED_SOUNDSCAPES.rglob("S4A03895_20190522_*.wav"))[:2]
    clips = sorted(SHARED_LABELLED.glob("*.mp3"))[:2]
    if len(recordings) < 2 or len(clips) < 2:
        pytest.skip("the SM4 recordings or the labelled clips are not there")
    # The study's default front end (32 kHz, 128 x 256 tiles) with a 1-block model.
    backbone = BackboneConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2,
                              drop_path_rate=0.0)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "default.pth", build_checkpoint(
        method="dino", step=0, epoch=0, world_size=1, backbone_config=backbone, method_config={},
        train_config={}, spectrogram_config=SpectrogramConfig().to_dict(),
        normalization={"mean": -60.0, "std": 20.0}, model_state={},
        backbone_state=build_backbone(backbone).state_dict(), optimizer_state={}))
    out = tmp_path / "EMB.npy"
    assert main(["--checkpoint", str(checkpoint), "--audio", *map(str, recordings + clips),
                 "--out", str(out), "--device", "cpu", "--pooling", "mean", "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "EMB.csv")
    assert pd.read_csv(tmp_path / "EMB.skipped.csv").empty
    embeddings = np.load(out)
    assert embeddings.shape == (len(rows), 32) and np.isfinite(embeddings).all()
    rule = SpectrogramConfig().window_rule
    for path in recordings:                      # WAVs: exact lengths, the rule's 3 s spans
        info = sf.info(path)
        grid = rule.grid(info.frames, info.samplerate)
        ours = rows[rows["relpath"] == path.name]
        assert ours["offset_s"].tolist() == grid.offset_s.tolist()
        np.testing.assert_allclose(ours["valid_s"], grid.valid_s, atol=1e-9)
    for path in clips:                           # MP3s: spans every 3 s up to the decoded end
        ours = rows[rows["relpath"] == path.name]
        assert len(ours) > 1
        np.testing.assert_allclose(ours["offset_s"], 3.0 * np.arange(len(ours)))
        assert (ours["valid_s"].iloc[:-1] == 3.0).all() and 1.5 <= ours["valid_s"].iloc[-1] <= 3.0


def test_without_pooling_the_embedding_is_the_one_the_method_trained(store, checkpoint, tmp_path):
    """`soundscape-ssl embed` with no --pooling writes the checkpoint's `embedding_pooling`
    (a VICReg trained on bands: EMB.npy is the band embedding); an older checkpoint that
    records none gets the mean of the patch tokens."""
    import torch

    banded = tmp_path / "banded.pth"
    payload = torch.load(checkpoint, weights_only=True)
    payload["embedding_pooling"] = "band"
    torch.save(payload, banded)
    clip = store[0] / "R1" / "R1_20210524_050000.wav"
    assert main(["--checkpoint", str(banded), "--audio", str(clip), "--out", str(tmp_path / "B.npy"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["--checkpoint", str(banded), "--audio", str(clip), "--out", str(tmp_path / "A.npy"),
                 "--device", "cpu", "--no-progress", "--pooling", "all"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "B.npy"), np.load(tmp_path / "A.band.npy"))
    assert json.loads((tmp_path / "B.json").read_text())["config"]["pooling"] == "band"
    assert main(["--checkpoint", str(checkpoint), "--audio", str(clip), "--out", str(tmp_path / "M.npy"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "M.json").read_text())["config"]["pooling"] == "mean"


@pytest.mark.gpu
def test_embedding_on_cuda_matches_the_cpu(store, checkpoint, reference, tmp_path):
    """The store embedded on CUDA: in float32 (TF32 off) every value within 1e-4 + 1e-3 relative of
    the CPU's; in bf16 (the GPU default) every row's cosine similarity to the CPU's at least 0.99."""
    import dataclasses

    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(CPU_CONFIG, device="cuda", precision=precision)
        summary = embed_store(store[1], checkpoint, tmp_path / precision, config, rank=0, world_size=1,
                              show_progress=False)
        assert summary.finished and summary.device.startswith("cuda") and summary.precision == precision
    for pooling in ("mean", "cls"):
        cpu = np.asarray(load_embeddings(reference, pooling), dtype=np.float64)
        np.testing.assert_allclose(load_embeddings(tmp_path / "fp32", pooling), cpu, rtol=1e-3, atol=1e-4)
        bf16 = np.asarray(load_embeddings(tmp_path / "bf16", pooling), dtype=np.float64)
        cosine = (bf16 * cpu).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(cpu, axis=1)
        assert cosine.min() >= 0.99, pooling
