"""The one audio reader: the window rule's known answers, the resampler, fault isolation, and every
stage cutting the same windows from the same file."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio

from soundscape_ssl.analysis import embed as embed_module
from soundscape_ssl.analysis.birdnet import BirdNetConfig, _file_windows, file_windows_index
from soundscape_ssl.analysis.embed import EmbedConfig, embed_audio_files
from soundscape_ssl.analysis.validate import ValidateConfig, window_table
from soundscape_ssl.core.audio import (AudioFile, SincResampler, WindowRule, downmix,
                                       get_resampler, grid_windows, read_windows)
from soundscape_ssl.pretrain.checkpoint import build_checkpoint, save_checkpoint
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
from soundscape_ssl.recordings.archive import scan_archive
from soundscape_ssl.tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig
from soundscape_ssl.tiles.store import TileStore
from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

RULE_32K = WindowRule.from_seconds(32000, 3.0, 3.0)


def noise(seconds: float, sample_rate_hz: int, seed: int, channels: int = 1) -> np.ndarray:
    shape = (round(seconds * sample_rate_hz),) + ((channels,) if channels > 1 else ())
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


def write(path: Path, samples: np.ndarray, sample_rate_hz: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate_hz, **kwargs)
    return path


# ----------------------------------------------------------------------------------------------
# The window rule: known answers


RATES = (8000, 44100, 48000, 192000)


def _edge_cases(rate: int) -> list[tuple[str, int, list[float], list[float], int]]:
    """(case, frames, offsets_s, valid_s, tails dropped) for 3 s windows every 3 s."""
    half = 3 * rate // 2
    return [
        ("empty", 0, [], [], 0),
        ("one sample", 1, [0.0], [1 / rate], 0),                  # a file's first window is kept
        ("half a window minus one sample", half - 1, [0.0], [1.5 - 1 / rate], 0),
        ("exactly half a window", half, [0.0], [1.5], 0),
        ("exactly one window", 3 * rate, [0.0], [3.0], 0),
        ("one window and one sample", 3 * rate + 1, [0.0], [3.0], 1),
        ("one and a half windows minus one sample", 3 * rate + half - 1, [0.0], [3.0], 1),
        ("one and a half windows", 3 * rate + half, [0.0, 3.0], [3.0, 1.5], 0),
        ("one and a half windows and one sample", 3 * rate + half + 1, [0.0, 3.0],
         [3.0, 1.5 + 1 / rate], 0),
        ("two windows minus one sample", 6 * rate - 1, [0.0, 3.0], [3.0, 3.0 - 1 / rate], 0),
        ("exactly two windows", 6 * rate, [0.0, 3.0], [3.0, 3.0], 0),
    ]


@pytest.mark.parametrize("rate", RATES)
def test_window_rule_known_answers_at_the_edges(rate):
    for case, frames, offsets, valid, dropped in _edge_cases(rate):
        grid = RULE_32K.grid(frames, rate)
        assert grid.offset_s.tolist() == offsets, (rate, case)
        np.testing.assert_allclose(grid.valid_s, valid, rtol=0, atol=1e-12, err_msg=f"{rate} {case}")
        assert grid.padded.tolist() == [v < 3.0 for v in valid], (rate, case)
        assert grid.n_tail_dropped == dropped, (rate, case)
        assert RULE_32K.count(frames, rate) == len(offsets), (rate, case)
        assert RULE_32K.n_whole(frames, rate) == sum(v == 3.0 for v in valid), (rate, case)
        # The same windows whatever the model rate they are cut at (BirdNET: 48 kHz).
        at_48k = WindowRule.from_seconds(48000, 3.0, 3.0).grid(frames, rate)
        assert at_48k.offset_s.tolist() == grid.offset_s.tolist(), (rate, case)
        assert at_48k.valid_s.tolist() == grid.valid_s.tolist(), (rate, case)


def test_window_rule_with_overlapping_windows_and_the_uncovered_tail():
    rule = WindowRule.from_seconds(32000, 3.0, 1.5)
    grid = rule.grid(10 * 44100, 44100)
    # starts 0, 1.5, ... 7.5 hold >= 1.5 s; 9.0 holds 1.0 s (dropped); none starts at 10 s
    assert grid.offset_s.tolist() == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]
    assert grid.valid_s.tolist() == [3.0, 3.0, 3.0, 3.0, 3.0, 2.5]
    assert (grid.n_tail_dropped, grid.tail_uncovered_s) == (1, 0.0)
    tail = RULE_32K.grid(10 * 22000, 22000)                      # SM4: 10 s -> 3 tiles, 1 s left
    assert (len(tail.offset_s), tail.n_tail_dropped, tail.tail_uncovered_s) == (3, 1, 1.0)
    # A rate that does not divide the window: the valid seconds are exact fractions.
    frames = 8 * 11025 + 3
    assert RULE_32K.grid(frames, 11025).valid_s[-1] == float(Fraction(frames, 11025) - 6)


def test_window_rule_agrees_with_exact_fractions_on_random_lengths():
    rng = np.random.default_rng(0)
    for _ in range(300):
        rate = int(rng.choice([8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000]))
        frames = int(rng.integers(0, 12 * rate))
        duration = Fraction(frames, rate)
        expected = [k for k in range(5) if 3 * k < duration
                    and (k == 0 or duration - 3 * k >= Fraction(3, 2))]
        grid = RULE_32K.grid(frames, rate)
        assert grid.numbers.tolist() == expected, (frames, rate)
        assert grid.valid_s.tolist() == [float(min(Fraction(3), duration - 3 * k)) for k in expected]


# ----------------------------------------------------------------------------------------------
# Mono and the resampler


def test_downmix_is_the_channel_mean():
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [0.25, 0.75]], np.float32)
    assert downmix(stereo).tolist() == [0.5, 0.0, 0.5]
    assert downmix(stereo[:, :1]).tolist() == [1.0, 0.5, 0.25]
    assert downmix(stereo[:, 0]).dtype == np.float32


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000, 192000])
def test_resampler_matches_torchaudio(rate):
    signal = torch.randn(2 * rate + 123, generator=torch.Generator().manual_seed(rate))
    ours = SincResampler(rate, 32000).resample(signal)
    reference = torchaudio.transforms.Resample(rate, 32000)(signal)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5)
    # torchaudio's functional form builds its kernel in float32: equal to float32 precision
    functional = torchaudio.functional.resample(signal, rate, 32000)
    assert torch.allclose(ours, functional, atol=5e-4)


def test_block_wise_resampling_equals_resampling_whole():
    resampler = get_resampler(44100, 32000)
    signal = torch.randn(5 * 44100, generator=torch.Generator().manual_seed(1))
    whole = resampler.resample(signal)
    orig, _new, width = resampler.orig, resampler.new, resampler.width
    padded = torch.nn.functional.pad(signal, (width, 10 * orig + width))
    pieces, frame = [], 0
    for block in (7, 1, 130, 64, 300):  # frames per block, deliberately uneven
        stretch = padded[frame * orig:(frame + block) * orig + 2 * width]
        pieces.append(resampler.resample_frames(stretch, first_frame=frame))
        frame += block
    blocked = torch.cat(pieces)[:len(whole)]
    # To the bit: the tile store's promise that decode blocks change no tile rests on it.
    assert torch.equal(blocked, whole)


def test_resampled_input_keeps_its_frequency():
    """A tone resampled from 44.1 or 8 kHz lands in the mel band of its frequency."""
    config = SpectrogramConfig()
    front_end = LogMelFrontEnd(config)
    bank = torchaudio.functional.melscale_fbanks(513, 50.0, 15000.0, 128, 32000, norm="slaney",
                                                 mel_scale="slaney")
    for rate, frequency in ((32000, 5000.0), (44100, 5000.0), (8000, 3000.0)):
        t = torch.arange(3 * rate) / rate
        tone = get_resampler(rate, 32000).resample(0.5 * torch.sin(2 * math.pi * frequency * t))
        tile = front_end(tone[None, :96000]).log_mel_db[0]
        band = int(bank[round(frequency / 32000 * 1024)].argmax())
        assert int(tile.argmax(dim=0).median()) == band, rate


@pytest.mark.gpu
def test_gpu_resampler_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    signal = torch.randn(3 * 44100)
    assert torch.allclose(get_resampler(44100, 32000, device="cuda").resample(signal.cuda()).cpu(),
                          get_resampler(44100, 32000).resample(signal), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Reading: zeros outside the audio, padding, faults


def test_reads_outside_the_audio_are_zeros_and_16_bit_is_exact(tmp_path):
    samples = noise(2.0, 16000, 1, channels=2)
    path = write(tmp_path / "a.wav", samples, 16000, subtype="PCM_16")
    as_float, _ = sf.read(path, dtype="float32")
    with AudioFile(str(path)) as audio:
        assert (audio.frames, audio.channels, audio.sample_rate_hz) == (32000, 2, 16000)
        block, bad = audio.read(-100, 200)
        assert bad == [] and (block[:100] == 0).all()
        np.testing.assert_array_equal(block[100:], downmix(as_float[:200]))
        tail, _ = audio.read(31900, 32100)
        np.testing.assert_array_equal(tail[:100], downmix(as_float[31900:]))
        assert (tail[100:] == 0).all()


@pytest.mark.parametrize("rate", RATES)
def test_padded_windows_are_the_audio_then_exact_zeros(tmp_path, rate, reference_tiles):
    """4.6 s: tile 1 holds 1.6 s of audio and 1.4 s of exact zeros; the same tile as the audio
    padded with zeros by hand."""
    config = SpectrogramConfig()
    samples = noise(4.6, rate, 2)
    path = write(tmp_path / "a.wav", samples, rate, subtype="FLOAT")
    losses = []
    with AudioFile(str(path)) as audio:
        batches = list(grid_windows(audio, config.window_rule, 0, 2, losses))
    assert losses == [] and len(batches) == 1
    batch = batches[0]
    assert batch.offset_s.tolist() == [0.0, 3.0] and batch.padded.tolist() == [False, True]
    np.testing.assert_allclose(batch.valid_s, [3.0, 4.6 - 3.0], atol=1e-12)
    first_zero = -(-len(samples) * 32000 // rate) - 96000
    assert (batch.waveforms[1, first_zero:] == 0).all() and (batch.waveforms[1, :first_zero] != 0).any()
    expected, _ = reference_tiles(samples, rate, config)
    got = LogMelFrontEnd(config)(batch.waveforms).log_mel_db.numpy()
    assert got.astype(np.float16).tobytes() == expected.astype(np.float16).tobytes()


def test_non_finite_samples_are_counted_in_full(tmp_path):
    """Defect 17.6: 44,103 non-finite samples (one NaN at frame 1000, then a run of 44,102
    alternating inf/NaN) were reported as "1 non-finite sample(s) from frame 1000"."""
    samples = noise(9.0, 16000, 3)
    samples[1000] = np.nan
    samples[40000:40000 + 44102:2] = np.inf
    samples[40001:40000 + 44102:2] = np.nan
    path = write(tmp_path / "R1" / "R1_20240524_050000.wav", samples, 16000, subtype="FLOAT")
    files = scan_archive(tmp_path, show_progress=False).files
    tile_archive(files, tmp_path / "tiles", show_progress=False)
    skipped = TileStore(tmp_path / "tiles").skipped
    assert skipped["reason"].tolist() == ["non_finite_samples"]
    record = skipped.iloc[0]
    assert (record["offset_s"], record["n_tiles_lost"]) == (0.0, 2)      # 0.06 s to 5.26 s
    assert record["detail"] == ("44103 non-finite sample(s) in 2 run(s), frames 1000-84101 "
                                "(0.062-5.256 s)")
    assert TileStore(tmp_path / "tiles").index["offset_s"].tolist() == [6.0]


def test_scattered_non_finite_samples_are_counted_and_kept_short(tmp_path):
    """Every other sample of 0.5-2.5 s is NaN (16,000 runs of one sample), and one NaN at 8.2 s:
    runs closer than a window share a fault span (the span list stays short however the samples
    are scattered), every sample is counted, and the windows between the faults are kept."""
    samples = noise(12.0, 16000, 13)
    samples[8000:40000:2] = np.nan
    samples[round(8.2 * 16000)] = np.nan
    path = write(tmp_path / "a.wav", samples, 16000, subtype="FLOAT")
    losses = []
    with AudioFile(str(path), piece_s=3.0) as audio:
        offsets = [o for b in grid_windows(audio, RULE_32K, 0, 4, losses, block_s=4.0)
                   for o in b.offset_s.tolist()]
        assert len(audio.bad_spans) == 2
    assert offsets == [3.0, 9.0]
    assert [(loss.reason, loss.numbers.tolist(), loss.detail) for loss in losses] == [
        ("non_finite_samples", [0], "16000 non-finite sample(s) in 16000 run(s), frames "
                                    "8000-39998 (0.500-2.500 s)"),
        ("non_finite_samples", [2], "1 non-finite sample(s) in 1 run(s), frames 131200-131200 "
                                    "(8.200-8.200 s)")]


def test_a_decoder_error_costs_only_the_windows_it_touches(tmp_path, reference_tiles):
    """A FLAC with 64 bytes overwritten mid-file: the windows around the damage are lost with a
    decode_error, every other window equals the intact file's, byte for byte."""
    config = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512,
                               hop_length=250, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
    samples = noise(30.0, 16000, 4)
    path = write(tmp_path / "a.flac", samples, 16000, format="FLAC", subtype="PCM_16")
    intact, _ = sf.read(path, dtype="float32")
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(range(64))
    path.write_bytes(bytes(data))
    losses = []
    kept, offsets = [], []
    with AudioFile(str(path), piece_s=1.0) as audio:
        for batch in grid_windows(audio, config.window_rule, 0, 30, losses, block_s=10.0):
            kept.append(LogMelFrontEnd(config)(batch.waveforms).log_mel_db.numpy())
            offsets += batch.offset_s.tolist()
    assert [loss.reason for loss in losses] == ["decode_error"]
    lost = losses[0].numbers.tolist()
    assert 0 < len(lost) <= 3 and 12 <= lost[0] <= 16               # near the middle only
    assert "could not be decoded" in losses[0].detail
    assert offsets == [float(k) for k in range(30) if k not in lost]
    expected, _ = reference_tiles(intact, 16000, config)
    assert (np.concatenate(kept).astype(np.float16).tobytes()
            == expected[[k for k in range(30) if k not in lost]].astype(np.float16).tobytes())


