"""How the analysis scales with the number of tiles: time per 1,000 tiles and peak memory per stage.

Builds tile stores of --sizes tiles (default 10k, 40k, 160k) and runs on each the stages the
notebooks run after tiling, each in a fresh subprocess:

- ``embed``: `analysis.embed.embed_store` on the CPU (mean pooling, fp32) with --checkpoint
  (default: the reference demo run's DINO ViT-Ti, depth 4); only at the --embed-sizes, because a
  ViT on two shared cores embeds a few dozen tiles per second;
- ``cluster``: `analysis.cluster.fit_clusters` (k = 100, fitted on up to 50k rows, every row
  assigned in chunks) from the memory-mapped embedding, and `ClusterResult.save`;
- ``map``: `analysis.cluster.umap_2d` (fitted on up to 20k rows as notebook 04 does, the rest
  placed with `transform` in chunks);
- ``baselines``: `analysis.baselines.compute_baselines` (log-mel statistics and PCA-64 of the
  raw tiles), streamed from the store into .npy files;
- ``score``: `analysis.metrics.score_spaces` of the SSL space and both baselines (grouped kNN,
  KMeans agreement, bootstrap intervals; a seeded subsample of `metrics.SCORE_MAX_ROWS` rows
  above that) and `metrics.paired_against` the log-mel baseline, as notebook 04 does.

The tiles: each is a tile of --source-store (the reference demo's 2,880 synthetic-archive
tiles) with its time axis rotated by a random number of frames and a random gain of -6..+6 dB,
written as float16 shards of 2,048 tiles with an index that repeats the source tile's row, so
the store reads like a tiled archive (tiling's own speed is measured by benchmarks/tiling.py).
At a size without an embedding run, the embedding is the largest embedded size's embedding
resampled with replacement plus Gaussian noise of 5% of each dimension's spread (so rows are
distinct); the JSON says which sizes were embedded and which resampled.

Measured per stage and size, in the subprocess that runs the stage (imports, opening the store
and loading the model are outside the timed part and reported as setup_s):
- ``s``: wall seconds of the stage's work, and ``s_per_1k_tiles``;
- ``peak_rss_mib``: the child's peak resident set size, VmHWM of /proc/self/status read by the
  child as the stage ends (imports and the model included). It counts the resident pages of
  memory-mapped files too (tile shards, embeddings), which the kernel can drop at any time.
  (`ru_maxrss` of the child from `os.wait4` is not used: Linux carries the parent's peak at the
  fork into it);
- ``peak_anon_mib``: the peak of RssAnon (anonymous memory: what the process itself holds),
  sampled every 50 ms from /proc/self/status by a thread in the child;
- ``setup_rss_mib``: the resident set once imports, model and inputs are loaded, before the
  timed work.
The ratios are those of the largest size against the smallest, run in the same invocation (the
named baseline). Goals (issue 14): time per tile within 1.3x, peak memory at most 1.5x.

Measured (defaults, 2 threads, the 2-core machine when quiet; README "The whole archive"): s per
1,000 tiles at 10k / 40k / 160k: cluster 0.34 / 0.25 / 0.09, map 3.47 / 0.99 / 0.36, baselines
1.95 / 0.91 / 0.56, scoring 0.80 / 0.58 / 0.18; embed 4.86 (2.5k) / 4.05 (10k). Peak anonymous
memory 160k / 10k: 1.05, 1.26, 1.00, 1.16 (embed 10k / 2.5k: 1.04); peak RSS 1.13, 1.27, 2.36
(the store's mapped pages), 1.34 (embed 1.30). Under a load of 7-8 from other jobs the same stages
took 1.3-14x longer.

Thread counts (torch, OpenMP, MKL, OpenBLAS, numba) are set to --threads before numpy loads.
The last line on stdout is one JSON object; a readable table goes to stderr.

    nice -n 5 python benchmarks/scale.py                                  # 10k/40k/160k, embed 2.5k/10k
    python benchmarks/scale.py --tiny                                     # a minute: 1k/2k/4k, embed 500/1k
    python benchmarks/scale.py --sizes 5000 20000 80000 --embed-sizes 5000
"""

