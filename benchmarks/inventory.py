"""Throughput of `scan_archive` against `soundfile.info` per file, on a synthetic archive tree.

Builds (or reuses) a tree of N tiny valid WAVs spread over recorder folders, with a few bad
files mixed in, then reports files per second for

- ``scan_archive`` end to end (directory walk + header reads + name parsing + tables);
- the named baseline, ``soundfile.info(path)`` per file on a list of paths (no walk, no tables,
  so the baseline is flattered), on an evenly spaced subset of the files to keep it quick;

each at every thread count in --threads (the baseline threaded with a ThreadPoolExecutor), in
two cache states:

- ``warm``: one untimed warm-up run, then the timed runs read from the page cache (CPU cost);
- ``cold``: before every timed run the tree's own file pages are dropped from the page cache
  with posix_fadvise(DONTNEED) (Linux; nothing else on the machine is touched), so the header
  reads go to the disk, as in a first scan of a freshly mounted archive. Directory and inode
  caches stay warm.

Medians over --repeats runs. The last line printed is one JSON object.

    python benchmarks/inventory.py --n-files 100000 --tree-dir /tmp/inventory_bench
"""

from __future__ import annotations

import os

# Thread counts are set before numpy/pandas load: only the scan's own threads should run.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile  # noqa: E402

from soundscape_ssl.recordings import archive  # noqa: E402

logging.getLogger("soundscape_ssl").setLevel(logging.ERROR)  # the planted bad files are expected

TREE_MARKER = "inventory_benchmark_tree.json"
SAMPLE_RATE_HZ = 44100
FRAMES_PER_FILE = 32  # tiny files: the benchmark measures per-file cost, not bandwidth
RECORDING_INTERVAL = dt.timedelta(minutes=10)
BAD_FILE_EVERY = 1000  # one bad file per this many good ones