def test_an_early_end_is_a_loss_except_where_the_length_is_an_estimate(tmp_path):
    wav = write(tmp_path / "a.wav", noise(7.0, 16000, 5), 16000, subtype="PCM_16")
    losses = []
    # The inventory listed 10 s; the file now holds 7 s: windows 2 (7 s in it: 1 s) is lost.
    with AudioFile(str(wav), frames=10 * 16000) as audio:
        got = [b.offset_s.tolist() for b in grid_windows(audio, RULE_32K, 0, 3, losses)]
    assert got == [[0.0, 3.0]]
    assert [(loss.reason, loss.numbers.tolist()) for loss in losses] == [("truncated", [2])]
    assert losses[0].detail == ("112000 frames (7.000 s) are readable, 160000 (10.000 s) were "
                                "expected: the header lists 112000 frames")
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    mp3 = write(tmp_path / "a.mp3", noise(8.0, 16000, 6), 16000, format="MP3",
                subtype="MPEG_LAYER_III")
    data = mp3.read_bytes()
    mp3.write_bytes(data[:len(data) // 2])           # the Xing header still says 8 s
    losses = []
    with AudioFile(str(mp3)) as audio:
        assert audio.frames == 8 * 16000
        batches = list(grid_windows(audio, RULE_32K, 0, 3, losses))
        assert audio.ended_early and 3.5 * 16000 < audio.frames < 4.5 * 16000
    assert losses == []                              # an estimate, not a loss
    decoded = RULE_32K.grid(len(sf.read(mp3, dtype="float32")[0]), 16000)
    assert np.concatenate([b.offset_s for b in batches]).tolist() == decoded.offset_s.tolist()
    assert np.concatenate([b.valid_s for b in batches]).tolist() == decoded.valid_s.tolist()


def test_windows_at_any_offsets_and_outside_the_audio(tmp_path):
    """BirdNET reads windows where a tile index puts them, in any order; one starting after the
    end is an `outside_audio` loss; duplicates are read twice."""
    path = write(tmp_path / "a.wav", noise(7.0, 44100, 7), 44100, subtype="PCM_16")
    rule = WindowRule.from_seconds(48000, 3.0, 3.0)
    starts = np.array([0, 48000, 48000, 4 * 48000, 8 * 48000])      # 0, 1, 1, 4 and 8 s
    losses = []
    with AudioFile(str(path)) as audio:
        batches = list(read_windows(audio, rule, np.arange(5), starts, losses, block_s=2.0))
    numbers = np.concatenate([b.numbers for b in batches]).tolist()
    waveforms = torch.cat([b.waveforms for b in batches])
    assert numbers == [0, 1, 2, 3]
    assert torch.equal(waveforms[1], waveforms[2])
    assert [(loss.reason, loss.numbers.tolist()) for loss in losses] == [("outside_audio", [4])]
    whole = get_resampler(44100, 48000).resample(torch.from_numpy(sf.read(path, dtype="float32")[0]))
    torch.testing.assert_close(waveforms[1], whole[48000:48000 + 144000], rtol=0, atol=0)
    torch.testing.assert_close(waveforms[3], whole[4 * 48000:], rtol=0, atol=0)  # ends at 7 s


# ----------------------------------------------------------------------------------------------
# Every stage cuts the same windows


def default_checkpoint(path: Path) -> Path:
    """A 1-block ViT for the default 128 x 256 tiles (32 kHz, 3 s), with a plausible normalisation."""
    backbone = BackboneConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2,
                              drop_path_rate=0.0)
    torch.manual_seed(0)
    return save_checkpoint(path, build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=backbone, method_config={},
        train_config={}, spectrogram_config=SpectrogramConfig().to_dict(),
        normalization={"mean": -60.0, "std": 20.0}, model_state={},
        backbone_state=build_backbone(backbone).state_dict(), optimizer_state={}))


