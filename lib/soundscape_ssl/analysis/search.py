"""Search by example: the tiles of a run nearest a query clip in one output space.

A scientist has one recording of a call and wants every tile of the archive that sounds like it.
`search_run(run_dir, query, space)` embeds the query's span (`offset_s`, one tile long) the way
the run's tiles were embedded, and ranks every tile of the run's store by cosine similarity to it:

* a checkpoint's space, "<name>_<pooling>" (e.g. "vicreg_band"), is the array notebook 04 wrote to
  `runs/<id>/embeddings/<name>/embeddings_<pooling>.npy` (row i = tile_id i of `runs/<id>/tiles`).
  The query is embedded with the checkpoint that folder's `config.json` records (its sha256 is
  checked, so a retrained checkpoint cannot silently embed the query into another space), by
  `embed.embed_audio_files`: the one audio reader, the same front end, float16 rounding,
  normalisation and pooling, so a query cut from an archive file on the tile grid gets its tile's
  embedding (similarity 1).
* "logmel_stats" is the baseline of notebook 04 (`baselines.logmel_stats_features`: per mel band,
  mean and std of the tile's dB values), computed from the store's tiles and cached in
  `runs/<id>/search/spaces/` (the store is read once, not per query).

Similarity. Every dimension is standardised first (z-scored with the mean and standard deviation
of all rows, the scaling notebook 04's kNN and KMeans use) unless `standardize=False`; without it
the log-mel statistics, all negative dB values, would be nearly parallel. Cosine similarity is
then the dot product of unit vectors.

Brute force, bounded memory (the default, `index="exact"`). The embedding stays a read-only
memory map; `top_k_cosine` reads `chunk_rows` rows at a time, scores them against every query at
once, and keeps a running top-k per query, so memory is O(chunk_rows x D + queries x k) whatever
the number of tiles. The scaler and the standardised rows' lengths are computed once per space and
kept in `runs/<id>/search/spaces/` (`space_statistics`), so a query costs one pass over the rows.

An approximate index (`index="ivf"`: faiss IndexIVFFlat on the same standardised unit vectors,
optional extra `search`) answers a query in milliseconds once built. `benchmarks/search.py`
measured it on the shared 2-core machine, 1,536-dimensional rows, at recall@50 >= 0.99 against
brute force: 83x the single-query rate at 100k rows (1.6 ms against 0.13 s) and 33x at 1M (40 ms
against 1.3 s), 6-8x for batches of 64; its build (25 s at 100k, 290 s at 1M) costs as much as
~200 brute-force queries. Brute force stays the default: it is exact, needs no build and no extra
package, and one query of the command is dominated by loading the checkpoint and embedding the
clip until the archive holds millions of tiles. The index is for
many queries over a large archive (it is built on first use and kept beside the statistics).

A band (`band_hz`, `--band-hz LOW HIGH`: the Low and High Freq of a Raven box drawn around the
call). A tile where the call sits beside other sounds is far from the query in every dimension
that describes the other sounds. The spaces that keep frequency apart (log-mel statistics: per
mel bin; "band" pooling: per frequency row of the patch grid) can compare only the dimensions of
the call's band (`band_columns`), standardised as before, their lengths computed in one more pass.
Measured on the demo's reference run (`benchmarks/search.py --precision`, the planted call's
annotated band as the box; nothing was tuned): precision@50 for the call's species 0.40 -> 0.48
in vicreg_band and 0.40 -> 0.53 in logmel_stats.

A call's time span (`call_s`, `--call-s START END`: the Begin and End Time of the box, in s from
the query's offset). A short call fills a tenth of a 3 s tile, so the tile's pooled vector is
mostly the rest of the tile. The pooled search (in the band, when one is given) first shortlists
`shortlist` tiles; each is then read back from the store and compared window by window: the
call's own window of the query against every window of the same length in the tile
(`CallWindows`: the log-mel mean and std per bin, or the mean of the backbone's final patch tokens
over those columns per frequency row), standardised with the space's own scaler. A tile scores its
best window, and the hit says where that window starts (`match_offset_s`). Memory and time per
query grow with the shortlist, not with the archive. On the reference run (the call's annotated box:
band and time), precision@50 for the dominant label rose from the band's 0.48 to 0.55 in vicreg_band
and 0.53 to 0.55 in logmel_stats; for the species present in the hit at all, 0.71 -> 0.86 and 0.90 ->
0.93 (`benchmarks/search.py --precision`, whose docstring says why ~0.54 is what a search that only
ever returns tiles holding the species would score on the dominant label there).

Offsets. The query is the tile-long span of the clip from `offset_s`. On the clip's tile grid
(multiples of `tile_hop_s`, 3 s in the demo) it is embedded exactly as the audio command embeds
that span; any other offset is first cut out at the tiles' rate through the one reader
(`cut_span`: resampled with the audio around it, as a tile is). A span that runs past the end of
the clip is zero-padded and kept when at least half of it is audio, as for the archive's tiles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from ..core.audio import AudioFile, AudioOpenError, WindowLoss, WindowRule, read_windows
from ..core.stage import atomic_save_npy, atomic_write, atomic_write_text, file_sha256
from ..pretrain.checkpoint import checkpoint_backbone_config
from ..pretrain.models import patch_grid_hw
from ..pretrain.pooling import BAND_POOLINGS
from ..recordings.archive import probe_recording
from ..tiles.spectrogram import SpectrogramConfig, hz_to_mel_bin
from ..tiles.store import TileStore
from .baselines import logmel_stats_features
from .embed import (EmbedConfig, audio_output_paths, audio_tiles_db, checkpoint_embedder, embed_audio_files,
                    load_embeddings, read_embeddings_metadata)

logger = logging.getLogger(__name__)

LOGMEL_SPACE = "logmel_stats"
EMBEDDINGS_DIR = "embeddings"
TILES_DIR = "tiles"
SEARCH_DIR = "search"
SPACES_CACHE_DIR = "spaces"
RESULT_COLUMNS = ["rank", "tile_id", "similarity", "recorder", "time", "file", "offset_s", "path"]
DEFAULT_CHUNK_ROWS = 65_536
DEFAULT_SHORTLIST = 500
RERANK_BATCH_TILES = 128
INDEX_KINDS = ("exact", "ivf")


class SearchInputError(ValueError):
    """The search cannot start: a missing run, an unknown space, a query too short or an offset
    past its end. The message is one line that says which and what would work."""


# ----------------------------------------------------------------------------------------------
# The brute-force kernel


def embedding_scaler(embeddings: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per dimension over all finite rows: scikit-learn's StandardScaler fitted
    `chunk_rows` at a time (`partial_fit`), so a memory map is never read whole; a constant
    dimension gets scale 1, as StandardScaler gives it."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for start in range(0, embeddings.shape[0], chunk_rows):
        rows = np.asarray(embeddings[start:start + chunk_rows], dtype=np.float64)
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows):
            scaler.partial_fit(rows)
    if not getattr(scaler, "n_samples_seen_", 0):
        raise ValueError("the embedding has no finite row to standardise with")
    return scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)


def standardised_row_norms(embeddings: np.ndarray, mean: np.ndarray | None = None,
                           scale: np.ndarray | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """(N,) float32: the length of every row after standardising with (mean, scale) when given;
    NaN for a row that is not finite. Read `chunk_rows` at a time."""
    norms = np.empty(embeddings.shape[0], np.float32)
    for start in range(0, embeddings.shape[0], chunk_rows):
        rows = np.asarray(embeddings[start:start + chunk_rows], dtype=np.float32)
        if mean is not None:
            rows = (rows - mean) / scale
        norms[start:start + len(rows)] = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    return norms


def top_k_cosine(embeddings: np.ndarray, queries: np.ndarray, k: int,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, mean: np.ndarray | None = None,
                 scale: np.ndarray | None = None, norms: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `embeddings` (N, D; a memory map is read `chunk_rows` at a time) most
    cosine-similar to each of `queries` (Q, D), after standardising both with (mean, scale) when
    given. Returns (rows (Q, k') int64, similarities (Q, k') float32), k' = min(k, N), best first;
    equal similarities in row order; a row that is not finite scores -inf, a zero row 0.

    `norms` (`standardised_row_norms` with the same mean and scale; computed here when not given)
    make one query cost one pass of products: with z = (x - mean) / scale and u the unit
    standardised query, z.u / |z| = (x.(u / scale) - mean.(u / scale)) / |z|, so the rows are never
    standardised, only read."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n_rows, n_dims = embeddings.shape
    if queries.shape[1] != n_dims:
        raise ValueError(f"queries have {queries.shape[1]} dimensions, the embedding {n_dims}")
    if not np.isfinite(queries).all():
        raise ValueError("a query embedding is not finite (NaN or inf)")
    if norms is None:
        norms = standardised_row_norms(embeddings, mean, scale, chunk_rows)
    if len(norms) != n_rows:
        raise ValueError(f"{len(norms)} row norms for {n_rows} rows")
    units = queries if mean is None else (queries - mean) / scale
    units = units / np.maximum(np.linalg.norm(units, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    weights = units if scale is None else units / scale                          # (Q, D)
    offsets = np.zeros(len(queries), np.float32) if mean is None else (weights @ mean).astype(np.float32)
    k = min(k, n_rows)
    best = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
    for start in range(0, n_rows, chunk_rows):
        chunk = np.asarray(embeddings[start:start + chunk_rows], dtype=np.float32)
        chunk_norms = norms[start:start + len(chunk)]
        with np.errstate(invalid="ignore", over="ignore"):
            scores = (weights @ chunk.T - offsets[:, None]) / np.where(chunk_norms > 0, chunk_norms, 1.0)
        scores[~np.isfinite(scores)] = -np.inf
        rows = np.arange(start, start + len(chunk), dtype=np.int64)
        for position, (kept_rows, kept_scores) in enumerate(best):
            best[position] = best_k(np.concatenate([kept_rows, rows]),
                                    np.concatenate([kept_scores, scores[position]]), k)
    return (np.stack([rows for rows, _ in best]).astype(np.int64),
            np.stack([scores for _, scores in best]).astype(np.float32))


def best_k(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (rows, scores), best first, equal scores in row order: a partial sort picks the
    candidates (every row tied with the k-th score included, so the choice among ties does not
    depend on how the rows were chunked), a full sort orders only them."""
    if len(scores) > k:
        kth = scores[np.argpartition(-scores, k - 1)[:k]].min()
        candidates = np.flatnonzero(scores >= kth)
        rows, scores = rows[candidates], scores[candidates]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


