"""Seconds of audio BirdNET scores per wall second per core: the batched runner against one window at a time.

Measured in one process with one thread everywhere (LiteRT num_threads=1; OMP, MKL, OpenBLAS 1),
medians over --repeats, each case after one untimed warm-up:

Model level, on --windows preloaded 3 s windows at 48 kHz (logits and 1024-d embeddings):
- ``batched``: `BirdNetRunner(batch_size=B).logits_and_embeddings`, the interpreter resized to
  [B, 144000] and allocated once.
- ``one_at_a_time`` (the named baseline): `BirdNetRunner(batch_size=1)`, one invoke per window,
  allocated once.
- ``birdnetlib_style`` (a second baseline): what birdnetlib's `Analyzer.predict` does per window
  on the unmodified model: resize the input to [1, 144000], `allocate_tensors`, set, invoke, read
  the logits (its embeddings would take another such call).

End to end, `run_on_files` on a synthetic archive of 44.1 kHz 16-bit WAVs of --file-s seconds
(decode, resample to 48 kHz, score, write shards, finalise), with batch B against batch 1.

"x real time per core" = audio seconds / wall seconds / threads. CPU seconds (process time) are
reported too, since the machine may be shared. The last line printed is one JSON object.

    python benchmarks/birdnet.py --windows 64 --repeats 5 --batch-size 32
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy / scipy load.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from soundscape_ssl.analysis import birdnet  # noqa: E402
from soundscape_ssl.analysis.birdnet import BirdNetConfig, BirdNetRunner, run_on_files  # noqa: E402

logging.getLogger("soundscape_ssl").setLevel(logging.ERROR)

NUM_THREADS = 1
ARCHIVE_SAMPLE_RATE_HZ = 44100
TARGET_REALTIME_X_PER_CORE = 100.0


def soundscape(seconds: float, sample_rate_hz: int, seed: int) -> np.ndarray:
    """Noise floor with bird-like chirps, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate_hz)) / sample_rate_hz
    audio = 0.01 * rng.standard_normal(len(t))
    for start_s in rng.uniform(0, seconds - 0.4, size=max(1, int(seconds / 2))):
        span = (t >= start_s) & (t < start_s + 0.3)
        tt = t[span] - start_s
        audio[span] += 0.2 * np.sin(2 * np.pi * (2500 + 6000 * tt) * tt) * np.hanning(span.sum())
    return audio.astype(np.float32)