@pytest.fixture(scope="module")
def three_files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("stages")
    files = {
        "kept_tail": write(root / "R1" / "R1_20240524_050000.wav", noise(10.6, 44100, 8), 44100,
                           subtype="PCM_16"),                  # 3 whole + 1.6 s (kept, padded)
        "dropped_tail": write(root / "R1" / "R1_20240524_051000.wav", noise(7.4, 22050, 9),
                              22050, subtype="PCM_16"),        # 2 whole + 1.4 s (dropped)
        "short": write(root / "R2" / "R2_20240524_050000.wav", noise(2.0, 48000, 10), 48000,
                       subtype="PCM_16"),                      # one padded window of 2 s
    }
    return root, files


def test_every_stage_cuts_the_same_windows_from_the_same_file(three_files, tmp_path):
    root, files = three_files
    expected = {"kept_tail": ([0.0, 3.0, 6.0, 9.0], [3.0, 3.0, 3.0, 1.6]),
                "dropped_tail": ([0.0, 3.0], [3.0, 3.0]),
                "short": ([0.0], [2.0])}
    # tile store (through the inventory)
    inventory = scan_archive(root, show_progress=False)
    tile_archive(inventory.files, tmp_path / "tiles", show_progress=False,
                 tiling=TilingConfig(unit_max_tiles=3, decode_block_s=4.0))
    store = TileStore(tmp_path / "tiles")
    # embed --audio
    out = tmp_path / "EMB.npy"
    embed_audio_files([root], default_checkpoint(tmp_path / "ckpt.pth"), out,
                      EmbedConfig(pooling="mean", device="cpu"), show_progress=False)
    embedded = pd.read_csv(out.with_suffix(".csv"))
    # BirdNET's index of files, and its reading at 48 kHz
    birdnet = file_windows_index(files.values())
    # labelled validation
    recordings = pd.DataFrame({"recording": [p.name for p in files.values()],
                               "path": [str(p) for p in files.values()], "label": "x",
                               "group": [p.name for p in files.values()]})
    windows, _, skipped = window_table(recordings, ValidateConfig(progress=False))
    assert skipped.empty

    def columns(frame: pd.DataFrame, path: Path, path_column: str = "path") -> list[tuple]:
        rows = frame[frame[path_column].astype(str) == str(path)]
        return list(zip(rows["offset_s"].astype(float), rows["valid_s"].astype(np.float32),
                        rows["padded"].astype(bool)))

    for name, path in files.items():
        offsets, valid = expected[name]
        truth = [(o, np.float32(v), v < 3.0) for o, v in zip(offsets, valid)]
        assert columns(store.index, path) == truth, name
        assert columns(embedded, path) == truth, name
        assert columns(birdnet, path) == truth, name
        assert columns(windows, path) == truth, name
        rows = birdnet.index[birdnet["path"] == str(path)].to_numpy()
        read = list(_file_windows(str(path), rows, birdnet.loc[rows, "offset_s"].to_numpy(),
                                  BirdNetConfig()))
        assert [np.float32(w.audio_s) for w in read] == [np.float32(v) for v in valid], name
        assert all(w.skip_reason is None and w.samples.shape == (144000,) for w in read)
    assert not store.index["padded"].iloc[:3].any()
    config = json_counts(tmp_path / "tiles")
    assert (config["tail_remainders_dropped"], config["tail_audio_dropped_s"]) == (1, pytest.approx(1.4))