# ----------------------------------------------------------------------------------------------
# A run's spaces


@dataclass
class SearchSpace:
    """One output space of a run: its (N, D) memory-mapped rows and how to put a query in it."""

    name: str
    embeddings: np.ndarray
    checkpoint: Path | None          # None for the log-mel statistics
    pooling: str | None
    spectrogram: SpectrogramConfig   # the tiles' front end (a query is cut by its window rule)
    source: Path                     # the .npy file the rows are mapped from
    run_dir: Path
    frequency_rows: int | None = None   # "band" pooling: the patch grid's frequency rows, low to high


def require_run(run_dir: str | os.PathLike) -> Path:
    """The run folder, or SearchInputError when it is missing or holds no finished tile store."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SearchInputError(f"no run folder {run_dir}")
    if not (run_dir / TILES_DIR / "config.json").is_file():
        raise SearchInputError(f"{run_dir} holds no finished tile store ({run_dir / TILES_DIR}/config.json "
                               "is missing): run notebook 02 first")
    return run_dir


def run_spaces(run_dir: str | os.PathLike) -> list[str]:
    """The spaces a run can be searched in: "<checkpoint>_<pooling>" for every finished folder of
    `embeddings/`, then "logmel_stats" (always: it needs only the tiles)."""
    names = []
    for folder in sorted(p for p in (Path(run_dir) / EMBEDDINGS_DIR).glob("*") if p.is_dir()):
        try:
            arrays = read_embeddings_metadata(folder)["arrays"]
        except (OSError, ValueError):
            continue
        names += [f"{folder.name}_{pooling}" for pooling in sorted(arrays)]
    return names + [LOGMEL_SPACE]


def open_space(run_dir: str | os.PathLike, name: str, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               show_progress: bool = False) -> SearchSpace:
    """The space `name` of a run (see `run_spaces`); SearchInputError naming the ones it has."""
    run_dir = require_run(run_dir)
    store = TileStore(run_dir / TILES_DIR)
    if name == LOGMEL_SPACE:
        rows = logmel_space(run_dir, store, chunk_rows, show_progress)
        return SearchSpace(name, rows, None, None, store.config, Path(rows.filename), run_dir)
    for folder in sorted(p for p in (run_dir / EMBEDDINGS_DIR).glob("*") if p.is_dir()):
        prefix = folder.name + "_"
        if not name.startswith(prefix):
            continue
        try:
            metadata = read_embeddings_metadata(folder)
        except (OSError, ValueError):
            continue
        pooling = name[len(prefix):]
        if pooling not in metadata["arrays"]:
            continue
        embeddings = load_embeddings(folder, pooling)
        if embeddings.shape[0] != len(store):
            raise SearchInputError(f"{folder} holds {embeddings.shape[0]} rows but the tile store "
                                   f"{len(store)} tiles: they are from different runs")
        return SearchSpace(name, embeddings, _space_checkpoint(run_dir, folder, metadata), pooling,
                           store.config, folder / metadata["arrays"][pooling]["file"], run_dir,
                           _frequency_rows(metadata, folder) if pooling in BAND_POOLINGS else None)
    raise SearchInputError(f"unknown space {name!r}: {run_dir} has {', '.join(run_spaces(run_dir))}")


def _frequency_rows(metadata: dict[str, Any], folder: Path) -> int | None:
    """The frequency rows of the patch grid of the backbone an embeddings folder was made with
    (its config.json's checkpoint record); None when the record has no backbone_config."""
    checkpoint = metadata.get("checkpoint") or {}
    if "backbone_config" not in checkpoint:
        return None
    backbone = checkpoint_backbone_config(checkpoint, folder / "config.json")
    return patch_grid_hw((backbone.n_mels, backbone.n_frames), backbone.patch_hw)[0]


def _space_checkpoint(run_dir: Path, folder: Path, metadata: dict[str, Any]) -> Path:
    """The checkpoint an embedding folder was made with: the path it records, or (for a run moved
    since) the same file name under the run's pretrain/<name>/ or embeddings/; checked by sha256."""
    recorded = metadata.get("checkpoint") or {}
    path = Path(str(recorded.get("path", "")))
    candidates = [path, run_dir / "pretrain" / folder.name / "checkpoint.pth", run_dir / EMBEDDINGS_DIR / path.name]
    sha256 = recorded.get("sha256")
    for candidate in candidates:
        if candidate.name and candidate.is_file():
            if sha256 and file_sha256(candidate) != sha256:
                raise SearchInputError(f"{candidate} is not the checkpoint {folder} was embedded with "
                                       f"(sha256 differs): re-embed the store or restore the checkpoint")
            return candidate
    raise SearchInputError(f"the checkpoint {folder} was embedded with is gone (looked for "
                           f"{', '.join(str(c) for c in candidates if c.name)})")


def logmel_space(run_dir: Path, store: TileStore, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 show_progress: bool = False) -> np.ndarray:
    """The log-mel statistics of every tile, memory-mapped from `search/spaces/logmel_stats.npy`;
    computed on first use and again when the store changed (its fingerprint is kept beside)."""
    cache = run_dir / SEARCH_DIR / SPACES_CACHE_DIR / f"{LOGMEL_SPACE}.npy"
    stamp_path = cache.with_suffix(".json")
    stamp = {"store": str(store.store_dir), "n_tiles": len(store),
             "store_config_sha256": file_sha256(Path(store.store_dir) / "config.json")}
    if cache.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return np.load(cache, mmap_mode="r")
    cache.parent.mkdir(parents=True, exist_ok=True)
    features = logmel_stats_features(store, batch_tiles=min(512, chunk_rows), progress=show_progress)
    atomic_save_npy(cache, features)
    atomic_write_text(stamp_path, json.dumps(stamp, indent=2) + "\n")
    return np.load(cache, mmap_mode="r")


# ----------------------------------------------------------------------------------------------
# The query


def check_query(query: str | os.PathLike, offset_s: float, spectrogram: SpectrogramConfig) -> Path:
    """The query file, or SearchInputError when it is missing or unreadable, its offset is
    negative, or less than half a tile of it lies after the offset."""
    path = Path(query)
    if not path.is_file():
        raise SearchInputError(f"no query file {path}")
    recording = probe_recording(path)
    if not recording.readable:
        raise SearchInputError(f"query {path} cannot be read ({recording.reason}: {recording.detail})")
    duration_s = recording.frames / recording.sample_rate_hz if recording.sample_rate_hz else 0.0
    tile_s = spectrogram.tile_s
    if not math.isfinite(offset_s) or offset_s < 0:
        raise SearchInputError(f"--offset-s must be >= 0 s, got {offset_s:g}")
    needed_s = offset_s + tile_s / 2
    if duration_s + 1e-9 < needed_s:
        if offset_s == 0:
            raise SearchInputError(f"query {path} is {duration_s:.2f} s long: a search needs at least "
                                   f"{tile_s / 2:g} s (half a {tile_s:g} s tile)")
        raise SearchInputError(f"--offset-s {offset_s:g} s is past the end of {path} ({duration_s:.2f} s): "
                               f"at least {tile_s / 2:g} s of audio must follow the offset")
    return path


def cut_span(path: str | os.PathLike, offset_s: float, spectrogram: SpectrogramConfig,
             out_path: str | os.PathLike) -> Path:
    """The tile-long span of `path` from `offset_s` (any offset), read through the one reader at the
    tiles' rate (resampled with the audio around it, as a tile is) and written as a float WAV at
    that rate: its span at 0 s is then the tile the window rule would cut at `offset_s`."""
    rule = WindowRule.from_seconds(spectrogram.sample_rate_hz, spectrogram.tile_s, spectrogram.tile_hop_s)
    start = round(offset_s * rule.sample_rate_hz)
    losses: list[WindowLoss] = []
    try:
        audio = AudioFile(str(path))
    except AudioOpenError as error:
        raise SearchInputError(f"query {path} cannot be read: {error}") from None
    with audio:
        batches = list(read_windows(audio, rule, np.array([0]), np.array([start]), losses, block_s=rule.window_s,
                                    lowpass_filter_width=spectrogram.resample_lowpass_filter_width,
                                    rolloff=spectrogram.resample_rolloff))
    if not batches:
        reason = "; ".join(f"{loss.reason}: {loss.detail}" for loss in losses) or "no audio there"
        raise SearchInputError(f"query {path} at {offset_s:g} s gave no tile ({reason})")
    batch = batches[0]
    valid = round(float(batch.valid_s[0]) * rule.sample_rate_hz)
    sf.write(out_path, batch.waveforms[0, :valid].cpu().numpy(), rule.sample_rate_hz, subtype="FLOAT")
    return Path(out_path)


@contextmanager
def query_span(spectrogram: SpectrogramConfig, query: str | os.PathLike, offset_s: float = 0.0):
    """(path, offset_s) of the query's span on a tile grid: the checked query itself when
    `offset_s` is a multiple of `tile_hop_s`, else the span cut out into a scratch file (`cut_span`)
    that lives as long as the context."""
    path = check_query(query, offset_s, spectrogram)
    hop_s = spectrogram.tile_hop_s
    if abs(round(offset_s / hop_s) * hop_s - offset_s) <= 1e-6:
        yield path, offset_s
        return
    with tempfile.TemporaryDirectory(prefix="search-span-") as scratch:
        yield cut_span(path, offset_s, spectrogram, Path(scratch) / "span.wav"), 0.0


def query_tile_db(space: SearchSpace, query: str | os.PathLike, offset_s: float = 0.0) -> np.ndarray:
    """The query span's (n_mels, n_frames) float16 dB tile, cut as the space's tiles were cut."""
    with query_span(space.spectrogram, query, offset_s) as (path, on_grid_s):
        _, tiles_db, problems = audio_tiles_db(path, space.spectrogram, [on_grid_s])
    if len(tiles_db) != 1:
        raise SearchInputError(f"query {query} at {offset_s:g} s gave no tile: {'; '.join(problems)}")
    return tiles_db[0]


def embed_query(space: SearchSpace, query: str | os.PathLike, offset_s: float = 0.0,
                device: str = "cpu") -> np.ndarray:
    """The query span's (D,) vector in `space`, made as the space's tiles were made."""
    if space.checkpoint is None:
        return logmel_stats_features(query_tile_db(space, query, offset_s)[None].astype(np.float32),
                                     progress=False)[0]
    with query_span(space.spectrogram, query, offset_s) as (path, on_grid_s):
        return _embed_checkpoint_query(space, path, on_grid_s, device)


def _embed_checkpoint_query(space: SearchSpace, path: Path, offset_s: float, device: str) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="search-query-") as scratch:
        out_path = Path(scratch) / "query.npy"
        config = EmbedConfig(pooling=space.pooling, batch_size=1, device=device, num_workers=0)
        summary = embed_audio_files([path], space.checkpoint, out_path, config, show_progress=False,
                                    spans={str(path): [offset_s]})
        if summary.n_rows != 1:
            raise SearchInputError(f"query {path} at {offset_s:g} s gave {summary.n_rows} rows, not 1")
        vector = np.load(audio_output_paths(out_path, [space.pooling])[space.pooling])[0]
    if vector.shape[0] != space.embeddings.shape[1]:
        raise SearchInputError(f"the query's embedding has {vector.shape[0]} dimensions, {space.name} "
                               f"{space.embeddings.shape[1]}")
    return vector