from __future__ import annotations

import os
import sys


from soundscape_ssl.core.threads import pin_threads_from_argv  # noqa: E402  (imports nothing heavy)

THREADS = pin_threads_from_argv(sys.argv[1:], default=2)  # before numpy, numba and torch load

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE_RUN = REPO / "runs" / "reference"   # `make figures` makes it
STAGES = ("embed", "cluster", "map", "baselines", "score")
SHARD_TILES = 2048
GAIN_DB = 6.0
RESAMPLE_NOISE = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000],
                        help="tile counts the post-embedding stages run at")
    parser.add_argument("--embed-sizes", type=int, nargs="*", default=[2_500, 10_000],
                        help="tile counts embedded with the ViT (the others reuse the largest, resampled)")
    parser.add_argument("--tiny", action="store_true",
                        help="a quick check: sizes 1000 2000 4000, embed 500 1000, 200 bootstrap resamples")
    parser.add_argument("--source-store", type=Path, default=REFERENCE_RUN / "tiles")
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE_RUN / "pretrain" / "dino" / "checkpoint.pth")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "_scale_benchmark",
                        help="stores and products (several GB at 160k tiles; removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and products")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-bootstrap", type=int, default=2000, help="resamples in the score stage (notebook 04: 2000)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)   # internal: run one stage
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.embed_sizes, args.n_bootstrap = [1000, 2000, 4000], [500, 1000], 200
    if not args.embed_sizes and args.stage is None:
        parser.error("--embed-sizes needs at least one size (the other sizes resample its embedding)")
    return args


# ----------------------------------------------------------------------------- inputs


def store_dir(work: Path, n: int) -> Path:
    return work / f"store_{n}"


def embeddings_path(work: Path, n: int) -> Path:
    return work / f"embeddings_{n}.npy"


def build_store(source_dir: Path, out_dir: Path, n_tiles: int, seed: int) -> float:
    """A tile store of n_tiles perturbed copies of the source store's tiles; returns seconds."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from soundscape_ssl.tiles.store import CONFIG_FILE, INDEX_FILE, INDEX_SCHEMA, TileStore, shard_path

    started = time.perf_counter()
    if (out_dir / CONFIG_FILE).is_file() and len(TileStore(out_dir)) == n_tiles:
        return 0.0
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "units").mkdir(parents=True)
    source = TileStore(source_dir)
    source_tiles = source.read_range(0, len(source))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(source), size=n_tiles)
    for shard, start in enumerate(range(0, n_tiles, SHARD_TILES)):
        rows = picks[start:start + SHARD_TILES]
        tiles = source_tiles[rows].astype(np.float32)
        shifts = rng.integers(0, tiles.shape[2], size=len(rows))
        gains = rng.uniform(-GAIN_DB, GAIN_DB, size=len(rows)).astype(np.float32)
        for i, shift in enumerate(shifts):
            tiles[i] = np.roll(tiles[i], int(shift), axis=1) + gains[i]
        np.save(shard_path(out_dir, shard), tiles.astype(np.float16))
    index = source.index.iloc[picks].reset_index(drop=True)
    index["tile_id"] = np.arange(n_tiles, dtype=np.int64)
    index["shard"] = (np.arange(n_tiles) // SHARD_TILES).astype(np.int32)
    index["shard_row"] = (np.arange(n_tiles) % SHARD_TILES).astype(np.int32)
    pq.write_table(pa.Table.from_pandas(index[INDEX_SCHEMA.names], schema=INDEX_SCHEMA, preserve_index=False),
                   out_dir / INDEX_FILE)
    pd.DataFrame().to_parquet(out_dir / "skipped.parquet")
    metadata = json.loads((source_dir / CONFIG_FILE).read_text())
    metadata["fingerprint"] = hashlib.sha256(
        f"{metadata.get('fingerprint')} scale-benchmark n={n_tiles} seed={seed}".encode()).hexdigest()
    metadata["counts"] = {**metadata.get("counts", {}), "n_tiles": n_tiles, "n_tiles_planned": n_tiles,
                          "n_units": int(index["shard"].max()) + 1}
    metadata["benchmark"] = (f"benchmarks/scale.py: {n_tiles} tiles of {source_dir}, time-rotated, "
                             f"gain +-{GAIN_DB} dB, seed {seed}")
    (out_dir / CONFIG_FILE).write_text(json.dumps(metadata, indent=1))
    return time.perf_counter() - started


def resample_embeddings(source: Path, out: Path, n_rows: int, seed: int, chunk_rows: int = 65_536) -> None:
    """n_rows rows drawn with replacement from `source`, plus noise (written chunk by chunk)."""
    base = np.load(source, mmap_mode="r")
    spread = base.std(axis=0).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    out_array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n_rows, base.shape[1]))
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        rows = np.sort(rng.integers(0, len(base), size=stop - start))
        noise = rng.normal(0.0, RESAMPLE_NOISE, size=(stop - start, base.shape[1])).astype(np.float32)
        out_array[start:stop] = base[rows] + noise * spread
    out_array.flush()
    del out_array


# ----------------------------------------------------------------------------- one stage (child)


class PeakAnonSampler:
    """Peak RssAnon of this process, sampled from /proc/self/status by a daemon thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak_kib = 0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read_kib(field: str = "RssAnon") -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.read_kib())
            self._stop.wait(self._interval_s)

    def __enter__(self) -> "PeakAnonSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.read_kib())


