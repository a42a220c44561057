"""Seconds of audio tiled per wall second, end to end, against two per-slice baselines.

Input: a synthetic archive of 44.1 kHz 16-bit mono WAVs (the realistic case: the study's
recorders), --minutes of audio in files of --file-s seconds (noise floor, chirps, tones).
Measured in the same process, one thread (torch, OMP, MKL, OpenBLAS), medians over repeats,
each after one untimed warm-up:

- ``ours``: `soundscape_ssl.tiles.tiling.tile_archive` end to end: plan, decode, resample to 32 kHz,
  log-mel, float16 shards, per-tile statistics, indexes, finalise (normalisation, config.json).
- ``librosa`` (baseline a): decode with soundfile, `librosa.resample` (soxr_hq) to 32 kHz, then
  per 3 s slice `librosa.feature.melspectrogram` (same FFT, hop, mels, band) and
  `librosa.power_to_db`; one float16 .npy per file.
- ``png`` (baseline b, the original study's way): decode, then per 3 s slice a scikit-maad
  spectrogram (1024-sample Hann, 50 % overlap, native rate) rendered and saved by scikit-maad
  itself (`maad.sound.spectrogram(..., display=True, savefig=...)`: matplotlib, Agg, labelled
  figure, PNG). ``png_bare`` is the cheapest PNG route we know, reported beside it: the same
  spectrogram and `maad.util.power2dB` drawn as a bare 224 x 224 px image without axes.

With --device cuda `ours` runs on the GPU (decode stays on the CPU) and the result is also given
in hours of 44.1 kHz audio tiled per second; ``ours_cpu`` (the same call on the CPU) is then the
baseline that says what the GPU adds. `--baselines` picks the baselines run (librosa is the
`bench` extra: a GPU node without it runs `--baselines ours_cpu,png_bare`); a ratio to one not
run is null. A memory probe tiles a 1x and a 4x archive in
child processes and reports their peak RSS: it should not grow with the archive.
The last line printed is one JSON object.

    python benchmarks/tiling.py --minutes 5
    python benchmarks/tiling.py --device cuda --minutes 60 --decode-block-s 600
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy / torch load.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from soundscape_ssl.core.provenance import package_versions  # noqa: E402
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig  # noqa: E402
from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
logging.getLogger("soundscape_ssl").setLevel(logging.ERROR)

SAMPLE_RATE_HZ = 44100
CONFIG = SpectrogramConfig()
# Targets from the issue (one core, end to end); librosa ~590x and PNG ~40x measured before.
TARGET_REALTIME_X = 1500.0
TARGET_VS_LIBROSA = 2.5
TARGET_VS_PNG = 30.0


def synth_recording(seconds: float, seed: int) -> np.ndarray:
    """A soundscape-like signal: pink-ish noise floor, bird-like chirps, an insect tone."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE_HZ)
    t = np.arange(n) / SAMPLE_RATE_HZ
    white = rng.standard_normal(n)
    floor = np.cumsum(white) * 0.002
    floor -= np.convolve(floor, np.ones(441) / 441, mode="same")     # drop the random walk's DC
    signal = floor + 0.01 * white
    for start in rng.uniform(0, seconds - 0.5, size=max(1, int(seconds / 2))):
        i0, i1 = round(start * SAMPLE_RATE_HZ), round((start + 0.3) * SAMPLE_RATE_HZ)
        tt = t[i0:i1] - start
        f0 = rng.uniform(2000, 7000)
        signal[i0:i1] += 0.2 * np.sin(2 * np.pi * (f0 * tt + 4000 * tt * tt)) * np.hanning(i1 - i0)
    signal += 0.02 * np.sin(2 * np.pi * 9000 * t) * (1 + np.sin(2 * np.pi * 0.2 * t)) / 2
    return np.clip(signal, -1, 1).astype(np.float32)