# ----------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class SearchConfig:
    """How a query is searched. Serialisable."""

    k: int = 50                       # tiles returned
    chunk_rows: int = DEFAULT_CHUNK_ROWS   # rows scored at once: memory ~ chunk_rows x D x 4 B x 2
    standardize: bool = True          # z-score every dimension first (as notebook 04's kNN does)
    device: str = "cpu"               # where the query is embedded ("auto": CUDA when available)
    index: str = "exact"              # "exact": brute force; "ivf": faiss IVF index (approximate,
                                      # built once per space and kept; optional extra `search`)
    nprobe: int = 16                  # "ivf": index lists searched (of sqrt(N)); more: slower, exacter
    band_hz: tuple[float, float] | None = None   # compare only this band (a Raven box's Low/High Freq):
                                      # the dimensions of a space that describe it (`band_columns`)
    call_s: tuple[float, float] | None = None    # the call's span in the query tile (a Raven box's
                                      # Begin/End Time, s from the query's offset): re-rank by the
                                      # best window of that length in each tile (`rerank_by_call`)
    shortlist: int = DEFAULT_SHORTLIST   # with call_s: tiles of the pooled search re-ranked

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk_rows < 1 or self.nprobe < 1 or self.shortlist < 1:
            raise SearchInputError(f"k, chunk_rows, nprobe and shortlist must be >= 1, got {self.k}, "
                                   f"{self.chunk_rows}, {self.nprobe}, {self.shortlist}")
        if self.call_s is not None:
            start_s, end_s = (float(t) for t in self.call_s)
            if not (math.isfinite(start_s) and math.isfinite(end_s) and 0.0 <= start_s < end_s):
                raise SearchInputError(f"the call must be START END in s with 0 <= START < END, got {self.call_s}")
            object.__setattr__(self, "call_s", (start_s, end_s))
        if self.index not in INDEX_KINDS:
            raise SearchInputError(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.band_hz is not None:
            low_hz, high_hz = (float(f) for f in self.band_hz)
            if not (math.isfinite(low_hz) and math.isfinite(high_hz) and 0.0 <= low_hz < high_hz):
                raise SearchInputError(f"the band must be LOW HIGH in Hz with 0 <= LOW < HIGH, got {self.band_hz}")
            object.__setattr__(self, "band_hz", (low_hz, high_hz))
            if self.index != "exact":
                raise SearchInputError("a band search is exact: the ivf index holds whole vectors, not bands")


@dataclass
class SearchResult:
    """The hits of one query and what they were searched with."""

    table: pd.DataFrame               # RESULT_COLUMNS, best first
    space: str
    query: str
    offset_s: float
    config: SearchConfig
    checkpoint: str | None
    n_tiles: int

    def record(self) -> dict[str, Any]:
        return {"space": self.space, "query": self.query, "offset_s": self.offset_s,
                "k": self.config.k, "index": self.config.index,
                "nprobe": self.config.nprobe if self.config.index == "ivf" else None, "chunk_rows": self.config.chunk_rows,
                "band_hz": list(self.config.band_hz) if self.config.band_hz else None,
                "call_s": list(self.config.call_s) if self.config.call_s else None,
                "shortlist": self.config.shortlist if self.config.call_s else None,
                "standardize": self.config.standardize, "checkpoint": self.checkpoint,
                "n_tiles": self.n_tiles, "n_hits": len(self.table)}


@dataclass
class SpaceStatistics:
    """What every query of a space reuses: the scaler (None without standardisation) and the
    standardised rows' lengths (`standardised_row_norms`)."""

    mean: np.ndarray | None
    scale: np.ndarray | None
    norms: np.ndarray


def _cache_path(space: SearchSpace, config: SearchConfig, suffix: str) -> Path:
    return space.run_dir / SEARCH_DIR / SPACES_CACHE_DIR / f"{space.name}{'' if config.standardize else '-raw'}{suffix}"


def _stamp(space: SearchSpace, config: SearchConfig) -> str:
    """What a kept statistic of a space was made from: its rows file as it was, and the scaling."""
    stat = space.source.stat()
    return json.dumps({"source": str(space.source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "standardize": config.standardize}, sort_keys=True)


def space_statistics(space: SearchSpace, config: SearchConfig) -> SpaceStatistics:
    """The space's statistics, from `search/spaces/<space>[-raw].stats.npz` when that was made
    from the same rows file (path, size, modification time), else computed (two passes over the
    rows) and kept there, so a second query costs one pass."""
    cache = _cache_path(space, config, ".stats.npz")
    stamp = np.array(_stamp(space, config))
    if cache.is_file():
        try:
            with np.load(cache) as kept:
                if str(kept["stamp"]) == str(stamp) and len(kept["norms"]) == space.embeddings.shape[0]:
                    return SpaceStatistics(kept["mean"] if config.standardize else None,
                                           kept["scale"] if config.standardize else None, kept["norms"])
        except (OSError, ValueError, KeyError) as error:
            logger.warning("recomputing %s: %s", cache, error)
    mean, scale = (embedding_scaler(space.embeddings, config.chunk_rows) if config.standardize
                   else (None, None))
    norms = standardised_row_norms(space.embeddings, mean, scale, config.chunk_rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    empty = np.zeros(0, np.float32)
    with atomic_write(cache) as temporary, open(temporary, "wb") as handle:   # a file: savez adds no suffix
        np.savez(handle, stamp=stamp, norms=norms, mean=empty if mean is None else mean,
                 scale=empty if scale is None else scale)
    return SpaceStatistics(mean, scale, norms)


def hits_table(index: pd.DataFrame, rows: np.ndarray, similarity: np.ndarray,
               match_s: np.ndarray | None = None) -> pd.DataFrame:
    """The tiles at `rows` of a store's index as RESULT_COLUMNS; with `match_s` (where in each
    tile the call's best window starts), a last column match_offset_s: that start in the file."""
    tiles = index.iloc[rows]
    time = tiles["timestamp"] if "timestamp" in tiles else pd.Series(pd.NaT, index=tiles.index)
    table = pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1), "tile_id": tiles["tile_id"].to_numpy(),
        "similarity": np.round(similarity.astype(np.float64), 6), "recorder": tiles["recorder"].to_numpy(),
        "time": time.to_numpy(), "file": tiles["relpath"].to_numpy(),
        "offset_s": tiles["offset_s"].to_numpy(), "path": tiles["path"].to_numpy()}, columns=RESULT_COLUMNS)
    if match_s is not None:
        table["match_offset_s"] = np.round(table["offset_s"].to_numpy(dtype=float) + np.asarray(match_s), 4)
    return table


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchInputError("the ivf index needs faiss-cpu (pip install 'soundscape-ssl[search]'); "
                               "without it, search exactly (--index exact)") from None
    return faiss