def timed(run: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds over `repeats` runs, after one untimed warm-up."""
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "wall_s_all": [round(w, 4) for w in walls]}


def speed(timing: dict[str, float], audio_s: float) -> dict[str, float]:
    return {**timing,
            "audio_s": audio_s,
            "x_realtime_per_core": audio_s / timing["wall_s"] / NUM_THREADS,
            "x_realtime_per_cpu_s": audio_s / timing["cpu_s"],
            "ms_per_window": 1000 * timing["wall_s"] / (audio_s / 3.0)}


def birdnetlib_style_loop(windows: np.ndarray) -> Callable[[], None]:
    """birdnetlib's per-window predict: resize + allocate + invoke on every call."""
    from ai_edge_litert import interpreter as litert

    interpreter = litert.Interpreter(model_path=str(birdnet.birdnet_model_dir() / birdnet.MODEL_FILE),
                                     num_threads=NUM_THREADS)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run() -> None:
        for window in windows:
            sample = window[None, :]
            interpreter.resize_tensor_input(input_index, list(sample.shape))
            interpreter.allocate_tensors()
            interpreter.set_tensor(input_index, sample)
            interpreter.invoke()
            interpreter.get_tensor(output_index)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=64, help="3 s windows per model-level repeat")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-windows", type=int, default=16,
                        help="windows per repeat of the birdnetlib-style loop")
    parser.add_argument("--archive-windows", type=int, default=64,
                        help="3 s windows of the end-to-end archive")
    parser.add_argument("--file-s", type=float, default=60.0, help="length of each archive file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    windows = np.stack([soundscape(3.0, 48000, seed) for seed in range(args.windows)])
    windows += 0.001 * rng.standard_normal(windows.shape).astype(np.float32)

    batched_runner = BirdNetRunner(BirdNetConfig(batch_size=args.batch_size, num_threads=NUM_THREADS))
    single_runner = BirdNetRunner(BirdNetConfig(batch_size=1, num_threads=NUM_THREADS))
    model_audio_s = 3.0 * args.windows
    results: dict[str, dict[str, float]] = {}
    results["batched"] = speed(timed(lambda: batched_runner.logits_and_embeddings(windows), args.repeats),
                               model_audio_s)
    results["one_at_a_time"] = speed(timed(lambda: [single_runner.logits_and_embeddings(w) for w in windows],
                                           args.repeats), model_audio_s)
    baseline_windows = windows[:args.baseline_windows]
    results["birdnetlib_style"] = speed(timed(birdnetlib_style_loop(baseline_windows), args.repeats),
                                        3.0 * len(baseline_windows))
    logits_batched, _ = batched_runner.logits_and_embeddings(windows)
    logits_single = np.concatenate([single_runner.logits_and_embeddings(w)[0] for w in windows])
    max_logit_diff = float(np.abs(logits_batched - logits_single).max())

    work = Path(tempfile.mkdtemp(prefix="bench_birdnet_"))
    try:
        n_files = max(1, round(args.archive_windows * 3.0 / args.file_s))
        paths = []
        for i in range(n_files):
            path = work / "archive" / f"REC_{i:04d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, soundscape(args.file_s, ARCHIVE_SAMPLE_RATE_HZ, 1000 + i), ARCHIVE_SAMPLE_RATE_HZ,
                     subtype="PCM_16")
            paths.append(path)
        archive_audio_s = n_files * (args.file_s // 3.0) * 3.0
        counter = {"run": 0}

        def end_to_end(runner: BirdNetRunner) -> Callable[[], None]:
            def run() -> None:
                counter["run"] += 1
                out = work / f"out_{counter['run']}"
                run_on_files(paths, out, runner.config, runner=runner, progress=False)
                shutil.rmtree(out)
            return run

        results["end_to_end_batched"] = speed(timed(end_to_end(batched_runner), args.repeats), archive_audio_s)
        results["end_to_end_one_at_a_time"] = speed(timed(end_to_end(single_runner), args.repeats),
                                                    archive_audio_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for name, row in results.items():
        print(f"{name:>26}: {row['x_realtime_per_core']:7.1f}x real time per core (wall), "
              f"{row['x_realtime_per_cpu_s']:7.1f}x per CPU second, {row['ms_per_window']:6.1f} ms/window")
    end_to_end = results["end_to_end_batched"]
    summary = {
        "benchmark": "birdnet",
        "num_threads": NUM_THREADS,
        "batch_size": args.batch_size,
        "windows": args.windows,
        "repeats": args.repeats,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                    for name, row in results.items()},
        "batched_vs_one_at_a_time": results["batched"]["x_realtime_per_core"]
        / results["one_at_a_time"]["x_realtime_per_core"],
        "batched_vs_birdnetlib_style": results["batched"]["x_realtime_per_core"]
        / results["birdnetlib_style"]["x_realtime_per_core"],
        "end_to_end_batched_vs_one_at_a_time": results["end_to_end_batched"]["x_realtime_per_core"]
        / results["end_to_end_one_at_a_time"]["x_realtime_per_core"],
        # The same ratios in CPU time, which other processes on a shared machine do not inflate.
        "cpu_batched_vs_one_at_a_time": results["one_at_a_time"]["cpu_s"] / results["batched"]["cpu_s"],
        "cpu_end_to_end_batched_vs_one_at_a_time": results["end_to_end_one_at_a_time"]["cpu_s"]
        / results["end_to_end_batched"]["cpu_s"],
        "max_abs_logit_diff_batched_vs_single": max_logit_diff,
        "target_x_realtime_per_core": TARGET_REALTIME_X_PER_CORE,
        "meets_target_end_to_end": end_to_end["x_realtime_per_core"] >= TARGET_REALTIME_X_PER_CORE,
        "meets_target_end_to_end_cpu": end_to_end["x_realtime_per_cpu_s"] >= TARGET_REALTIME_X_PER_CORE,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
