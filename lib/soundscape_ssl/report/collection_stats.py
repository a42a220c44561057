"""Data-collection statistics of an inventory, as a paper shows them (notebook 01).

Pure functions of the inventory tables (`soundscape_ssl.recordings.archive`): a summary table per habitat,
quarantined files by reason, a recorder x day coverage matrix, recorded hours by hour of day and
hours per recorder; plus figure helpers that return matplotlib Figures and `save_figure`.

Time is the naive recorder clock of the file names. A recording that spans a bin boundary
(an hour, midnight) is split across the bins in proportion to the time it spends in each, so
totals per day or per hour of day always add up to the recorded hours. Files without a start
time (NaT) count in the summary and per-recorder totals but cannot be placed in time: the
coverage and hour-of-day tables leave them out and log how many.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..recordings.archive import QUARANTINE_REASONS
from .figures import save_figure  # noqa: F401  (notebook 01 saves through this module)

logger = logging.getLogger(__name__)

UNASSIGNED_HABITAT = "unassigned"  # label of recorders without a habitat in sites.csv
ALL_HABITATS = "all"
NS_PER_HOUR = 3_600_000_000_000
NS_PER_DAY = 24 * NS_PER_HOUR
BYTES_PER_GB = 1e9  # decimal gigabytes, as disk vendors and most papers count


# --------------------------------------------------------------------------- tables


def _habitat_labels(files: pd.DataFrame) -> pd.Series:
    habitat = files["habitat"].astype(object)
    return habitat.where(habitat.notna(), UNASSIGNED_HABITAT).astype(str)


def _habitat_order(labels: pd.Series) -> list[str]:
    """Habitats alphabetically, recorders without one last."""
    named = sorted(set(labels) - {UNASSIGNED_HABITAT})
    return named + ([UNASSIGNED_HABITAT] if UNASSIGNED_HABITAT in set(labels) else [])


def _joined_unique(values: pd.Series) -> str:
    """'22000, 44100' for the distinct non-missing values of a column, in ascending order."""
    distinct = sorted({int(v) for v in values.dropna()})
    return ", ".join(str(v) for v in distinct)


def collection_summary(files: pd.DataFrame) -> pd.DataFrame:
    """One row per habitat (alphabetical, then 'unassigned') and a final 'all' row.

    Columns: habitat, n_recorders, n_files, total_hours, total_gb (1e9 bytes), first_start and
    last_end (of the files with a start time; last_end = start + duration), n_days (calendar
    days with any recording), n_files_without_time, sample_rates_hz and bit_depths (distinct
    values in use, e.g. "22000, 44100").
    """
    files = files.assign(habitat_label=_habitat_labels(files))
    groups = [(label, files[files["habitat_label"] == label])
              for label in _habitat_order(files["habitat_label"])]
    groups.append((ALL_HABITATS, files))
    rows = []
    for label, group in groups:
        timed = group[group["start_time"].notna()]
        ends = timed["start_time"] + pd.to_timedelta(timed["duration_s"], unit="s")
        rows.append({
            "habitat": label,
            "n_recorders": int(group["recorder"].nunique()),
            "n_files": len(group),
            "total_hours": float(group["duration_s"].sum() / 3600.0),
            "total_gb": float(group["bytes"].sum() / BYTES_PER_GB),
            "first_start": timed["start_time"].min() if len(timed) else pd.NaT,
            "last_end": ends.max() if len(timed) else pd.NaT,
            "n_days": int(_split_into_bins(timed, NS_PER_DAY)["bin"].nunique()),
            "n_files_without_time": int(group["start_time"].isna().sum()),
            "sample_rates_hz": _joined_unique(group["sample_rate_hz"]),
            "bit_depths": _joined_unique(group["bit_depth"]),
        })
    summary = pd.DataFrame(rows)
    for column in ("first_start", "last_end"):
        summary[column] = pd.to_datetime(summary[column]).astype("datetime64[ns]")
    return summary


def quarantine_summary(quarantine: pd.DataFrame) -> pd.DataFrame:
    """Quarantined files by reason (most frequent first): n_files, total_gb, meaning, example."""
    columns = ["reason", "n_files", "total_gb", "meaning", "example_relpath"]
    if quarantine.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "total_gb" else
                                          (int if c == "n_files" else object))
                             for c in columns})
    grouped = quarantine.groupby("reason", sort=False)
    table = pd.DataFrame({
        "n_files": grouped.size(),
        "total_gb": grouped["bytes"].sum() / BYTES_PER_GB,
        "example_relpath": grouped["relpath"].min(),
    }).reset_index()
    table["meaning"] = table["reason"].map(QUARANTINE_REASONS).fillna("")
    table = table.sort_values(["n_files", "reason"], ascending=[False, True], ignore_index=True)
    return table.loc[:, columns]


def _split_into_bins(files: pd.DataFrame, bin_ns: int) -> pd.DataFrame:
    """Cut each timed recording at the bin edges of the naive time axis.

    Bins are aligned to the epoch (1970-01-01 00:00), so day bins start at midnight and hour
    bins on the hour. Returns one row per (recording, bin) it overlaps: `row` (position in
    `files`), `bin` (bin number since the epoch) and `hours` recorded inside that bin.
    """
    timed = files["start_time"].notna().to_numpy()
    start_ns = files["start_time"].to_numpy(dtype="datetime64[ns]")[timed].astype(np.int64)
    duration_ns = np.round(files["duration_s"].to_numpy(dtype=float)[timed] * 1e9).astype(np.int64)
    end_ns = start_ns + duration_ns
    first_bin = np.floor_divide(start_ns, bin_ns)
    # The end is exclusive: a recording that stops exactly at midnight does not touch the next day.
    last_bin = np.maximum(np.floor_divide(end_ns - 1, bin_ns), first_bin)
    n_bins = last_bin - first_bin + 1
    rows = np.repeat(np.flatnonzero(timed), n_bins)
    piece = np.repeat(np.arange(len(start_ns)), n_bins)
    offset_in_run = np.arange(n_bins.sum()) - np.repeat(np.cumsum(n_bins) - n_bins, n_bins)
    bins = first_bin[piece] + offset_in_run
    overlap_ns = (np.minimum(end_ns[piece], (bins + 1) * bin_ns)
                  - np.maximum(start_ns[piece], bins * bin_ns))
    return pd.DataFrame({"row": rows, "bin": bins,
                         "hours": np.clip(overlap_ns, 0, None) / NS_PER_HOUR})


def _log_untimed(files: pd.DataFrame, what: str) -> None:
    n_untimed = int(files["start_time"].isna().sum())
    if n_untimed:
        logger.info("%s leaves out %d files without a start time (%.1f h)", what, n_untimed,
                    files.loc[files["start_time"].isna(), "duration_s"].sum() / 3600.0)


def recorder_order(files: pd.DataFrame) -> list[str]:
    """Recorders grouped by habitat (alphabetical, 'unassigned' last), then by name."""
    labels = _habitat_labels(files)
    order = _habitat_order(labels)
    pairs = sorted(set(zip(labels, files["recorder"].astype(str))),
                   key=lambda pair: (order.index(pair[0]), pair[1]))
    seen: dict[str, None] = {}
    for _, recorder in pairs:
        seen.setdefault(recorder, None)
    return list(seen)


def coverage_matrix(files: pd.DataFrame) -> pd.DataFrame:
    """Recorded hours per recorder (rows) and calendar day (columns).

    Rows follow `recorder_order`; recorders without any timed file are left out. Columns are
    every day from the first to the last recorded day (a DatetimeIndex of midnights), so gaps
    in the deployment show up as zeros.
    """
    _log_untimed(files, "coverage_matrix")
    pieces = _split_into_bins(files, NS_PER_DAY)
    if pieces.empty:
        return pd.DataFrame(index=pd.Index([], name="recorder", dtype=object),
                            columns=pd.DatetimeIndex([], name="day"), dtype=float)
    pieces["recorder"] = files["recorder"].astype(str).to_numpy()[pieces["row"]]
    table = pieces.pivot_table(index="recorder", columns="bin", values="hours", aggfunc="sum",
                               fill_value=0.0)
    all_days = np.arange(pieces["bin"].min(), pieces["bin"].max() + 1)
    table = table.reindex(columns=all_days, fill_value=0.0)
    table.columns = pd.DatetimeIndex(pd.to_datetime(all_days * NS_PER_DAY, unit="ns"),
                                     name="day").astype("datetime64[ns]")
    timed_recorders = set(table.index)
    table = table.loc[[r for r in recorder_order(files) if r in timed_recorders]]
    table.index.name = "recorder"
    return table.astype(float)


def hours_by_hour_of_day(files: pd.DataFrame, by: str | None = "habitat") -> pd.DataFrame:
    """Recorded hours in each hour of the day (rows 0-23), one column per habitat.

    With `by=None` a single column 'all'. A recording from 05:50 to 06:10 adds 10 min to
    hour 5 and 10 min to hour 6.
    """
    if by not in ("habitat", None):
        raise ValueError(f"by must be 'habitat' or None, got {by!r}")
    _log_untimed(files, "hours_by_hour_of_day")
    pieces = _split_into_bins(files, NS_PER_HOUR)
    hour_of_day = np.mod(pieces["bin"].to_numpy(), 24)
    if by is None:
        group = np.full(len(pieces), ALL_HABITATS, dtype=object)
        groups = [ALL_HABITATS]
    else:
        labels = _habitat_labels(files).to_numpy(dtype=object)
        group = labels[pieces["row"].to_numpy()]
        groups = [g for g in _habitat_order(pd.Series(labels, dtype=object)) if g in set(group)]
    table = pd.DataFrame(0.0, index=pd.RangeIndex(24), columns=groups)
    hours = pieces["hours"].to_numpy()
    for name in groups:
        selected = group == name
        table[name] = np.bincount(hour_of_day[selected], weights=hours[selected], minlength=24)
    table.index.name = "hour_of_day"
    table.columns.name = by or ALL_HABITATS
    return table.astype(float)


def hours_per_recorder(files: pd.DataFrame) -> pd.DataFrame:
    """One row per recorder (in `recorder_order`): habitat, n_files, hours, gb."""
    frame = files.assign(habitat_label=_habitat_labels(files),
                         recorder=files["recorder"].astype(str))
    table = frame.groupby("recorder").agg(
        habitat=("habitat_label", "first"), n_files=("relpath", "size"),
        hours=("duration_s", lambda s: float(s.sum()) / 3600.0),
        gb=("bytes", lambda s: float(s.sum()) / BYTES_PER_GB))
    table = table.loc[recorder_order(files)].reset_index()
    return table.loc[:, ["recorder", "habitat", "n_files", "hours", "gb"]]


# --------------------------------------------------------------------------- figures


def habitat_colors(habitats: list[str]) -> dict[str, str]:
    """A stable colour per habitat (matplotlib's tab10 cycle); 'unassigned' is grey."""
    palette = [f"C{i}" for i in range(10)]
    named = [h for h in habitats if h != UNASSIGNED_HABITAT]
    colors = {habitat: palette[i % len(palette)] for i, habitat in enumerate(named)}
    if UNASSIGNED_HABITAT in habitats:
        colors[UNASSIGNED_HABITAT] = "0.6"
    return colors


def plot_coverage_heatmap(coverage: pd.DataFrame,
                          recorder_habitats: Mapping[str, str] | None = None,
                          title: str | None = None) -> Figure:
    """Heat map of recorded hours per recorder and day (from `coverage_matrix`).

    The colour scale runs from 0 to the largest daily total, so duty-cycled schedules (a few
    minutes per hour) stay readable. With `recorder_habitats` (e.g. the habitat column of
    `hours_per_recorder` indexed by recorder) the tick labels name the habitat too.
    """
    n_recorders, n_days = coverage.shape
    figure = Figure(figsize=(max(6.0, min(16.0, 2.5 + 0.12 * n_days)),
                             max(2.5, 1.4 + 0.28 * n_recorders)), layout="constrained")
    axes = figure.add_subplot()
    values = coverage.to_numpy(dtype=float)
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis",
                        vmin=0.0, vmax=max(float(values.max(initial=0.0)), 1e-9))
    labels = [f"{recorder} ({recorder_habitats[recorder]})"
              if recorder_habitats is not None and recorder in recorder_habitats else recorder
              for recorder in coverage.index]
    axes.set_yticks(range(n_recorders), labels=labels)
    step = max(1, int(np.ceil(n_days / 12)))  # at most ~12 date labels
    ticks = list(range(0, n_days, step))
    axes.set_xticks(ticks, labels=[coverage.columns[i].strftime("%Y-%m-%d") for i in ticks],
                    rotation=45, ha="right")
    axes.set_xlabel("day (recorder clock)")
    axes.set_ylabel("recorder")
    figure.colorbar(image, ax=axes, label="recorded hours per day")
    axes.set_title(title or "Recording coverage")
    return figure


