"""Wall time and quality of clustering and of the 2-D map, against named baselines in the same process.

Input: synthetic Gaussian-mixture "embeddings" (--n-rows x --dims float32, --components
components with Zipf-like weights, centres N(0, 1), unit isotropic noise x --noise), so the
planted component of every row is known.

Clustering (k = --n-clusters), medians over --repeats, each after one untimed warm-up:
- ``ours``: `soundscape_ssl.analysis.cluster.fit_clusters` with its defaults: scaler + KMeans
  (k-means++, n_init 3) fitted on --fit-subsample random rows, every row assigned in chunks,
  silhouette on 10k rows included.
- ``ours_n_init1``: the same with one k-means++ start, to separate the subsample's effect from
  that of the restarts.
- ``baseline_kmeans_all``: StandardScaler + `sklearn.cluster.KMeans(k)` with sklearn's defaults
  (n_init "auto" = 1 for k-means++, lloyd) fitted on all rows, then its `labels_`.
Times are wall and CPU seconds (process-wide): on a shared machine the CPU time is steadier.
Quality: inertia of each solution on all rows in the same standardised space (lower is better;
the ratio shows what fitting on a subsample costs), NMI with the planted components, NMI
between the two solutions.

2-D map on the first --umap-rows rows, medians over --umap-repeats after a numba warm-up:
- ``ours``: `soundscape_ssl.analysis.cluster.umap_2d` with its defaults (seeded, single-threaded,
  fitted on up to 100k rows: at --umap-rows 50000 it is fitted on all of them).
- ``ours_subsample``: the same with umap_subsample = --umap-subsample (fit, then `transform`);
  its quality is also given apart for the fitted and the transformed rows.
- ``baseline_umap_all``: `umap.UMAP()` defaults (unseeded, n_jobs=-1: all --threads cores) on the
  standardised rows.
Quality: share of rows whose 10 nearest neighbours in the map share their planted component.

Thread counts (OpenMP, MKL, OpenBLAS, numba) are set to --threads before numpy loads.
The last line printed is one JSON object.

    python benchmarks/cluster.py                       # 200k rows, UMAP on 50k
    python benchmarks/cluster.py --umap-rows 20000     # a busy 2-core machine
"""

from __future__ import annotations

import os
import sys


from soundscape_ssl.core.threads import pin_threads_from_argv  # noqa: E402  (imports nothing heavy)

THREADS = pin_threads_from_argv(sys.argv[1:], default=os.cpu_count() or 1)  # before numpy loads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from soundscape_ssl.analysis.cluster import (ClusterConfig, ClusterResult, assign_to_centroids,  # noqa: E402
                                    fit_clusters, subsample_indices, umap_2d)

logging.getLogger("soundscape_ssl").setLevel(logging.ERROR)


def gaussian_mixture(n_rows: int, dims: int, n_components: int, noise: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_components + 1) ** 0.8
    component = rng.choice(n_components, size=n_rows, p=weights / weights.sum())
    centres = rng.standard_normal((n_components, dims)).astype(np.float32)
    embeddings = centres[component]
    embeddings += noise * rng.standard_normal((n_rows, dims), dtype=np.float32)
    return embeddings, component


class Timings:
    """Wall and CPU seconds (process-wide, all threads) of repeated runs.

    On a shared machine wall time swings with other people's load; CPU time is the steadier
    measure of work done, so both are reported.
    """

    def __init__(self) -> None:
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []

    def run(self, function: Callable[[], object]) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        self.wall_s.append(time.perf_counter() - wall)
        self.cpu_s.append(time.process_time() - cpu)
        return result

    def median_wall_s(self) -> float:
        return statistics.median(self.wall_s)

    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)

    def summary(self) -> dict[str, object]:
        return {"runs_wall_s": [round(r, 3) for r in self.wall_s],
                "median_wall_s": round(self.median_wall_s(), 3),
                "runs_cpu_s": [round(r, 3) for r in self.cpu_s],
                "median_cpu_s": round(self.median_cpu_s(), 3)}


def timed(function: Callable[[], object], repeats: int,
          warm_up: bool = True) -> tuple[Timings, object]:
    if warm_up:
        function()  # thread pools, BLAS, numba caches
    timings, result = Timings(), None
    for _ in range(repeats):
        result = timings.run(function)
    return timings, result


def ratios(baseline: Timings, ours: Timings) -> dict[str, float]:
    """How many times faster ours is (> 1: faster), by wall and by CPU time."""
    return {"wall": round(baseline.median_wall_s() / ours.median_wall_s(), 2),
            "cpu": round(baseline.median_cpu_s() / ours.median_cpu_s(), 2)}


