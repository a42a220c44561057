"""A deterministic synthetic recorder archive with planted, annotated sound events.

`generate_archive(out_dir, SynthConfig())` writes what a real deployment of SM4-style recorders
leaves behind -- one folder per recorder of 16-bit mono WAV files named
`RECORDER_YYYYMMDD_HHMMSS.wav`, a `sites.csv` -- plus the ground truth a real deployment lacks:
`annotations.csv`, one time-frequency box per planted event (bird calls and songs, insect
choruses, rain, wind, traffic, aircraft, and a few rare events), each with its measured SNR.

What is planted (see `species_table()` and docs/synthetic_archive.md):
- 11 bird species with distinct call shapes (two-note whistle, rising and falling FM sweeps, a
  fast and a slow trill, an owl-like harmonic hoot, a buzz with introductory notes, chips, a
  multi-note song with two song types, a nightjar-like churr, a harmonic "kek" series). Each
  recorder hears its own individuals, which keep fixed offsets (pitch, tempo, pulse rate, song
  type, distance); every rendition is jittered on top.
- habitat preferences (grassland-only, canopy-only, canopy-preferring species), a diel pattern
  (dawn chorus, smaller evening peak, nocturnal and crepuscular species), overlapping calls.
- three insects (cricket chirps at night, katydid pulses at night and on warm afternoons,
  cicada buzz on warm afternoons), rain episodes spanning whole files on some days, wind with
  gusts, distant traffic, passing aircraft, and a pink/brown ambient floor with white recorder
  self-noise (never annotated: it is the background).
- distance-like levels: call distances are uniform over an area, with spherical spreading and
  habitat-dependent excess attenuation, so SNRs range from inaudible to loud.
- rare events, the anomalies an outlier search should surface (`RARE_SOURCES`): a rare bird
  (kind `rare_bird`) and two anthropogenic sounds (chainsaw bursts and gunshots, kind
  `anthropogenic`), at `rare_events_per_hour` per recording hour (about 0.25% of 3 s tiles by
  default); their own SeedSequence stream leaves every other draw unchanged.

Reproducibility: every file draws from its own `numpy.random.SeedSequence` keyed by (seed,
recorder, day, recording), so files are independent of each other and of the number of
workers; the same config gives byte-identical WAVs and CSVs on the same platform and library
versions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.fft
import soundfile as sf
from tqdm.auto import tqdm

from ..core.provenance import to_jsonable, write_config_json
from ..core.stage import atomic_write

logger = logging.getLogger(__name__)

STAGE = "synth-archive"

# Everything planted stays inside the band the tiles see (log-mel 50-15000 Hz).
PLANT_F_MIN_HZ = 50.0
PLANT_F_MAX_HZ = 15000.0

# Columns of annotations.csv, in order; the first eight are the shared contract.
ANNOTATION_COLUMNS = (
    "file", "recorder", "start_s", "end_s", "f_low_hz", "f_high_hz", "label", "kind",
    "individual_id", "snr_db", "peak_dbfs", "distance_m", "habitat", "file_start_time",
)
EVENT_KINDS = ("bird", "insect", "rain", "wind", "traffic", "aircraft", "rare_bird", "anthropogenic")

# SeedSequence stream keys: each kind of random decision has its own stream, so adding a day or
# a recorder never changes the draws behind anything that already existed.
_STREAM_SITES = 1
_STREAM_INDIVIDUALS = 2
_STREAM_WEATHER = 3
_STREAM_FILE = 4
_STREAM_INSECT_CHORUS = 5
_STREAM_RARE = 6  # rare events: a stream of their own, so planting them changes no other draw

# Order of the per-source child streams spawned from a file's SeedSequence.
_FILE_SUBSTREAMS = ("floor", "wind", "traffic", "aircraft", "rain", "insects", "birds")

_INT16_FULL_SCALE = 32767.0

# Bumped whenever a change to the generator changes its output for the same config, so cached
# archives (runs/_cache, keyed by config and this number) are regenerated.
GENERATOR_VERSION = 3

# Annotated upper edges of the smoothly rolling-off broadband sources: where their spectrum has
# fallen about 20 dB below its low-frequency level.
TRAFFIC_F_HIGH_HZ = 2500.0
AIRCRAFT_F_HIGH_HZ = 3500.0
WIND_F_HIGH_HZ = 800.0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Shape and randomness of the synthetic archive; every field maps to a CLI option."""

    seed: int = 0  # master seed; the same config gives byte-identical files
    recorders: int = 9  # number of recorders (S4A10001, S4A10002, ...)
    grassland_recorders: int = 2  # the first this many stand in open grassland, the rest under canopy
    days: int = 2  # consecutive recording days from start_date
    start_date: str = "2024-05-24"  # ISO date of the first day
    # Local clock hours at which each day's recordings start: night, four dawn-chorus slots,
    # midday, a warm afternoon and dusk.
    recording_start_hours: tuple[float, ...] = (0.5, 4.5, 5.0, 5.5, 6.5, 12.0, 16.0, 21.0)
    file_s: float = 60.0  # duration of every recording
    sample_rate_hz: int = 44100  # WAV sample rate; >= 32000 so 15 kHz stays below Nyquist
    site_lat: float = 48.0  # centre of the deployment (an arbitrary temperate site), decimal degrees
    site_lon: float = 11.0
    sunrise_hour: float = 5.25  # local clock time of sunrise; the dawn chorus peaks just after
    sunset_hour: float = 21.25  # local clock time of sunset; a smaller evening peak precedes it
    rainy_days: tuple[int, ...] = (1,)  # 0-based days that always get a rain episode (days past the end are ignored)
    rain_day_probability: float = 0.25  # chance that any other day gets a rain episode
    call_rate_scale: float = 1.0  # multiplies every bird's calling rate
    rare_events_per_hour: float = 2.0  # rare bird, chainsaw and gunshot events per recording hour (0 = none)
    workers: int = 1  # processes generating files in parallel; never changes the output

    def __post_init__(self) -> None:
        # The CLI may hand lists; store tuples so configs compare and serialise the same way.
        object.__setattr__(self, "recording_start_hours",
                           tuple(float(h) for h in self.recording_start_hours))
        object.__setattr__(self, "rainy_days", tuple(int(d) for d in self.rainy_days))
        problems = []
        if self.recorders < 1:
            problems.append(f"recorders must be >= 1, got {self.recorders}")
        if not 0 <= self.grassland_recorders <= self.recorders:
            problems.append(f"grassland_recorders must be in [0, recorders={self.recorders}], "
                            f"got {self.grassland_recorders}")
        if self.days < 1:
            problems.append(f"days must be >= 1, got {self.days}")
        try:
            dt.date.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            problems.append(f"start_date must be an ISO date like 2024-05-24, got {self.start_date!r}")
        hours = self.recording_start_hours
        if not hours:
            problems.append("recording_start_hours must name at least one hour")
        if any(not 0.0 <= h < 24.0 for h in hours):
            problems.append(f"recording_start_hours must lie in [0, 24), got {hours}")
        starts_s = sorted(round(h * 3600) for h in hours)
        # Gaps between consecutive recordings, including the one across midnight.
        gaps_s = [b - a for a, b in zip(starts_s, starts_s[1:] + [starts_s[0] + 86400])] if starts_s else []
        if gaps_s and min(gaps_s) < self.file_s:
            problems.append(f"recordings of file_s={self.file_s} s starting at hours {hours} would overlap")
        if not 1.0 <= self.file_s <= 3600.0:
            problems.append(f"file_s must be in [1, 3600] seconds, got {self.file_s}")
        if self.sample_rate_hz < 2.0 * PLANT_F_MAX_HZ + 2000:
            problems.append(f"sample_rate_hz must be >= 32000 so events up to {PLANT_F_MAX_HZ:.0f} Hz "
                            f"stay below Nyquist, got {self.sample_rate_hz}")
        if not (0.0 < self.sunrise_hour < self.sunset_hour < 24.0):
            problems.append(f"need 0 < sunrise_hour < sunset_hour < 24, got "
                            f"{self.sunrise_hour} and {self.sunset_hour}")
        if not 0.0 <= self.rain_day_probability <= 1.0:
            problems.append(f"rain_day_probability must be in [0, 1], got {self.rain_day_probability}")
        if any(d < 0 for d in self.rainy_days):
            problems.append(f"rainy_days must be >= 0, got {self.rainy_days}")
        if self.call_rate_scale <= 0:
            problems.append(f"call_rate_scale must be > 0, got {self.call_rate_scale}")
        if not 0.0 <= self.rare_events_per_hour <= 600.0:
            problems.append(f"rare_events_per_hour must be in [0, 600], got {self.rare_events_per_hour}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    @property
    def sorted_start_hours(self) -> tuple[float, ...]:
        return tuple(sorted(self.recording_start_hours))


def recorder_names(n_recorders: int) -> list[str]:
    """SM4-style serial numbers: S4A10001, S4A10002, ..."""
    return [f"S4A{10001 + i:05d}" for i in range(n_recorders)]


# --------------------------------------------------------------------------------------------
# Diel activity: smooth functions of local clock hour, peak value about 1
# --------------------------------------------------------------------------------------------

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bump(hour: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((hour - centre) / width) ** 2)


def diel_activity(pattern: str, hour: float, sunrise_hour: float, sunset_hour: float) -> float:
    """Relative activity (about 0..1) of a diel `pattern` at local clock `hour`.

    Patterns: dawn (dawn chorus peak just after sunrise, smaller evening peak, little song by
    day), diurnal (active all day, dawn peak), nocturnal (dark hours), crepuscular (dusk and
    pre-dawn peaks, some night activity), night_insect, afternoon_insect, night_and_afternoon.
    """
    daylight = _sigmoid((hour - sunrise_hour) / 0.35) * _sigmoid((sunset_hour - hour) / 0.35)
    night = 1.0 - daylight
    dawn = _bump(hour, sunrise_hour + 0.3, 0.8)
    dusk = _bump(hour, sunset_hour - 0.5, 0.7)
    warm_afternoon = _bump(hour, 15.5, 2.2)
    if pattern == "dawn":
        return 0.02 + 0.98 * dawn + 0.35 * dusk + 0.12 * daylight
    if pattern == "diurnal":
        return 0.02 + 0.55 * dawn + 0.4 * daylight + 0.2 * dusk
    if pattern == "nocturnal":
        return 0.02 + 0.95 * night * (1.0 - 0.6 * _bump(hour, sunrise_hour, 0.6))
    if pattern == "crepuscular":
        return (0.02 + 0.9 * _bump(hour, sunset_hour + 0.75, 0.8)
                + 0.6 * _bump(hour, sunrise_hour - 0.5, 0.6) + 0.45 * night)
    if pattern == "night_insect":
        return 0.03 + 0.9 * night + 0.25 * dusk
    if pattern == "afternoon_insect":
        return 0.95 * warm_afternoon * daylight
    if pattern == "night_and_afternoon":
        return 0.02 + 0.7 * night + 0.55 * warm_afternoon * daylight
    raise ValueError(f"unknown diel pattern {pattern!r}")


# --------------------------------------------------------------------------------------------
# Signal helpers
# --------------------------------------------------------------------------------------------

def _ramped_envelope(n: int, sr: int, attack_s: float, release_s: float) -> np.ndarray:
    """Unit envelope with sin^2 attack and release, so no event starts or ends with a click."""
    env = np.ones(n, dtype=np.float64)
    n_attack = int(min(max(1, round(attack_s * sr)), n // 2))
    n_release = int(min(max(1, round(release_s * sr)), n - n_attack))
    if n_attack > 0:
        env[:n_attack] = np.sin(0.5 * np.pi * (np.arange(n_attack) + 0.5) / n_attack) ** 2
    if n_release > 0:
        env[n - n_release:] = np.sin(0.5 * np.pi * (np.arange(n_release)[::-1] + 0.5) / n_release) ** 2
    return env


def _fade_edges(signal: np.ndarray, sr: int, fade_s: float) -> np.ndarray:
    """Fade a long signal in and out in place (cheaper than a full-length envelope)."""
    n_fade = int(min(round(fade_s * sr), signal.size // 2))
    if n_fade > 0:
        ramp = (np.sin(0.5 * np.pi * (np.arange(n_fade) + 0.5) / n_fade) ** 2).astype(signal.dtype)
        signal[:n_fade] *= ramp
        signal[signal.size - n_fade:] *= ramp[::-1]
    return signal


def _fm_tone(freq_hz: np.ndarray, sr: int, phase0: float) -> np.ndarray:
    """A sinusoid following the instantaneous frequency track `freq_hz` (one value per sample)."""
    phase = phase0 + 2.0 * np.pi * np.cumsum(freq_hz) / sr
    return np.sin(phase)


def _band_mask(freqs_hz: np.ndarray, f_low_hz: float, f_high_hz: float) -> np.ndarray:
    """Pass-band gain: 1 inside, a raised-cosine taper over the outer 10% (min 20 Hz), 0 outside.

    The taper lies inside [f_low_hz, f_high_hz], so nothing leaks outside the annotated box.
    """
    taper_hz = max(20.0, 0.1 * (f_high_hz - f_low_hz))
    gain = np.zeros_like(freqs_hz, dtype=np.float64)
    inside = (freqs_hz >= f_low_hz) & (freqs_hz <= f_high_hz)
    f = freqs_hz[inside]
    rise = np.clip((f - f_low_hz) / taper_hz, 0.0, 1.0)
    fall = np.clip((f_high_hz - f) / taper_hz, 0.0, 1.0)
    gain[inside] = np.sin(0.5 * np.pi * np.minimum(rise, fall)) ** 2
    return gain


def _colored_noise(rng: np.random.Generator, n: int, sr: int, f_low_hz: float, f_high_hz: float,
                   psd: Callable[[np.ndarray], np.ndarray], taper: bool = True) -> np.ndarray:
    """Gaussian noise with one-sided power spectral density `psd(f)` (amplitude^2/Hz) in a band.

    Built in the frequency domain: only the bins of the band get random values, so narrow
    bands are cheap, and the band edges are exact (see `_band_mask`).
    """
    n_bins = n // 2 + 1
    bin_hz = sr / n
    k_low = max(1, int(math.floor(f_low_hz / bin_hz)))
    k_high = min(n_bins - 1, int(math.ceil(f_high_hz / bin_hz)))
    spectrum = np.zeros(n_bins, dtype=np.complex64)
    if k_high > k_low:
        freqs = np.arange(k_low, k_high + 1) * bin_hz
        # E|X_k|^2 = psd * sr * n / 2 makes the time-domain variance equal the integral of psd.
        power = psd(freqs) * (_band_mask(freqs, f_low_hz, f_high_hz) if taper else 1.0)
        scale = np.sqrt(power * (sr * n / 4.0)).astype(np.float32)
        spectrum.real[k_low:k_high + 1] = scale * rng.standard_normal(freqs.size, dtype=np.float32)
        spectrum.imag[k_low:k_high + 1] = scale * rng.standard_normal(freqs.size, dtype=np.float32)
    return scipy.fft.irfft(spectrum, n)


def _band_limit(signal: np.ndarray, sr: int, f_low_hz: float, f_high_hz: float) -> np.ndarray:
    """Restrict a signal to [f_low_hz, f_high_hz] with the tapered mask (zero phase)."""
    spectrum = scipy.fft.rfft(signal)
    spectrum *= _band_mask(np.fft.rfftfreq(signal.size, 1.0 / sr), f_low_hz, f_high_hz)
    return scipy.fft.irfft(spectrum, signal.size)


def _slow_random_curve(rng: np.random.Generator, duration_s: float, corner_hz: float,
                       control_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean, unit-std random curve varying slower than `corner_hz`: (times_s, values)."""
    n_control = int(math.ceil(duration_s * control_hz)) + 2
    spectrum = np.fft.rfft(rng.standard_normal(n_control))
    spectrum[np.fft.rfftfreq(n_control, 1.0 / control_hz) > corner_hz] = 0.0
    curve = np.fft.irfft(spectrum, n_control)
    return np.arange(n_control) / control_hz, (curve - curve.mean()) / (curve.std() + 1e-12)


def _jitter(rng: np.random.Generator, sd: float) -> float:
    """A multiplicative per-rendition jitter factor near 1."""
    return min(1.0 + 3 * sd, max(1.0 - 3 * sd, 1.0 + float(rng.normal(0.0, sd))))


def _box_margin_hz(f_hz: float) -> float:
    """Margin added to a tone's frequency track so the box also holds its spectral spread."""
    return max(60.0, 0.03 * f_hz)


def _box(f_min_hz: float, f_max_hz: float) -> tuple[float, float]:
    f_low = max(PLANT_F_MIN_HZ, f_min_hz - _box_margin_hz(f_min_hz))
    f_high = min(PLANT_F_MAX_HZ, f_max_hz + _box_margin_hz(f_max_hz))
    return f_low, f_high


# --------------------------------------------------------------------------------------------
# Birds: species, individuals, call renderers
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Individual:
    """One bird heard by one recorder, with the fixed offsets that make it recognisable."""

    label: str
    individual_id: str
    freq_scale: float  # multiplies every frequency of the species template
    tempo_scale: float  # multiplies note and song durations
    rate_scale: float  # multiplies trill pulse rates and buzz modulation rates
    variant: int  # song type / call variant (0 or 1)
    distance_m: float  # typical distance from the recorder
    level_offset_db: float  # how loud this individual is relative to its species


@dataclasses.dataclass(frozen=True)
class Call:
    """A rendered call: samples at unit peak, offset within the rendition, frequency box."""

    offset_s: float
    signal: np.ndarray
    f_low_hz: float
    f_high_hz: float


def _single(signal: np.ndarray, f_min_hz: float, f_max_hz: float) -> list[Call]:
    peak = float(np.max(np.abs(signal))) or 1.0
    f_low, f_high = _box(f_min_hz, f_max_hz)
    return [Call(0.0, (signal / peak).astype(np.float32), f_low, f_high)]


def _render_whistler(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Two-note tonal whistle ("fee-bee"): a flat note with light vibrato, then a lower note."""
    f1 = 3150.0 * ind.freq_scale * _jitter(rng, 0.01)
    ratio = (0.80 if ind.variant == 0 else 0.86) * _jitter(rng, 0.005)
    d1 = 0.42 * ind.tempo_scale * _jitter(rng, 0.05)
    gap = 0.10 * ind.tempo_scale * _jitter(rng, 0.1)
    d2 = 0.34 * ind.tempo_scale * _jitter(rng, 0.05)
    t1 = np.arange(int(d1 * sr)) / sr
    t2 = np.arange(int(d2 * sr)) / sr
    track1 = f1 + 30.0 * np.sin(2 * np.pi * 5.5 * t1)
    track2 = f1 * ratio * (1.0 - 0.02 * t2 / d2)
    note1 = _fm_tone(track1, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(t1.size, sr, 0.03, 0.06)
    note2 = 0.85 * _fm_tone(track2, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(t2.size, sr, 0.03, 0.06)
    signal = np.concatenate([note1, np.zeros(int(gap * sr)), note2])
    return _single(signal, float(track2.min()), float(track1.max()))


def _render_upsweeper(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Rising exponential FM sweep, about 2.1 -> 5.4 kHz in 0.28 s."""
    f0 = 2100.0 * ind.freq_scale * _jitter(rng, 0.015)
    f1 = 5400.0 * ind.freq_scale * _jitter(rng, 0.015)
    d = 0.28 * ind.tempo_scale * _jitter(rng, 0.06)
    u = np.arange(int(d * sr)) / (d * sr)
    track = f0 * (f1 / f0) ** (u ** 1.3)
    signal = _fm_tone(track, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(u.size, sr, 0.015, 0.03)
    return _single(signal, float(track.min()), float(track.max()))


def _render_downsweeper(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Falling FM sweep, about 8.2 -> 3.8 kHz in 0.16 s, dropping fastest at the start."""
    f0 = 8200.0 * ind.freq_scale * _jitter(rng, 0.015)
    f1 = 3800.0 * ind.freq_scale * _jitter(rng, 0.015)
    d = 0.16 * ind.tempo_scale * _jitter(rng, 0.06)
    u = np.arange(int(d * sr)) / (d * sr)
    track = f1 + (f0 - f1) * (1.0 - u) ** 2
    signal = _fm_tone(track, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(u.size, sr, 0.006, 0.03)
    return _single(signal, float(track.min()), float(track.max()))


def _pulse_train(sr: int, duration_s: float, rate_hz: float, pulse_s: float,
                 pulse: Callable[[int, float], np.ndarray], crescendo_s: float) -> np.ndarray:
    """Pulses `pulse(i, progress)` placed every 1/rate_hz seconds, under a crescendo envelope."""
    n_pulses = max(2, int(duration_s * rate_hz))
    n = int(((n_pulses - 1) / rate_hz + pulse_s) * sr) + 1
    out = np.zeros(n)
    for i in range(n_pulses):
        start = int(round(i / rate_hz * sr))
        p = pulse(i, i / (n_pulses - 1))
        out[start:start + p.size] += p[: n - start]
    return out * _ramped_envelope(n, sr, crescendo_s, 0.04) * np.linspace(0.55, 1.0, n) ** 0.5


def _render_fast_triller(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Fast trill: ~23 down-slurred pulses per second near 6-7 kHz, ~1.6 s."""
    rate = 23.0 * ind.rate_scale * _jitter(rng, 0.02)
    d = 1.6 * ind.tempo_scale * _jitter(rng, 0.08)
    f_hi = 7000.0 * ind.freq_scale * _jitter(rng, 0.01)
    f_lo = 5900.0 * ind.freq_scale * _jitter(rng, 0.01)
    pulse_s = 0.55 / rate
    u = np.arange(int(pulse_s * sr)) / (pulse_s * sr)
    track = f_hi + (f_lo - f_hi) * u
    env = _ramped_envelope(u.size, sr, 0.35 * pulse_s, 0.45 * pulse_s)
    pulse = _fm_tone(track, sr, rng.uniform(0, 2 * np.pi)) * env
    signal = _pulse_train(sr, d, rate, pulse_s, lambda i, progress: pulse, 0.25)
    return _single(signal, float(track.min()), float(track.max()))


def _render_slow_triller(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Slow trill: ~7.5 up-slurred pulses per second, 2.7 -> 3.5 kHz, drifting down ~6%."""
    rate = 7.5 * ind.rate_scale * _jitter(rng, 0.03)
    d = 2.0 * ind.tempo_scale * _jitter(rng, 0.08)
    f_lo = 2700.0 * ind.freq_scale * _jitter(rng, 0.01)
    f_hi = 3500.0 * ind.freq_scale * _jitter(rng, 0.01)
    pulse_s = 0.5 / rate
    u = np.arange(int(pulse_s * sr)) / (pulse_s * sr)
    env = _ramped_envelope(u.size, sr, 0.01, 0.02)
    phase0 = rng.uniform(0, 2 * np.pi)

    def pulse(i: int, progress: float) -> np.ndarray:
        return _fm_tone((f_lo + (f_hi - f_lo) * u) * (1.0 - 0.06 * progress), sr, phase0) * env

    signal = _pulse_train(sr, d, rate, pulse_s, pulse, 0.2)
    return _single(signal, f_lo * 0.94, f_hi)


_HOOT_HARMONIC_AMPLITUDES = (1.0, 0.55, 0.3, 0.15)


def _render_hooter(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Owl-like hoots: a harmonic stack on f0 ~410 Hz (4 harmonics), 2 or 3 hoots, gliding down."""
    f0 = 410.0 * ind.freq_scale * _jitter(rng, 0.01)
    n_hoots = 2 if ind.variant == 0 else 3
    d = 0.5 * ind.tempo_scale * _jitter(rng, 0.05)
    gap = 0.32 * ind.tempo_scale * _jitter(rng, 0.08)
    u = np.arange(int(d * sr)) / (d * sr)
    env = _ramped_envelope(u.size, sr, 0.06, 0.12)
    pieces = []
    for h in range(n_hoots):
        track = f0 * 0.97 ** h * (1.0 - 0.06 * u)
        phase0 = rng.uniform(0, 2 * np.pi)
        stack = sum(a * _fm_tone(track * (k + 1), sr, phase0 * (k + 1))
                    for k, a in enumerate(_HOOT_HARMONIC_AMPLITUDES))
        pieces += [stack * env, np.zeros(int(gap * sr))]
    signal = np.concatenate(pieces[:-1])
    f_min = f0 * 0.97 ** (n_hoots - 1) * 0.94
    return _single(signal, f_min, f0 * len(_HOOT_HARMONIC_AMPLITUDES))


def _render_buzzer(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Two short introductory notes near 7.8 kHz, then a ~1.1 s noisy buzz 5.3-8.3 kHz, AM ~95 Hz."""
    f_intro = 7800.0 * ind.freq_scale * _jitter(rng, 0.01)
    f_low = 5300.0 * ind.freq_scale * _jitter(rng, 0.01)
    f_high = 8300.0 * ind.freq_scale * _jitter(rng, 0.01)
    d = 1.1 * ind.tempo_scale * _jitter(rng, 0.08)
    am_hz = 95.0 * ind.rate_scale * _jitter(rng, 0.02)
    n_intro = int(0.045 * sr)
    intro_track = f_intro * (1.0 - 0.04 * np.arange(n_intro) / n_intro)
    intro = 0.6 * _fm_tone(intro_track, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(n_intro, sr, 0.005, 0.015)
    n_buzz = int(d * sr)
    noise = _band_limit(rng.standard_normal(n_buzz), sr, f_low, f_high)
    t = np.arange(n_buzz) / sr
    buzz = noise / (noise.std() + 1e-12) * (1.0 - 0.7 * (0.5 + 0.5 * np.cos(2 * np.pi * am_hz * t)))
    buzz *= _ramped_envelope(n_buzz, sr, 0.04, 0.08) * 0.35  # noise peaks ~3x its rms
    gap = np.zeros(int(0.075 * sr))
    signal = np.concatenate([intro, gap, intro, np.zeros(int(0.05 * sr)), buzz])
    # The noise band is exact (tapered mask), so the box needs no tone margin on that side.
    f_box_low = max(PLANT_F_MIN_HZ, min(f_low, intro_track.min() - _box_margin_hz(f_intro)))
    f_box_high = min(PLANT_F_MAX_HZ, max(f_high, intro_track.max() + _box_margin_hz(f_intro)))
    peak = float(np.max(np.abs(signal))) or 1.0
    return [Call(0.0, (signal / peak).astype(np.float32), f_box_low, f_box_high)]


def _render_chipper(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """A bout of 3-8 short chips (~32 ms, fast 8.8 -> 4.3 kHz drop); every chip is one call."""
    n_chips = int(rng.integers(3, 9))
    interval = 0.26 * ind.tempo_scale
    calls, offset = [], 0.0
    for _ in range(n_chips):
        f0 = 8800.0 * ind.freq_scale * _jitter(rng, 0.02)
        f1 = 4300.0 * ind.freq_scale * _jitter(rng, 0.02)
        d = 0.032 * _jitter(rng, 0.1)
        u = np.arange(int(d * sr)) / (d * sr)
        track = f1 + (f0 - f1) * np.exp(-4.0 * u)
        chip = _fm_tone(track, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(u.size, sr, 0.002, 0.012)
        (call,) = _single(chip, float(track.min()), float(track.max()))
        calls.append(dataclasses.replace(call, offset_s=offset))
        offset += interval * _jitter(rng, 0.15) + d
    return calls


# Song types: notes as (start frequency, end frequency) relative to the individual's base, and
# duration in seconds before tempo scaling.
_SONG_TYPES = (
    ((1.0, 1.0, 0.13), (1.0, 1.0, 0.13), (1.38, 1.22, 0.11), (0.78, 0.78, 0.17), (1.25, 0.88, 0.24)),
    ((1.25, 1.25, 0.10), (0.92, 0.92, 0.10), (0.92, 0.92, 0.10), (1.45, 1.05, 0.20), (1.10, 1.10, 0.16)),
)


def _render_songster(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Multi-note song (base ~3.5 kHz): the individual's main song type 75% of the time, the
    other otherwise; one rendition in five is cut short by one or two notes."""
    song_type = ind.variant if rng.random() < 0.75 else 1 - ind.variant
    notes = _SONG_TYPES[song_type]
    if rng.random() < 0.2:
        notes = notes[: len(notes) - int(rng.integers(1, 3))]
    base = 3500.0 * ind.freq_scale * _jitter(rng, 0.01)
    pieces, f_min, f_max = [], np.inf, 0.0
    for rel_start, rel_end, note_s in notes:
        d = note_s * ind.tempo_scale * _jitter(rng, 0.05)
        u = np.arange(int(d * sr)) / (d * sr)
        track = base * (rel_start + (rel_end - rel_start) * u)
        pieces += [_fm_tone(track, sr, rng.uniform(0, 2 * np.pi)) * _ramped_envelope(u.size, sr, 0.012, 0.025),
                   np.zeros(int(0.065 * ind.tempo_scale * _jitter(rng, 0.1) * sr))]
        f_min, f_max = min(f_min, float(track.min())), max(f_max, float(track.max()))
    return _single(np.concatenate(pieces[:-1]), f_min, f_max)


def _render_churrer(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Nightjar-like churr: 2.5-5 s of ~36 pulses/s on a ~1.45 kHz carrier with its 2nd harmonic."""
    d = rng.uniform(2.5, 5.0) * ind.tempo_scale
    rate = 36.0 * ind.rate_scale * _jitter(rng, 0.02)
    carrier = 1450.0 * ind.freq_scale * _jitter(rng, 0.01)
    t = np.arange(int(d * sr)) / sr
    track = carrier * (1.0 + 0.05 * np.sin(2 * np.pi * t / d * rng.uniform(0.7, 1.5)))
    phase0 = rng.uniform(0, 2 * np.pi)
    tone = _fm_tone(track, sr, phase0) + 0.45 * _fm_tone(2 * track, sr, 2 * phase0)
    pulses = (0.5 + 0.5 * np.cos(2 * np.pi * rate * t)) ** 2
    signal = tone * pulses * _ramped_envelope(t.size, sr, 0.2, 0.3)
    # The pulsing adds sidebands at +-rate and +-2*rate around each line.
    return _single(signal, float(track.min()) - 2 * rate, 2.0 * float(track.max()) + 2 * rate)


_KEK_HARMONIC_AMPLITUDES = (0.55, 1.0, 0.8, 0.45, 0.25)


def _render_kekker(ind: Individual, rng: np.random.Generator, sr: int) -> list[Call]:
    """Nasal "kek-kek-kek": 3-5 harmonic notes (f0 ~1.2 kHz, 5 harmonics) 0.17 s apart."""
    f0 = 1200.0 * ind.freq_scale * _jitter(rng, 0.01)
    n_keks = int(rng.integers(3, 6))
    interval = 0.17 * ind.tempo_scale * _jitter(rng, 0.05)
    d = 0.085 * ind.tempo_scale
    u = np.arange(int(d * sr)) / (d * sr)
    env = _ramped_envelope(u.size, sr, 0.008, 0.025)
    n = int(((n_keks - 1) * interval + d) * sr) + 1
    signal = np.zeros(n)
    for i in range(n_keks):
        track = f0 * _jitter(rng, 0.005) * (1.0 + 0.04 * u)
        phase0 = rng.uniform(0, 2 * np.pi)
        kek = sum(a * _fm_tone(track * (k + 1), sr, phase0 * (k + 1))
                  for k, a in enumerate(_KEK_HARMONIC_AMPLITUDES))
        start = int(round(i * interval * sr))
        signal[start:start + u.size] += kek * env
    return _single(signal, f0 * 0.985, f0 * 1.04 * 1.015 * len(_KEK_HARMONIC_AMPLITUDES))


@dataclasses.dataclass(frozen=True)
class BirdSpecies:
    """A synthetic bird species: call shape, where and when it calls, how loud and how often."""

    label: str
    call_shape: str
    f_range_hz: tuple[float, float]  # nominal range of the template (individuals shift it ~5%)
    typical_duration_s: float
    grassland_weight: float  # 0 = never in grassland; multiplies activity there
    canopy_weight: float
    diel: str  # pattern name for diel_activity()
    mean_gap_s: float  # start-to-start interval between renditions at full activity
    source_dbfs: float  # peak level of a rendition at 10 m
    render: Callable[[Individual, np.random.Generator, int], list[Call]]

    def habitat_weight(self, habitat: str) -> float:
        return self.grassland_weight if habitat == "grassland" else self.canopy_weight

    @property
    def habitat_preference(self) -> str:
        if self.canopy_weight == 0:
            return "grassland only"
        if self.grassland_weight == 0:
            return "canopy only"
        if self.canopy_weight > 1.5 * self.grassland_weight:
            return "canopy-preferring"
        if self.grassland_weight > 1.5 * self.canopy_weight:
            return "grassland-preferring"
        return "both"


BIRD_SPECIES: tuple[BirdSpecies, ...] = (
    BirdSpecies(label="whistler", call_shape="two-note tonal whistle",
                f_range_hz=(2450, 3250), typical_duration_s=0.86, grassland_weight=0.15, canopy_weight=1.0,
                diel="dawn", mean_gap_s=7.0, source_dbfs=-21.0, render=_render_whistler),
    BirdSpecies(label="upsweeper", call_shape="rising FM sweep",
                f_range_hz=(2100, 5400), typical_duration_s=0.28, grassland_weight=0.8, canopy_weight=0.8,
                diel="diurnal", mean_gap_s=5.0, source_dbfs=-23.0, render=_render_upsweeper),
    BirdSpecies(label="downsweeper", call_shape="falling FM sweep",
                f_range_hz=(3800, 8200), typical_duration_s=0.16, grassland_weight=0.2, canopy_weight=1.0,
                diel="dawn", mean_gap_s=4.0, source_dbfs=-24.0, render=_render_downsweeper),
    BirdSpecies(label="fast_triller", call_shape="fast trill (~23 pulses/s)",
                f_range_hz=(5900, 7000), typical_duration_s=1.6, grassland_weight=1.0, canopy_weight=0.0,
                diel="dawn", mean_gap_s=6.0, source_dbfs=-22.0, render=_render_fast_triller),
    BirdSpecies(label="slow_triller", call_shape="slow trill (~7.5 pulses/s)",
                f_range_hz=(2540, 3500), typical_duration_s=2.0, grassland_weight=0.3, canopy_weight=1.0,
                diel="diurnal", mean_gap_s=8.0, source_dbfs=-22.0, render=_render_slow_triller),
    BirdSpecies(label="hooter", call_shape="owl-like harmonic hoots (f0 ~410 Hz)",
                f_range_hz=(360, 1640), typical_duration_s=1.4, grassland_weight=0.0, canopy_weight=1.0,
                diel="nocturnal", mean_gap_s=9.0, source_dbfs=-18.0, render=_render_hooter),
    BirdSpecies(label="buzzer", call_shape="intro notes + noisy buzz band",
                f_range_hz=(5300, 8300), typical_duration_s=1.4, grassland_weight=1.0, canopy_weight=0.0,
                diel="dawn", mean_gap_s=7.0, source_dbfs=-22.0, render=_render_buzzer),
    BirdSpecies(label="chipper", call_shape="short broadband chips in bouts",
                f_range_hz=(4300, 8800), typical_duration_s=0.032, grassland_weight=0.6, canopy_weight=1.0,
                diel="diurnal", mean_gap_s=20.0, source_dbfs=-24.0, render=_render_chipper),
    BirdSpecies(label="songster", call_shape="multi-note song, two song types",
                f_range_hz=(2730, 5080), typical_duration_s=1.0, grassland_weight=0.3, canopy_weight=1.0,
                diel="dawn", mean_gap_s=5.0, source_dbfs=-19.0, render=_render_songster),
    BirdSpecies(label="churrer", call_shape="nightjar-like churr (~36 pulses/s)",
                f_range_hz=(1310, 3120), typical_duration_s=3.75, grassland_weight=1.0, canopy_weight=0.0,
                diel="crepuscular", mean_gap_s=7.0, source_dbfs=-21.0, render=_render_churrer),
    BirdSpecies(label="kekker", call_shape="nasal harmonic kek series (f0 ~1.2 kHz)",
                f_range_hz=(1180, 6250), typical_duration_s=0.6, grassland_weight=0.4, canopy_weight=1.0,
                diel="diurnal", mean_gap_s=14.0, source_dbfs=-15.0, render=_render_kekker),
)
_SPECIES_BY_LABEL = {s.label: s for s in BIRD_SPECIES}

# Excess attenuation beyond spherical spreading, dB per metre at 4 kHz (grows with sqrt(f)):
# foliage scatters high frequencies much more than open grass does.
_EXCESS_DB_PER_M = {"grassland": 0.03, "canopy": 0.1}
_CALL_DISTANCE_RANGE_M = (5.0, 150.0)


def _make_individuals(config: SynthConfig, recorder_index: int, recorder: str,
                      habitat: str) -> list[Individual]:
    """The birds a recorder hears: 1-3 individuals of every species allowed in its habitat."""
    individuals = []
    for species_index, species in enumerate(BIRD_SPECIES):
        weight = species.habitat_weight(habitat)
        if weight <= 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence(
            [config.seed, _STREAM_INDIVIDUALS, recorder_index, species_index]))
        n_individuals = 1 + int(rng.binomial(2, 0.5 * min(1.0, weight)))
        lo, hi = _CALL_DISTANCE_RANGE_M
        for k in range(n_individuals):
            individuals.append(Individual(
                label=species.label,
                individual_id=f"{recorder}-{species.label}-{k + 1}",
                freq_scale=float(np.clip(rng.normal(1.0, 0.045), 0.9, 1.1)),
                tempo_scale=float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)),
                rate_scale=float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15)),
                variant=int(rng.integers(0, 2)),
                # Uniform over an annulus: distant birds outnumber near ones, as in the field.
                distance_m=float(math.sqrt(rng.uniform(lo ** 2, hi ** 2))),
                level_offset_db=float(rng.normal(0.0, 2.0)),
            ))
    return individuals


# --------------------------------------------------------------------------------------------
# Insects and geophony
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """A non-bird planted source, for the species table."""

    label: str
    kind: str
    call_shape: str
    f_range_hz: tuple[float, float]
    habitat_preference: str
    diel: str


INSECTS: tuple[SourceInfo, ...] = (
    SourceInfo("cricket", "insect", "chorus of chirps: 3-4 syllables at ~30/s on a 4.3-4.9 kHz carrier",
               (4150, 5050), "grassland-preferring", "night_insect"),
    SourceInfo("katydid", "insect", "noisy ~9-12.5 kHz band pulsed at ~14/s in 1-2 s phrases",
               (8800, 12800), "canopy-preferring", "night_and_afternoon"),
    SourceInfo("cicada", "insect", "noisy band around 6.1-6.7 kHz, ~120 Hz AM with slow swells",
               (5300, 7500), "canopy-preferring", "afternoon_insect"),
)
_INSECT_HABITAT_WEIGHT = {
    "cricket": {"grassland": 0.95, "canopy": 0.4},
    "katydid": {"grassland": 0.3, "canopy": 0.75},
    "cicada": {"grassland": 0.4, "canopy": 0.9},
}
# Peak level range of a chorus (distance to the nearest singers varies from file to file).
_INSECT_PEAK_DBFS_RANGE = {"cricket": (-58.0, -40.0), "katydid": (-52.0, -36.0), "cicada": (-55.0, -38.0)}
GEOPHONY: tuple[SourceInfo, ...] = (
    SourceInfo("rain", "rain", "drop impulses + hiss, episodes spanning whole files", (600, 13000), "both",
               "episodes on rainy days"),
    SourceInfo("wind", "wind", "low-frequency rumble with gusts, smooth roll-off", (50, WIND_F_HIGH_HZ), "both (stronger in grassland)",
               "windy days, mostly afternoon"),
    SourceInfo("traffic", "traffic", "distant road: low-frequency broadband rolling off above 1 kHz, slow swells",
               (50, TRAFFIC_F_HIGH_HZ), "both",
               "day, rush hours"),
    SourceInfo("aircraft", "aircraft", "pass-by: broadband rise/fall rolling off above 1.5 kHz + engine harmonics",
               (60, AIRCRAFT_F_HIGH_HZ), "both",
               "day, rarely night"),
)


def species_table() -> pd.DataFrame:
    """Every label planted in the archive: kind, call shape, frequency range, habitat, diel activity."""
    rows = []
    for s in BIRD_SPECIES:
        rows.append({"label": s.label, "kind": "bird", "call_shape": s.call_shape,
                     "f_low_hz": s.f_range_hz[0], "f_high_hz": s.f_range_hz[1],
                     "typical_duration_s": s.typical_duration_s, "habitat_preference": s.habitat_preference,
                     "grassland_weight": s.grassland_weight, "canopy_weight": s.canopy_weight,
                     "diel_activity": s.diel, "mean_gap_s": s.mean_gap_s, "source_dbfs_at_10m": s.source_dbfs})
    for r in RARE_SOURCES:
        rows.append({"label": r.label, "kind": r.kind, "call_shape": r.call_shape,
                     "f_low_hz": r.f_range_hz[0], "f_high_hz": r.f_range_hz[1], "typical_duration_s": np.nan,
                     "habitat_preference": "both", "grassland_weight": np.nan, "canopy_weight": np.nan,
                     "diel_activity": "any hour, rare", "mean_gap_s": np.nan, "source_dbfs_at_10m": np.nan})
    for s in INSECTS + GEOPHONY:
        weights = _INSECT_HABITAT_WEIGHT.get(s.label, {})
        rows.append({"label": s.label, "kind": s.kind, "call_shape": s.call_shape,
                     "f_low_hz": s.f_range_hz[0], "f_high_hz": s.f_range_hz[1], "typical_duration_s": np.nan,
                     "habitat_preference": s.habitat_preference,
                     "grassland_weight": weights.get("grassland", np.nan),
                     "canopy_weight": weights.get("canopy", np.nan),
                     "diel_activity": s.diel, "mean_gap_s": np.nan, "source_dbfs_at_10m": np.nan})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Planning: sites, weather, files
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecorderSite:
    recorder: str
    habitat: str
    lat: float
    lon: float
    road_distance_m: float  # sets how loud distant traffic is at this recorder


@dataclasses.dataclass(frozen=True)
class DayWeather:
    rain_slots: tuple[int, ...]  # indices into the sorted recording schedule that it rains through
    rain_intensity: float  # 0..1
    windiness: float  # 0..1


@dataclasses.dataclass(frozen=True)
class FilePlan:
    """Everything a worker needs to render one recording."""

    relpath: str
    recorder_index: int
    day_index: int
    slot_index: int
    start_time: dt.datetime
    start_hour: float
    site: RecorderSite
    weather: DayWeather

    @property
    def raining(self) -> bool:
        return self.slot_index in self.weather.rain_slots


def plan_sites(config: SynthConfig) -> list[RecorderSite]:
    """Recorder positions: the grassland ones in a meadow east of the centre, the rest in woodland."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _STREAM_SITES]))
    metres_per_deg_lat = 111_320.0
    metres_per_deg_lon = metres_per_deg_lat * math.cos(math.radians(config.site_lat))
    sites = []
    for i, name in enumerate(recorder_names(config.recorders)):
        habitat = "grassland" if i < config.grassland_recorders else "canopy"
        east, north = rng.uniform(-250, 250, size=2)
        if habitat == "grassland":
            east = abs(east) + 300.0
        else:
            east = -abs(east) - 50.0
        sites.append(RecorderSite(
            recorder=name, habitat=habitat,
            lat=round(config.site_lat + north / metres_per_deg_lat, 6),
            lon=round(config.site_lon + east / metres_per_deg_lon, 6),
            road_distance_m=float(rng.uniform(400.0, 2000.0)),
        ))
    return sites


def plan_weather(config: SynthConfig, day_index: int) -> DayWeather:
    """A day's weather, shared by all recorders: an optional rain episode and a windiness."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _STREAM_WEATHER, day_index]))
    n_slots = len(config.recording_start_hours)
    random_rain = rng.random() < config.rain_day_probability
    first_slot = int(rng.integers(0, n_slots))
    n_rain_slots = int(rng.integers(1, 4))
    intensity = float(rng.uniform(0.2, 1.0))
    windiness = float(rng.beta(1.5, 2.5))
    rain_slots: tuple[int, ...] = ()
    if day_index in config.rainy_days or random_rain:
        rain_slots = tuple(range(first_slot, min(n_slots, first_slot + n_rain_slots)))
    return DayWeather(rain_slots=rain_slots, rain_intensity=intensity, windiness=windiness)


def plan_files(config: SynthConfig) -> list[FilePlan]:
    """All recordings of the archive, ordered by recorder, day and start time."""
    start_date = dt.date.fromisoformat(config.start_date)
    weathers = [plan_weather(config, d) for d in range(config.days)]
    plans = []
    for r, site in enumerate(plan_sites(config)):
        for d in range(config.days):
            day = start_date + dt.timedelta(days=d)
            for s, hour in enumerate(config.sorted_start_hours):
                start = dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=round(hour * 3600))
                name = f"{site.recorder}_{start:%Y%m%d_%H%M%S}.wav"
                plans.append(FilePlan(relpath=f"{site.recorder}/{name}", recorder_index=r, day_index=d,
                                      slot_index=s, start_time=start, start_hour=hour, site=site,
                                      weather=weathers[d]))
    return plans


# --------------------------------------------------------------------------------------------
# Rendering one file
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Planted:
    """One annotated event in a file: its samples (already at their level) and its box."""

    label: str
    kind: str
    start: int  # sample index in the file
    signal: np.ndarray
    f_low_hz: float
    f_high_hz: float
    individual_id: str = ""
    distance_m: float = float("nan")


def _render_floor(rng: np.random.Generator, n: int, sr: int, hour: float, sunrise: float,
                  sunset: float) -> np.ndarray:
    """The never-annotated background: brown rumble + pink ambient + white recorder self-noise.

    Levels follow a real SM4 in a quiet spruce forest at night: about -65 dBFS in 50-500 Hz and
    -74 dBFS in 2-4 kHz.
    """
    daytime = _sigmoid((hour - sunrise) / 0.5) * _sigmoid((sunset - hour) / 0.5)
    gain_db = rng.normal(0.0, 1.5) + 3.0 * daytime  # distant human activity by day
    ambient_shape, white_psd = _floor_psd_shape(n, sr)
    psd = ambient_shape * np.float32(10 ** (gain_db / 10)) + white_psd
    # See _colored_noise for the scaling; built here directly so the shape can be cached.
    spectrum = rng.standard_normal(2 * psd.size, dtype=np.float32).view(np.complex64)
    spectrum *= np.sqrt(psd * np.float32(sr * n / 4.0))
    spectrum[0] = 0.0
    return scipy.fft.irfft(spectrum, n)


@functools.lru_cache(maxsize=4)
def _floor_psd_shape(n: int, sr: int) -> tuple[np.ndarray, np.float32]:
    """Ambient pink + brown power per Hz over the rfft bins (at 0 dB gain), and the white self-noise."""
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 1.0)
    highpass = 1.0 / (1.0 + (25.0 / f) ** 4)  # recorders high-pass their input
    pink = 10 ** (-104.0 / 10) * 1000.0 / f  # -104 dB/Hz at 1 kHz
    brown = 10 ** (-90.0 / 10) * (100.0 / f) ** 2  # -90 dB/Hz at 100 Hz
    white = np.float32(10 ** (-112.0 / 10))  # ~ -68 dBFS over 0-22 kHz
    return ((pink + brown) * highpass).astype(np.float32), white


def _render_wind(rng: np.random.Generator, plan: FilePlan, n: int, sr: int, file_s: float) -> list[_Planted]:
    afternoon = _bump(plan.start_hour, 15.0, 4.0)
    p_wind = plan.weather.windiness * (0.5 + 0.5 * afternoon) * (1.3 if plan.raining else 1.0)
    if rng.random() >= p_wind:
        return []
    exposure_db = 4.0 if plan.site.habitat == "grassland" else 0.0  # no canopy to break the wind
    level_db = -52.0 + 14.0 * plan.weather.windiness + exposure_db + rng.normal(0.0, 3.0)
    # Brown rumble that fades smoothly (no brick-wall edge a model could key on).
    rumble = _colored_noise(rng, n, sr, 50.0, 1500.0, lambda f: (100.0 / f) ** 2 / (1.0 + (f / 400.0) ** 4))
    control_t, curve = _slow_random_curve(rng, file_s, corner_hz=0.25, control_hz=20.0)
    gusts = np.interp(np.arange(n, dtype=np.float32) / np.float32(sr), control_t, np.exp(0.8 * curve))
    gusts = gusts.astype(np.float32)
    gain = 10 ** (level_db / 20) / ((rumble.std() + 1e-12) * np.sqrt(np.mean(gusts ** 2)))
    signal = rumble * gusts * np.float32(gain)
    return [_Planted("wind", "wind", 0, _fade_edges(signal, sr, 0.5), 50.0, WIND_F_HIGH_HZ)]


def _render_traffic(rng: np.random.Generator, plan: FilePlan, n: int, sr: int,
                    file_s: float, daylight: float) -> list[_Planted]:
    rush = max(_bump(plan.start_hour, 7.5, 1.0), _bump(plan.start_hour, 17.5, 1.2))
    p_traffic = 0.12 + 0.4 * daylight + 0.35 * rush
    if rng.random() >= p_traffic:
        return []
    level_db = (-44.0 - 20.0 * math.log10(plan.site.road_distance_m / 400.0) + 6.0 * rush
                - 6.0 * (1.0 - daylight) + rng.normal(0.0, 2.0))
    # Distant road noise: the high frequencies are absorbed by air and ground on the way, so the
    # spectrum rolls off smoothly above ~1 kHz rather than ending at an edge.
    hum = _colored_noise(rng, n, sr, 50.0, 4000.0, lambda f: (200.0 / f) ** 1.5 / (1.0 + (f / 1000.0) ** 4))
    hum /= hum.std() + 1e-12
    # Individual vehicles: slow swells of 5-20 s over a steady hum (built at 20 Hz, interpolated).
    control_t = np.arange(int(math.ceil(file_s * 20.0)) + 2) / 20.0
    swell = np.full(control_t.size, 0.6)
    for _ in range(int(rng.poisson(file_s / 15.0))):
        swell += rng.uniform(0.3, 1.2) * np.exp(
            -0.5 * ((control_t - rng.uniform(0, file_s)) / rng.uniform(2.5, 8.0)) ** 2)
    swell /= np.sqrt(np.mean(swell ** 2))
    signal = hum * np.interp(np.arange(n) / sr, control_t, swell).astype(np.float32) * 10 ** (level_db / 20)
    return [_Planted("traffic", "traffic", 0, _fade_edges(signal.astype(np.float32), sr, 0.5), 50.0,
                     TRAFFIC_F_HIGH_HZ)]


def _render_aircraft(rng: np.random.Generator, plan: FilePlan, n: int, sr: int,
                     file_s: float, daylight: float) -> list[_Planted]:
    if rng.random() >= 0.02 + 0.1 * daylight:
        return []
    pass_s = rng.uniform(20.0, 50.0)
    start_s = rng.uniform(-0.6 * pass_s, file_s - 0.4 * pass_s)
    a = max(0, int(start_s * sr))
    b = min(n, int((start_s + pass_s) * sr))
    if b - a < sr:  # less than a second of it in this file
        return []
    t = np.arange(a, b) / sr
    u = (t - start_s) / pass_s
    envelope = np.sin(np.pi * u) ** 4  # slow rise and fall, silent at the ends of the pass
    roar = _colored_noise(rng, b - a, sr, 60.0, 6000.0, lambda f: 300.0 / f / (1.0 + (f / 1500.0) ** 4))
    roar /= roar.std() + 1e-12
    # Engine harmonics sliding down as the aircraft passes (Doppler).
    blade_hz = rng.uniform(95.0, 140.0)
    doppler = 1.0 + 0.04 * np.tanh(-(u - 0.5) * 6.0)
    phase0 = rng.uniform(0, 2 * np.pi)
    lines = sum(0.5 / k * _fm_tone(blade_hz * k * doppler, sr, phase0 * k) for k in range(1, 5))
    level_db = rng.uniform(-46.0, -30.0)
    signal = (roar + lines) * envelope * 10 ** (level_db / 20)
    f_high = max(AIRCRAFT_F_HIGH_HZ, 4 * blade_hz * 1.04 + 20.0)
    return [_Planted("aircraft", "aircraft", a, signal.astype(np.float32), 60.0, f_high)]


def _render_rain(rng: np.random.Generator, plan: FilePlan, n: int, sr: int, file_s: float) -> list[_Planted]:
    if not plan.raining:
        return []
    intensity = plan.weather.rain_intensity * float(np.exp(rng.normal(0.0, 0.15)))
    f_low, f_high = 600.0, 13000.0
    # Drops: Poisson impulses with log-normal sizes, each ringing down over ~1 ms.
    n_drops = int(rng.poisson(file_s * (30.0 + 250.0 * intensity)))
    impulses = np.zeros(n)
    np.add.at(impulses, rng.integers(0, n, n_drops), rng.lognormal(0.0, 0.8, n_drops))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    decay = math.exp(-1.0 / (0.0012 * sr))
    ringing = 1.0 / (1.0 - decay * np.exp(-2j * np.pi * freqs / sr))
    tilt = (2000.0 / np.maximum(freqs, 1.0)) ** 0.3
    drops = scipy.fft.irfft(scipy.fft.rfft(impulses) * ringing * tilt * _band_mask(freqs, f_low, f_high), n)
    drops /= np.sqrt(np.mean(drops ** 2)) + 1e-12
    hiss = _colored_noise(rng, n, sr, 1000.0, 12000.0, lambda f: (3000.0 / f) ** 0.5)
    hiss /= hiss.std() + 1e-12
    level_db = -48.0 + 16.0 * intensity + rng.normal(0.0, 1.5)
    signal = (0.8 * drops + 0.6 * hiss) * 10 ** (level_db / 20)
    return [_Planted("rain", "rain", 0, _fade_edges(signal.astype(np.float32), sr, 0.5), f_low, f_high)]


def _insect_span(rng: np.random.Generator, n: int, sr: int) -> tuple[int, int]:
    """Most choruses last the whole file; some start or stop inside it."""
    if rng.random() < 0.7:
        return 0, n
    length = int(n * rng.uniform(0.3, 0.9))
    start = int(rng.integers(0, n - length + 1))
    return start, start + length


def _render_insects(rng: np.random.Generator, config: SynthConfig, plan: FilePlan, n: int,
                    sr: int) -> list[_Planted]:
    hour = plan.start_hour + config.file_s / 7200.0
    planted = []
    for info in INSECTS:
        activity = diel_activity(info.diel, hour, config.sunrise_hour, config.sunset_hour)
        p_present = activity * _INSECT_HABITAT_WEIGHT[info.label][plan.site.habitat]
        p_present *= 0.3 if plan.raining else 1.0
        draw = rng.random()
        # The chorus members of a recorder are fixed for the whole deployment.
        chorus_rng = np.random.default_rng(np.random.SeedSequence(
            [config.seed, _STREAM_INSECT_CHORUS, plan.recorder_index, [i.label for i in INSECTS].index(info.label)]))
        if draw >= p_present:
            continue
        a, b = _insect_span(rng, n, sr)
        level_db = float(rng.uniform(*_INSECT_PEAK_DBFS_RANGE[info.label]))
        if info.label == "cricket":
            signal, f_low, f_high = _cricket_chorus(rng, chorus_rng, b - a, sr)
        elif info.label == "katydid":
            signal, f_low, f_high = _katydid(rng, chorus_rng, b - a, sr)
        else:
            signal, f_low, f_high = _cicada(rng, chorus_rng, b - a, sr)
        signal = signal / (np.max(np.abs(signal)) + 1e-12) * 10 ** (level_db / 20)
        planted.append(_Planted(info.label, "insect", a, _fade_edges(signal.astype(np.float32), sr, 0.3),
                                f_low, f_high))
    return planted


def _cricket_chorus(rng: np.random.Generator, chorus_rng: np.random.Generator, n: int,
                    sr: int) -> tuple[np.ndarray, float, float]:
    """2-4 crickets, each chirping (3-4 syllables at ~30/s) on its own carrier near 4.6 kHz."""
    n_members = int(chorus_rng.integers(2, 5))
    carriers = chorus_rng.uniform(4300.0, 4900.0, n_members)
    syllable_hz = chorus_rng.uniform(27.0, 34.0, n_members)
    syllables = chorus_rng.integers(3, 5, n_members)
    chirp_period_s = chorus_rng.uniform(0.35, 0.55, n_members)
    signal = np.zeros(n, dtype=np.float32)
    for f_c, syl_hz, n_syl, period in zip(carriers, syllable_hz, syllables, chirp_period_s):
        # One chirp period, tiled: the gate is silent at both ends of the period, so the carrier's
        # phase jump between copies is inaudible. Members differ in period and so never lock.
        period_t = np.arange(int(round(period * sr))) / sr
        syllable_index = np.floor(period_t * syl_hz)
        within = period_t * syl_hz - syllable_index
        gate = np.where(syllable_index < n_syl, np.sin(np.pi * np.clip(within / 0.6, 0, 1)) ** 2, 0.0)
        chirp = (gate * np.sin(2 * np.pi * f_c * period_t + rng.uniform(0, 2 * np.pi))).astype(np.float32)
        offset = int(rng.integers(0, chirp.size))
        tiled = np.tile(chirp, n // chirp.size + 2)[offset:offset + n]
        signal += np.float32(rng.uniform(0.4, 1.0)) * tiled
    # Syllable gating (~20 ms sin^2 pulses) spreads each carrier by about +-100 Hz.
    return signal, float(carriers.min() - 150.0), float(carriers.max() + 150.0)


def _smooth_envelope(n: int, sr: int, control_hz: float,
                     shape: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`shape(t)` evaluated at `control_hz` and interpolated to every sample (float32).

    Amplitude envelopes vary far slower than the sample rate; evaluating them on a coarse grid
    makes long insect choruses several times cheaper to render.
    """
    control_t = np.arange(int(math.ceil(n / sr * control_hz)) + 2) / control_hz
    return np.interp(np.arange(n, dtype=np.float32) / np.float32(sr), control_t, shape(control_t)).astype(np.float32)


def _katydid(rng: np.random.Generator, chorus_rng: np.random.Generator, n: int,
             sr: int) -> tuple[np.ndarray, float, float]:
    """A noisy 9-12.5 kHz band pulsed at ~14/s in phrases of 1-2 s."""
    f_low = float(chorus_rng.uniform(8800.0, 9400.0))
    f_high = float(chorus_rng.uniform(12000.0, 12800.0))
    pulse_hz = float(chorus_rng.uniform(12.0, 16.0))
    noise = _colored_noise(rng, n, sr, f_low, f_high, lambda f: np.ones_like(f))
    phrase_s = rng.uniform(1.0, 2.0)
    cycle_s = phrase_s + rng.uniform(0.5, 1.5)
    phase_s = rng.uniform(0, cycle_s)

    def envelope(t: np.ndarray) -> np.ndarray:
        phrase_time = np.mod(t + phase_s, cycle_s)
        # Phrases fade in and out over 50 ms: hard gates would splatter energy outside the band.
        edge = np.where(phrase_time < phrase_s, np.minimum(phrase_time, phrase_s - phrase_time), 0.0)
        phrase_gate = np.sin(0.5 * np.pi * np.clip(edge / 0.05, 0.0, 1.0)) ** 2
        return phrase_gate * (0.5 + 0.5 * np.cos(2 * np.pi * pulse_hz * t)) ** 3

    return noise * _smooth_envelope(n, sr, 1000.0, envelope), f_low, f_high


def _cicada(rng: np.random.Generator, chorus_rng: np.random.Generator, n: int,
            sr: int) -> tuple[np.ndarray, float, float]:
    """A narrow noisy band near 6.4 kHz, modulated at ~120 Hz, swelling every 5-10 s."""
    centre = float(chorus_rng.uniform(6100.0, 6700.0))
    f_low, f_high = centre - 800.0, centre + 800.0
    noise = _colored_noise(rng, n, sr, f_low, f_high, lambda f: np.exp(-0.5 * ((f - centre) / 300.0) ** 2))
    am_hz = chorus_rng.uniform(100.0, 140.0)
    swell_s = rng.uniform(5.0, 10.0)
    swell_phase = rng.uniform(0, 2 * np.pi)

    def envelope(t: np.ndarray) -> np.ndarray:
        am = 0.3 + 0.7 * (0.5 + 0.5 * np.cos(2 * np.pi * am_hz * t))
        return am * (0.5 + 0.5 * np.sin(2 * np.pi * t / swell_s + swell_phase) ** 2)

    return noise * _smooth_envelope(n, sr, 4000.0, envelope), f_low, f_high


def _render_birds(rng: np.random.Generator, config: SynthConfig, plan: FilePlan,
                  individuals: Sequence[Individual], n: int, sr: int) -> list[_Planted]:
    """Every individual is active in this file with a probability set by its species' diel
    pattern and habitat weight; active birds call as a jittered renewal process."""
    hour = plan.start_hour + config.file_s / 7200.0
    habitat = plan.site.habitat
    weather_factor = 0.25 if plan.raining else 1.0  # birds mostly fall silent in rain
    planted = []
    for ind in individuals:
        species = _SPECIES_BY_LABEL[ind.label]
        activity = diel_activity(species.diel, hour, config.sunrise_hour, config.sunset_hour)
        p_active = min(1.0, activity * species.habitat_weight(habitat) * weather_factor)
        if rng.random() >= p_active:
            continue
        mean_gap_s = species.mean_gap_s / (config.call_rate_scale * (0.35 + 0.65 * min(1.0, activity)))
        t = -rng.uniform(0.0, mean_gap_s)  # the bird was already calling before the file started
        while True:
            t += mean_gap_s * float(rng.lognormal(0.0, 0.3))
            if t >= config.file_s:
                break
            calls = species.render(ind, rng, sr)
            distance_m = float(np.clip(ind.distance_m * rng.lognormal(0.0, 0.2), 3.0, 200.0))
            f_centre = 0.5 * (calls[0].f_low_hz + calls[0].f_high_hz)
            excess_db = _EXCESS_DB_PER_M[habitat] * distance_m * math.sqrt(f_centre / 4000.0)
            level_db = (species.source_dbfs + ind.level_offset_db - 20.0 * math.log10(distance_m / 10.0)
                        - excess_db + rng.normal(0.0, 1.5))
            gain = 10 ** (level_db / 20)
            call_end_s = t
            for call in calls:
                start = int(round((t + call.offset_s) * sr))
                call_end_s = max(call_end_s, t + call.offset_s + call.signal.size / sr)
                if start < 0 or start + call.signal.size > n:
                    continue  # calls cut by the file edges are left out: every event lies inside
                planted.append(_Planted(ind.label, "bird", start, call.signal * np.float32(gain),
                                        call.f_low_hz, call.f_high_hz, ind.individual_id, distance_m))
            t = max(t, call_end_s + 0.15)  # a bird does not start a new song before it ends the last
    return planted


# --------------------------------------------------------------------------------------------
# Rare events: the anomalies an outlier search should find
# --------------------------------------------------------------------------------------------

_RARE_PAD_S = 0.02  # silence around a rare event, so band-limiting rings out inside its samples


def _finish_rare(signal: np.ndarray, sr: int, f_low_hz: float, f_high_hz: float) -> np.ndarray:
    """Pad, restrict to the annotated box, fade the ends and bring the peak to 1."""
    pad = np.zeros(int(_RARE_PAD_S * sr))
    padded = _band_limit(np.concatenate([pad, signal, pad]), sr, f_low_hz, f_high_hz)
    padded = _fade_edges(padded, sr, 0.5 * _RARE_PAD_S)
    return (padded / (np.max(np.abs(padded)) + 1e-12)).astype(np.float32)


def _render_bellbird(rng: np.random.Generator, sr: int) -> tuple[np.ndarray, float, float]:
    """Three bell-like notes 0.38 s apart: inharmonic partials at 1, 2.76 and 5.4 x f0 (~1.75 kHz),
    struck and decaying over ~0.12 s, gliding down 2% -- unlike any common species' call."""
    f0 = 1750.0 * _jitter(rng, 0.03)
    interval_s = 0.38 * _jitter(rng, 0.05)
    note_s = 0.3
    t = np.arange(int(note_s * sr)) / sr
    envelope = (1.0 - np.exp(-t / 0.004)) * np.exp(-t / 0.12)
    signal = np.zeros(int((2 * interval_s + note_s) * sr) + 1)
    for note in range(3):
        glide = f0 * (1.0 - 0.02 * t / note_s) * (1.0 - 0.03 * note)
        partials = sum(a * _fm_tone(glide * ratio, sr, rng.uniform(0, 2 * np.pi))
                       for ratio, a in ((1.0, 1.0), (2.76, 0.5), (5.4, 0.25)))
        start = int(round(note * interval_s * sr))
        signal[start:start + t.size] += partials * envelope
    f_low, f_high = _box(f0 * 0.97 * 0.94, f0 * 5.4)
    return _finish_rare(signal, sr, f_low, f_high), f_low, f_high


_CHAINSAW_F_LOW_HZ, _CHAINSAW_F_HIGH_HZ = 80.0, 7000.0


def _render_chainsaw(rng: np.random.Generator, sr: int) -> tuple[np.ndarray, float, float]:
    """A 1.8-2.6 s burst of a two-stroke engine: a buzzy harmonic series on a ~110 Hz firing rate
    that revs up by half and back, plus cutting noise; both roll off smoothly above ~2.5 kHz (no
    hard spectral edge, like the other broadband sources)."""
    duration_s = rng.uniform(1.8, 2.6)
    n = int(duration_s * sr)
    u = np.arange(n) / n
    firing_hz = rng.uniform(95.0, 125.0) * (1.0 + 0.5 * np.sin(np.pi * u) ** 2)
    phase = rng.uniform(0, 2 * np.pi) + 2.0 * np.pi * np.cumsum(firing_hz) / sr
    top_harmonic = int((_CHAINSAW_F_HIGH_HZ - 200.0) // firing_hz.max())
    mean_firing_hz = float(firing_hz.mean())
    engine = sum(np.sin(k * phase) / k ** 0.7 / math.sqrt(1.0 + (k * mean_firing_hz / 2500.0) ** 4)
                 for k in range(1, top_harmonic + 1))
    engine /= np.std(engine) + 1e-12
    cutting = _colored_noise(rng, n, sr, 400.0, 6800.0, lambda f: 1.0 / (1.0 + (f / 2500.0) ** 4))
    cutting /= np.std(cutting) + 1e-12
    signal = (engine + 0.5 * cutting) * _ramped_envelope(n, sr, 0.15, 0.25)
    return (_finish_rare(signal, sr, _CHAINSAW_F_LOW_HZ, _CHAINSAW_F_HIGH_HZ),
            _CHAINSAW_F_LOW_HZ, _CHAINSAW_F_HIGH_HZ)


_GUNSHOT_F_LOW_HZ, _GUNSHOT_F_HIGH_HZ = 150.0, 9000.0


def _render_gunshot(rng: np.random.Generator, sr: int) -> tuple[np.ndarray, float, float]:
    """A distant shot: a broadband blast with a 1 ms rise and ~40 ms decay, then a ~0.15 s
    reverberant tail, ~0.7 s in all; its spectrum falls as 1/f and rolls off above ~4 kHz."""
    n = int(rng.uniform(0.6, 0.75) * sr)
    t = np.arange(n) / sr
    noise = _colored_noise(rng, n, sr, _GUNSHOT_F_LOW_HZ, _GUNSHOT_F_HIGH_HZ, lambda f: 1000.0 / f / (1.0 + (f / 4000.0) ** 4))
    noise /= np.std(noise) + 1e-12
    envelope = (1.0 - np.exp(-t / 0.001)) * (np.exp(-t / 0.04) + 0.15 * np.exp(-t / rng.uniform(0.12, 0.18)))
    return (_finish_rare(noise * envelope, sr, _GUNSHOT_F_LOW_HZ, _GUNSHOT_F_HIGH_HZ),
            _GUNSHOT_F_LOW_HZ, _GUNSHOT_F_HIGH_HZ)


@dataclasses.dataclass(frozen=True)
class RareSource:
    """A rare planted source: what it is, how long and loud it can be, and its renderer."""

    label: str
    kind: str
    call_shape: str
    f_range_hz: tuple[float, float]
    max_duration_s: float  # longest rendition, padding included: events are placed to fit the file
    peak_dbfs_range: tuple[float, float]  # peak level at the recorder, drawn uniformly
    render: Callable[[np.random.Generator, int], tuple[np.ndarray, float, float]]


RARE_SOURCES: tuple[RareSource, ...] = (
    RareSource("bellbird", "rare_bird", "three struck bell-like notes, inharmonic partials (f0 ~1.75 kHz)",
               (1540, 9730), 1.2, (-34.0, -22.0), _render_bellbird),
    RareSource("chainsaw", "anthropogenic", "two-stroke engine burst: buzzy harmonics on ~110 Hz, revving",
               (_CHAINSAW_F_LOW_HZ, _CHAINSAW_F_HIGH_HZ), 2.65, (-38.0, -26.0), _render_chainsaw),
    RareSource("gunshot", "anthropogenic", "distant shot: broadband blast and reverberant tail",
               (_GUNSHOT_F_LOW_HZ, _GUNSHOT_F_HIGH_HZ), 0.8, (-24.0, -10.0), _render_gunshot),
)
RARE_LABELS: tuple[str, ...] = tuple(source.label for source in RARE_SOURCES)
_RARE_BY_LABEL = {source.label: source for source in RARE_SOURCES}


def plan_rare_events(config: SynthConfig, plan: FilePlan) -> list[tuple[str, float]]:
    """(label, start_s) of the rare events of one recording, from their own stream: a Poisson
    number at `rare_events_per_hour`, each source equally likely, placed uniformly so it fits."""
    if config.rare_events_per_hour <= 0:
        return []
    rng = np.random.default_rng(np.random.SeedSequence(
        [config.seed, _STREAM_RARE, plan.recorder_index, plan.day_index, plan.slot_index]))
    events = []
    for _ in range(int(rng.poisson(config.rare_events_per_hour * config.file_s / 3600.0))):
        source = RARE_SOURCES[int(rng.integers(len(RARE_SOURCES)))]
        latest_s = config.file_s - source.max_duration_s
        if latest_s > 0:  # a file too short for the event gets none
            events.append((source.label, float(rng.uniform(0.0, latest_s))))
    return events


def _render_rare(config: SynthConfig, plan: FilePlan, n: int, sr: int) -> list[_Planted]:
    events = plan_rare_events(config, plan)
    if not events:
        return []
    rng = np.random.default_rng(np.random.SeedSequence(
        [config.seed, _STREAM_RARE, plan.recorder_index, plan.day_index, plan.slot_index, 1]))
    planted = []
    for label, start_s in events:
        source = _RARE_BY_LABEL[label]
        signal, f_low, f_high = source.render(rng, sr)
        start = int(round(start_s * sr))
        signal = signal[: n - start] * np.float32(10 ** (rng.uniform(*source.peak_dbfs_range) / 20))
        planted.append(_Planted(label, source.kind, start, signal, f_low, f_high))
    return planted


def _band_power(spectrum: np.ndarray, freqs_hz: np.ndarray, f_low_hz: float, f_high_hz: float) -> float:
    band = (freqs_hz >= f_low_hz) & (freqs_hz <= f_high_hz)
    return float(np.sum(np.abs(spectrum[band]) ** 2))


# Long events (insect choruses, rain, wind ...) get their SNR from this many evenly spaced
# windows of this length instead of one FFT over the whole span: a 60 s FFT per source would
# dominate the generation time and changes the estimate by a fraction of a dB.
_SNR_WINDOWS = 8
_SNR_WINDOW_S = 0.5


def _snr_db(mix: np.ndarray, event: _Planted, sr: int) -> float:
    """Event power over everything else's power (mixture minus event) inside the event's box."""
    n_event = event.signal.size
    window = int(_SNR_WINDOW_S * sr)
    if n_event <= _SNR_WINDOWS * window:
        segments = [(0, n_event)]
    else:
        segments = [(int(s), int(s) + window) for s in np.linspace(0, n_event - window, _SNR_WINDOWS)]
    signal_power = rest_power = 0.0
    for s, e in segments:
        n_fft = scipy.fft.next_fast_len(e - s, real=True)  # zero-padding: odd lengths are slow
        freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
        event_spectrum = scipy.fft.rfft(event.signal[s:e], n_fft)
        mix_spectrum = scipy.fft.rfft(mix[event.start + s:event.start + e], n_fft)
        signal_power += _band_power(event_spectrum, freqs, event.f_low_hz, event.f_high_hz)
        rest_power += _band_power(mix_spectrum - event_spectrum, freqs, event.f_low_hz, event.f_high_hz)
    return 10.0 * math.log10((signal_power + 1e-30) / (rest_power + 1e-30))


def render_file(config: SynthConfig, plan: FilePlan,
                individuals: Sequence[Individual]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render one recording: int16 samples and one annotation row per planted event."""
    sr = config.sample_rate_hz
    n = int(round(config.file_s * sr))
    file_seed = np.random.SeedSequence(
        [config.seed, _STREAM_FILE, plan.recorder_index, plan.day_index, plan.slot_index])
    rngs = dict(zip(_FILE_SUBSTREAMS, (np.random.default_rng(s) for s in file_seed.spawn(len(_FILE_SUBSTREAMS)))))
    hour = plan.start_hour + config.file_s / 7200.0
    daylight = _sigmoid((hour - config.sunrise_hour) / 0.5) * _sigmoid((config.sunset_hour - hour) / 0.5)

    mix = _render_floor(rngs["floor"], n, sr, hour, config.sunrise_hour, config.sunset_hour)
    planted = (_render_wind(rngs["wind"], plan, n, sr, config.file_s)
               + _render_traffic(rngs["traffic"], plan, n, sr, config.file_s, daylight)
               + _render_aircraft(rngs["aircraft"], plan, n, sr, config.file_s, daylight)
               + _render_rain(rngs["rain"], plan, n, sr, config.file_s)
               + _render_insects(rngs["insects"], config, plan, n, sr)
               + _render_birds(rngs["birds"], config, plan, individuals, n, sr)
               + _render_rare(config, plan, n, sr))
    for event in planted:
        mix[event.start:event.start + event.signal.size] += event.signal

    clipped = int(np.count_nonzero(np.abs(mix) > 1.0))
    if clipped:
        logger.debug("%s: %d samples clipped", plan.relpath, clipped)
    samples = np.clip(np.rint(mix * _INT16_FULL_SCALE), -32768, 32767).astype(np.int16)

    rows = []
    for event in planted:
        peak = float(np.max(np.abs(event.signal)))
        rows.append({
            "file": plan.relpath,
            "recorder": plan.site.recorder,
            "start_s": round(event.start / sr, 4),
            "end_s": round((event.start + event.signal.size) / sr, 4),
            "f_low_hz": round(event.f_low_hz, 1),
            "f_high_hz": round(event.f_high_hz, 1),
            "label": event.label,
            "kind": event.kind,
            "individual_id": event.individual_id,
            "snr_db": round(_snr_db(mix, event, sr), 2),
            "peak_dbfs": round(20.0 * math.log10(peak + 1e-12), 2),
            "distance_m": round(event.distance_m, 1),
            "habitat": plan.site.habitat,
            "file_start_time": plan.start_time.isoformat(),
        })
    return samples, rows


# --------------------------------------------------------------------------------------------
# Writing the archive
# --------------------------------------------------------------------------------------------

def _write_wav_atomically(path: Path, samples: np.ndarray, sr: int) -> None:
    with atomic_write(path) as tmp:  # a reader never sees half a file
        sf.write(tmp, samples, sr, subtype="PCM_16", format="WAV")


def _write_csv_atomically(path: Path, frame: pd.DataFrame) -> None:
    with atomic_write(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def _generate_one(out_dir: str, config: SynthConfig, plan: FilePlan,
                  individuals: Sequence[Individual]) -> list[dict[str, Any]]:
    """Worker entry point: render and write one file, return its annotation rows."""
    samples, rows = render_file(config, plan, individuals)
    path = Path(out_dir) / plan.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_wav_atomically(path, samples, config.sample_rate_hz)
    return rows


def _output_defining(config: SynthConfig) -> dict[str, Any]:
    """The config fields that decide the archive's content (`workers` only decides speed)."""
    fields = to_jsonable(config)
    fields.pop("workers")
    return fields


def _check_out_dir(out_dir: Path, config: SynthConfig) -> None:
    """Refuse to mix synthetic files into a folder holding anything else."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    config_path = out_dir / "config.json"
    if not config_path.exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no synthetic-archive config.json; "
                              "choose an empty or new folder")
    try:
        previous = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise FileExistsError(f"{config_path} is unreadable ({exc}); choose an empty or new folder") from exc
    previous_config = dict(previous.get("config", {}))
    previous_config.pop("workers", None)
    if previous.get("stage") != STAGE or previous_config != _output_defining(config):
        raise FileExistsError(f"{out_dir} holds a different archive ({config_path}); "
                              "choose a new folder or delete the old one")


def generate_archive(out_dir: str | os.PathLike, config: SynthConfig | None = None) -> Path:
    """Write the synthetic archive described by `config` into `out_dir` and return `out_dir`.

    Layout: `<RECORDER>/<RECORDER>_YYYYMMDD_HHMMSS.wav` (16-bit PCM mono), `sites.csv`,
    `annotations.csv` and `config.json`. Rerunning with the same config into the same folder
    regenerates identical bytes; a folder holding anything else is refused. `config.json` is
    written first with status "incomplete" and last with status "complete".
    """
    config = config or SynthConfig()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config_json(out_dir, STAGE, config, status="incomplete")

    sites = plan_sites(config)
    plans = plan_files(config)
    individuals = {r: _make_individuals(config, r, site.recorder, site.habitat) for r, site in enumerate(sites)}

    rows_per_file: list[list[dict[str, Any]] | None] = [None] * len(plans)
    progress = tqdm(total=len(plans), desc="synthetic archive", unit="file")
    if config.workers > 1:
        # spawn, not fork: the parent may hold torch or CUDA state that must not be forked.
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
                futures = [pool.submit(_generate_one, str(out_dir), config, plan, individuals[plan.recorder_index])
                           for plan in plans]
                for i, future in enumerate(futures):  # in plan order: annotations never depend on timing
                    rows_per_file[i] = future.result()
                    progress.update()
        except BrokenProcessPool as exc:
            # Files are independent, so finishing serially writes exactly the same bytes.
            logger.warning("parallel generation failed (%s); generating the remaining files serially. "
                           "Spawned workers re-import the calling script: run it from a file guarded by "
                           "`if __name__ == '__main__':`, or use workers=1.", exc)
    for i, plan in enumerate(plans):
        if rows_per_file[i] is None:
            rows_per_file[i] = _generate_one(str(out_dir), config, plan, individuals[plan.recorder_index])
            progress.update()
    progress.close()

    sites_frame = pd.DataFrame([{"recorder": s.recorder, "habitat": s.habitat, "lat": s.lat, "lon": s.lon}
                                for s in sites])
    _write_csv_atomically(out_dir / "sites.csv", sites_frame)
    annotations = pd.DataFrame([row for rows in rows_per_file for row in rows or []],
                               columns=list(ANNOTATION_COLUMNS))
    annotations = annotations.sort_values(["file", "start_s", "label", "individual_id", "end_s"],
                                          kind="mergesort").reset_index(drop=True)
    _write_csv_atomically(out_dir / "annotations.csv", annotations)

    label_counts = annotations["label"].value_counts().sort_index()
    write_config_json(out_dir, STAGE, config, status="complete", n_files=len(plans),
                      n_annotations=len(annotations), hours_of_audio=round(len(plans) * config.file_s / 3600, 4),
                      annotations_per_label={str(k): int(v) for k, v in label_counts.items()})
    logger.info("wrote %d files (%.2f h) and %d annotations to %s", len(plans),
                len(plans) * config.file_s / 3600, len(annotations), out_dir)
    return out_dir


def read_annotations(archive_dir: str | os.PathLike) -> pd.DataFrame:
    """Load an archive's `annotations.csv` with stable dtypes (individual_id "" for non-birds)."""
    frame = pd.read_csv(Path(archive_dir) / "annotations.csv", dtype={"individual_id": str})
    frame["individual_id"] = frame["individual_id"].fillna("")
    return frame