def plot_hours_by_hour_of_day(hours: pd.DataFrame, title: str | None = None) -> Figure:
    """Grouped bars of recorded hours per hour of day (from `hours_by_hour_of_day`)."""
    figure = Figure(figsize=(8.0, 3.5), layout="constrained")
    axes = figure.add_subplot()
    groups = list(hours.columns)
    colors = habitat_colors(groups)
    width = 0.8 / max(1, len(groups))
    for i, group in enumerate(groups):
        axes.bar(hours.index.to_numpy() - 0.4 + (i + 0.5) * width, hours[group].to_numpy(),
                 width=width, label=str(group), color=colors.get(group, "C0"))
    axes.set_xticks(range(0, 24, 2))
    axes.set_xlim(-0.6, 23.6)
    axes.set_xlabel("hour of day (recorder clock)")
    axes.set_ylabel("recorded hours")
    if len(groups) > 1:
        axes.legend(title=hours.columns.name, frameon=False, loc="upper left",
                    bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title or "Recorded hours by hour of day")
    return figure


def plot_hours_per_recorder(per_recorder: pd.DataFrame, title: str | None = None) -> Figure:
    """Bar per recorder coloured by habitat (from `hours_per_recorder`)."""
    n_recorders = len(per_recorder)
    figure = Figure(figsize=(max(5.0, min(16.0, 1.5 + 0.35 * n_recorders)), 3.5),
                    layout="constrained")
    axes = figure.add_subplot()
    habitats = list(dict.fromkeys(per_recorder["habitat"]))
    colors = habitat_colors(habitats)
    positions = np.arange(n_recorders)
    axes.bar(positions, per_recorder["hours"].to_numpy(),
             color=[colors[h] for h in per_recorder["habitat"]])
    axes.set_xticks(positions, labels=list(per_recorder["recorder"]), rotation=45, ha="right")
    axes.set_xlabel("recorder")
    axes.set_ylabel("recorded hours")
    axes.legend(handles=[Patch(color=colors[h], label=h) for h in habitats], title="habitat",
                frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title or "Recorded hours per recorder")
    return figure