def inertia_on(standardized: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of all rows to their nearest centroid (lower is better)."""
    dims = standardized.shape[1]
    _, distances = assign_to_centroids(standardized, centroids, np.zeros(dims), np.ones(dims))
    return float(np.sum(distances.astype(np.float64) ** 2))


def map_neighbour_agreement(coordinates: np.ndarray, component: np.ndarray, k: int = 10) -> np.ndarray:
    """Per row, the share of its k nearest map neighbours from its own planted component."""
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(coordinates).kneighbors(
        coordinates, return_distance=False)[:, 1:]
    return (component[neighbours] == component[:, None]).mean(axis=1)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-rows", type=int, default=200_000, help="rows clustered")
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--components", type=int, default=100, help="planted mixture components")
    parser.add_argument("--noise", type=float, default=1.0, help="noise std (centres have std 1)")
    parser.add_argument("--n-clusters", type=int, default=100)
    parser.add_argument("--fit-subsample", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed clustering runs")
    parser.add_argument("--umap-rows", type=int, default=50_000, help="rows mapped (0: skip UMAP)")
    parser.add_argument("--umap-subsample", type=int, default=10_000)
    parser.add_argument("--umap-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS, help="read before numpy loads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    embeddings, component = gaussian_mixture(args.n_rows, args.dims, args.components, args.noise,
                                             args.seed)
    config = ClusterConfig(n_clusters=args.n_clusters, fit_subsample=args.fit_subsample,
                           seed=args.seed)

    one_init = dataclasses.replace(config, n_init=1)
    ours_time, ours = timed(lambda: fit_clusters(embeddings, config, progress=False), args.repeats)
    one_init_time, ours_one_init = timed(lambda: fit_clusters(embeddings, one_init, progress=False),
                                         args.repeats)

    def baseline_kmeans() -> tuple[KMeans, StandardScaler]:
        scaler = StandardScaler().fit(embeddings)
        model = KMeans(n_clusters=args.n_clusters, random_state=args.seed).fit(scaler.transform(embeddings))
        return model, scaler

    baseline_time, (baseline, scaler) = timed(baseline_kmeans, args.repeats)
    standardized = scaler.transform(embeddings).astype(np.float32)

    def quality(result: ClusterResult) -> dict[str, object]:
        # centroids mapped into the baseline's (all-rows) standardised space: one inertia scale
        original = result.centroids * result.scaler_scale + result.scaler_mean
        centroids = (original - scaler.mean_) / scaler.scale_
        inertia = inertia_on(standardized, centroids.astype(np.float32))
        return {"fit_rows": int(result.fit_indices.size), "n_init": result.config.n_init,
                "n_iter": result.n_iter, "inertia_all_rows": inertia,
                "inertia_ratio_vs_baseline": round(inertia / baseline_inertia, 4),
                "nmi_vs_planted": normalized_mutual_info_score(component, result.labels),
                "nmi_vs_baseline": normalized_mutual_info_score(result.labels, baseline.labels_),
                "silhouette_10k": result.silhouette}

    baseline_inertia = inertia_on(standardized, baseline.cluster_centers_.astype(np.float32))
    clustering = {
        "ours": {**ours_time.summary(), **quality(ours),
                 "speedup_vs_baseline": ratios(baseline_time, ours_time)},
        "ours_n_init1": {**one_init_time.summary(), **quality(ours_one_init),
                         "speedup_vs_baseline": ratios(baseline_time, one_init_time)},
        "baseline_kmeans_all": {**baseline_time.summary(), "fit_rows": args.n_rows, "n_init": "auto (1)",
                                "n_iter": int(baseline.n_iter_), "inertia_all_rows": baseline_inertia,
                                "nmi_vs_planted": normalized_mutual_info_score(component, baseline.labels_)},
    }
    print(json.dumps({"clustering": clustering}), flush=True)

    umap_result: dict[str, object] = {}
    if args.umap_rows:
        import umap

        rows = embeddings[:args.umap_rows]
        truth = component[:args.umap_rows]
        # numba compiles nndescent (used above 4096 rows), the layout and transform: not timed
        warm = ClusterConfig(umap_subsample=5000, seed=args.seed)
        umap_2d(embeddings[:6000], warm)
        umap.UMAP(n_jobs=-1).fit_transform(StandardScaler().fit_transform(embeddings[:6000]))

        map_config = ClusterConfig(seed=args.seed)
        subsample_config = ClusterConfig(seed=args.seed, umap_subsample=args.umap_subsample)
        variants: dict[str, Callable[[], np.ndarray]] = {
            "ours": lambda: umap_2d(rows, map_config),
            "ours_subsample": lambda: umap_2d(rows, subsample_config),
            "baseline_umap_all": lambda: umap.UMAP(n_jobs=-1).fit_transform(
                StandardScaler().fit_transform(rows)),
        }
        timings: dict[str, Timings] = {}
        for name, function in variants.items():
            timings[name], coordinates = timed(function, args.umap_repeats, warm_up=False)
            agreement = map_neighbour_agreement(coordinates, truth)
            umap_result[name] = {**timings[name].summary(),
                                 "map_10nn_same_component": float(agreement.mean())}
            if name == "ours_subsample":
                fitted = np.zeros(len(rows), dtype=bool)
                fitted[subsample_indices(len(rows), args.umap_subsample, args.seed)] = True
                umap_result[name]["map_10nn_same_component_fitted_rows"] = float(agreement[fitted].mean())
                umap_result[name]["map_10nn_same_component_transformed_rows"] = float(
                    agreement[~fitted].mean())
            print(json.dumps({name: umap_result[name]}), flush=True)
        umap_result["ours"]["fit_rows"] = min(args.umap_rows, map_config.umap_subsample or args.umap_rows)
        umap_result["ours_subsample"]["fit_rows"] = min(args.umap_rows, args.umap_subsample)
        for name in ("ours", "ours_subsample"):
            umap_result[name]["speedup_vs_baseline"] = ratios(timings["baseline_umap_all"], timings[name])

    result = {
        "benchmark": "cluster",
        "threads": THREADS,
        "input": f"{args.n_rows} x {args.dims} float32 Gaussian mixture, {args.components} components, "
                 f"noise {args.noise:g}",
        "n_clusters": args.n_clusters,
        "clustering": clustering,
        "umap_rows": args.umap_rows,
        "umap": umap_result,
        "versions": {name: version(name) for name in ("numpy", "scikit-learn", "umap-learn", "numba",
                                                      "pynndescent")},
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