def json_counts(store_dir: Path) -> dict:
    import json

    return json.loads((store_dir / "config.json").read_text())["counts"]


def test_an_embedded_span_is_the_stored_tile_to_the_bit(three_files, tmp_path):
    root, files = three_files
    tile_archive(scan_archive(root, show_progress=False).files, tmp_path / "tiles",
                 show_progress=False, tiling=TilingConfig(unit_max_tiles=2, decode_block_s=5.0))
    store = TileStore(tmp_path / "tiles")
    config = SpectrogramConfig()
    front_end = LogMelFrontEnd(config)
    for path in files.values():
        skips = []
        blocks = list(embed_module._file_spans(str(path), config, front_end, torch.device("cpu"),
                                               skips))
        assert skips == []
        spans = torch.cat([b.tiles_db for b in blocks]).numpy()
        offsets = np.concatenate([b.offset_s for b in blocks])
        rows = store.index[store.index["path"] == str(path)]
        assert rows["offset_s"].tolist() == offsets.tolist()
        stored = np.stack([store[int(i)] for i in rows["tile_id"]])
        assert spans.dtype == np.float16 and spans.tobytes() == stored.tobytes(), path.name


def test_files_cut_short_are_read_up_to_the_break_by_every_stage(tmp_path):
    """A WAV truncated mid-data and an MP3 cut in half: the inventory lists their readable
    duration with a damage note, tiling and embed --audio read them up to the break (the same
    windows, the last one padded) and list them with the note, and no loss is reported for
    audio that never existed."""
    root = tmp_path / "archive"
    wav = write(root / "R1" / "R1_20240524_050000.wav", noise(8.0, 16000, 11), 16000,
                subtype="PCM_16")
    wav.write_bytes(wav.read_bytes()[:44 + 2 * round(4.9 * 16000)])       # 4.9 s of 8
    cases = {"R1/R1_20240524_050000.wav": (4.9, [0.0, 3.0], [3.0, 1.9])}
    if "MP3" in sf.available_formats():
        mp3 = write(root / "R1" / "R1_20240524_051000.mp3", noise(12.0, 16000, 12), 16000,
                    format="MP3", subtype="MPEG_LAYER_III")
        mp3.write_bytes(mp3.read_bytes()[:mp3.stat().st_size // 2])
        decoded = len(sf.read(mp3, dtype="float32")[0])                  # what mpg123 decodes
        readable_s = decoded / 16000
        assert 5.0 < readable_s < 7.0
        grid = RULE_32K.grid(decoded, 16000)
        cases["R1/R1_20240524_051000.mp3"] = (readable_s, grid.offset_s.tolist(),
                                              grid.valid_s.tolist())
    inventory = scan_archive(root, show_progress=False)
    assert inventory.quarantine.empty
    files = inventory.files.set_index("relpath")
    tile_archive(inventory.files, tmp_path / "tiles", show_progress=False)
    store = TileStore(tmp_path / "tiles")
    out = tmp_path / "EMB.npy"
    embed_audio_files([root], default_checkpoint(tmp_path / "ckpt.pth"), out,
                      EmbedConfig(pooling="mean", device="cpu"), show_progress=False)
    embedded = pd.read_csv(out.with_suffix(".csv"))
    embed_skipped = pd.read_csv(out.parent / "EMB.skipped.csv")
    for relpath, (readable_s, offsets, valid) in cases.items():
        row = files.loc[relpath]
        assert row["duration_s"] == pytest.approx(readable_s, abs=1e-9)
        assert row["damage"] == "truncated" and f"({readable_s:.3f} s) are readable" in row["damage_detail"]
        tiles = store.index[store.index["relpath"] == relpath]
        assert tiles["offset_s"].tolist() == offsets
        np.testing.assert_allclose(tiles["valid_s"], valid, atol=1e-6)
        spans = embedded[embedded["relpath"] == relpath]
        assert spans["offset_s"].tolist() == offsets
        np.testing.assert_allclose(spans["valid_s"], valid, atol=1e-9)
        for skipped, lost_column in ((store.skipped, "n_tiles_lost"), (embed_skipped, "n_spans_lost")):
            notes = skipped[skipped["relpath"] == relpath]
            assert notes["reason"].tolist() == ["truncated"] and notes[lost_column].tolist() == [0]
            assert f"({readable_s:.3f} s) are readable" in notes["detail"].iloc[0]