# --------------------------------------------------------------------------- planted ground truth


def planted_event_counts(annotations: pd.DataFrame) -> pd.DataFrame:
    """Planted events per (kind, label) and habitat from a synthetic archive's annotations.csv.

    Rows are ordered by kind then by total count; a `total` column sums the habitats.
    """
    counts = pd.crosstab([annotations["kind"], annotations["label"]], annotations["habitat"])
    counts.columns.name = "habitat"
    counts["total"] = counts.sum(axis=1)
    order = counts.reset_index().sort_values(["kind", "total"], ascending=[True, False])
    return counts.loc[list(zip(order["kind"], order["label"]))]


def plot_planted_events(counts: pd.DataFrame, title: str | None = None) -> Figure:
    """Grouped horizontal bars of planted events per label and habitat (from `planted_event_counts`).

    Log scale: bird calls outnumber rain episodes by orders of magnitude; bars are grouped, not
    stacked, because stacked lengths mislead on a log axis.
    """
    habitats = [c for c in counts.columns if c != "total"]
    colors = habitat_colors(habitats)
    labels = [f"{label} ({kind})" for kind, label in counts.index]
    figure = Figure(figsize=(7.5, max(3.0, 0.8 + 0.3 * len(counts))), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(counts))[::-1].astype(float)
    height = 0.8 / max(1, len(habitats))
    for i, habitat in enumerate(habitats):
        axes.barh(positions + 0.4 - (i + 0.5) * height, counts[habitat].to_numpy(dtype=float),
                  height=height, color=colors[habitat], label=habitat)
    axes.set_yticks(positions, labels=labels)
    axes.set_xscale("log")
    axes.set_xlabel("planted events (log scale)")
    axes.legend(title="habitat", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title or "Planted events by label and habitat")
    return figure