def run_stage(args: argparse.Namespace) -> dict:
    """Run one stage at one size in this (fresh) process; its numbers as a dict."""
    import torch

    torch.set_num_threads(args.threads)
    sampler = PeakAnonSampler().__enter__()
    work, n = args.work_dir, args.n
    started = time.perf_counter()
    setup = {}
    if args.stage == "embed":
        from soundscape_ssl.analysis.embed import EmbedConfig, embed_store, load_embeddings

        out_dir = work / f"embed_{n}"
        shutil.rmtree(out_dir, ignore_errors=True)
        config = EmbedConfig(pooling="mean", device="cpu", batch_size=256, num_workers=1)
        setup["setup_s"] = time.perf_counter() - started
        setup["setup_rss_mib"] = sampler.read_kib("VmRSS") / 1024
        started = time.perf_counter()
        embed_store(store_dir(work, n), args.checkpoint, out_dir, config, show_progress=False)
        seconds = time.perf_counter() - started
        shutil.copyfile(load_embeddings(out_dir, "mean").filename, embeddings_path(work, n))
    elif args.stage in ("cluster", "map"):
        from soundscape_ssl.analysis.cluster import ClusterConfig, fit_clusters, umap_2d

        embeddings = np.load(embeddings_path(work, n), mmap_mode="r")
        # notebook 04's settings: k = 100 fitted on up to 50k rows, UMAP fitted on up to 20k
        config = ClusterConfig(n_clusters=100, fit_subsample=50_000, umap_subsample=20_000, seed=args.seed)
        if args.stage == "map":
            # numba compiles UMAP's fit and transform on first use (~20 s, whatever N): a warm-up
            # on 300 random rows makes that setup, not map time
            warm = np.random.default_rng(0).normal(size=(300, embeddings.shape[1])).astype(np.float32)
            umap_2d(warm, ClusterConfig(umap_subsample=200, seed=args.seed))
        setup["setup_s"] = time.perf_counter() - started
        setup["setup_rss_mib"] = sampler.read_kib("VmRSS") / 1024
        started = time.perf_counter()
        if args.stage == "cluster":
            result = fit_clusters(embeddings, config, progress=False)
            result.save(work / f"clusters_{n}")
        else:
            coordinates = umap_2d(embeddings, config)
            np.save(work / f"map_{n}.npy", coordinates)
        seconds = time.perf_counter() - started
    elif args.stage == "baselines":
        from soundscape_ssl.analysis.baselines import BaselineConfig, compute_baselines
        from soundscape_ssl.tiles.store import TileStore

        store = TileStore(store_dir(work, n))
        setup["setup_s"] = time.perf_counter() - started
        setup["setup_rss_mib"] = sampler.read_kib("VmRSS") / 1024
        started = time.perf_counter()
        compute_baselines(store, BaselineConfig(pca_n_components=64, seed=args.seed), progress=False,
                          out_dir=work / f"baselines_{n}")
        seconds = time.perf_counter() - started
    else:  # score
        import pandas as pd

        from soundscape_ssl.analysis import metrics
        from soundscape_ssl.analysis.cluster import ClusterResult
        from soundscape_ssl.tiles.store import TileStore

        index = TileStore(store_dir(work, n)).index
        labels = (index["timestamp"].dt.hour // 6).astype(str).to_numpy()   # quarter of the day
        groups = index["relpath"].astype(str).to_numpy()                      # the source file
        clusters = ClusterResult.load(work / f"clusters_{n}")
        spaces = {"ssl": np.load(embeddings_path(work, n), mmap_mode="r"),
                  "logmel_stats": np.load(work / f"baselines_{n}" / "logmel_stats.npy", mmap_mode="r"),
                  "pca64": np.load(work / f"baselines_{n}" / "pca64.npy", mmap_mode="r")}
        knn_config = metrics.KnnConfig(n_bootstrap=args.n_bootstrap, seed=args.seed)
        setup["setup_s"] = time.perf_counter() - started
        setup["setup_rss_mib"] = sampler.read_kib("VmRSS") / 1024
        started = time.perf_counter()
        scored = metrics.score_spaces(spaces, labels, groups, "file", knn_config,
                                      cluster_labels={"ssl": clusters.labels},
                                      silhouettes={"ssl": clusters.silhouette}, progress=False)
        table = metrics.spaces_table(scored)
        metrics.paired_against(scored, "logmel_stats", groups, "file", args.n_bootstrap, seed=args.seed)
        seconds = time.perf_counter() - started
        setup["n_scored"] = int(table["n_scored"].iloc[0])
        setup["knn_accuracy"] = {name: round(float(v), 3) for name, v in table["knn_accuracy"].items()}
        pd.options.display.width = 200
    sampler.__exit__()
    return {"stage": args.stage, "n_tiles": n, "s": seconds, "peak_anon_mib": sampler.peak_kib / 1024,
            "peak_rss_mib": sampler.read_kib("VmHWM") / 1024, **setup}


# ----------------------------------------------------------------------------- driver (parent)


def run_child(args: argparse.Namespace, stage: str, n: int) -> dict:
    """Run one stage in a fresh subprocess; the numbers it measured on itself."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--n", str(n),
               "--threads", str(args.threads), "--work-dir", str(args.work_dir), "--seed", str(args.seed),
               "--checkpoint", str(args.checkpoint), "--n-bootstrap", str(args.n_bootstrap)]
    log_path = args.work_dir / f"{stage}_{n}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    lines = log_path.read_text().splitlines()
    if returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"stage {stage} at {n} tiles failed (exit {returncode}); {log_path}:\n{tail}")
    result = json.loads(lines[-1])
    with open(args.work_dir / "results.jsonl", "a") as results_log:   # kept if a later stage fails
        results_log.write(lines[-1] + "\n")
    result["s_per_1k_tiles"] = 1000 * result["s"] / n
    return result


def ratios(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, float]]:
    out = {}
    for stage, by_size in results.items():
        if len(by_size) < 2:
            continue
        small, large = by_size[min(by_size)], by_size[max(by_size)]
        out[stage] = {"sizes": f"{max(by_size)}/{min(by_size)}",
                      "time_per_tile": large["s_per_1k_tiles"] / small["s_per_1k_tiles"],
                      "peak_rss": large["peak_rss_mib"] / small["peak_rss_mib"],
                      "peak_anon": large["peak_anon_mib"] / small["peak_anon_mib"]}
    return out


def main() -> None:
    args = parse_args()
    args.work_dir = args.work_dir.resolve()
    if args.stage:
        print(json.dumps(run_stage(args)))
        return
    for path in (args.source_store, args.checkpoint):
        if not path.exists():
            sys.exit(f"scale benchmark: {path} not found: run `make figures` (the reference run) first, or give --source-store / --checkpoint")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "results.jsonl").unlink(missing_ok=True)
    sizes, embed_sizes = sorted(set(args.sizes)), sorted(set(args.embed_sizes))
    results: dict[str, dict[int, dict]] = {stage: {} for stage in STAGES}
    build_s = {}
    started = time.perf_counter()
    for n in embed_sizes:
        build_s[n] = build_store(args.source_store, store_dir(args.work_dir, n), n, args.seed)
        results["embed"][n] = run_child(args, "embed", n)
        print(f"embed {n}: {results['embed'][n]['s']:.1f} s", file=sys.stderr)
    largest_embedded = embeddings_path(args.work_dir, embed_sizes[-1])
    for n in sizes:
        if n not in build_s:
            build_s[n] = build_store(args.source_store, store_dir(args.work_dir, n), n, args.seed)
        if n not in embed_sizes:
            resample_embeddings(largest_embedded, embeddings_path(args.work_dir, n), n, args.seed)
        for stage in ("cluster", "map", "baselines", "score"):
            results[stage][n] = run_child(args, stage, n)
            print(f"{stage} {n}: {results[stage][n]['s']:.1f} s", file=sys.stderr)
    summary = {
        "benchmark": "scale",
        "threads": args.threads,
        "sizes": sizes,
        "embed_sizes": embed_sizes,
        "embeddings": {str(n): ("embedded" if n in embed_sizes else f"resampled from the {embed_sizes[-1]}-tile "
                                f"embedding (+{RESAMPLE_NOISE:g} sd noise)") for n in sizes},
        "checkpoint": str(args.checkpoint),
        "source_store": str(args.source_store),
        "n_bootstrap": args.n_bootstrap,
        "store_build_s": {str(n): round(s, 1) for n, s in build_s.items()},
        "memory_method": "peak_rss_mib: VmHWM of the stage's own fresh subprocess, read at its end (mapped "
                         "file pages and imports included); peak_anon_mib: RssAnon sampled every 50 ms "
                         "in that subprocess",
        "baseline": f"each stage at the smallest size, same invocation; ratios = largest / smallest",
        "stages": {stage: {str(n): {key: (round(value, 3) if isinstance(value, float) else value)
                                    for key, value in r.items() if key not in ("stage", "n_tiles")}
                           for n, r in by_size.items()} for stage, by_size in results.items()},
        "ratios": {stage: {key: (round(value, 3) if isinstance(value, float) else value) for key, value in r.items()}
                   for stage, r in ratios(results).items()},
        "goals": {"time_per_tile": 1.3, "peak_memory": 1.5},
        "total_s": round(time.perf_counter() - started, 1),
    }
    lines = [f"{'stage':<10}{'tiles':>8}{'s':>9}{'s/1k':>8}{'rss MiB':>9}{'anon MiB':>10}"]
    for stage, by_size in results.items():
        for n, r in sorted(by_size.items()):
            lines.append(f"{stage:<10}{n:>8}{r['s']:>9.1f}{r['s_per_1k_tiles']:>8.2f}"
                         f"{r['peak_rss_mib']:>9.0f}{r['peak_anon_mib']:>10.0f}")
    for stage, r in summary["ratios"].items():
        lines.append(f"{stage:<10} {r['sizes']}: time/tile x{r['time_per_tile']:.2f}, "
                     f"peak rss x{r['peak_rss']:.2f}, peak anon x{r['peak_anon']:.2f}")
    print("\n".join(lines), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
