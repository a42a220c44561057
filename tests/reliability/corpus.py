"""A bad-audio corpus written by the tests themselves: every way a recording can be damaged,
oddly encoded or oddly named, beside one good file. Each case is a file (or link) in one folder."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

GOOD_NAME = "good.wav"
GOOD_SECONDS = 4.6                 # at 22.05 kHz: whole tiles plus a kept padded tail (1 s tiles)


def signal(seconds: float, sample_rate_hz: int, seed: int, channels: int = 1) -> np.ndarray:
    """Noise whose level changes every 0.25 s plus a tone: every tile differs from the others."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate_hz)
    t = np.arange(n) / sample_rate_hz
    level = 10 ** rng.uniform(-2.5, -1.0, size=int(np.ceil(seconds * 4)) + 1)[(t * 4).astype(int)]
    mono = level * rng.standard_normal(n) + 0.05 * np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    if channels == 1:
        return mono.astype(np.float32)
    return np.stack([mono * (0.5 + k / channels) for k in range(channels)], axis=1).astype(np.float32)


def _pcm16_wav(frames_claimed: int, pcm: bytes, sample_rate_hz: int) -> bytes:
    """A mono 16-bit WAV whose data chunk claims `frames_claimed` frames and holds `pcm`."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate_hz, 2 * sample_rate_hz, 2, 16)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", 2 * frames_claimed) + pcm)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _as_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _write(path: Path, samples: np.ndarray, sample_rate_hz: int, **kwargs) -> None:
    sf.write(path, samples, sample_rate_hz, **kwargs)


def write_good(folder: Path) -> Path:
    path = folder / GOOD_NAME
    _write(path, signal(GOOD_SECONDS, 22050, 0), 22050, subtype="PCM_16")
    return path


def _truncated(path: Path) -> None:            # 5 s written, cut to 3.7 s mid-data
    _write(path, signal(5.0, 16000, 1), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[:44 + 2 * round(3.7 * 16000)])


def _lying_larger(path: Path) -> None:         # claims 6 s, holds 2.5 s
    path.write_bytes(_pcm16_wav(6 * 16000, _as_pcm16(signal(2.5, 16000, 2)), 16000))


def _lying_smaller(path: Path) -> None:        # claims 2.2 s, holds 5 s
    path.write_bytes(_pcm16_wav(round(2.2 * 16000), _as_pcm16(signal(5.0, 16000, 3)), 16000))


def _nan_inf(path: Path) -> None:              # 6 s float; 1 NaN at 1.25 s, 44,102 non-finite from 1.4 s
    samples = signal(6.0, 16000, 4)
    samples[20000] = np.nan
    samples[22400:22400 + 44102:2] = np.inf
    samples[22401:22400 + 44102:2] = np.nan
    _write(path, samples, 16000, subtype="FLOAT")


def _corrupt_flac(path: Path) -> None:         # 30 s FLAC, 64 bytes overwritten in the middle
    _write(path, signal(30.0, 16000, 5), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(6).integers(0, 256, 64, np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _half_mp3(path: Path) -> None:             # 8 s MP3 (LAME writes a Xing header), cut in half
    _write(path, signal(8.0, 16000, 7), 16000, format="MP3", subtype="MPEG_LAYER_III")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _symlink_loop(path: Path) -> None:         # loop_a.wav -> loop_b.wav -> loop_a.wav
    other = path.with_name("loop_b.wav")
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def _folder_loop(path: Path) -> None:          # a folder link back to the archive itself
    os.symlink(".", path)


# name -> how it is written. Names are part of the test: spaces, unicode, a leading dash and
# shell metacharacters must reach no shell and break no path handling.
CASES: dict[str, Callable[[Path], None]] = {
    "zero_bytes.wav": lambda p: p.write_bytes(b""),
    "header_only.wav": lambda p: _write(p, np.zeros(0, np.float32), 16000, subtype="PCM_16"),
    "truncated.wav": _truncated,
    "lying_larger.wav": _lying_larger,
    "lying_smaller.wav": _lying_smaller,
    "not_audio.wav": lambda p: p.write_bytes(np.random.default_rng(8).bytes(5000)),
    "nan_inf.wav": _nan_inf,
    "pcm8.wav": lambda p: _write(p, signal(2.0, 16000, 9), 16000, subtype="PCM_U8"),
    "pcm24.wav": lambda p: _write(p, signal(2.0, 16000, 10), 16000, subtype="PCM_24"),
    "pcm32.wav": lambda p: _write(p, signal(2.0, 16000, 11), 16000, subtype="PCM_32"),
    "float32.wav": lambda p: _write(p, signal(2.0, 16000, 12), 16000, subtype="FLOAT"),
    "stereo.wav": lambda p: _write(p, signal(2.0, 16000, 13, channels=2), 16000, subtype="PCM_16"),
    "rate_8k.wav": lambda p: _write(p, signal(2.0, 8000, 14), 8000, subtype="PCM_16"),
    "rate_192k.wav": lambda p: _write(p, signal(2.0, 192000, 15), 192000, subtype="PCM_16"),
    "short_0.1s.wav": lambda p: _write(p, signal(0.1, 16000, 16), 16000, subtype="PCM_16"),
    "corrupt.flac": _corrupt_flac,
    "half.mp3": _half_mp3,
    "with space.wav": lambda p: _write(p, signal(1.0, 16000, 17), 16000, subtype="PCM_16"),
    "ünïcødé_名前.wav": lambda p: _write(p, signal(1.0, 16000, 18), 16000, subtype="PCM_16"),
    "-leading-dash.wav": lambda p: _write(p, signal(1.0, 16000, 19), 16000, subtype="PCM_16"),
    "semi;colon $(touch PWNED).wav": lambda p: _write(p, signal(1.0, 16000, 20), 16000,
                                                      subtype="PCM_16"),
    "loop_a.wav": _symlink_loop,
    "folder_loop": _folder_loop,
}


def mp3_writable() -> bool:
    return "MP3" in sf.available_formats()


def write_corpus(folder: Path, with_good: bool = True) -> dict[str, Path]:
    """Write every case (and the good file) into `folder`; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, write in CASES.items():
        if name == "half.mp3" and not mp3_writable():
            continue
        write(folder / name)
        paths[name] = folder / name
    if with_good:
        paths[GOOD_NAME] = write_good(folder)
    return paths