def make_archive(root: Path, minutes: float, file_s: float) -> pd.DataFrame:
    """WAVs under root/BENCH01/ and their inventory rows (the columns tile_archive reads)."""
    n_files = max(1, round(minutes * 60 / file_s))
    rows = []
    start = pd.Timestamp("2021-05-24 05:00:00")
    for k in range(n_files):
        time_stamp = start + pd.Timedelta(seconds=k * file_s)
        relpath = f"BENCH01/BENCH01_{time_stamp:%Y%m%d_%H%M%S}.wav"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            sf.write(path, synth_recording(file_s, k), SAMPLE_RATE_HZ, subtype="PCM_16")
        frames = sf.info(path).frames
        rows.append(dict(recorder="BENCH01", habitat="canopy", path=str(path), relpath=relpath,
                         start_time=time_stamp, duration_s=frames / SAMPLE_RATE_HZ,
                         sample_rate_hz=SAMPLE_RATE_HZ, channels=1, frames=frames))
    return pd.DataFrame(rows)


def replicate(files: pd.DataFrame, root: Path, copies: int) -> pd.DataFrame:
    """The same recordings `copies` times under new recorder names (hard links: no extra disk)."""
    tables = []
    for copy in range(copies):
        table = files.copy()
        recorder = f"COPY{copy:02d}"
        new_paths = []
        for path, relpath in zip(files["path"], files["relpath"]):
            target = root / recorder / Path(relpath).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)
            new_paths.append(str(target))
        table["path"] = new_paths
        table["relpath"] = [f"{recorder}/{Path(p).name}" for p in new_paths]
        table["recorder"] = recorder
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


class Method:
    """One way of tiling, timed in rounds interleaved with the others (so that background load
    on a shared machine hits all of them alike)."""

    def __init__(self, name: str, run: Callable[[], None], output: Path, audio_s: float,
                 repeats: int) -> None:
        self.name, self.run, self.output, self.audio_s = name, run, output, audio_s
        self.repeats = repeats
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []

    def measure(self, record: bool) -> None:
        shutil.rmtree(self.output, ignore_errors=True)
        wall, cpu = time.perf_counter(), time.process_time()
        self.run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        shutil.rmtree(self.output, ignore_errors=True)
        if record:
            self.wall_s.append(wall)
            self.cpu_s.append(cpu)

    def summary(self) -> dict[str, object]:
        wall, cpu = statistics.median(self.wall_s), statistics.median(self.cpu_s)
        return {"audio_s": self.audio_s, "runs_wall_s": [round(r, 4) for r in self.wall_s],
                "median_wall_s": round(wall, 4), "median_cpu_s": round(cpu, 4),
                "realtime_x": round(self.audio_s / wall, 1),
                "realtime_x_cpu": round(self.audio_s / cpu, 1)}


def time_interleaved(methods: list[Method]) -> None:
    """One untimed warm-up each (page cache, kernels, imports), then rounds of timed runs."""
    for method in methods:
        method.measure(record=False)
    for round_index in range(max(method.repeats for method in methods)):
        for method in methods:
            if round_index < method.repeats:
                method.measure(record=True)


