"""Labelling clusters: an expert names clusters once, every tile of the archive gets the name.

The loop a field ornithologist runs on an archive of a million tiles:

1. Notebook 04 writes `clusters/<space>/cluster_names.csv` (`cluster_names_table`): one row per
   cluster with its size, its level-based verdict, the majority BirdNET species (when notebook 06
   has run) and the majority planted label (synthetic archive), and an empty `name` column.
2. The expert listens to the clusters (report pages, galleries) and fills in `name`, or `ignore`
   for clusters that hold nothing worth a label (rain, silence). A blank name leaves the cluster
   unnamed; rows may be deleted.
3. `soundscape-ssl label --run RUN_DIR --names cluster_names.csv` (`label_run`) writes
   `labels/tiles.parquet` (every tile, its cluster, the cluster's name, a confidence) and one Raven
   Pro selection table per recording under `labels/raven/`, adjacent tiles of one name merged.

Which run a names file belongs to. Every row carries the clustering's `space` and `fingerprint`
(`clustering_fingerprint`: a hash of the centroids), CSV-friendly columns that survive a
spreadsheet. A names file from another run or space, or from an older clustering of the same
space, has another fingerprint and is refused: its cluster numbers mean other clusters.

Confidence. A tile's confidence in its name is its margin against the nearest *differently named*
cluster: ``1 - d_own / d_other``, where d_own is the tile's distance to its own centroid and d_other
the distance to the nearest centroid of a cluster with another name (each unnamed or ignored
cluster counts as a name of its own), both in the clustering's standardised space. 1 is a tile on
its centroid, 0 a tile on the boundary with another name, where a small change of the embedding
would change its label. Two neighbouring clusters with one name do not lower each other's tiles'
confidence: the label is the same either side. When every cluster bears the same name there is no
other name and the confidence is 1. Distances to every centroid need the embedding: it is read in
chunks of rows from its memory map (peak memory ~ chunk_rows x (dims + k) floats, whatever N is).

Raven selection tables (Raven Pro's documented text format): tab-separated, a header row, one
selection per row, times in seconds from the start of the recording. We write the seven standard
columns (Selection, View "Spectrogram 1", Channel 1, Begin/End Time, Low/High Freq: the tile
store's band f_min_hz..f_max_hz) plus `Label` and `Confidence` (the mean confidence of its tiles).
`read_raven_table` reads Raven's own files too: extra columns are kept as text, a missing standard
column is refused with one line naming it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..core.provenance import write_config_json
from ..core.stage import atomic_write, atomic_write_text, file_sha256
from ..pretrain.pooling import split_space_name
from .cluster import ClusterResult

logger = logging.getLogger(__name__)

STAGE = "labels"
NAMES_FILE = "cluster_names.csv"
LABELS_DIR = "labels"
TILES_FILE = "tiles.parquet"
RAVEN_DIR = "raven"
IGNORE = "ignore"
NAME_COLUMN = "name"
NAMES_COLUMNS = ("space", "fingerprint", "cluster", "size", "verdict", "birdnet_species",
                 "birdnet_share", "planted_label", "planted_share", NAME_COLUMN)
REQUIRED_NAMES_COLUMNS = ("fingerprint", "cluster", NAME_COLUMN)

RAVEN_VIEW = "Spectrogram 1"
RAVEN_CHANNEL = 1
RAVEN_COLUMNS = ("Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)")
RAVEN_LABEL_COLUMN = "Label"
RAVEN_CONFIDENCE_COLUMN = "Confidence"
RAVEN_SUFFIX = ".Table.1.selections.txt"
_RAVEN_INT_COLUMNS = ("Selection", "Channel")
_RAVEN_FLOAT_COLUMNS = ("Begin Time (s)", "End Time (s)", "Low Freq (Hz)", "High Freq (Hz)")
# Tiles closer than this (seconds) count as touching: offsets are sums of float hops.
_ADJACENT_TOLERANCE_S = 1e-6


class NamesFileError(ValueError):
    """A cluster names file that cannot be applied to this clustering (one line, names the row)."""


class RavenTableError(ValueError):
    """A file that is not a readable Raven selection table (one line, names the line)."""


# ----------------------------------------------------------------------------------------------
# cluster_names.csv


def clustering_fingerprint(centroids: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the centroids (shape and float32 values): the identity of a
    clustering. Refitting (other k, seed, embedding) changes it; re-saving the same one does not."""
    centroids = np.ascontiguousarray(np.asarray(centroids, dtype="<f4"))
    digest = hashlib.sha256(repr(centroids.shape).encode() + centroids.tobytes())
    return digest.hexdigest()[:16]