def tiny_wav_bytes(n_frames: int, rate_hz: int) -> bytes:
    """A 16-bit mono PCM WAV with a plain 44-byte header."""
    data = (np.sin(np.arange(n_frames) * 0.3) * 1000).astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate_hz, rate_hz * 2, 2, 16)
    body = b"WAVE" + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def build_tree(tree_dir: Path, n_files: int, n_recorders: int) -> dict:
    """Write the synthetic archive (reused when a tree with the same shape is already there)."""
    marker = tree_dir / TREE_MARKER
    shape = {"n_files": n_files, "n_recorders": n_recorders, "frames_per_file": FRAMES_PER_FILE,
             "bad_file_every": BAD_FILE_EVERY}
    if marker.is_file():
        if json.loads(marker.read_text()).get("shape") == shape:
            return json.loads(marker.read_text())
        shutil.rmtree(tree_dir)  # a benchmark tree of another shape: ours to replace
    elif tree_dir.exists() and any(tree_dir.iterdir()):
        raise SystemExit(f"{tree_dir} exists and is not a benchmark tree: refusing to touch it")
    tree_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    good = tiny_wav_bytes(FRAMES_PER_FILE, SAMPLE_RATE_HZ)
    # Data chunk claims 10x the bytes present: quarantined as truncated.
    truncated = good[:40] + struct.pack("<I", 10 * FRAMES_PER_FILE * 2) + good[44:]
    noise = b"\x00" + np.random.default_rng(0).bytes(511)  # not_audio
    bad_contents = (b"", truncated, noise)
    recorders = [f"S4A{i:05d}" for i in range(n_recorders)]
    for recorder in recorders:
        (tree_dir / recorder).mkdir()
    first_start = dt.datetime(2021, 5, 24)
    n_bad = 0
    for index in range(n_files):
        recorder = recorders[index % n_recorders]
        start = first_start + (index // n_recorders) * RECORDING_INTERVAL
        name = f"{recorder}_{start:%Y%m%d_%H%M%S}.wav"
        content = good
        if index % BAD_FILE_EVERY == BAD_FILE_EVERY - 1:
            content = bad_contents[n_bad % len(bad_contents)]
            n_bad += 1
        with open(tree_dir / recorder / name, "wb") as handle:
            handle.write(content)
    summary = {"shape": shape, "n_bad_files": n_bad,
               "build_s": round(time.perf_counter() - started, 2)}
    marker.write_text(json.dumps(summary))
    return summary


def evict_from_page_cache(paths: list[str]) -> None:
    """Drop these files' cached pages (only theirs) so the next read goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median_seconds(function, repeats: int, before_each=None, warm_up: bool = True) -> float:
    if warm_up:
        function()  # page cache, imports, thread pool start-up
    timings = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def soundfile_info_all(paths: list[str], threads: int) -> None:
    """The baseline: soundfile.info on every path; threaded too, so both sides get threads
    (soundfile serialises its opens behind a lock, which limits what threads can do for it)."""
    if threads == 1:
        for path in paths:
            soundfile.info(path)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(soundfile.info, paths):
            pass


def measure(mode: str, tree_dir: Path, all_paths: list[str], baseline_paths: list[str],
            n_files: int, thread_counts: list[int], repeats: int) -> dict:
    cold = mode == "cold"
    scan_results, baseline_results = {}, {}
    for threads in thread_counts:
        seconds = median_seconds(
            lambda: archive.scan_archive(tree_dir, show_progress=False, num_threads=threads),
            repeats, before_each=(lambda: evict_from_page_cache(all_paths)) if cold else None,
            warm_up=not cold)
        scan_results[f"threads_{threads}"] = {
            "median_s": round(seconds, 3), "files_per_s": round(n_files / seconds, 1)}
        seconds = median_seconds(
            lambda: soundfile_info_all(baseline_paths, threads), repeats,
            before_each=(lambda: evict_from_page_cache(baseline_paths)) if cold else None,
            warm_up=not cold)
        baseline_results[f"threads_{threads}"] = {
            "median_s": round(seconds, 3),
            "files_per_s": round(len(baseline_paths) / seconds, 1)}
    return {
        "scan_archive": scan_results,
        "baseline_soundfile_info": baseline_results,
        "speedup_vs_baseline_same_threads": {
            key: round(scan_results[key]["files_per_s"] / baseline_results[key]["files_per_s"], 2)
            for key in scan_results},
        "speedup_vs_baseline_1_thread": {
            key: round(scan_results[key]["files_per_s"]
                       / baseline_results[f"threads_{thread_counts[0]}"]["files_per_s"], 2)
            for key in scan_results},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-files", type=int, default=100_000)
    parser.add_argument("--n-recorders", type=int, default=100)
    parser.add_argument("--tree-dir", type=Path, default=None,
                        help="where the tree lives; reused when present (default: a temp dir, "
                             "deleted afterwards)")
    parser.add_argument("--threads", default="1,8",
                        help="comma-separated thread counts, the first one is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-files", type=int, default=10_000,
                        help="files given to the soundfile.info baseline (an evenly spaced subset)")
    parser.add_argument("--modes", default="warm,cold", help="cache states to measure")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if "cold" in modes and not hasattr(os, "posix_fadvise"):
        print("posix_fadvise is unavailable: skipping the cold-cache mode", file=sys.stderr)
        modes.remove("cold")

    wall_started = time.perf_counter()
    temporary = args.tree_dir is None
    tree_dir = Path(tempfile.mkdtemp(prefix="inventory_bench_")) if temporary else args.tree_dir
    try:
        tree = build_tree(tree_dir, args.n_files, args.n_recorders)
        os.sync()  # dirty pages cannot be dropped: write the fresh tree out first

        inventory = archive.scan_archive(tree_dir, show_progress=False, num_threads=1)
        n_scanned = len(inventory.files) + len(inventory.quarantine)
        assert n_scanned == args.n_files, (n_scanned, args.n_files)
        assert len(inventory.quarantine) == tree["n_bad_files"]
        all_paths = inventory.files["path"].tolist() + inventory.quarantine["path"].tolist()
        good_paths = inventory.files["path"].tolist()
        step = max(1, len(good_paths) // args.baseline_files)
        baseline_paths = good_paths[::step][: args.baseline_files]

        walk_s = median_seconds(lambda: archive.list_audio_files(tree_dir),
                                args.repeats)
        result = {
            "benchmark": "inventory",
            "baseline": "soundfile.info per file (paths given: no walk, no tables)",
            "n_files": n_scanned,
            "n_quarantined": len(inventory.quarantine),
            "n_recorders": args.n_recorders,
            "baseline_n_files": len(baseline_paths),
            "tree_build_s": tree.get("build_s"),
            "repeats": args.repeats,
            "walk_only_warm_median_s": round(walk_s, 3),
            **{mode: measure(mode, tree_dir, all_paths, baseline_paths, n_scanned,
                             thread_counts, args.repeats) for mode in modes},
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "soundfile": soundfile.__version__,
            "libsndfile": soundfile.__libsndfile_version__,
        }
    finally:
        if temporary:
            shutil.rmtree(tree_dir, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - wall_started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