def run_ours(files: pd.DataFrame, store: Path, device: str, decode_block_s: float) -> None:
    tile_archive(files, store, config=CONFIG, tiling=TilingConfig(decode_block_s=decode_block_s),
                 rank=0, world_size=1, device=device, show_progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_librosa(files: pd.DataFrame, out_dir: Path) -> None:
    import librosa

    out_dir.mkdir(parents=True, exist_ok=True)
    slice_samples = CONFIG.tile_samples
    for k, path in enumerate(files["path"]):
        samples, rate = sf.read(path, dtype="float32")
        resampled = librosa.resample(samples, orig_sr=rate, target_sr=CONFIG.sample_rate_hz)
        tiles = []
        for start in range(0, len(resampled) - slice_samples + 1, slice_samples):
            power = librosa.feature.melspectrogram(
                y=resampled[start:start + slice_samples], sr=CONFIG.sample_rate_hz,
                n_fft=CONFIG.n_fft, hop_length=CONFIG.hop_length, n_mels=CONFIG.n_mels,
                fmin=CONFIG.f_min_hz, fmax=CONFIG.f_max_hz, power=2.0)
            tiles.append(librosa.power_to_db(power, ref=1.0, amin=CONFIG.power_floor,
                                             top_db=None).astype(np.float16))
        np.save(out_dir / f"{k:06d}.npy", np.stack(tiles))


def run_png(files: pd.DataFrame, out_dir: Path) -> None:
    """scikit-maad's own renderer: `spectrogram(display=True, savefig=...)` per 3 s slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from maad import sound

    out_dir.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(files["path"]):
        samples, rate = sf.read(path, dtype="float64")
        slice_samples = round(CONFIG.tile_s * rate)
        for j, start in enumerate(range(0, len(samples) - slice_samples + 1, slice_samples)):
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")       # maad prints each file name, warns on layout
                sound.spectrogram(samples[start:start + slice_samples], rate, window="hann",
                                  nperseg=1024, noverlap=512, mode="psd", display=True,
                                  savefig=str(out_dir / f"{k:06d}_{j:04d}"))
            plt.close("all")


def run_png_bare(files: pd.DataFrame, out_dir: Path) -> None:
    """The cheapest PNG route: maad spectrogram and dB, a bare 224 x 224 px image, no axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from maad import sound, util

    out_dir.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(files["path"]):
        samples, rate = sf.read(path, dtype="float64")
        slice_samples = round(CONFIG.tile_s * rate)
        for j, start in enumerate(range(0, len(samples) - slice_samples + 1, slice_samples)):
            power, _, _, extent = sound.spectrogram(samples[start:start + slice_samples], rate,
                                                    window="hann", nperseg=1024, noverlap=512,
                                                    mode="psd")
            power_db = util.power2dB(power, db_range=96)
            figure = plt.figure(figsize=(2.24, 2.24), dpi=100)
            axes = figure.add_axes((0, 0, 1, 1))
            axes.imshow(power_db, origin="lower", aspect="auto", cmap="gray", extent=extent)
            axes.axis("off")
            figure.savefig(out_dir / f"{k:06d}_{j:04d}.png", dpi=100)
            plt.close(figure)


def peak_rss_mib() -> float:
    """This process's peak resident set size. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so a child would report its parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(inventory: Path, store: Path, device: str, decode_block_s: float) -> None:
    """Child mode: tile an inventory and print the peak RSS (MiB) as JSON."""
    files = pd.read_parquet(inventory)
    before_mib = peak_rss_mib()
    started = time.perf_counter()
    run_ours(files, store, device, decode_block_s)
    peak_mib = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak_mib, "peak_rss_before_tiling_mib": before_mib,
                      "wall_s": time.perf_counter() - started,
                      "audio_s": float(files["duration_s"].sum())}))


def measure_memory(files: pd.DataFrame, work: Path, device: str,
                   decode_block_s: float) -> dict[str, object]:
    results = {}
    for copies in (1, 4):
        archive = replicate(files, work / "replicas", copies)
        inventory = work / f"inventory_x{copies}.parquet"
        archive.to_parquet(inventory)
        store = work / f"memory_store_x{copies}"
        shutil.rmtree(store, ignore_errors=True)
        child = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(inventory), str(store),
             "--device", device, "--decode-block-s", str(decode_block_s)],
            capture_output=True, text=True, check=True)
        shutil.rmtree(store, ignore_errors=True)
        results[f"x{copies}"] = json.loads(child.stdout.strip().splitlines()[-1])
    growth = results["x4"]["peak_rss_mib"] - results["x1"]["peak_rss_mib"]
    return {**results, "peak_rss_growth_mib_for_4x_audio": growth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="audio in the archive")
    parser.add_argument("--file-s", type=float, default=60.0, help="length of each WAV")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of ours and librosa")
    parser.add_argument("--png-repeats", type=int, default=3, help="timed runs of the PNG way")
    parser.add_argument("--png-minutes", type=float, default=2.0,
                        help="audio (first files) for the slow PNG baseline")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for ours")
    parser.add_argument("--baselines", default="librosa,png,png_bare",
                        help="comma list of librosa, png, png_bare, ours_cpu (ours on the CPU)")
    parser.add_argument("--decode-block-s", type=float, default=TilingConfig().decode_block_s)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-RSS probe")
    parser.add_argument("--memory-probe", nargs=2, type=Path, metavar=("INVENTORY", "STORE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.device, args.decode_block_s)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tiling_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    files = make_archive(work / "archive", args.minutes, args.file_s)
    audio_s = float(files["duration_s"].sum())
    png_files = files.iloc[:max(1, round(args.png_minutes * 60 / args.file_s))]
    png_audio_s = float(png_files["duration_s"].sum())
    available = {
        "ours": Method("ours", lambda: run_ours(files, work / "store", args.device,
                                                args.decode_block_s),
                       work / "store", audio_s, args.repeats),
        "ours_cpu": Method("ours_cpu", lambda: run_ours(files, work / "store_cpu", "cpu",
                                                        args.decode_block_s),
                           work / "store_cpu", audio_s, args.repeats),
        "librosa": Method("librosa", lambda: run_librosa(files, work / "librosa"),
                          work / "librosa", audio_s, args.repeats),
        "png": Method("png", lambda: run_png(png_files, work / "png"), work / "png",
                      png_audio_s, args.png_repeats),
        "png_bare": Method("png_bare", lambda: run_png_bare(png_files, work / "png_bare"),
                           work / "png_bare", png_audio_s, args.png_repeats),
    }
    baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    unknown = sorted(set(baselines) - set(available) | ({"ours"} & set(baselines)))
    if unknown or not baselines:
        parser.error(f"--baselines: unknown {unknown}; choose from {sorted(set(available) - {'ours'})}")
    methods = {name: available[name] for name in ["ours", *baselines]}
    load_before = os.getloadavg()
    time_interleaved(list(methods.values()))
    load_after = os.getloadavg()
    summaries = {name: method.summary() for name, method in methods.items()}
    for name, summary in summaries.items():
        print(f"{name:<9} {summary['realtime_x']:>9.1f}x real time (wall), "
              f"{summary['realtime_x_cpu']:>9.1f}x (CPU time)", file=sys.stderr)

    def ratio(baseline: str, key: str = "realtime_x") -> float | None:
        if baseline not in summaries:
            return None
        return round(float(summaries["ours"][key]) / float(summaries[baseline][key]), 2)

    def at_least(value: float | None, target: float) -> bool | None:
        return None if value is None else value >= target

    ours_x = float(summaries["ours"]["realtime_x"])
    result: dict[str, object] = {
        "benchmark": "tiling",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "input": f"{len(files)} x {args.file_s:g} s 44.1 kHz 16-bit mono WAV",
        "config": CONFIG.to_dict(),
        "decode_block_s": args.decode_block_s,
        "ours": summaries["ours"],
        "baseline_librosa": summaries.get("librosa"),
        "baseline_png": summaries.get("png"),
        "baseline_png_bare": summaries.get("png_bare"),
        "baseline_ours_cpu": summaries.get("ours_cpu"),
        "ratio_vs_ours_cpu": ratio("ours_cpu"),
        "ratio_vs_librosa": ratio("librosa"),
        "ratio_vs_png": ratio("png"),
        "ratio_vs_png_bare": ratio("png_bare"),
        "ratio_vs_librosa_cpu_time": ratio("librosa", "realtime_x_cpu"),
        "ratio_vs_png_cpu_time": ratio("png", "realtime_x_cpu"),
        "ratio_vs_png_bare_cpu_time": ratio("png_bare", "realtime_x_cpu"),
        "targets": {"realtime_x": TARGET_REALTIME_X, "vs_librosa": TARGET_VS_LIBROSA,
                    "vs_png": TARGET_VS_PNG},
    }
    result["targets_met"] = {
        "realtime_x": ours_x >= TARGET_REALTIME_X,
        "realtime_x_cpu_time": float(summaries["ours"]["realtime_x_cpu"]) >= TARGET_REALTIME_X,
        "vs_librosa": at_least(result["ratio_vs_librosa"], TARGET_VS_LIBROSA),
        "vs_png": at_least(result["ratio_vs_png"], TARGET_VS_PNG),
    }
    if args.device.startswith("cuda"):
        result["ours_audio_hours_per_s"] = round(ours_x / 3600.0, 3)
        result["gpu"] = torch.cuda.get_device_name()
    if not args.skip_memory:
        result["memory"] = measure_memory(files, work, args.device, args.decode_block_s)
    result["versions"] = package_versions((
        "torch", "torchaudio", "numpy", "soundfile", "librosa", "soxr", "scikit-maad",
        "matplotlib"))
    # Wall-clock figures assume an otherwise idle core; on a busy machine read the CPU-time ones.
    result["machine"] = {"python": platform.python_version(), "processor": platform.processor(),
                         "cpu_count": os.cpu_count(),
                         "load_average_1min_before_after": [round(load_before[0], 2),
                                                            round(load_after[0], 2)]}
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
