"""Tiles per second per core of the acoustic-indices stage, against scikit-maad called file by file.

Input: a synthetic archive of 32 kHz 16-bit mono WAVs (--files of --file-s seconds: noise floor,
tones, chirps), cut into 3 s tiles, so that both sides read the same samples without resampling.
Measured in the same process, one thread (OMP, MKL, OpenBLAS, torch), medians over --repeats,
each kind after one untimed warm-up:

- ``ours``: `soundscape_ssl.analysis.indices.compute_indices` end to end on the tiles (plan, the one
  reader, scikit-maad's two all_* functions per tile, units, merge, config.json) into a new folder.
- ``maad_file_by_file`` (the baseline): what a user of scikit-maad writes: `maad.sound.load` of
  each file, then per 3 s slice the same two functions with the same settings.
- For the question "is the indices stage the slowest CPU stage per tile after pretraining", the
  two other per-tile CPU stages on the same tiles: ``tiling`` (`tiles.tiling.tile_archive`, the
  archive to log-mel tiles) and ``embedding`` (a ViT-S/16 backbone's forward on 128 x 256 tiles,
  batches of 32, fp32: the study's model; `--embed-arch` to change it).

Every rate is tiles per second on one core. The last line printed is one JSON object.

Measured (default sizes, 40 tiles, medians of 3, one thread, on the 2-core machine while other
jobs held a load of about 6): indices 1.61 tiles/s (622 ms a tile), scikit-maad file by file 1.97
(ratio 0.82: the reader, units and merge cost 18 % on top of scikit-maad), tiling 125, ViT-S/16
embedding 8.5. The indices stage is the slowest CPU stage per tile: about 70 % of scikit-maad's
time per tile goes to its regions of interest (`region_of_interest_index`, nROI and aROI; profiled
on demo tiles: 0.12 of 0.17 s), which `all_spectral_alpha_indices` always computes.

    python benchmarks/indices.py                 # ~2 min on one core
    python benchmarks/indices.py --files 2 --file-s 15 --repeats 1 --embed-batches 1
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from soundscape_ssl.analysis import indices  # noqa: E402
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone  # noqa: E402
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig  # noqa: E402
from soundscape_ssl.tiles.tiling import tile_archive  # noqa: E402

RATE_HZ = 32000
TILE_S = 3.0


def synth_recording(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE_HZ)) / RATE_HZ
    signal = 0.01 * rng.standard_normal(t.size)
    signal += 0.1 * np.sin(2 * np.pi * (2000 + 1500 * np.sin(2 * np.pi * 0.3 * t)) * t) * (t % 2.0 < 0.5)
    signal += 0.05 * np.sin(2 * np.pi * 6000 * t) * (t % 3.0 > 2.0)
    return signal.astype(np.float32)


def make_archive(folder: Path, n_files: int, file_s: float) -> pd.DataFrame:
    rows = []
    for k in range(n_files):
        path = folder / "R1" / f"R1_20240524_{k:02d}0000.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synth_recording(file_s, k), RATE_HZ, subtype="PCM_16")
        rows.append(dict(path=str(path), relpath=path.relative_to(folder).as_posix(), recorder="R1",
                         habitat=None, start_time=pd.Timestamp(f"2024-05-24 {k:02d}:00:00"),
                         sample_rate_hz=RATE_HZ, frames=sf.info(path).frames))
    return pd.DataFrame(rows)


def median_time(function, repeats: int) -> float:
    function()                                   # untimed warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="WAV files in the archive")
    parser.add_argument("--file-s", type=float, default=30.0, help="seconds per file (a multiple of 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embed-arch", default="vit_small", help="backbone for the embedding comparison")
    parser.add_argument("--embed-batches", type=int, default=3, help="batches of 32 tiles per embedding repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    work = Path(tempfile.mkdtemp(prefix="bench-indices-"))
    try:
        files = make_archive(work / "archive", args.files, args.file_s)
        tiles_per_file = int(args.file_s // TILE_S)
        n_tiles = len(files) * tiles_per_file
        windows = pd.DataFrame({"tile_id": np.arange(n_tiles),
                                "path": np.repeat(files["path"].to_numpy(), tiles_per_file),
                                "offset_s": np.tile(np.arange(tiles_per_file) * TILE_S, len(files))})
        config = indices.IndicesConfig(sample_rate_hz=RATE_HZ, window_s=TILE_S)
        run = iter(range(10 ** 6))

        def ours() -> None:
            indices.compute_indices(windows, work / f"indices-{next(run)}", config, show_progress=False)

        def maad_file_by_file() -> None:
            from maad import sound

            for path in files["path"]:
                samples, rate_hz = sound.load(path, detrend=False)
                for k in range(tiles_per_file):
                    span = samples[round(k * TILE_S * rate_hz):round((k + 1) * TILE_S * rate_hz)]
                    indices.window_indices(span, rate_hz, config)   # the two all_* calls, detrended

        def tiling() -> None:
            tile_archive(files, work / f"tiles-{next(run)}", SpectrogramConfig(), show_progress=False,
                         rank=0, world_size=1, threads=1)

        spectrogram = SpectrogramConfig()
        model = build_backbone(BackboneConfig(arch=args.embed_arch, n_mels=spectrogram.n_mels,
                                              n_frames=spectrogram.n_frames, drop_path_rate=0.0)).eval()
        batch = torch.randn(32, 1, spectrogram.n_mels, spectrogram.n_frames)

        @torch.no_grad()
        def embedding() -> None:
            for _ in range(args.embed_batches):
                model(batch)

        seconds = {"ours": median_time(ours, args.repeats),
                   "maad_file_by_file": median_time(maad_file_by_file, args.repeats),
                   "tiling": median_time(tiling, args.repeats),
                   "embedding": median_time(embedding, args.repeats)}
        tiles = {"ours": n_tiles, "maad_file_by_file": n_tiles, "tiling": n_tiles,
                 "embedding": 32 * args.embed_batches}
        rates = {name: tiles[name] / seconds[name] for name in seconds}
        ranking = sorted(("indices" if name == "ours" else name, rate) for name, rate in rates.items()
                         if name != "maad_file_by_file")
        result = {
            "benchmark": "indices",
            "unit": "tiles per second per core (3 s tiles at 32 kHz)",
            "n_tiles": n_tiles, "repeats": args.repeats, "threads": 1,
            "indices_tiles_per_s": round(rates["ours"], 2),
            "baseline_maad_file_by_file_tiles_per_s": round(rates["maad_file_by_file"], 2),
            "ratio_vs_maad_file_by_file": round(rates["ours"] / rates["maad_file_by_file"], 3),
            "tiling_tiles_per_s": round(rates["tiling"], 2),
            f"embedding_{args.embed_arch}_tiles_per_s": round(rates["embedding"], 2),
            "slowest_per_tile": min(ranking, key=lambda item: item[1])[0],
            "indices_ms_per_tile": round(1000 / rates["ours"], 1),
            "scikit_maad": indices.maad_version(), "python": platform.python_version(),
            "machine": platform.machine(),
        }
        print(json.dumps(result, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