def majority_per_cluster(cluster_labels: np.ndarray, values: Sequence | np.ndarray, n_clusters: int,
                         exclude: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """For each cluster 0..n_clusters-1: its commonest value and that value's share of the cluster.

    Missing values (None, NaN, "") and `exclude` never win; the share counts all the cluster's
    tiles, so a cluster where 3 of 100 tiles carry a BirdNET detection says 0.03. Ties go to the
    alphabetically first value. A cluster with no countable value gets "" and share 0.
    """
    cluster_labels = np.asarray(cluster_labels)
    values = pd.Series(values, dtype=object)
    if len(values) != len(cluster_labels):
        raise ValueError(f"{len(values)} values for {len(cluster_labels)} cluster labels")
    sizes = np.bincount(cluster_labels, minlength=n_clusters)
    majority = np.full(n_clusters, "", dtype=object)
    share = np.zeros(n_clusters)
    countable = values.notna() & (values.astype(str) != "") & ~values.isin(list(exclude))
    if countable.any():
        frame = pd.DataFrame({"cluster": cluster_labels[countable.to_numpy()],
                              "value": values[countable].astype(str).to_numpy()})
        counts = frame.value_counts().reset_index(name="n")
        counts = counts.sort_values(["cluster", "n", "value"], ascending=[True, False, True], kind="mergesort")
        best = counts.drop_duplicates("cluster")
        clusters = best["cluster"].to_numpy(dtype=int)
        majority[clusters] = best["value"].to_numpy()
        share[clusters] = best["n"].to_numpy() / sizes[clusters]
    return majority, share


def cluster_names_table(clusters_table: pd.DataFrame, space: str, centroids: np.ndarray,
                        cluster_labels: np.ndarray, birdnet_species: Sequence | None = None,
                        planted_labels: Sequence | None = None) -> pd.DataFrame:
    """The table an expert fills in: one row per cluster, `name` empty.

    clusters_table: `cluster_report.describe_clusters` output (cluster, n_tiles, verdict).
    cluster_labels: every tile's cluster. birdnet_species: every tile's confident BirdNET species
    (None/"" where none; see `birdnet_species_per_tile`), or None when BirdNET has not run: the
    column is then empty. planted_labels: every tile's dominant planted label (synthetic archive),
    or None. Sorted by size, largest first: the clusters worth naming first.
    """
    missing = [c for c in ("cluster", "n_tiles", "verdict") if c not in clusters_table.columns]
    if missing:
        raise ValueError(f"clusters table lacks columns {missing}")
    n_clusters = int(np.asarray(centroids).shape[0])
    table = pd.DataFrame({"space": space, "fingerprint": clustering_fingerprint(centroids),
                          "cluster": np.arange(n_clusters)})
    described = clusters_table.set_index("cluster")
    table["size"] = described["n_tiles"].reindex(table["cluster"]).fillna(0).astype(int).to_numpy()
    table["verdict"] = described["verdict"].reindex(table["cluster"]).fillna("").to_numpy()
    for majority_column, share_column, values in (("birdnet_species", "birdnet_share", birdnet_species),
                                                  ("planted_label", "planted_share", planted_labels)):
        if values is None:
            table[majority_column], table[share_column] = "", np.nan
            continue
        majority, share = majority_per_cluster(cluster_labels, values, n_clusters)
        table[majority_column], table[share_column] = majority, np.round(share, 3)
    table[NAME_COLUMN] = ""
    table = table.sort_values(["size", "cluster"], ascending=[False, True], kind="mergesort")
    return table[list(NAMES_COLUMNS)].reset_index(drop=True)


def write_cluster_names(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the names table (atomically) without losing an expert's work.

    Names already in `path` for the same clustering (same fingerprint) are carried over into the
    new table (rerunning notebook 04 after 06 fills in BirdNET and keeps the names). A named file
    of another clustering is moved aside to `cluster_names.<its fingerprint>.csv`, with a warning.
    """
    path = Path(path)
    table = table.copy()
    if path.exists():
        try:
            existing = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            existing = pd.DataFrame()
        if {"fingerprint", "cluster", NAME_COLUMN} <= set(existing.columns):
            named = existing[existing[NAME_COLUMN].str.strip() != ""]
            fingerprint = str(table["fingerprint"].iloc[0]) if len(table) else ""
            same = named["fingerprint"].str.strip() == fingerprint
            if same.all() and len(named):
                carried = dict(zip(named["cluster"].str.strip().astype(int), named[NAME_COLUMN].str.strip()))
                table[NAME_COLUMN] = table["cluster"].map(carried).fillna(table[NAME_COLUMN])
                logger.info("%s: %d names carried over", path, len(carried))
            elif len(named):
                aside = path.with_name(f"{path.stem}.{named['fingerprint'].iloc[0].strip() or 'unknown'}{path.suffix}")
                path.rename(aside)
                logger.warning("%s named another clustering: moved to %s", path, aside)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, table.to_csv(index=False))


def birdnet_species_per_tile(birdnet_dir: str | os.PathLike, tile_ids: np.ndarray,
                             confidence_threshold: float | None = None) -> tuple[np.ndarray | None, str]:
    """Every tile's confident BirdNET species (None where none), or (None, why) without a finished
    BirdNET run covering these tiles. Confident: top confidence at or above the threshold of
    notebook 06 (`compare.CompareConfig.confidence_threshold` by default)."""
    from .birdnet import CONFIG_FILE, DETECTIONS_FILE
    from .compare import CompareConfig

    threshold = CompareConfig().confidence_threshold if confidence_threshold is None else confidence_threshold
    birdnet_dir = Path(birdnet_dir)
    if not (birdnet_dir / CONFIG_FILE).exists():
        return None, f"no finished BirdNET run in {birdnet_dir} (notebook 06 runs after 04; rerun 04 to fill it)"
    detections = pq.read_table(birdnet_dir / DETECTIONS_FILE,
                               columns=["tile_id", "top_species", "top_confidence", "skip_reason"]).to_pandas()
    if not np.array_equal(detections["tile_id"].to_numpy(), np.asarray(tile_ids)):
        return None, f"{birdnet_dir} does not cover this tile store tile for tile"
    confident = (detections["top_confidence"].fillna(-1.0).to_numpy() >= threshold) & detections["skip_reason"].isna().to_numpy()
    species = np.where(confident, detections["top_species"].to_numpy(dtype=object), None)
    return species, f"BirdNET species with top confidence >= {threshold}"


def read_cluster_names(path: str | os.PathLike, fingerprint: str, n_clusters: int,
                       space: str | None = None) -> dict[int, str]:
    """{cluster: name} from a names file, checked against the clustering it claims to name.

    Blank names are left out (the cluster stays unnamed); `ignore` (any case) is kept as "ignore".
    Raises NamesFileError, one line naming the row ("row 3" is the third row under the header),
    for an empty file, missing columns, another clustering's fingerprint or space, a cluster that
    is not an integer in 0..n_clusters-1, a cluster given twice, or a name with a tab or newline
    (it would break a Raven table).
    """
    path = Path(path)
    if not path.is_file():
        raise NamesFileError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)  # pandas drops a BOM
    except pd.errors.EmptyDataError:
        raise NamesFileError(f"{path} is empty: expected the cluster_names.csv notebook 04 wrote") from None
    except pd.errors.ParserError as error:
        raise NamesFileError(f"{path} is not a readable CSV: {str(error).strip()}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_NAMES_COLUMNS if c not in table.columns]
    if missing:
        raise NamesFileError(f"{path} lacks column(s) {missing} (it has {list(table.columns)})")
    if table.empty:
        raise NamesFileError(f"{path} has a header but no rows")
    names: dict[int, str] = {}
    row_of: dict[int, int] = {}
    for row, record in enumerate(table.to_dict("records"), start=1):
        where = f"{path} row {row}"
        if record["fingerprint"].strip() != fingerprint:
            raise NamesFileError(f"{where}: fingerprint {record['fingerprint'].strip()!r} is not this clustering's "
                                 f"{fingerprint!r}: the file names another run's or space's clusters")
        if space is not None and "space" in record and record["space"].strip() not in ("", space):
            raise NamesFileError(f"{where}: space {record['space'].strip()!r} is not {space!r}")
        text = record["cluster"].strip()
        try:
            cluster = int(text)
        except ValueError:
            raise NamesFileError(f"{where}: cluster {text!r} is not an integer") from None
        if not 0 <= cluster < n_clusters:
            raise NamesFileError(f"{where}: unknown cluster {cluster} (this clustering has 0..{n_clusters - 1})")
        if cluster in row_of:
            raise NamesFileError(f"{where}: cluster {cluster} is named again (first in row {row_of[cluster]})")
        row_of[cluster] = row
        name = record[NAME_COLUMN].strip()
        if any(character in name for character in "\t\r\n"):
            raise NamesFileError(f"{where}: the name of cluster {cluster} holds a tab or line break")
        if name.lower() == IGNORE:
            name = IGNORE
        if name:
            names[cluster] = name
    return names


# ----------------------------------------------------------------------------------------------
# Propagation and confidence


def _name_groups(names: Mapping[int, str], n_clusters: int) -> np.ndarray:
    """An integer per cluster, equal for clusters of one name; unnamed and ignored clusters each
    get their own (they do not share a label with anything)."""
    codes: dict[str, int] = {}
    groups = np.empty(n_clusters, dtype=np.int64)
    for cluster in range(n_clusters):
        name = names.get(cluster)
        if name is None or name == IGNORE:
            groups[cluster] = n_clusters + cluster  # above any shared code: never equal to another
        else:
            groups[cluster] = codes.setdefault(name, len(codes))
    return groups


def name_margins(embeddings: np.ndarray, result: ClusterResult, names: Mapping[int, str],
                 chunk_rows: int = 32_768, progress: bool = True,
                 check_rtol: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance to own centroid, distance to the nearest differently named centroid, confidence)
    for every row, in the clustering's standardised space; read one chunk of rows at a time.

    The own cluster is the saved one (`result.labels`). The embedding must be the one clustered:
    a row whose recomputed distance to its centroid differs from the saved distance (relative
    `check_rtol`) means another embedding, and is refused with the count of such rows.
    """
    n_rows = int(embeddings.shape[0])
    if n_rows != len(result):
        raise ValueError(f"the embedding has {n_rows} rows, the clustering {len(result)}")
    if embeddings.shape[1] != result.centroids.shape[1]:
        raise ValueError(f"the embedding has {embeddings.shape[1]} dimensions, the centroids {result.centroids.shape[1]}")
    centroids = result.centroids.astype(np.float64)
    centroid_sq = np.einsum("kd,kd->k", centroids, centroids)
    groups = _name_groups(names, result.n_clusters)
    own = np.empty(n_rows, dtype=np.float64)
    other = np.empty(n_rows, dtype=np.float64)
    starts = range(0, n_rows, chunk_rows)
    for start in tqdm(starts, desc="distances to centroids", unit="chunk", disable=not progress or n_rows <= chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        rows = ((np.asarray(embeddings[start:stop], dtype=np.float64) - result.scaler_mean) / result.scaler_scale)
        labels = result.labels[start:stop]
        squared = np.einsum("nd,nd->n", rows, rows)[:, None] - 2.0 * rows @ centroids.T + centroid_sq
        own[start:stop] = np.linalg.norm(rows - centroids[labels], axis=1)
        squared[groups[labels][:, None] == groups[None, :]] = np.inf  # own name's centroids are no rival
        other[start:stop] = np.sqrt(np.clip(squared.min(axis=1), 0.0, None))
    saved = result.distances.astype(np.float64)
    mismatched = ~np.isclose(own, saved, rtol=check_rtol, atol=1e-4)
    if mismatched.any():
        raise ValueError(f"{int(mismatched.sum())} of {n_rows} rows lie elsewhere than the clustering saved "
                         f"(first: row {int(np.flatnonzero(mismatched)[0])}): this is not the embedding that was clustered")
    return own, other, margin_confidence(own, other)


def margin_confidence(own_distance: np.ndarray, other_distance: np.ndarray) -> np.ndarray:
    """``1 - own / other`` clipped to [0, 1]: 1 on the own centroid, 0 on the boundary with another
    name; 1 when there is no other name (other = inf), 0 when both distances are 0."""
    own_distance = np.asarray(own_distance, dtype=np.float64)
    other_distance = np.asarray(other_distance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(other_distance > 0, own_distance / other_distance, 1.0)
    return np.clip(1.0 - ratio, 0.0, 1.0)


def propagate_names(index: pd.DataFrame, cluster_labels: np.ndarray, names: Mapping[int, str],
                    own_distance: np.ndarray, other_distance: np.ndarray) -> pd.DataFrame:
    """One row per tile: tile_id, relpath, offset_s, valid_s, recorder, timestamp, cluster, name
    (None when unnamed, "ignore" when ignored), labelled (a real name), distance_to_centroid,
    distance_to_other_name and confidence (`margin_confidence`)."""
    cluster_labels = np.asarray(cluster_labels)
    if len(index) != len(cluster_labels):
        raise ValueError(f"{len(index)} tiles but {len(cluster_labels)} cluster labels")
    name_of = np.array([names.get(c) for c in range(int(cluster_labels.max(initial=-1)) + 1)] or [None], dtype=object)
    name = name_of[cluster_labels]
    frame = pd.DataFrame({
        "tile_id": index["tile_id"].to_numpy(np.int64) if "tile_id" in index else np.arange(len(index)),
        "relpath": index["relpath"].astype(str).to_numpy(),
        "offset_s": index["offset_s"].to_numpy(np.float64),
        "valid_s": index["valid_s"].to_numpy(np.float64) if "valid_s" in index else np.nan,
        "recorder": index["recorder"].astype(str).to_numpy() if "recorder" in index else None,
        "timestamp": index["timestamp"].to_numpy() if "timestamp" in index else pd.NaT,
        "cluster": cluster_labels.astype(np.int32),
        "name": name,
        "labelled": np.array([n is not None and n != IGNORE for n in name], dtype=bool),
        "distance_to_centroid": np.asarray(own_distance, dtype=np.float32),
        "distance_to_other_name": np.asarray(other_distance, dtype=np.float32),
        "confidence": margin_confidence(own_distance, other_distance).astype(np.float32),
    })
    return frame


# ----------------------------------------------------------------------------------------------
# Raven selection tables


def merge_selections(tiles: pd.DataFrame, tile_s: float) -> pd.DataFrame:
    """Runs of touching tiles of one recording with one name, as selections.

    `tiles`: relpath, offset_s, name, labelled, confidence and optionally valid_s (propagate_names
    output). Tiles touch when the next starts at or before the previous one's end (offset_s +
    tile_s; overlapping tiles touch too). Unlabelled and ignored tiles break runs and make no
    selection. Returns relpath, begin_s (the first tile's offset), end_s (the last tile's end; the
    real audio's end for a padded last tile), label, n_tiles, mean_confidence; in (relpath, begin_s)
    order.
    """
    columns = ["relpath", "begin_s", "end_s", "label", "n_tiles", "mean_confidence"]
    labelled = tiles[tiles["labelled"].to_numpy(dtype=bool)]
    if labelled.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(columns, (object, float, float, object, int, float))})
    labelled = labelled.sort_values(["relpath", "offset_s"], kind="mergesort")
    relpath = labelled["relpath"].to_numpy()
    offset = labelled["offset_s"].to_numpy(np.float64)
    name = labelled["name"].to_numpy()
    valid = labelled["valid_s"].to_numpy(np.float64) if "valid_s" in labelled else np.full(len(labelled), np.nan)
    end = offset + np.where(np.isfinite(valid) & (valid > 0), np.minimum(valid, tile_s), tile_s)
    nominal_end = offset + tile_s
    new_run = np.ones(len(labelled), dtype=bool)
    new_run[1:] = ((relpath[1:] != relpath[:-1]) | (name[1:] != name[:-1])
                   | (offset[1:] > nominal_end[:-1] + _ADJACENT_TOLERANCE_S))
    run = np.cumsum(new_run) - 1
    grouped = pd.DataFrame({"run": run, "relpath": relpath, "begin_s": offset, "end_s": end, "label": name,
                            "confidence": labelled["confidence"].to_numpy(np.float64)}).groupby("run", sort=True)
    selections = pd.DataFrame({
        "relpath": grouped["relpath"].first(), "begin_s": grouped["begin_s"].min(),
        "end_s": grouped["end_s"].max(), "label": grouped["label"].first(),
        "n_tiles": grouped.size(), "mean_confidence": grouped["confidence"].mean()})
    return selections[columns].reset_index(drop=True)


def raven_table(selections: pd.DataFrame, low_freq_hz: float, high_freq_hz: float) -> pd.DataFrame:
    """One recording's selections (merge_selections rows) as a Raven table: the standard columns
    typed (Selection and Channel int, times and frequencies float), Label, and Confidence as text
    with three decimals (what the file holds, so a read gives back exactly this frame)."""
    n = len(selections)
    return pd.DataFrame({
        "Selection": np.arange(1, n + 1, dtype=np.int64),
        "View": [RAVEN_VIEW] * n,
        "Channel": np.full(n, RAVEN_CHANNEL, dtype=np.int64),
        "Begin Time (s)": selections["begin_s"].to_numpy(np.float64),
        "End Time (s)": selections["end_s"].to_numpy(np.float64),
        "Low Freq (Hz)": np.full(n, float(low_freq_hz)),
        "High Freq (Hz)": np.full(n, float(high_freq_hz)),
        RAVEN_LABEL_COLUMN: selections["label"].astype(str).to_numpy(),
        RAVEN_CONFIDENCE_COLUMN: [f"{value:.3f}" for value in selections["mean_confidence"]],
    })


def _cell(value: object) -> str:
    # repr of a float is its shortest exact decimal form: parsed back, it is the same float
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    text = str(value)
    if any(character in text for character in "\t\r\n"):
        raise ValueError(f"a Raven table cell cannot hold a tab or line break: {text!r}")
    return text


def raven_table_text(table: pd.DataFrame) -> str:
    """The tab-separated text of a Raven table (header row, one selection per row, '\\n' ends)."""
    missing = [c for c in RAVEN_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"a Raven table needs columns {missing}")
    lines = ["\t".join(_cell(c) for c in table.columns)]
    lines += ["\t".join(_cell(v) for v in row) for row in table.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def write_raven_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, raven_table_text(table))


def read_raven_table(path: str | os.PathLike) -> pd.DataFrame:
    """A Raven Pro selection table as a DataFrame, from its documented text format: tab-separated,
    the first line the column names, then one selection per line (Raven writes one line per view
    for a selection shown in several views: they are kept, each with its View).

    The standard columns are typed (Selection and Channel int, times and frequencies float); every
    other column (Raven's measurements, annotations) is kept as text. A missing standard column, a
    line with the wrong number of fields or a non-numeric standard value raises RavenTableError
    naming the file and line. Blank lines are skipped; a UTF-8 byte order mark is tolerated.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise RavenTableError(f"{path}: empty, expected a header line of tab-separated column names")
    header = lines[0].split("\t")
    missing = [c for c in RAVEN_COLUMNS if c not in header]
    if missing:
        raise RavenTableError(f"{path} line 1: missing Raven column(s) {missing} (header: {header})")
    rows: list[list[str]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise RavenTableError(f"{path} line {number}: {len(fields)} fields, the header has {len(header)}")
        rows.append(fields)
    frame = pd.DataFrame(rows, columns=header, dtype=str)
    for columns, kind in ((_RAVEN_INT_COLUMNS, int), (_RAVEN_FLOAT_COLUMNS, float)):
        for column in columns:
            values = []
            for number, value in enumerate(frame[column], start=2):
                try:
                    values.append(kind(value))
                except ValueError:
                    raise RavenTableError(f"{path} line {number}: {column} {value!r} is not a number") from None
            frame[column] = np.array(values, dtype=np.int64 if kind is int else np.float64)
    return frame


def raven_table_path(raven_dir: str | os.PathLike, relpath: str) -> Path:
    """`<raven_dir>/<relpath's folder>/<recording>.Table.1.selections.txt` (the archive's layout
    is mirrored, so two recorders' files of one name never collide)."""
    relative = Path(str(relpath).replace("\\", "/"))
    return Path(raven_dir) / relative.parent / f"{relative.stem}{RAVEN_SUFFIX}"


def write_raven_tables(tiles: pd.DataFrame, raven_dir: str | os.PathLike, tile_s: float,
                       low_freq_hz: float, high_freq_hz: float) -> int:
    """One table per recording of `tiles` (a header only where nothing is labelled), written to a
    fresh folder that then replaces `raven_dir`, so no table of an earlier naming survives.
    Returns the number of selections."""
    raven_dir = Path(raven_dir)
    fresh = raven_dir.with_name(f".{raven_dir.name}.partial")
    stale = raven_dir.with_name(f".{raven_dir.name}.old")
    for folder in (fresh, stale):
        shutil.rmtree(folder, ignore_errors=True)
    selections = merge_selections(tiles, tile_s)
    by_recording = dict(tuple(selections.groupby("relpath", sort=False)))
    empty = selections.iloc[:0]
    for relpath in tqdm(pd.unique(tiles["relpath"]), desc="Raven tables", unit="file", disable=len(tiles) < 100_000):
        table = raven_table(by_recording.get(relpath, empty), low_freq_hz, high_freq_hz)
        write_raven_table(table, raven_table_path(fresh, relpath))
    if raven_dir.exists():
        raven_dir.rename(stale)
    fresh.rename(raven_dir)
    shutil.rmtree(stale, ignore_errors=True)
    return len(selections)


# ----------------------------------------------------------------------------------------------
# The `label` command


@dataclass
class LabelSummary:
    """What one `label_run` wrote."""

    out_dir: Path
    space: str
    fingerprint: str
    n_tiles: int
    n_named_clusters: int      # clusters with a real name (not ignore)
    n_ignored_clusters: int
    n_labelled_tiles: int
    n_selections: int
    n_recordings: int

    def line(self) -> str:
        return (f"{self.out_dir}: {self.n_labelled_tiles} of {self.n_tiles} tiles labelled from "
                f"{self.n_named_clusters} named clusters ({self.n_ignored_clusters} ignored) of {self.space}; "
                f"{self.n_selections} Raven selections in {self.n_recordings} tables")


def find_space(run_dir: str | os.PathLike, space: str | None = None) -> str:
    """`space` if the run has a finished clustering of it; else the run's only clustering."""
    clusters_dir = Path(run_dir) / "clusters"
    if not clusters_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} has no clusters/ folder: not a run that has been through notebook 04")
    finished = sorted(p.name for p in clusters_dir.glob("*") if (p / "config.json").is_file() and (p / "model.npz").is_file())
    if space is not None:
        if space not in finished:
            raise FileNotFoundError(f"{clusters_dir / space} holds no finished clustering (finished: {finished})")
        return space
    if len(finished) != 1:
        raise ValueError(f"{clusters_dir} holds {len(finished)} clusterings {finished}: name one with --space")
    return finished[0]


def space_embedding(run_dir: str | os.PathLike, space: str) -> np.ndarray:
    """The memory-mapped embedding notebook 04 clustered for `space` ("<checkpoint>_<pooling>",
    stored under embeddings/<checkpoint>/). Baseline spaces are not stored and are refused."""
    from .embed import load_embeddings

    try:
        name, pooling = split_space_name(space)
    except ValueError:
        name = pooling = ""
    folder = Path(run_dir) / "embeddings" / name
    if not name or not folder.is_dir():
        raise FileNotFoundError(f"space {space!r} has no stored embedding ({folder} is missing); "
                                "only SSL spaces (<method>_<pooling>) are stored")
    return load_embeddings(folder, pooling)


def label_run(run_dir: str | os.PathLike, names_path: str | os.PathLike, space: str | None = None,
              out_dir: str | os.PathLike | None = None, embeddings: np.ndarray | None = None,
              chunk_rows: int = 32_768, progress: bool = True) -> LabelSummary:
    """Apply a names file to a run's clustering: write `tiles.parquet`, the Raven tables and a
    config.json into `out_dir` (default RUN_DIR/labels). `embeddings` overrides the stored one."""
    from ..tiles.store import INDEX_FILE, read_store_metadata

    run_dir = Path(run_dir)
    space = find_space(run_dir, space)
    result = ClusterResult.load(run_dir / "clusters" / space)
    fingerprint = clustering_fingerprint(result.centroids)
    names = read_cluster_names(names_path, fingerprint, result.n_clusters, space)
    store_dir = run_dir / "tiles"
    store_config = read_store_metadata(store_dir)["config"]
    index = pq.read_table(store_dir / INDEX_FILE).to_pandas()
    if len(index) != len(result):
        raise ValueError(f"{store_dir} has {len(index)} tiles, the clustering {len(result)} rows")
    embeddings = space_embedding(run_dir, space) if embeddings is None else embeddings
    own, other, _ = name_margins(embeddings, result, names, chunk_rows=chunk_rows, progress=progress)
    tiles = propagate_names(index, result.labels, names, own, other)

    out_dir = Path(out_dir) if out_dir is not None else run_dir / LABELS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / TILES_FILE) as tmp:
        pq.write_table(pa.Table.from_pandas(tiles, preserve_index=False), tmp)
    n_selections = write_raven_tables(tiles, out_dir / RAVEN_DIR, float(store_config["tile_s"]),
                                      float(store_config["f_min_hz"]), float(store_config["f_max_hz"]))
    n_ignored = sum(1 for n in names.values() if n == IGNORE)
    summary = LabelSummary(out_dir=out_dir, space=space, fingerprint=fingerprint, n_tiles=len(tiles),
                           n_named_clusters=len(names) - n_ignored, n_ignored_clusters=n_ignored,
                           n_labelled_tiles=int(tiles["labelled"].sum()), n_selections=n_selections,
                           n_recordings=int(tiles["relpath"].nunique()))
    write_config_json(out_dir, STAGE, {"space": space, "names_file": str(Path(names_path).resolve()),
                                       "confidence": "1 - d_own / d_nearest_other_name"},
                      fingerprint=fingerprint, names_sha256=file_sha256(names_path), run_dir=str(run_dir.resolve()),
                      names={str(k): v for k, v in sorted(names.items())}, n_tiles=summary.n_tiles,
                      n_labelled_tiles=summary.n_labelled_tiles, n_selections=n_selections)
    return summary


# ----------------------------------------------------------------------------------------------
# Measuring the loop on the synthetic archive


def name_largest_by_majority(names_table: pd.DataFrame, n_largest: int, column: str = "planted_label") -> pd.DataFrame:
    """The names table with the `n_largest` clusters (by size; ties by cluster id) named by their
    majority `column` (what an expert who listened and agreed with it would write); others blank.
    A cluster without a majority value stays blank."""
    if column not in names_table.columns:
        raise ValueError(f"names table lacks column {column!r}")
    table = names_table.copy()
    order = table.sort_values(["size", "cluster"], ascending=[False, True], kind="mergesort").index[:n_largest]
    table[NAME_COLUMN] = ""
    table.loc[order, NAME_COLUMN] = table.loc[order, column].fillna("").astype(str)
    return table


def score_propagated_labels(names: Sequence, truth_labels: Sequence, truth_label_sets: Sequence[str] | None = None,
                            n_decisions: int | None = None) -> pd.DataFrame:
    """Precision of propagated names against the truth, per name and overall ("all" row).

    names: every tile's propagated name (None/"ignore"/"" = unlabelled). truth_labels: every
    tile's dominant true label. truth_label_sets: every tile's ';'-joined labels that count in it
    (groundtruth `labels` column), for the lenient measure. Columns: tiles_labelled, hits_dominant,
    precision_dominant (the name is the tile's dominant label), hits_any and precision_any (the name
    is any label that counts in the tile; only with truth_label_sets), base_rate (share of all
    tiles whose dominant label is the name: a random pick's precision), and, on the "all" row,
    tiles_per_decision (labelled tiles / n_decisions).
    """
    names = pd.Series(names, dtype=object).reset_index(drop=True)
    truth = pd.Series(truth_labels, dtype=object).astype(str).reset_index(drop=True)
    if len(names) != len(truth):
        raise ValueError(f"{len(names)} names for {len(truth)} truth labels")
    labelled = names.notna() & (names.astype(str) != "") & (names.astype(str) != IGNORE)
    hit_dominant = labelled & (names.astype(str) == truth)
    frame = pd.DataFrame({"name": names.where(labelled), "hit_dominant": hit_dominant})
    if truth_label_sets is not None:
        sets = pd.Series(truth_label_sets, dtype=object).fillna("").astype(str).reset_index(drop=True)
        frame["hit_any"] = [bool(ok) and name in labels.split(";")
                            for ok, name, labels in zip(labelled, names.astype(str), sets)]
    base = truth.value_counts(normalize=True)
    rows = []
    for name, group in frame[labelled].groupby("name", sort=True):
        row = {"name": name, "tiles_labelled": len(group), "hits_dominant": int(group["hit_dominant"].sum())}
        if "hit_any" in frame:
            row["hits_any"] = int(group["hit_any"].sum())
        row["base_rate"] = float(base.get(name, 0.0))
        rows.append(row)
    overall = {"name": "all", "tiles_labelled": int(labelled.sum()), "hits_dominant": int(hit_dominant.sum())}
    if "hit_any" in frame:
        overall["hits_any"] = int(frame["hit_any"].sum())
    per_name = pd.DataFrame(rows)
    overall["base_rate"] = (float((per_name["base_rate"] * per_name["tiles_labelled"]).sum() / overall["tiles_labelled"])
                            if overall["tiles_labelled"] else float("nan"))
    table = pd.concat([per_name, pd.DataFrame([overall])], ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["precision_dominant"] = table["hits_dominant"] / table["tiles_labelled"]
        if "hits_any" in table:
            table["precision_any"] = table["hits_any"] / table["tiles_labelled"]
    table["tiles_per_decision"] = np.nan
    if n_decisions:
        table.loc[table["name"] == "all", "tiles_per_decision"] = overall["tiles_labelled"] / n_decisions
    return table


def precision_by_confidence(names: Sequence, truth_labels: Sequence, confidence: Sequence,
                            n_bins: int = 4) -> pd.DataFrame:
    """Precision (name == dominant true label) of the labelled tiles in `n_bins` equal-count bins of
    confidence, lowest first: does the confidence rank the right labels above the wrong ones?
    Columns: bin (1 = least confident), confidence_low, confidence_high, tiles, precision."""
    frame = pd.DataFrame({"name": pd.Series(names, dtype=object).to_numpy(),
                          "truth": pd.Series(truth_labels, dtype=object).astype(str).to_numpy(),
                          "confidence": np.asarray(confidence, dtype=np.float64)})
    frame = frame[frame["name"].notna() & ~frame["name"].isin(["", IGNORE])]
    # rank first: equal confidences never leave a bin empty
    frame["bin"] = pd.qcut(frame["confidence"].rank(method="first"), n_bins, labels=False) + 1
    frame["hit"] = frame["name"].astype(str) == frame["truth"]
    grouped = frame.groupby("bin")
    return pd.DataFrame({"confidence_low": grouped["confidence"].min(), "confidence_high": grouped["confidence"].max(),
                         "tiles": grouped.size(), "precision": grouped["hit"].mean()}).reset_index()


def measure_labelling(run_dir: str | os.PathLike, archive_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      n_largest: int = 20, space: str | None = None,
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, LabelSummary]:
    """The labelling loop on a synthetic archive, with the planted truth standing in for the expert.

    Writes into `out_dir` (never into the run): `cluster_names.csv` as notebook 04 makes it (from
    the run's `clusters/<space>/clusters.csv` for sizes and verdicts), `cluster_names_named.csv`
    with the `n_largest` clusters named by their majority planted label, `labels/` from
    `label_run`, `precision.csv` (`score_propagated_labels`, one naming decision per named
    cluster) and `precision_by_confidence.csv` (quartiles of confidence). Returns (the precision
    table, the precision by confidence, the label summary).
    """
    from ..recordings.groundtruth import tile_ground_truth
    from ..recordings.synth import read_annotations
    from ..tiles.store import INDEX_FILE, read_store_metadata

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    space = find_space(run_dir, space)
    clusters_dir = run_dir / "clusters" / space
    result = ClusterResult.load(clusters_dir)
    store_config = read_store_metadata(run_dir / "tiles")["config"]
    index = pq.read_table(run_dir / "tiles" / INDEX_FILE).to_pandas()
    truth = tile_ground_truth(read_annotations(archive_dir), index.assign(tile_s=float(store_config["tile_s"])))
    described = pd.read_csv(clusters_dir / "clusters.csv")
    birdnet_species, _ = birdnet_species_per_tile(run_dir / "birdnet", index["tile_id"].to_numpy())
    names_table = cluster_names_table(described, space, result.centroids, result.labels,
                                      birdnet_species=birdnet_species, planted_labels=truth["label"].to_numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_cluster_names(names_table, out_dir / NAMES_FILE)
    named = name_largest_by_majority(names_table, n_largest)
    named_path = atomic_write_text(out_dir / "cluster_names_named.csv", named.to_csv(index=False))
    summary = label_run(run_dir, named_path, space, out_dir=out_dir / LABELS_DIR, progress=progress)
    tiles = pq.read_table(out_dir / LABELS_DIR / TILES_FILE, columns=["name", "confidence"]).to_pandas()
    n_decisions = int((named[NAME_COLUMN].str.strip() != "").sum())
    scores = score_propagated_labels(tiles["name"], truth["label"], truth["labels"], n_decisions=n_decisions)
    atomic_write_text(out_dir / "precision.csv", scores.to_csv(index=False))
    by_confidence = precision_by_confidence(tiles["name"], truth["label"], tiles["confidence"])
    atomic_write_text(out_dir / "precision_by_confidence.csv", by_confidence.to_csv(index=False))
    return scores, by_confidence, summary
