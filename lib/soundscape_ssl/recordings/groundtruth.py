"""Per-tile ground truth from annotated events (the synthetic archive's `annotations.csv`).

A tile is a span [offset_s, offset_s + tile_s) of one file. For every tile this module gives:
- `tile_label_overlaps`: a tiles x labels matrix of seconds covered by each label (the union of
  that label's events inside the tile), for multi-label scoring; `> 0` is the indicator matrix;
- `tile_ground_truth`: one dominant label per tile, for clustering scores (NMI, ARI);
- `tile_boxes` / `box_mask`: the events' time-frequency boxes in tile coordinates, for scoring
  attention maps.

Which events count in a tile (`GroundTruthConfig`): an event counts when it is audible
(`snr_db >= min_snr_db`) and enough of it lies inside the tile: at least `min_overlap_s`, or at
least `min_event_fraction` of the event (so a 30 ms chip wholly inside a tile counts, a 2 s song
that only clips the tile edge for 50 ms does not).

The dominant label: foreground kinds (birds, and the synthetic archive's rare events: the rare
bird and the anthropogenic chainsaw and gunshot, by default) win over continuous sources, because
the study asks whether tiles group by what calls in them, and a bird calling in the rain is a
bird tile (a chainsaw over distant traffic is a chainsaw tile). Among labels of the same rank the larger covered time wins, then the higher SNR, then
the alphabetically first label (so the answer never depends on row order). Tiles where nothing
counts get `background_label`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

_ANNOTATION_COLUMNS = ("file", "start_s", "end_s", "f_low_hz", "f_high_hz", "label", "kind")
_TILE_COLUMNS = ("relpath", "offset_s")
# Overlaps are compared after rounding to this many decimals (1 microsecond), so that float
# noise in offsets never decides a tie.
_OVERLAP_DECIMALS = 6
# Columns of tile_event_overlaps, with the dtypes an empty result gets.
_PAIR_DTYPES = {"tile": "int64", "event": "int64", "label": object, "kind": object, "snr_db": "float64",
                "overlap_s": "float64", "start_s": "float64", "end_s": "float64", "f_low_hz": "float64",
                "f_high_hz": "float64", "counts": "bool"}


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
    """Which events count in a tile and how the dominant label is chosen."""

    min_overlap_s: float = 0.25  # an event counts once this much of it lies in the tile ...
    min_event_fraction: float = 0.5  # ... or this fraction of the event does (short calls)
    min_snr_db: float = -3.0  # quieter events are treated as inaudible; NaN SNR counts as audible
    foreground_kinds: tuple[str, ...] = ("bird", "rare_bird", "anthropogenic")  # kinds that win over all others
    background_label: str = "background"  # label of tiles where nothing counts

    def __post_init__(self) -> None:
        object.__setattr__(self, "foreground_kinds", tuple(self.foreground_kinds))
        if self.min_overlap_s < 0 or not 0 <= self.min_event_fraction <= 1:
            raise ValueError("min_overlap_s must be >= 0 and min_event_fraction in [0, 1]")


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(frame.columns)}")


def _tile_durations(tiles: pd.DataFrame, tile_s: float | None) -> np.ndarray:
    if tile_s is not None:
        if tile_s <= 0:
            raise ValueError(f"tile_s must be > 0, got {tile_s}")
        return np.full(len(tiles), float(tile_s))
    # Only a column named tile_s: a tile index may also carry the *file's* duration_s.
    if "tile_s" in tiles.columns:
        return tiles["tile_s"].to_numpy(dtype=float)
    raise ValueError("give tile_s, or a tiles table with a tile_s column")


def _normalise_paths(paths: pd.Series) -> np.ndarray:
    return paths.astype(str).str.replace("\\", "/", regex=False).to_numpy()


def tile_event_overlaps(annotations: pd.DataFrame, tiles: pd.DataFrame, tile_s: float | None = None,
                        config: GroundTruthConfig | None = None) -> pd.DataFrame:
    """Every (tile, event) pair that overlaps in time, with the overlap and whether it counts.

    `tiles` needs relpath (matching the annotations' `file`) and offset_s, and either the
    `tile_s` argument or a tile_s column. Returns one row per pair with: tile (row position in
    `tiles`), event (row position in `annotations`), label, kind, snr_db, overlap_s, start_s and
    end_s (tile-relative, clipped to the tile), f_low_hz, f_high_hz and counts (bool).
    """
    config = config or GroundTruthConfig()
    _require_columns(annotations, _ANNOTATION_COLUMNS, "annotations")
    _require_columns(tiles, _TILE_COLUMNS, "tiles")
    durations = _tile_durations(tiles, tile_s)
    if len(tiles) == 0 or len(annotations) == 0:
        return pd.DataFrame({c: pd.Series(dtype=dtype) for c, dtype in _PAIR_DTYPES.items()})

    tile_files = _normalise_paths(tiles["relpath"])
    offsets = tiles["offset_s"].to_numpy(dtype=float)
    categories = pd.Index(pd.unique(tile_files))
    tile_codes = categories.get_indexer(tile_files)
    event_codes = categories.get_indexer(_normalise_paths(annotations["file"]))
    if not np.any(event_codes >= 0):
        logger.warning("no tile file matches an annotated file: were the tiles made from this archive, "
                       "with relpath relative to the archive root? (tile e.g. %r, annotation e.g. %r)",
                       tile_files[0], annotations["file"].iloc[0])
    starts = annotations["start_s"].to_numpy(dtype=float)
    ends = annotations["end_s"].to_numpy(dtype=float)

    # Sort tiles by (file, offset) and search each event's candidate tiles on a combined key:
    # file code * span + offset, where span exceeds any offset or event time.
    span = float(max(offsets.max() + durations.max(), ends.max(), 0.0)) + 1.0
    order = np.lexsort((offsets, tile_codes))
    keys = tile_codes[order] * span + offsets[order]
    valid = np.flatnonzero(event_codes >= 0)
    max_duration = durations.max()
    lo = np.searchsorted(keys, event_codes[valid] * span + starts[valid] - max_duration, side="right")
    hi = np.searchsorted(keys, event_codes[valid] * span + ends[valid], side="left")
    n_candidates = np.maximum(hi - lo, 0)
    event_rows = np.repeat(valid, n_candidates)
    first = np.repeat(lo, n_candidates)
    within = np.arange(n_candidates.sum()) - np.repeat(np.cumsum(n_candidates) - n_candidates, n_candidates)
    tile_rows = order[first + within]
    # The combined key can admit a neighbouring file's tile at a boundary; keep the same file only.
    same_file = tile_codes[tile_rows] == event_codes[event_rows]
    event_rows, tile_rows = event_rows[same_file], tile_rows[same_file]

    tile_start = offsets[tile_rows]
    tile_end = tile_start + durations[tile_rows]
    clipped_start = np.maximum(starts[event_rows], tile_start)
    clipped_end = np.minimum(ends[event_rows], tile_end)
    overlap = np.round(clipped_end - clipped_start, _OVERLAP_DECIMALS)
    keep = overlap > 0
    event_rows, tile_rows = event_rows[keep], tile_rows[keep]
    overlap, clipped_start = overlap[keep], clipped_start[keep]
    clipped_end, tile_start = clipped_end[keep], tile_start[keep]

    if "snr_db" in annotations.columns:
        snr = annotations["snr_db"].to_numpy(dtype=float)[event_rows]
    else:
        snr = np.full(event_rows.size, np.nan)
    event_duration = ends[event_rows] - starts[event_rows]
    needed = np.minimum(config.min_overlap_s, config.min_event_fraction * event_duration)
    audible = np.isnan(snr) | (snr >= config.min_snr_db)
    pairs = pd.DataFrame({
        "tile": tile_rows,
        "event": event_rows,
        "label": annotations["label"].astype(str).to_numpy()[event_rows],
        "kind": annotations["kind"].astype(str).to_numpy()[event_rows],
        "snr_db": snr,
        "overlap_s": overlap,
        "start_s": np.round(clipped_start - tile_start, _OVERLAP_DECIMALS),
        "end_s": np.round(clipped_end - tile_start, _OVERLAP_DECIMALS),
        "f_low_hz": annotations["f_low_hz"].to_numpy(dtype=float)[event_rows],
        "f_high_hz": annotations["f_high_hz"].to_numpy(dtype=float)[event_rows],
        "counts": audible & (overlap >= np.round(needed, _OVERLAP_DECIMALS)),
    }, columns=list(_PAIR_DTYPES))
    return pairs.sort_values(["tile", "start_s", "event"], kind="mergesort").reset_index(drop=True)


def _label_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (tile, label) over counting pairs: union of covered seconds, max SNR, kind."""
    counted = pairs[pairs["counts"]].sort_values(["tile", "label", "start_s"], kind="mergesort")
    if counted.empty:
        return pd.DataFrame(columns=["tile", "label", "kind", "overlap_s", "snr_db", "n_events"])
    tile = counted["tile"].to_numpy()
    label = counted["label"].to_numpy()
    start = counted["start_s"].to_numpy(dtype=float)
    end = counted["end_s"].to_numpy(dtype=float)
    # Interval union per group: each event adds only what lies past the furthest end so far.
    group_start = np.ones(len(counted), dtype=bool)
    group_start[1:] = (tile[1:] != tile[:-1]) | (label[1:] != label[:-1])
    group_id = np.cumsum(group_start) - 1
    running_end = pd.Series(end).groupby(group_id).cummax().to_numpy()
    previous_end = np.where(group_start, -np.inf, np.concatenate([[-np.inf], running_end[:-1]]))
    counted = counted.assign(added_s=np.clip(end - np.maximum(start, previous_end), 0.0, None))
    summary = counted.groupby(["tile", "label"], sort=True).agg(
        kind=("kind", "first"), overlap_s=("added_s", "sum"), snr_db=("snr_db", "max"),
        n_events=("event", "size")).reset_index()
    summary["overlap_s"] = summary["overlap_s"].round(_OVERLAP_DECIMALS)
    return summary


def tile_label_overlaps(annotations: pd.DataFrame, tiles: pd.DataFrame, tile_s: float | None = None,
                        config: GroundTruthConfig | None = None,
                        labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Tiles x labels matrix: seconds of each tile covered by counting events of each label.

    Rows follow `tiles` (same index); columns are `labels` (default: every label in the
    annotations, sorted). Overlapping events of one label are counted once (interval union).
    `(matrix > 0)` is the multi-label indicator matrix.
    """
    config = config or GroundTruthConfig()
    pairs = tile_event_overlaps(annotations, tiles, tile_s, config)
    if labels is None:
        labels = sorted(annotations["label"].astype(str).unique()) if len(annotations) else []
    labels = list(labels)
    matrix = np.zeros((len(tiles), len(labels)))
    summary = _label_summary(pairs)
    if not summary.empty and labels:
        column = pd.Index(labels).get_indexer(summary["label"])
        known = column >= 0
        matrix[summary["tile"].to_numpy(dtype=int)[known], column[known]] = summary["overlap_s"].to_numpy()[known]
    return pd.DataFrame(matrix, index=tiles.index, columns=pd.Index(labels, name="label"))


def tile_ground_truth(annotations: pd.DataFrame, tiles: pd.DataFrame, tile_s: float | None = None,
                      config: GroundTruthConfig | None = None) -> pd.DataFrame:
    """One row per tile (same index as `tiles`): the dominant label and what else is in the tile.

    Columns: label (dominant, or the background label), kind ("background" when none),
    overlap_s (seconds the dominant label covers), snr_db (its loudest counting event),
    n_labels (how many labels count in the tile) and labels (all of them, sorted, ';'-joined).
    """
    config = config or GroundTruthConfig()
    pairs = tile_event_overlaps(annotations, tiles, tile_s, config)
    summary = _label_summary(pairs)
    result = pd.DataFrame({
        "label": config.background_label, "kind": "background", "overlap_s": 0.0, "snr_db": np.nan,
        "n_labels": 0, "labels": "",
    }, index=range(len(tiles)))
    if not summary.empty:
        summary["foreground"] = summary["kind"].isin(config.foreground_kinds)
        ranked = summary.sort_values(["tile", "foreground", "overlap_s", "snr_db", "label"],
                                     ascending=[True, False, False, False, True], na_position="last",
                                     kind="mergesort")
        dominant = ranked.drop_duplicates("tile", keep="first").set_index("tile")
        rows = dominant.index.to_numpy(dtype=int)
        result.loc[rows, "label"] = dominant["label"].to_numpy()
        result.loc[rows, "kind"] = dominant["kind"].to_numpy()
        result.loc[rows, "overlap_s"] = dominant["overlap_s"].to_numpy(dtype=float)
        result.loc[rows, "snr_db"] = dominant["snr_db"].to_numpy(dtype=float)
        present = summary.groupby("tile")["label"].agg(lambda s: ";".join(sorted(s)))
        counts = summary.groupby("tile")["label"].size()
        result.loc[present.index.to_numpy(dtype=int), "labels"] = present.to_numpy()
        result.loc[counts.index.to_numpy(dtype=int), "n_labels"] = counts.to_numpy()
    result.index = tiles.index
    return result


def tile_boxes(annotations: pd.DataFrame, relpath: str, offset_s: float, tile_s: float,
               config: GroundTruthConfig | None = None, counting_only: bool = False) -> pd.DataFrame:
    """The events of one tile as boxes in tile coordinates.

    start_s/end_s are relative to the tile start and clipped to [0, tile_s]; f_low_hz and
    f_high_hz are unchanged. Columns as `tile_event_overlaps` (without tile), one row per event
    overlapping the tile, in time order; `counting_only` keeps the events that count.
    """
    tile = pd.DataFrame({"relpath": [relpath], "offset_s": [float(offset_s)]})
    pairs = tile_event_overlaps(annotations, tile, tile_s, config).drop(columns="tile")
    if counting_only:
        pairs = pairs[pairs["counts"]]
    return pairs.reset_index(drop=True)


def box_mask(boxes: pd.DataFrame, frame_times_s: np.ndarray, bin_freqs_hz: np.ndarray) -> np.ndarray:
    """Boolean (n_bins, n_frames) mask of the cells inside any box (e.g. to score attention maps).

    A cell is inside a box when its frame time (e.g. the frame centre, tile-relative) lies in
    [start_s, end_s) and its bin frequency (e.g. the mel band's centre) in [f_low_hz, f_high_hz].
    """
    frame_times_s = np.asarray(frame_times_s, dtype=float)
    bin_freqs_hz = np.asarray(bin_freqs_hz, dtype=float)
    mask = np.zeros((bin_freqs_hz.size, frame_times_s.size), dtype=bool)
    for start, end, f_low, f_high in boxes[["start_s", "end_s", "f_low_hz", "f_high_hz"]].itertuples(index=False):
        in_time = (frame_times_s >= start) & (frame_times_s < end)
        in_band = (bin_freqs_hz >= f_low) & (bin_freqs_hz <= f_high)
        mask |= in_band[:, None] & in_time[None, :]
    return mask