def standardised_rows(rows: np.ndarray, statistics: SpaceStatistics) -> np.ndarray:
    """Rows standardised with a space's statistics (float32); a row that is not finite becomes
    zero (similarity 0 to everything). Divide by `statistics.norms` for unit rows."""
    rows = np.asarray(rows, dtype=np.float32)
    if statistics.mean is not None:
        rows = (rows - statistics.mean) / statistics.scale
    return np.nan_to_num(rows / np.where(np.isfinite(rows).all(axis=1, keepdims=True), 1.0, np.nan), nan=0.0)


def build_ivf_index(embeddings: np.ndarray, statistics: SpaceStatistics, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    seed: int = 0):
    """A faiss IndexIVFFlat (inner product) of the standardised unit rows: sqrt(N) lists trained
    on min(N, 40 x lists) random rows, every row added a chunk at a time. Its inner products are
    the cosine similarities `top_k_cosine` computes."""
    faiss = _faiss()
    n_rows, n_dims = embeddings.shape
    n_lists = max(1, round(math.sqrt(n_rows)))
    norms = np.where(statistics.norms > 0, statistics.norms, 1.0)[:, None]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(n_dims), n_dims, n_lists, faiss.METRIC_INNER_PRODUCT)
    training = np.sort(np.random.default_rng(seed).choice(n_rows, size=min(n_rows, 40 * n_lists), replace=False))
    index.train(standardised_rows(embeddings[training], statistics) / norms[training])
    for start in range(0, n_rows, chunk_rows):
        index.add(standardised_rows(embeddings[start:start + chunk_rows], statistics) / norms[start:start + chunk_rows])
    return index


