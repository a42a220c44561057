"""The log-mel front end: config, log-mel values and tile statistics (the resampler and the
window rule: test_audio.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchaudio

from soundscape_ssl.tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig

CONFIG = SpectrogramConfig()




def sine(frequency_hz: float, seconds: float, sample_rate_hz: int,
         amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate_hz)) / sample_rate_hz
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def mel_band_of(frequency_hz: float) -> int:
    """Index of the mel filter with the largest weight at `frequency_hz` (default config)."""
    bank = torchaudio.functional.melscale_fbanks(513, 50.0, 15000.0, 128, 32000, norm="slaney",
                                                 mel_scale="slaney")
    return int(bank[round(frequency_hz / 32000 * 1024)].argmax())


def test_defaults_give_the_documented_tile_geometry():
    assert (CONFIG.sample_rate_hz, CONFIG.tile_s, CONFIG.n_mels) == (32000, 3.0, 128)
    assert CONFIG.tile_samples == 96000
    assert CONFIG.n_frames == 256
    assert CONFIG.floor_db == pytest.approx(-100.0)


def test_config_round_trips_through_json_and_rejects_unknown_fields():
    config = SpectrogramConfig(tile_s=2.0, tile_hop_s=1.0, n_mels=64, mel_norm=None)
    assert SpectrogramConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown"):
        SpectrogramConfig.from_dict({**config.to_dict(), "tile_seconds": 3})


@pytest.mark.parametrize("bad", [dict(tile_s=3.00001), dict(f_max_hz=17000.0),
                                 dict(hop_length=2048), dict(mel_scale="bark"),
                                 dict(power_floor=0.0)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        SpectrogramConfig(**bad)


def test_log_mel_equals_torchaudio_melspectrogram_in_db():
    waveforms = 0.1 * torch.randn(3, CONFIG.tile_samples,
                                  generator=torch.Generator().manual_seed(2))
    ours = LogMelFrontEnd(CONFIG)(waveforms).log_mel_db
    mel = torchaudio.transforms.MelSpectrogram(
        32000, n_fft=1024, hop_length=375, f_min=50.0, f_max=15000.0, n_mels=128, power=2.0,
        norm="slaney", mel_scale="slaney")(waveforms)[..., :256]
    reference = 10 * torch.log10(mel.clamp_min(1e-10))
    assert ours.shape == (3, 128, 256)
    assert torch.allclose(ours, reference, atol=1e-3)


def test_tile_statistics_of_a_tone_noise_and_silence():
    tone = torch.from_numpy(sine(1000.0, 3.0, 32000, amplitude=0.5))
    noise = torch.randn(CONFIG.tile_samples, generator=torch.Generator().manual_seed(3)) * 0.1
    silence = torch.zeros(CONFIG.tile_samples)
    features = LogMelFrontEnd(CONFIG)(torch.stack([tone, noise, silence]))
    # RMS of a 0.5-amplitude sine: 0.5 / sqrt(2) -> -9.03 dB re full scale; peak -6.02 dBFS
    expected_rms_dbfs = 20 * math.log10(0.5 / math.sqrt(2))
    assert features.rms_dbfs[0].item() == pytest.approx(expected_rms_dbfs, abs=0.01)
    assert features.peak_dbfs[0].item() == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert features.rms_dbfs[1].item() == pytest.approx(-20.0, abs=0.1)
    assert features.rms_dbfs[2].item() == pytest.approx(-120.0)
    # the tone's energy sits in the mel band of 1 kHz, in every frame but the reflect-padded first
    loudest_band = features.log_mel_db[0].argmax(dim=0)
    assert (loudest_band[1:] == mel_band_of(1000.0)).all()
    # Wiener entropy: tonal near 0, white noise near 1 on area-normalised mel bands
    assert features.spectral_flatness[0].item() < 0.05
    assert features.spectral_flatness[1].item() > 0.6
    assert torch.allclose(features.log_mel_db[2], torch.tensor(CONFIG.floor_db), atol=1e-4)


def test_tiles_are_self_contained():
    """A tile equals the tile of its own 3 s cut out alone (reflect padding at tile edges), so a
    tile does not depend on the audio around it."""
    signal = torch.from_numpy(np.random.default_rng(4).standard_normal(int(9.5 * 32000))
                              .astype(np.float32) * 0.1)
    front_end = LogMelFrontEnd(CONFIG)
    tiles = front_end(signal[:288000].unfold(0, 96000, 96000)).log_mel_db
    alone = front_end(signal[96000:192000].clone()[None]).log_mel_db
    torch.testing.assert_close(alone[0], tiles[1], atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_gpu_front_end_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    waveforms = 0.1 * torch.randn(4, CONFIG.tile_samples,
                                  generator=torch.Generator().manual_seed(5))
    cpu = LogMelFrontEnd(CONFIG, "cpu")(waveforms)
    gpu = LogMelFrontEnd(CONFIG, "cuda")(waveforms)
    assert torch.allclose(gpu.log_mel_db.cpu(), cpu.log_mel_db, atol=1e-2)


def test_mel_band_centres_rise_within_the_band_limits():
    from soundscape_ssl.tiles.spectrogram import frame_times_s, mel_bin_centres_hz

    config = SpectrogramConfig()
    centres = mel_bin_centres_hz(config)
    assert centres.shape == (config.n_mels,)
    assert np.all(np.diff(centres) > 0)
    assert config.f_min_hz < centres[0] < 200 and 13000 < centres[-1] < config.f_max_hz
    times = frame_times_s(config)
    assert times.shape == (256,) and times[1] == pytest.approx(375 / 32000)
