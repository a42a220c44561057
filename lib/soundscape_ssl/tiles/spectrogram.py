"""The log-mel front end: its config, log-mel tiles, tile statistics, mel geometry.

Everything here is pure signal processing on tensors (CPU or GPU). Reading audio, resampling it
to the model rate and cutting it into tile windows live in `soundscape_ssl.core.audio` (the one
reader every stage uses); sharding and writing the tile store in `soundscape_ssl.tiles.tiling`,
reading the store in `soundscape_ssl.tiles.store`.

A tile is a function of its own `tile_s` seconds of (resampled) audio only: the STFT is centred
with reflect padding at the tile edges, so the tile at 12.0 s of a file equals the tile of the
same 3 s clip cut out and fed alone (as BirdNET and the labelled-validation windows are).
Frames are those whose centre lies inside the tile: `ceil(tile_samples / hop_length)` of them
(256 with the defaults).

Mel filters default to the Slaney scale and area normalisation (librosa's defaults), so white
noise has a flat mel spectrum and `spectral_flatness` on mel bands is ~1 for broadband noise
and ~0 for tonal song. Values are `10 * log10(max(mel_power, power_floor))` in dB re unit power
of a full-scale waveform in [-1, 1]; the default floor (1e-10, -100 dB) lies below the
quantisation noise of 16-bit audio, so digital silence is recognisable as exactly -100 dB.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torchaudio

from ..core.audio import WindowRule, whole_samples
from ..core.config import config_from_mapping

# Slaney mel filters at the defaults leave no filter empty; HTK ones with 128 bands from 50 Hz do
# on coarse FFTs, which torchaudio warns about. Both are allowed; the choice is recorded.
_MEL_SCALES = ("slaney", "htk")
_MEL_NORMS = ("slaney", None)

# Floors for the waveform level statistics (dBFS): -120 dBFS is below any 16/24-bit content.
_MEAN_SQUARE_FLOOR = 1e-12
_PEAK_FLOOR = 1e-6

@dataclass(frozen=True)
class SpectrogramConfig:
    """How audio becomes a log-mel tile. Serialisable with `to_dict` / `from_dict`."""

    sample_rate_hz: int = 32000          # model rate; every input is resampled to it
    tile_s: float = 3.0                  # tile length
    tile_hop_s: float = 3.0              # start-to-start distance of tiles (== tile_s: no overlap)
    n_fft: int = 1024                    # STFT size (Hann window of the same length)
    hop_length: int = 375                # STFT hop in samples: 3 s / 375 = 256 frames per tile
    n_mels: int = 128
    f_min_hz: float = 50.0
    f_max_hz: float = 15000.0
    mel_scale: str = "slaney"            # "slaney" (librosa default) or "htk"
    mel_norm: str | None = "slaney"      # "slaney" (area-normalised filters) or None
    power_floor: float = 1e-10           # mel power floor before the log: -100 dB
    min_input_sample_rate_hz: int = 8000     # inputs outside [min, max] are skipped, not tiled
    max_input_sample_rate_hz: int = 192000
    resample_lowpass_filter_width: int = 6   # core.audio.SincResampler (torchaudio sinc_interp_hann)
    resample_rolloff: float = 0.99

    def __post_init__(self) -> None:
        if self.sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {self.sample_rate_hz}")
        tile_samples = whole_samples(self.tile_s, self.sample_rate_hz, "tile_s")
        whole_samples(self.tile_hop_s, self.sample_rate_hz, "tile_hop_s")
        if not 0 < self.hop_length <= self.n_fft:
            raise ValueError(f"need 0 < hop_length <= n_fft, got {self.hop_length}, {self.n_fft}")
        if self.n_fft // 2 >= tile_samples:
            raise ValueError(f"n_fft={self.n_fft} too long for a {self.tile_s} s tile")
        if not 0 <= self.f_min_hz < self.f_max_hz <= self.sample_rate_hz / 2:
            raise ValueError(f"need 0 <= f_min_hz < f_max_hz <= Nyquist, got "
                             f"{self.f_min_hz}, {self.f_max_hz} at {self.sample_rate_hz} Hz")
        if self.mel_scale not in _MEL_SCALES:
            raise ValueError(f"mel_scale must be one of {_MEL_SCALES}, got {self.mel_scale!r}")
        if self.mel_norm not in _MEL_NORMS:
            raise ValueError(f"mel_norm must be one of {_MEL_NORMS}, got {self.mel_norm!r}")
        if not self.power_floor > 0:
            raise ValueError(f"power_floor must be positive, got {self.power_floor}")
        if not 0 < self.min_input_sample_rate_hz <= self.max_input_sample_rate_hz:
            raise ValueError("need 0 < min_input_sample_rate_hz <= max_input_sample_rate_hz")

    @property
    def tile_samples(self) -> int:
        """Samples per tile at `sample_rate_hz`."""
        return round(self.tile_s * self.sample_rate_hz)

    @property
    def tile_hop_samples(self) -> int:
        """Samples between consecutive tile starts at `sample_rate_hz`."""
        return round(self.tile_hop_s * self.sample_rate_hz)

    @property
    def n_frames(self) -> int:
        """STFT frames per tile: those whose centre lies inside the tile."""
        return -(-self.tile_samples // self.hop_length)

    @property
    def floor_db(self) -> float:
        """The dB value of a floored (silent) mel bin."""
        return 10.0 * math.log10(self.power_floor)

    def accepts_sample_rate(self, sample_rate_hz: int) -> bool:
        return self.min_input_sample_rate_hz <= sample_rate_hz <= self.max_input_sample_rate_hz

    @property
    def window_rule(self) -> WindowRule:
        """Where tiles are cut from a file: the one window rule of `soundscape_ssl.core.audio`
        (tiles every `tile_hop_s` from 0 s; a last partial tile is zero-padded and kept when at
        least half of it is audio)."""
        return WindowRule(self.sample_rate_hz, self.tile_samples, self.tile_hop_samples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SpectrogramConfig":
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        return config_from_mapping(cls, values)


class TileFeatures(NamedTuple):
    """Front-end output for a batch of B tiles (tensors on the front end's device)."""

    log_mel_db: torch.Tensor        # (B, n_mels, n_frames) float32, dB, floored
    rms_dbfs: torch.Tensor          # (B,) waveform RMS in dB re full scale (1.0), floor -120
    peak_dbfs: torch.Tensor         # (B,) max |sample| in dBFS, floor -120 (0 = clipping level)
    spectral_flatness: torch.Tensor  # (B,) frame mean of geometric / arithmetic mean mel power


class LogMelFrontEnd:
    """Batched log-mel front end on CPU or GPU: (B, tile_samples) waveforms -> `TileFeatures`.

    STFT via `torch.stft` (Hann, centred with reflect padding at the tile edges), |X|^2, mel
    filters from `torchaudio.functional.melscale_fbanks`: the same numbers as
    `torchaudio.transforms.MelSpectrogram(power=2)` (tested). On CPU the filterbank (at most two
    non-zero weights per FFT bin) is applied as a sparse CSR product: measured 0.012 against
    0.13 ms per audio second for the dense product MelSpectrogram does, its biggest cost after
    the STFT; on GPU the dense product is used.
    """

    def __init__(self, config: SpectrogramConfig, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.window = torch.hann_window(config.n_fft, device=self.device)
        filterbank = torchaudio.functional.melscale_fbanks(
            n_freqs=config.n_fft // 2 + 1, f_min=config.f_min_hz, f_max=config.f_max_hz,
            n_mels=config.n_mels, sample_rate=config.sample_rate_hz, norm=config.mel_norm,
            mel_scale=config.mel_scale)                           # (n_freqs, n_mels)
        dense = filterbank.T.contiguous().to(self.device)          # (n_mels, n_freqs)
        self._filterbank_dense = dense
        self._filterbank_sparse = None
        if self.device.type == "cpu":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only mm
                warnings.simplefilter("ignore", UserWarning)
                self._filterbank_sparse = dense.to_sparse_csr()

    def mel_power(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_mels, n_frames) mel power (not floored)."""
        config = self.config
        if self.device.type == "cpu":
            # torch.stft's own reflect padding is the slow generic pad; the same samples by
            # concatenation cost a tenth of it.
            half = config.n_fft // 2
            padded = torch.cat([waveforms[..., 1:half + 1].flip(-1), waveforms,
                                waveforms[..., -half - 1:-1].flip(-1)], dim=-1)
            spectrum = torch.stft(padded, n_fft=config.n_fft, hop_length=config.hop_length,
                                  window=self.window, center=False, return_complex=True)
        else:
            spectrum = torch.stft(waveforms, n_fft=config.n_fft, hop_length=config.hop_length,
                                  window=self.window, center=True, pad_mode="reflect",
                                  return_complex=True)
        # |X|^2 without the square root that .abs() would take; over all frames, so the result
        # is contiguous for the filterbank product, and only then cut to the tile's frames.
        power = torch.addcmul(spectrum.real.square(), spectrum.imag, spectrum.imag)
        if self._filterbank_sparse is None:
            return torch.matmul(self._filterbank_dense, power)[..., :config.n_frames]
        mel = torch.stack([self._filterbank_sparse @ tile for tile in power])
        return mel[..., :config.n_frames]

    def log_mel_db(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_mels, n_frames) log-mel in dB, floored at `config.floor_db`."""
        return self.mel_power(waveforms).clamp_min(self.config.power_floor).log10_().mul_(10.0)

    @torch.no_grad()
    def __call__(self, waveforms: torch.Tensor) -> TileFeatures:
        """Log-mel tiles and cheap per-tile statistics for a batch of tile waveforms.

        On CPU the statistics are reduced with numpy, whose summation order does not depend on
        the thread count (torch splits long reductions across threads), so a store's bytes do
        not depend on how many threads tiled it.
        """
        if waveforms.dim() != 2 or waveforms.shape[-1] != self.config.tile_samples:
            raise ValueError(f"expected (batch, {self.config.tile_samples}) waveforms, "
                             f"got {tuple(waveforms.shape)}")
        waveforms = waveforms.to(self.device, torch.float32)
        if self.device.type == "cpu":
            # One tile at a time: its spectrum stays in cache from STFT to log (measured 0.18
            # against 0.26-0.39 ms per audio second for batches of 20 tiles).
            mel = torch.cat([self.mel_power(tile) for tile in waveforms.split(1)])
            mel.clamp_min_(self.config.power_floor)
            log_mel_db = torch.log10(mel).mul_(10.0)
            return TileFeatures(log_mel_db, *_statistics_numpy(waveforms.numpy(), mel.numpy(),
                                                               log_mel_db.numpy()))
        mel = self.mel_power(waveforms).clamp_min_(self.config.power_floor)
        log_mel_db = torch.log10(mel).mul_(10.0)
        # Wiener entropy per frame on mel bands: exp(mean ln P) / mean P, then the frame average.
        geometric = torch.pow(10.0, log_mel_db.mean(dim=1) / 10.0)
        flatness = (geometric / mel.mean(dim=1)).mean(dim=-1)
        mean_square = waveforms.square().mean(dim=-1)
        rms_dbfs = 10.0 * torch.log10(mean_square.clamp_min(_MEAN_SQUARE_FLOOR))
        peak_dbfs = 20.0 * torch.log10(waveforms.abs().amax(dim=-1).clamp_min(_PEAK_FLOOR))
        return TileFeatures(log_mel_db, rms_dbfs, peak_dbfs, flatness)


def _statistics_numpy(waveforms: np.ndarray, mel: np.ndarray,
                      log_mel_db: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rms_dbfs, peak_dbfs, spectral_flatness as in `LogMelFrontEnd.__call__`.

    `einsum` (no BLAS, no threads) for the sum of squares: float32 accumulation over one tile
    is accurate to ~1e-5 relative, i.e. 1e-4 dB, at a tenth of the cost of a float64 sum.
    """
    mean_square = np.einsum("ij,ij->i", waveforms, waveforms) / waveforms.shape[-1]
    rms_dbfs = 10.0 * np.log10(np.maximum(mean_square, _MEAN_SQUARE_FLOOR))
    peak = np.maximum(waveforms.max(axis=-1), -waveforms.min(axis=-1))
    peak_dbfs = 20.0 * np.log10(np.maximum(peak, _PEAK_FLOOR))
    n_mels = mel.shape[1]
    geometric = 10.0 ** (log_mel_db.sum(axis=1) / (10.0 * n_mels))
    flatness = np.mean(geometric / (mel.sum(axis=1) / n_mels), axis=-1)
    return tuple(torch.from_numpy(np.asarray(value, dtype=np.float32))
                 for value in (rms_dbfs, peak_dbfs, flatness))


# --- Mel geometry: where a frequency or a time lands on a tile ------------------------------

# Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(frequencies_hz: Any, mel_scale: str = "slaney") -> np.ndarray:
    """Frequencies in Hz to mels on the scale the front end's filterbank uses ("slaney" or "htk")."""
    frequencies_hz = np.asarray(frequencies_hz, dtype=float)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + frequencies_hz / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    linear = frequencies_hz / _SLANEY_HZ_PER_MEL
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_HZ_PER_MEL
    with np.errstate(divide="ignore"):  # log of 0 Hz is discarded by the where
        logarithmic = min_log_mel + np.log(frequencies_hz / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOG_STEP
    return np.where(frequencies_hz >= _SLANEY_MIN_LOG_HZ, logarithmic, linear)


def mel_to_hz(mels: Any, mel_scale: str = "slaney") -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    mels = np.asarray(mels, dtype=float)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mels - min_log_mel))
    return np.where(mels >= min_log_mel, logarithmic, mels * _SLANEY_HZ_PER_MEL)


def _mel_grid(config: SpectrogramConfig) -> tuple[float, float]:
    """(mel of f_min_hz, mel spacing of the filter centres) of the front end's filterbank."""
    mel_low, mel_high = hz_to_mel([config.f_min_hz, config.f_max_hz], config.mel_scale)
    # n_mels triangles between n_mels + 2 equally spaced mel points; filter m peaks at point m + 1.
    return float(mel_low), float(mel_high - mel_low) / (config.n_mels + 1)


def mel_bin_centres_hz(config: SpectrogramConfig) -> np.ndarray:
    """(n_mels,) centre (peak) frequency of each mel filter of the front end, low to high."""
    mel_low, mel_step = _mel_grid(config)
    return mel_to_hz(mel_low + mel_step * np.arange(1, config.n_mels + 1), config.mel_scale)


def hz_to_mel_bin(frequencies_hz: Any, config: SpectrogramConfig) -> np.ndarray:
    """Fractional mel-bin position of frequencies: bin m's centre frequency maps to exactly m."""
    mel_low, mel_step = _mel_grid(config)
    return (hz_to_mel(frequencies_hz, config.mel_scale) - mel_low) / mel_step - 1.0


def frame_times_s(config: SpectrogramConfig) -> np.ndarray:
    """(n_frames,) tile-relative centre time of each STFT frame (centred STFT: frame j at j * hop)."""
    return np.arange(config.n_frames) * (config.hop_length / config.sample_rate_hz)