def ivf_top_k(index, queries: np.ndarray, k: int, statistics: SpaceStatistics, nprobe: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_cosine`'s answer from an index of `build_ivf_index` (approximate: rows outside the
    `nprobe` lists searched are missed); a query with fewer than k rows in its lists gets fewer."""
    queries = standardised_rows(np.atleast_2d(queries), statistics)
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    index.nprobe = nprobe
    similarity, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    found = rows >= 0
    width = int(found.sum(axis=1).min())
    return rows[:, :width].astype(np.int64), similarity[:, :width].astype(np.float32)


def space_ivf_index(space: SearchSpace, config: SearchConfig, statistics: SpaceStatistics):
    """The space's IVF index from `search/spaces/<space>.ivf.faiss` when made from the same rows
    file, else built (`build_ivf_index`) and kept there."""
    faiss = _faiss()
    cache = _cache_path(space, config, ".ivf.faiss")
    stamp_path = cache.with_suffix(".json")
    stamp = _stamp(space, config)
    if cache.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return faiss.read_index(str(cache))
    logger.info("building the ivf index of %s (%d rows): once, then kept in %s", space.name,
                space.embeddings.shape[0], cache)
    index = build_ivf_index(space.embeddings, statistics, config.chunk_rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cache) as temporary:
        faiss.write_index(index, str(temporary))
    atomic_write_text(stamp_path, stamp)
    return index


def band_mel_bins(band_hz: tuple[float, float], spectrogram: SpectrogramConfig) -> np.ndarray:
    """The mel bins a band covers: from the bin at or below its low edge to the bin at or above
    its high edge (so a band narrower than a bin still gets the bins around it)."""
    low_hz, high_hz = band_hz
    if high_hz <= spectrogram.f_min_hz or low_hz >= spectrogram.f_max_hz:
        raise SearchInputError(f"the band {low_hz:g}-{high_hz:g} Hz lies outside the tiles' "
                               f"{spectrogram.f_min_hz:g}-{spectrogram.f_max_hz:g} Hz")
    low_bin, high_bin = hz_to_mel_bin([max(low_hz, spectrogram.f_min_hz), min(high_hz, spectrogram.f_max_hz)],
                                      spectrogram)
    first = max(0, int(math.floor(low_bin)))
    return np.arange(first, max(first, min(spectrogram.n_mels - 1, int(math.ceil(high_bin)))) + 1)


def band_columns(space: SearchSpace, band_hz: tuple[float, float]) -> np.ndarray:
    """The dimensions of `space` that describe the band: in "logmel_stats" the mean and the std
    of each mel bin it covers; in a band pooling ("band", "band_active") the frequency rows of the
    patch grid that overlap those bins (each row a block of embed_dim dimensions, low to high).
    Other poolings mix every frequency into every dimension: SearchInputError."""
    n_mels = space.spectrogram.n_mels
    if space.name == LOGMEL_SPACE:
        bins = band_mel_bins(band_hz, space.spectrogram)
        return np.concatenate([bins, n_mels + bins])
    row_dims = space.embeddings.shape[1] // space.frequency_rows if space.frequency_rows else 0
    return np.concatenate([np.arange(row * row_dims, (row + 1) * row_dims) for row in band_rows(space, band_hz)])


def band_rows(space: SearchSpace, band_hz: tuple[float, float]) -> np.ndarray:
    """The frequency rows of a "band" pooling's patch grid that overlap the band's mel bins, low
    to high; SearchInputError for a space that pools every frequency together."""
    n_mels, rows = space.spectrogram.n_mels, space.frequency_rows
    bins = band_mel_bins(band_hz, space.spectrogram)
    if space.pooling not in BAND_POOLINGS or not rows or space.embeddings.shape[1] % rows or n_mels % rows:
        raise SearchInputError(f"a band search needs a space that keeps frequency apart ({LOGMEL_SPACE} or a "
                               f"*_band space); {space.name} pools every frequency together")
    return np.unique(bins // (n_mels // rows))


class _Columns:
    """A read-only view of some columns of an (N, D) array or memory map that reads rows a slice
    at a time (what `top_k_cosine` and `standardised_row_norms` ask of it)."""

    def __init__(self, array: np.ndarray, columns: np.ndarray):
        self.array, self.columns = array, columns
        self.shape = (array.shape[0], len(columns))

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.array[rows])[:, self.columns]


def nearest(space: SearchSpace, vectors: np.ndarray, k: int, config: SearchConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, similarities) of the k tiles nearest each vector, exactly or with the ivf index;
    with `config.band_hz`, exactly over the band's columns (their row lengths: one more pass)."""
    statistics = space_statistics(space, config)
    if config.band_hz is not None:
        columns = band_columns(space, config.band_hz)
        mean, scale = ((None, None) if statistics.mean is None
                       else (statistics.mean[columns], statistics.scale[columns]))
        return top_k_cosine(_Columns(space.embeddings, columns), np.atleast_2d(vectors)[:, columns], k,
                            config.chunk_rows, mean, scale)
    if config.index == "ivf":
        return ivf_top_k(space_ivf_index(space, config, statistics), vectors, k, statistics, config.nprobe)
    return top_k_cosine(space.embeddings, vectors, k, config.chunk_rows, statistics.mean, statistics.scale,
                        statistics.norms)


# ----------------------------------------------------------------------------------------------
# The call's time span: re-ranking by the best window


def call_frames(call_s: tuple[float, float], spectrogram: SpectrogramConfig) -> tuple[int, int]:
    """The frames [first, stop) of a tile that a call at `call_s` (s from the tile's start)
    covers, at least one; SearchInputError when the call does not start inside the tile."""
    start_s, end_s = call_s
    if start_s >= spectrogram.tile_s:
        raise SearchInputError(f"the call starts at {start_s:g} s, after the end of the {spectrogram.tile_s:g} s "
                               "query tile: give its time from the query's offset")
    frame_s = spectrogram.hop_length / spectrogram.sample_rate_hz
    first = min(spectrogram.n_frames - 1, int(math.floor(start_s / frame_s + 1e-9)))
    stop = max(first + 1, min(spectrogram.n_frames, int(math.ceil(end_s / frame_s - 1e-9))))
    return first, stop


def sliding_means(values: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Means over every run of `width` consecutive positions along `axis` (n - width + 1 of them),
    from float64 cumulative sums."""
    values = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    if not 1 <= width <= values.shape[-1]:
        raise ValueError(f"width must be in [1, {values.shape[-1]}], got {width}")
    sums = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, axis=-1)], axis=-1)
    return np.moveaxis((sums[..., width:] - sums[..., :-width]) / width, -1, axis)


class CallWindows:
    """The windows of a space that are as long as the call: the query's own (where the call is)
    and every one of a tile, as vectors of the space's columns for the band.

    * logmel_stats: per mel bin of the band, the mean and std of the window's dB values (the
      space's columns for those bins), windows sliding by one STFT frame;
    * a checkpoint's "band" pooling: per frequency row of the band, the mean of the final patch
      tokens over the window's columns (the band pooling of the window alone); "mean" pooling:
      the mean over every row and the window's columns. Windows slide by one patch column.
    """

    def __init__(self, space: SearchSpace, call_s: tuple[float, float], band_hz: tuple[float, float] | None,
                 device: str = "cpu"):
        spectrogram = space.spectrogram
        first, stop = call_frames(call_s, spectrogram)
        self.space = space
        self.columns = (band_columns(space, band_hz) if band_hz is not None
                        else np.arange(space.embeddings.shape[1]))
        if space.name == LOGMEL_SPACE:
            self.bins = (band_mel_bins(band_hz, spectrogram) if band_hz is not None
                         else np.arange(spectrogram.n_mels))
            self.step_frames, self.first, self.width = 1, first, stop - first
            self.embedder = None
            return
        if space.pooling not in ("band", "mean") or space.checkpoint is None:
            raise SearchInputError(f"a call's time span needs a space that keeps time apart before pooling "
                                   f"({LOGMEL_SPACE}, *_band or *_mean); {space.name} does not")
        self.embedder = checkpoint_embedder(space.checkpoint, device)
        rows, columns = self.embedder.model.patch_grid_hw
        self.rows = (band_rows(space, band_hz) if band_hz is not None and space.pooling == "band"
                     else np.arange(rows))
        self.step_frames = spectrogram.n_frames // columns
        self.first = first // self.step_frames
        self.width = max(1, -(-stop // self.step_frames) - self.first)

    @property
    def window_s(self) -> float:
        """Duration of one window step (s): an STFT hop or a patch column."""
        return self.step_frames * self.space.spectrogram.hop_length / self.space.spectrogram.sample_rate_hz

    def vectors(self, tiles_db: np.ndarray) -> np.ndarray:
        """(B, n_mels, n_frames) dB tiles -> (B, windows, len(columns)) float32."""
        if self.embedder is None:
            band = np.asarray(tiles_db, dtype=np.float32)[:, self.bins]
            mean = sliding_means(band, self.width, axis=2)
            std = np.sqrt(np.maximum(sliding_means(band.astype(np.float64) ** 2, self.width, axis=2) - mean ** 2, 0.0))
            return np.concatenate([mean, std], axis=1).transpose(0, 2, 1).astype(np.float32)
        tiles = torch.as_tensor(np.asarray(tiles_db), device=self.embedder.device)
        grid = self.embedder.token_grid(tiles).cpu().numpy()[:, self.rows]     # (B, rows, columns, D)
        windows = sliding_means(grid, self.width, axis=2)                       # (B, rows, windows, D)
        if self.space.pooling == "mean":
            return windows.mean(axis=1).astype(np.float32)
        return windows.transpose(0, 2, 1, 3).reshape(len(grid), windows.shape[2], -1).astype(np.float32)

    def query_vector(self, query_tile_db: np.ndarray) -> np.ndarray:
        """The window of the query tile where the call is: (len(columns),)."""
        return self.vectors(query_tile_db[None])[0, self.first]


def best_windows(windows: np.ndarray, query: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, window) of each tile's window nearest the query: cosine similarity after the
    same standardisation as the pooled search, the best of (B, W, D) windows. A tile whose
    windows are all non-finite gets -inf."""
    if mean is not None:
        windows, query = (windows - mean) / scale, (query - mean) / scale
    norms = np.linalg.norm(windows, axis=-1) * max(float(np.linalg.norm(query)), 1e-12)
    similarity = np.einsum("bwd,d->bw", windows, query) / np.maximum(norms, 1e-12)
    similarity = np.where(np.isfinite(similarity), similarity, -np.inf)
    best = np.argmax(similarity, axis=1)
    return similarity[np.arange(len(similarity)), best], best


def rerank_by_call(space: SearchSpace, query_tile_db: np.ndarray, rows: np.ndarray, k: int,
                   config: SearchConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, similarities, match_s) of the k of `rows` (a pooled search's shortlist) whose best
    window of the call's length is nearest the call's own window (`CallWindows`); match_s is
    where in its tile that window starts. Tiles are read from the run's store in batches."""
    windows = CallWindows(space, config.call_s, config.band_hz, config.device)
    statistics = space_statistics(space, config)
    mean, scale = ((None, None) if statistics.mean is None
                   else (statistics.mean[windows.columns], statistics.scale[windows.columns]))
    query = windows.query_vector(query_tile_db)
    store = TileStore(space.run_dir / TILES_DIR)
    rows = np.asarray(rows, dtype=np.int64)
    similarity, best = np.empty(len(rows)), np.empty(len(rows), np.int64)
    for start in range(0, len(rows), RERANK_BATCH_TILES):
        batch = slice(start, start + RERANK_BATCH_TILES)
        similarity[batch], best[batch] = best_windows(windows.vectors(store.read_rows(rows[batch])), query,
                                                      mean, scale)
    order = np.argsort(-similarity, kind="stable")[:k]
    return rows[order], similarity[order], best[order] * windows.window_s


def ranked_tiles(space: SearchSpace, query: str | os.PathLike, offset_s: float, k: int, config: SearchConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows, similarities, match_s or None) of the k tiles nearest the query: `nearest` on the
    pooled vectors, or with `config.call_s` its `config.shortlist` best re-ranked by the call's
    window (`rerank_by_call`)."""
    vector = embed_query(space, query, offset_s, config.device)
    if config.call_s is None:
        rows, similarity = nearest(space, vector[None], k, config)
        return rows[0], similarity[0], None
    shortlist, _ = nearest(space, vector[None], max(k, config.shortlist), config)
    return rerank_by_call(space, query_tile_db(space, query, offset_s), shortlist[0], k, config)


def search_run(run_dir: str | os.PathLike, query: str | os.PathLike, space: str, offset_s: float = 0.0,
               config: SearchConfig | None = None) -> SearchResult:
    """The `config.k` tiles of the run nearest the query's span at `offset_s` in `space`."""
    config = config or SearchConfig()
    opened = open_space(run_dir, space, config.chunk_rows)
    rows, similarity, match_s = ranked_tiles(opened, query, offset_s, config.k, config)
    index = TileStore(Path(run_dir) / TILES_DIR).index.reset_index(drop=True)
    return SearchResult(hits_table(index, rows, similarity, match_s), space, str(Path(query).resolve()),
                        float(offset_s), config, str(opened.checkpoint) if opened.checkpoint else None,
                        int(opened.embeddings.shape[0]))


def default_out_dir(run_dir: str | os.PathLike, query: str | os.PathLike, space: str,
                    band_hz: tuple[float, float] | None = None, call_s: tuple[float, float] | None = None) -> Path:
    """runs/<id>/search/<query stem>-<space>[-<low>-<high>Hz][-call-<start>-<end>s]: one folder
    per query, space, band and call span, so a boxed search never replaces the whole-tile
    search of the same clip."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(query).stem) or "query"
    band = f"-{band_hz[0]:g}-{band_hz[1]:g}Hz" if band_hz else ""
    call = f"-call-{call_s[0]:g}-{call_s[1]:g}s" if call_s else ""
    return Path(run_dir) / SEARCH_DIR / f"{stem}-{space}{band}{call}"


def write_result(result: SearchResult, csv_path: str | os.PathLike) -> Path:
    """The hits as CSV at `csv_path`, and `<csv stem>.json` beside it (what was searched, how)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, result.table.to_csv(index=False))
    atomic_write_text(csv_path.with_suffix(".json"), json.dumps(result.record(), indent=2) + "\n")
    return csv_path


# ----------------------------------------------------------------------------------------------
# Precision on a synthetic archive


def overlapping_tiles(index: pd.DataFrame, relpath: str, start_s: float, stop_s: float,
                      tile_s: float) -> np.ndarray:
    """Row positions of the tiles of `relpath` whose span overlaps [start_s, stop_s)."""
    same = index["relpath"].to_numpy() == relpath
    offsets = index["offset_s"].to_numpy(dtype=float)
    return np.flatnonzero(same & (offsets < stop_s) & (offsets + tile_s > start_s))


def precision_at_k(hit_rows: Sequence[int], labels: Sequence[str], label: str,
                   excluded: Sequence[int] = (), k: int = 50) -> float:
    """Share of the first k hits, after dropping `excluded` rows (the query's own tiles), whose
    label is `label`; NaN when no hit is left."""
    excluded_set = {int(row) for row in excluded}
    kept = [int(row) for row in hit_rows if int(row) not in excluded_set][:k]
    if not kept:
        return math.nan
    labels = np.asarray(labels)
    return float(np.mean(labels[kept] == label))


def planted_query_calls(annotations: pd.DataFrame, tile_s: float, per_label: int = 3,
                        kinds: Sequence[str] = ("bird",)) -> pd.DataFrame:
    """Calls to search with, from a synthetic archive's annotations: for every label of `kinds`,
    its loudest call (highest snr_db) in each of `per_label` recorders (the loudest first), among
    calls short enough to sit inside one tile. Columns of `annotations`, sorted by label."""
    calls = annotations[annotations["kind"].isin(kinds)
                        & ((annotations["end_s"] - annotations["start_s"]) <= tile_s)]
    calls = calls.sort_values(["label", "snr_db", "file", "start_s"], ascending=[True, False, True, True],
                              kind="mergesort")
    per_recorder = calls.drop_duplicates(["label", "recorder"], keep="first")
    return per_recorder.groupby("label", sort=True).head(per_label).reset_index(drop=True)


def query_precision(run_dir: str | os.PathLike, space: str, queries: pd.DataFrame, labels: Sequence[str],
                    k: int = 50, config: SearchConfig | None = None,
                    present_labels: Sequence[str] | None = None, in_band: bool = False,
                    in_time: bool = False) -> pd.DataFrame:
    """Precision@k of each query for its label in `space`.

    `queries` has columns label, clip (an audio file; its first tile is the query), relpath,
    start_s and stop_s (where in the archive the clip was cut: the run's tiles of that file that
    overlap it are the query's own and are excluded from its hits). `labels` gives each tile of the
    run its label (row i = tile_id i). Returns the queries with precision_at_k, n_label_tiles (the
    tiles of the label left after the exclusion) and max_precision (min(1, n_label_tiles / k)).
    With `present_labels` (each tile's labels, ';'-joined: `groundtruth.tile_ground_truth`'s
    "labels"), also precision_present_at_k: hits whose tile holds the label at all, dominant or not.
    With `in_band`, each query is searched in its own band (`SearchConfig.band_hz`), from the
    queries' f_low_hz and f_high_hz columns: the box an expert draws around the call. With
    `in_time`, also by the call's time span in the query clip (`SearchConfig.call_s`), from its
    call_start_s and call_end_s columns.
    """
    config = config or SearchConfig(k=k)
    run_dir = Path(run_dir)
    opened = open_space(run_dir, space, config.chunk_rows)
    index = TileStore(run_dir / TILES_DIR).index.reset_index(drop=True)
    labels = np.asarray(labels)
    if len(labels) != len(index):
        raise ValueError(f"{len(labels)} labels for {len(index)} tiles")
    rows_out = []
    for query in queries.itertuples(index=False):
        excluded = overlapping_tiles(index, query.relpath, query.start_s, query.stop_s, opened.spectrogram.tile_s)
        searched = replace(config, band_hz=(query.f_low_hz, query.f_high_hz) if in_band else config.band_hz,
                           call_s=(query.call_start_s, query.call_end_s) if in_time else config.call_s)
        hits, _, _ = ranked_tiles(opened, query.clip, 0.0, k + len(excluded), searched)
        present = (None if present_labels is None else
                   np.array([query.label in str(names).split(";") for names in present_labels]))
        n_label = int((labels == query.label).sum() - (labels[excluded] == query.label).sum())
        rows_out.append({**query._asdict(), "space": space,
                         "precision_at_k": precision_at_k(hits, labels, query.label, excluded, k),
                         **({"precision_present_at_k": precision_at_k(hits, present, True, excluded, k)}
                            if present is not None else {}),
                         "n_label_tiles": n_label, "max_precision": min(1.0, n_label / k),
                         "excluded_tiles": ";".join(str(int(t)) for t in excluded)})
    return pd.DataFrame(rows_out)
