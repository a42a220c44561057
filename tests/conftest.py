"""Shared test settings and helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soundscape_ssl.core.audio import WindowGrid, downmix, get_resampler
from soundscape_ssl.tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tests use small tensors: extra threads only spin on a shared 2-core machine. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reference_tiles(samples: np.ndarray, sample_rate_hz: int,
                     config: SpectrogramConfig = SpectrogramConfig()
                     ) -> tuple[np.ndarray, WindowGrid]:
    """The known answer for the streaming reader + front end: the whole signal resampled at once
    (no blocks), the window rule's windows cut from it, every sample at or after the end of the
    audio set to zero, then the log-mel front end. Returns (log_mel_db float32 (n, mels, frames),
    the rule's grid)."""
    mono = downmix(np.asarray(samples, dtype=np.float32))
    grid = config.window_rule.grid(len(mono), sample_rate_hz)
    resampled = get_resampler(sample_rate_hz, config.sample_rate_hz,
                              config.resample_lowpass_filter_width,
                              config.resample_rolloff).resample(torch.from_numpy(mono))
    end = -(-len(mono) * config.sample_rate_hz // sample_rate_hz)     # first sample past the end
    if len(grid.starts) == 0:
        return np.zeros((0, config.n_mels, config.n_frames), np.float32), grid
    signal = torch.zeros(max(int(grid.starts[-1]) + config.tile_samples, end))
    signal[:end] = resampled[:end]
    waveforms = torch.stack([signal[int(s):int(s) + config.tile_samples] for s in grid.starts])
    return LogMelFrontEnd(config)(waveforms).log_mel_db.numpy(), grid


@pytest.fixture(scope="session")
def reference_tiles():
    """`_reference_tiles`: tiles of an in-memory signal computed without the streaming reader."""
    return _reference_tiles
