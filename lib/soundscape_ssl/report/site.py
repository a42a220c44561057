"""A run as one browsable static site: `soundscape-ssl report RUN_DIR` writes `RUN_DIR/report/`.

The pipeline builds it as the last step of every `soundscape-ssl run`. It opens from the file
system (no server, relative links only) and holds:

    index.html          the run: profile, git sha, each notebook's status and wall time (from
                        manifest.json); per notebook, under its question, the headline score tables
                        (the CSVs the notebooks wrote) and every figure it saved, each under the
                        question it answers with a one-line caption (`report.catalogue`); links to
                        the executed notebooks' HTML copies
    overview.html       every cluster of the main space on one page: size, verdict, what it holds
                        (planted labels or BirdNET species) and its most central tiles as
                        thumbnails, each linking to its page
    clusters/cNNN.html  one page per cluster: size, verdict, level, recorders, habitats, hours of
                        day, BirdNET species shares (where notebook 06 ran), planted-label shares
                        (on a synthetic archive), and its most central tiles, each a spectrogram
                        thumbnail with an audio player of the tile's own 3 s
    outliers.html       the main space's top outliers (`clusters/<space>/outliers.csv` of notebook
                        04, most outlying first): rank, score, cluster, planted label (synthetic
                        archive), each tile a thumbnail with its audio, as on the cluster pages
    clips/              the clips and thumbnails (`report.clips`, a resumable stage)
    style.css, report.json (what was built, and how long it took)

Figures and notebooks are linked where the run keeps them (`../figures`, `../notebooks`), so the
run folder is the unit to share. The main space is the clustering notebook 04 saved
(`clusters/<space>/`, with its `clusters.csv` of verdicts); a run without it gets the index page
only, with a note. Pages are rendered with Jinja2 templates (`report/templates/`), autoescaped:
names from the data are shown as text, never run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.stage import PlanMismatchError, atomic_write_text
from . import catalogue
from .clips import ClipConfig, cut_clips

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
CLIPS_DIR = "clips"
CLUSTER_PAGES_DIR = "clusters"
OUTLIERS_PAGE = "outliers.html"
NO_BIRDNET_LABEL = "none"


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows."""

    space: str = ""            # the clustered space of the cluster pages; "" = the one notebook 04 saved
    central_tiles: int = 6     # tiles per cluster shown and heard, nearest the centroid first
    overview_tiles: int = 3    # of them, shown per cluster on the overview page
    top_shares: int = 6        # species / planted labels listed per cluster
    outlier_tiles: int = 50    # top outliers listed (and heard) on outliers.html, of those notebook 04 wrote
    threads: int = 2           # threads cutting clips and drawing thumbnails (the files do not depend on it)
    clips: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        if self.central_tiles < 1 or not 1 <= self.overview_tiles <= self.central_tiles:
            raise ValueError("need central_tiles >= 1 and 1 <= overview_tiles <= central_tiles, got "
                             f"{self.central_tiles} and {self.overview_tiles}")
        if self.outlier_tiles < 0:
            raise ValueError(f"outlier_tiles must be >= 0, got {self.outlier_tiles}")
        if self.top_shares < 1 or self.threads < 1:
            raise ValueError(f"top_shares and threads must be >= 1, got {self.top_shares} and {self.threads}")


# ----------------------------------------------------------------------------------------------
# The run: manifest, notebooks, figures, tables


@dataclass
class NotebookInfo:
    key: str                  # "04"
    stem: str                 # "04_embed_and_cluster"
    title: str                # the notebook's heading, "04 · Embeddings, clusters and 2-D maps"
    question: str             # its bold lead sentence, the question it answers
    status: str               # ok / failed / running / not run
    wall_s: float | None
    html: str | None          # link to the executed notebook's HTML, relative to the report
    error: str = ""
    figures: list["FigureInfo"] = field(default_factory=list)
    tables: list["TableInfo"] = field(default_factory=list)


@dataclass
class FigureInfo:
    name: str
    png: str                  # relative to the report folder
    pdf: str | None
    question: str
    caption: str
    catalogued: bool


@dataclass
class TableInfo:
    title: str
    source: str               # the CSV, relative to the report folder
    html: str                 # the table, rendered (escaped) by pandas


_HEADING = re.compile(r"^#\s+(.+)$", re.MULTILINE)
_BOLD = re.compile(r"\*\*(.+?)\*\*", re.DOTALL)


def notebook_heading(source: str) -> tuple[str, str]:
    """(title, question) from a notebook's first markdown cell: its `# ` heading and its first
    bold sentence (every notebook of the study opens with the question it answers in bold)."""
    title = _HEADING.search(source)
    bold = _BOLD.search(source)
    return (title.group(1).strip() if title else "",
            " ".join(bold.group(1).split()) if bold else "")


def _first_markdown(path: Path) -> str:
    """The source of a notebook's first markdown cell (read as JSON: nbformat's validator takes
    seconds to import, and only one cell is needed)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError) as error:  # an unreadable notebook must not stop the report
        logger.warning("could not read %s: %s", path, error)
        return ""
    source = next((cell.get("source", "") for cell in cells if cell.get("cell_type") == "markdown"), "")
    return "".join(source) if isinstance(source, list) else str(source)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no manifest.json "
                                "(made by `soundscape-ssl run`)")
    return json.loads(path.read_text())


def notebook_infos(run_dir: Path, manifest: dict[str, Any]) -> list[NotebookInfo]:
    """One entry per notebook the manifest lists, then any other executed notebook in the run."""
    records = {record["notebook"]: record for record in manifest.get("notebooks", [])}
    executed = {path.stem: path for path in sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    infos = []
    for stem in sorted(set(records) | set(executed)):
        record = records.get(stem, {})
        path = executed.get(stem)
        title, question = notebook_heading(_first_markdown(path)) if path else ("", "")
        html = run_dir / "notebooks" / f"{stem}.html"
        infos.append(NotebookInfo(
            key=stem[:2], stem=stem, title=title or stem, question=question,
            status=record.get("status", "not in the manifest"), wall_s=record.get("wall_s"),
            html=f"../notebooks/{html.name}" if html.is_file() else None, error=record.get("error", "")))
    return infos


def figure_infos(run_dir: Path) -> list[FigureInfo]:
    """Every PNG the notebooks saved, with its catalogue entry (or the title it was saved with), in
    the order each notebook saved them (a notebook's figures follow its story)."""
    figures = []
    pngs = sorted((run_dir / "figures").glob("*.png"),
                  key=lambda png: (catalogue.notebook_key(png.stem), png.stat().st_mtime_ns, png.name))
    for png in pngs:
        name = png.stem
        entry = catalogue.entry_for(name)
        if entry is not None:
            question, caption = entry.question, entry.caption
        else:
            sidecar = png.with_suffix(".json")
            title = json.loads(sidecar.read_text()).get("title", "") if sidecar.is_file() else ""
            question, caption = name.replace("_", " "), title or "(no caption: add it to report/catalogue.py)"
        pdf = png.with_suffix(".pdf")
        figures.append(FigureInfo(name, f"../figures/{png.name}", f"../figures/{pdf.name}" if pdf.is_file() else None,
                                  question, caption, entry is not None))
    return figures


def _number(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def duration_text(seconds: float) -> str:
    """'45 s', '12.5 min', '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def with_interval(value: Any, low: Any, high: Any, signed: bool = False) -> str:
    """'0.620 [0.580, 0.650]'; the value alone when the interval is missing."""
    text = _number(value, signed=signed)
    if _number(low) == "–" or _number(high) == "–":
        return text
    return f"{text} [{_number(low, signed=signed)}, {_number(high, signed=signed)}]"


def score_columns(frame: pd.DataFrame, key_columns: Sequence[str],
                  metrics: Sequence[tuple[str, str, str | None, str | None]]) -> pd.DataFrame:
    """A display table: the key columns, then one column per (heading, value column, low column,
    high column) present in `frame`, each cell the value with its interval."""
    shown = pd.DataFrame({column: frame[column].astype(str) for column in key_columns if column in frame})
    for heading, value, low, high in metrics:
        if value not in frame:
            continue
        lows = frame[low] if low and low in frame else [None] * len(frame)
        highs = frame[high] if high and high in frame else [None] * len(frame)
        shown[heading] = [with_interval(v, lo, hi) for v, lo, hi in zip(frame[value], lows, highs)]
    return shown


def paired_columns(frame: pd.DataFrame, key_columns: Sequence[str]) -> pd.DataFrame:
    """A paired-difference table (one row per space and metric) as one row per space, one column
    per metric: 'difference [low, high] (share not better)'."""
    cells = frame.assign(cell=[
        f"{with_interval(d, lo, hi, signed=True)} ({_number(share, 2)})"
        for d, lo, hi, share in zip(frame["difference"], frame["interval_low"], frame["interval_high"],
                                    frame["share_not_better"])])
    keys = [column for column in key_columns if column in frame]
    wide = cells.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
    wide.columns.name = None
    return wide.reset_index()


def _render_table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, border=0, classes="scores", na_rep="–",
                         float_format=lambda v: _number(v))


_KNN = ("kNN accuracy", "knn_accuracy", "knn_accuracy_interval_low", "knn_accuracy_interval_high")


def _table_specs(run_dir: Path) -> list[tuple[str, str, Path, Any]]:
    """(notebook key, title, CSV, frame -> display frame) of the headline tables a run may hold."""
    specs: list[tuple[str, str, Path, Any]] = [
        ("01", "The collection", run_dir / "inventory" / "collection_summary.csv", lambda f: f),
        ("04", "Output spaces against the planted labels (95% intervals over recorders)",
         run_dir / "clusters" / "scores.csv",
         lambda f: score_columns(f.sort_values("knn_accuracy", ascending=False, kind="stable")
                                 if "knn_accuracy" in f else f, ["output_space"], [
             _KNN, ("kNN macro-F1", "knn_macro_f1", "knn_macro_f1_interval_low", "knn_macro_f1_interval_high"),
             ("NMI", "nmi", "nmi_interval_low", "nmi_interval_high"),
             ("ARI", "ari", "ari_interval_low", "ari_interval_high"), ("V-measure", "v_measure", None, None),
             ("purity", "purity", None, None), ("silhouette", "silhouette", None, None)])),
        ("04", "Each space against the log-mel statistics, paired over recorders: difference [95% interval] "
               "(share of resamples not better)", run_dir / "clusters" / "paired_vs_logmel.csv",
         lambda f: paired_columns(f, ["output_space"])),
        ("04", "Planted rare events among the top outliers: precision@k against their base rate",
         run_dir / "clusters" / "outlier_precision.csv", lambda f: f),
        ("05", "The best attention head per method, chosen on one half of the recorders, scored on the other",
         run_dir / "attention" / "best_heads.csv",
         lambda f: score_columns(f, ["method", "best_head", "reported_on"], [
             ("IoU with the planted bird boxes", "best_head_iou", "best_head_iou_interval_low",
              "best_head_iou_interval_high"),
             ("mass lift", "best_head_mass_lift", None, None), ("energy threshold IoU", "energy_iou", None, None),
             ("heads beating energy", "heads_beating_energy", None, None), ("heads", "n_heads", None, None)])),
        ("06", "Output spaces against BirdNET pseudo-labels", run_dir / "birdnet_comparison" / "output_spaces.csv",
         lambda f: score_columns(f, ["output_space"], [
             ("NMI", "nmi", None, None), ("ARI", "ari", None, None), ("purity", "purity", None, None),
             ("labelled tiles", "n_labelled_tiles", None, None),
             ("top detection rate", "detection_rate_top", None, None),
             ("lift", "detection_rate_top_lift", None, None),
             ("kNN species", "knn_species_accuracy", "knn_species_interval_low", "knn_species_interval_high"),
             ("kNN recorder", "knn_recorder_accuracy", "knn_recorder_interval_low", "knn_recorder_interval_high"),
             ("kNN habitat", "knn_habitat_accuracy", "knn_habitat_interval_low", "knn_habitat_interval_high"),
             ("kNN hour", "knn_hour_accuracy", "knn_hour_interval_low", "knn_hour_interval_high")])),
    ]
    for set_dir in sorted(p for p in (run_dir / "validation").glob("*") if p.is_dir()):
        specs.append(("07", f"{set_dir.name}: every output space on the labelled windows (95% intervals)",
                      set_dir / "scores.csv", _validation_scores))
        specs.append(("07", f"{set_dir.name}: each space against log-mel, paired: difference [95% interval] "
                            "(share of resamples not better)", set_dir / "paired_vs_logmel.csv",
                      lambda f: paired_columns(f, ["space", "pooling"])))
    return specs


def _validation_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """notebook 07's long scores.csv as one row per space and pooling, one column per metric."""
    cells = frame.assign(cell=[with_interval(v, lo, hi) for v, lo, hi in
                               zip(frame["value"], frame["interval_low"], frame["interval_high"])])
    wide = cells.pivot_table(index=["space", "pooling"], columns="metric", values="cell", aggfunc="first",
                             sort=False)
    wide.columns.name = None
    order = [m for m in ("knn_accuracy", "knn_macro_f1", "kmeans_nmi", "kmeans_ari", "kmeans_v_measure")
             if m in wide.columns]
    return wide[order + [c for c in wide.columns if c not in order]].reset_index()


def headline_tables(run_dir: Path) -> dict[str, list[TableInfo]]:
    """{notebook key: its headline tables}, from the CSVs the run holds (missing ones skipped)."""
    tables: dict[str, list[TableInfo]] = {}
    for key, title, path, display in _table_specs(run_dir):
        if not path.is_file():
            continue
        try:
            frame = display(pd.read_csv(path))
        except Exception as error:  # a table the report cannot read is named, never fatal
            logger.warning("could not show %s: %s", path, error)
            continue
        source = os.path.relpath(path, run_dir / REPORT_DIR)
        tables.setdefault(key, []).append(TableInfo(title, source, _render_table(frame)))
    return tables


# ----------------------------------------------------------------------------------------------
# Clusters


@dataclass
class TileCard:
    tile_id: int
    recorder: str
    when: str                  # the tile's time stamp, or its offset in its file
    source: str                # relpath at offset
    distance: float
    thumbnail: str             # relative to the report folder
    clip: str                  # "" when the audio could not be read
    clip_s: float
    gain_db: float | None
    loss_reason: str


@dataclass
class ClusterInfo:
    cluster: int
    n_tiles: int
    audio_h: float
    verdict: str
    median_rms_dbfs: float | None
    median_flatness: float | None
    recorders: list[tuple[str, int]]
    habitats: list[tuple[str, int]]
    hours: list[int] | None            # tiles per hour of day (0-23), None without time stamps
    birdnet: list[tuple[str, float]] | None
    planted: list[tuple[str, float]] | None
    tiles: list[TileCard]

    @property
    def page(self) -> str:
        return f"{CLUSTER_PAGES_DIR}/c{self.cluster:03d}.html"

    @property
    def headline(self) -> str:
        """What the cluster holds in a few words: its top planted label, else BirdNET species."""
        for name, shares in (("planted", self.planted), ("BirdNET", self.birdnet)):
            if shares:
                label, share = shares[0]
                return f"{name}: {label} {share:.0%}"
        return ""


def find_main_space(run_dir: Path, requested: str = "") -> str | None:
    """The clustered space the cluster pages show: `requested`, else the one notebook 04 saved its
    verdicts for (`clusters/<space>/clusters.csv`; the newest if several), else the newest
    clustering. None when the run has no clustering."""
    root = run_dir / "clusters"
    spaces = sorted(p for p in root.glob("*") if (p / "config.json").is_file() and (p / "model.npz").is_file())
    if requested:
        if not (root / requested / "config.json").is_file():
            raise FileNotFoundError(f"no clustering of {requested!r} in {root}; have {[p.name for p in spaces]}")
        return requested
    if not spaces:
        return None
    described = [p for p in spaces if (p / "clusters.csv").is_file()] or spaces
    chosen = max(described, key=lambda p: ((p / "clusters.csv").stat().st_mtime if (p / "clusters.csv").is_file()
                                           else (p / "config.json").stat().st_mtime, p.name))
    if len(spaces) > 1:
        logger.info("cluster pages show %s (the newest of %s)", chosen.name, [p.name for p in spaces])
    return chosen.name


def _shares(labels: pd.Series, top: int, drop: Sequence[str] = ()) -> list[tuple[str, float]]:
    shares = labels.value_counts(normalize=True, sort=True)
    shares = shares.sort_index(kind="stable").sort_values(ascending=False, kind="stable")  # ties: by name
    shares = shares[[label not in drop for label in shares.index]]
    return [(str(label), float(share)) for label, share in shares.head(top).items()]


def _birdnet_name(label: str) -> str:
    """BirdNET's 'Scientific_Common' as 'Common (Scientific)'."""
    scientific, _, common = str(label).partition("_")
    return f"{common} ({scientific})" if common else str(label)


def _planted_labels(manifest: dict[str, Any], index: pd.DataFrame, tile_s: float) -> pd.Series | None:
    archive = manifest.get("archive_dir")
    if not archive or not (Path(archive) / "annotations.csv").is_file():
        return None
    from ..recordings import groundtruth, synth

    truth = groundtruth.tile_ground_truth(synth.read_annotations(archive), index.assign(tile_s=tile_s))
    return truth["label"].reset_index(drop=True)


def _birdnet_labels(run_dir: Path, n_tiles: int) -> pd.Series | None:
    path = run_dir / "birdnet_comparison" / "tile_labels.parquet"
    if not path.is_file():
        return None
    table = pd.read_parquet(path, columns=["tile_id", "pseudo_label"])
    if not np.array_equal(table["tile_id"].to_numpy(), np.arange(n_tiles)):
        logger.warning("%s does not cover the tile store tile for tile: BirdNET shares left out", path)
        return None
    return table["pseudo_label"].astype(str)


def _top_outliers(run_dir: Path, space: str, n_tiles: int, limit: int) -> pd.DataFrame | None:
    """The first `limit` rows of notebook 04's `clusters/<space>/outliers.csv`; None (logged) when
    it is missing, unreadable or names tiles the store lacks."""
    from ..analysis.outliers import OUTLIERS_FILE, read_outliers_table

    path = run_dir / "clusters" / space / OUTLIERS_FILE
    if limit == 0 or not path.is_file():
        return None
    try:
        table = read_outliers_table(path).sort_values("rank", kind="stable").head(limit)
    except Exception as error:  # a table the report cannot read is named, never fatal
        logger.warning("outliers left out of the report: %s", error)
        return None
    if not table["tile_id"].between(0, n_tiles - 1).all():
        logger.warning("%s names tiles outside the tile store's %d: outliers left out", path, n_tiles)
        return None
    return table.reset_index(drop=True)


def _page_clips(run_dir: Path, space: str, store: Any, central: dict[int, np.ndarray], config: ReportConfig,
                report_dir: Path, show_progress: bool) -> pd.DataFrame:
    """Clips and thumbnails of every tile the pages show (central tiles and top outliers), by
    tile_id, cut by the resumable clips stage into `report_dir/clips` as one plan."""
    wanted = {int(t) for rows in central.values() for t in rows}
    outliers = _top_outliers(run_dir, space, len(store.index), config.outlier_tiles)
    if outliers is not None:
        wanted |= set(outliers["tile_id"].astype(int))
    wanted_ids = sorted(wanted)
    clips_dir = report_dir / CLIPS_DIR
    try:
        clips = cut_clips(store.store_dir, wanted_ids, clips_dir, config.clips, show_progress, config.threads)
    except PlanMismatchError as error:   # clips of an earlier clustering or other settings: derived, redone
        logger.warning("redoing the report's clips: %s", error)
        shutil.rmtree(clips_dir)
        clips = cut_clips(store.store_dir, wanted_ids, clips_dir, config.clips, show_progress, config.threads)
    return clips.set_index("tile_id")


def _tile_card(index: pd.DataFrame, clips: pd.DataFrame, tile_id: int, distance: float) -> TileCard:
    tile = index.iloc[tile_id]
    clip = clips.loc[tile_id]
    stamp = tile["timestamp"] if "timestamp" in tile else pd.NaT
    return TileCard(
        tile_id=tile_id, recorder=str(tile["recorder"]),
        when=f"{stamp:%Y-%m-%d %H:%M:%S}" if pd.notna(stamp) else f"+{tile['offset_s']:.1f} s",
        source=f"{tile['relpath']} at {tile['offset_s']:.1f} s", distance=distance,
        thumbnail=f"{CLIPS_DIR}/{clip['thumbnail']}", clip=f"{CLIPS_DIR}/{clip['clip']}" if clip["clip"] else "",
        clip_s=float(clip["clip_s"]), gain_db=None if pd.isna(clip["gain_db"]) else float(clip["gain_db"]),
        loss_reason=str(clip["loss_reason"]))


@dataclass
class OutlierCard:
    rank: int
    score: float               # mean cosine distance to the nearest tiles (notebook 04)
    cluster: int
    planted: str               # the tile's dominant planted label; "" off the synthetic archive
    tile: TileCard


def outlier_cards(run_dir: Path, space: str, manifest: dict[str, Any], config: ReportConfig,
                  report_dir: Path, show_progress: bool = True) -> list[OutlierCard]:
    """The top outliers notebook 04 listed for `space`, most outlying first, each with its clip and
    thumbnail (the same clips stage and plan as the cluster pages); [] when it listed none."""
    from ..analysis.cluster import ClusterResult
    from ..tiles.store import TileStore

    store = TileStore(run_dir / "tiles")
    index = store.index.reset_index(drop=True)
    table = _top_outliers(run_dir, space, len(index), config.outlier_tiles)
    if table is None:
        return []
    result = ClusterResult.load(run_dir / "clusters" / space)
    clips = _page_clips(run_dir, space, store, result.central_indices(config.central_tiles), config, report_dir,
                        show_progress)
    planted = _planted_labels(manifest, index, store.config.tile_s)
    return [OutlierCard(rank=int(row.rank), score=float(row.score), cluster=int(result.labels[int(row.tile_id)]),
                        planted=str(planted.iloc[int(row.tile_id)]) if planted is not None else "",
                        tile=_tile_card(index, clips, int(row.tile_id), float(row.score)))
            for row in table.itertuples()]


def cluster_infos(run_dir: Path, space: str, manifest: dict[str, Any], config: ReportConfig,
                  report_dir: Path, show_progress: bool = True) -> list[ClusterInfo]:
    """Every cluster of `space` with its statistics and its central tiles' clips and thumbnails
    (cut by the resumable clips stage into `report_dir/clips`)."""
    from ..analysis.cluster import ClusterResult
    from ..tiles.store import TileStore

    store = TileStore(run_dir / "tiles")
    index = store.index.reset_index(drop=True)
    result = ClusterResult.load(run_dir / "clusters" / space)
    if len(result) != len(index):
        raise ValueError(f"the clustering of {space} has {len(result)} rows, the tile store {len(index)} tiles: "
                         "they are from different runs of notebooks 02 and 04")
    labels = pd.Series(result.labels)
    central = result.central_indices(config.central_tiles)
    clips = _page_clips(run_dir, space, store, central, config, report_dir, show_progress)

    verdicts = pd.DataFrame()
    described = run_dir / "clusters" / space / "clusters.csv"
    if described.is_file():
        verdicts = pd.read_csv(described).set_index("cluster")
    planted = _planted_labels(manifest, index, store.config.tile_s)
    birdnet = _birdnet_labels(run_dir, len(index))
    hours = index["timestamp"].dt.hour if "timestamp" in index else pd.Series(np.nan, index=index.index)
    hop_s = store.config.tile_hop_s
    infos = []
    for cluster in range(result.n_clusters):
        members = np.flatnonzero(labels.to_numpy() == cluster)
        rows = index.iloc[members]
        row_verdict = verdicts.loc[cluster] if cluster in verdicts.index else None
        cluster_hours = hours.iloc[members].dropna().astype(int)
        cards = [_tile_card(index, clips, int(tile_id), float(result.distances[int(tile_id)]))
                 for tile_id in central[cluster]]
        infos.append(ClusterInfo(
            cluster=cluster, n_tiles=len(members), audio_h=len(members) * hop_s / 3600,
            verdict=str(row_verdict["verdict"]) if row_verdict is not None else "–",
            median_rms_dbfs=float(rows["rms_dbfs"].median()) if len(rows) else None,
            median_flatness=float(rows["spectral_flatness"].median()) if len(rows) else None,
            recorders=[(str(k), int(v)) for k, v in rows["recorder"].value_counts().items()],
            habitats=[(str(k), int(v)) for k, v in rows["habitat"].fillna("unassigned").value_counts().items()],
            hours=np.bincount(cluster_hours, minlength=24).tolist() if len(cluster_hours) else None,
            birdnet=([(_birdnet_name(label) if label != NO_BIRDNET_LABEL else "no confident detection", share)
                      for label, share in _shares(birdnet.iloc[members], config.top_shares)]
                     if birdnet is not None and len(members) else None),
            planted=(_shares(planted.iloc[members], config.top_shares)
                     if planted is not None and len(members) else None),
            tiles=cards))
    return infos


# ----------------------------------------------------------------------------------------------
# Rendering


def _environment():
    import jinja2
    import markupsafe

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("soundscape_ssl.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    environment.filters["number"] = _number
    environment.filters["duration"] = duration_text
    environment.filters["percent"] = lambda share: f"{share:.0%}"
    environment.filters["markup"] = markupsafe.Markup   # tables pandas rendered with escape=True
    return environment


@dataclass
class ReportSummary:
    report_dir: Path
    index: Path
    n_clusters: int
    n_clips: int
    n_bytes: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "report_dir": str(self.report_dir), "index": str(self.index)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_report(run_dir: str | os.PathLike, config: ReportConfig | None = None,
                 show_progress: bool = True) -> ReportSummary:
    """Write `run_dir/report/` (module docstring); returns what was built. Rerunning rebuilds the
    pages and reuses the finished clips."""
    started = time.perf_counter()
    config = config or ReportConfig()
    run_dir = Path(run_dir).resolve()
    manifest = read_manifest(run_dir)
    report_dir = run_dir / REPORT_DIR
    (report_dir / CLUSTER_PAGES_DIR).mkdir(parents=True, exist_ok=True)

    notebooks = notebook_infos(run_dir, manifest)
    by_key = {info.key: info for info in notebooks}
    loose: list[FigureInfo] = []
    for figure in figure_infos(run_dir):
        owner = by_key.get(catalogue.notebook_key(figure.name))
        (owner.figures if owner else loose).append(figure)
    for key, tables in headline_tables(run_dir).items():
        if key in by_key:
            by_key[key].tables.extend(tables)

    space = find_main_space(run_dir, config.space)
    clusters: list[ClusterInfo] = []
    outliers: list[OutlierCard] = []
    cluster_note = ""
    if space is None:
        cluster_note = "This run has no clustering (notebook 04 did not run): no cluster pages."
    elif not (run_dir / "tiles" / "config.json").is_file():
        cluster_note = f"The tile store is missing: no cluster pages for {space}."
        space = None
    else:
        clusters = cluster_infos(run_dir, space, manifest, config, report_dir, show_progress)
        outliers = outlier_cards(run_dir, space, manifest, config, report_dir, show_progress)

    environment = _environment()
    profile = Path(str(manifest.get("profile", ""))).stem
    environment_report = manifest.get("environment", {})
    context = dict(
        run_id=manifest.get("run_id", run_dir.name), profile=profile, profile_path=manifest.get("profile", ""),
        git_sha=environment_report.get("git_sha") or "unknown", git_dirty=environment_report.get("git_dirty"),
        manifest=manifest, notebooks=notebooks, loose_figures=loose, space=space, clusters=clusters,
        cluster_note=cluster_note, config=config, outliers=outliers, cluster_pages_dir=CLUSTER_PAGES_DIR,
        hardware={key: value for key, value in {
            "machine": f"{environment_report.get('hardware', {}).get('cpu_count', '?')} CPU cores, "
                       f"{'CUDA' if environment_report.get('hardware', {}).get('cuda_available') else 'no GPU'}",
            "torch": environment_report.get("packages", {}).get("torch")}.items() if value},
        verdicts=pd.Series([c.verdict for c in clusters]).value_counts().to_dict() if clusters else {})
    shutil.copyfile(Path(__file__).with_name("templates") / "style.css", report_dir / "style.css")
    atomic_write_text(report_dir / "index.html",
                      environment.get_template("index.html.j2").render(**context, root=""))
    if clusters:
        by_size = sorted(clusters, key=lambda c: (-c.n_tiles, c.cluster))
        atomic_write_text(report_dir / "overview.html",
                          environment.get_template("overview.html.j2").render(**context, root="", ordered=by_size))
        cluster_template = environment.get_template("cluster.html.j2")
        written = {report_dir / info.page for info in clusters}
        for stale in (report_dir / CLUSTER_PAGES_DIR).glob("c*.html"):   # pages of an earlier clustering
            if stale not in written:
                stale.unlink()
        for position, info in enumerate(clusters):
            previous = clusters[position - 1] if position > 0 else None
            following = clusters[position + 1] if position + 1 < len(clusters) else None
            atomic_write_text(report_dir / info.page, cluster_template.render(
                **context, root="../", info=info, previous=previous, following=following))
    if outliers:
        atomic_write_text(report_dir / OUTLIERS_PAGE,
                          environment.get_template("outliers.html.j2").render(**context, root=""))
    elif (report_dir / OUTLIERS_PAGE).is_file():   # the page of an earlier run of notebook 04
        (report_dir / OUTLIERS_PAGE).unlink()
    n_clips = len({t.tile_id for t in [*(t for c in clusters for t in c.tiles), *(o.tile for o in outliers)]
                   if t.clip})
    summary = ReportSummary(report_dir, report_dir / "index.html", len(clusters), n_clips, 0,
                            round(time.perf_counter() - started, 2))
    summary.n_bytes = folder_bytes(report_dir)
    atomic_write_text(report_dir / "report.json", json.dumps(
        {**summary.as_dict(), "space": space, "config": dataclasses.asdict(config)}, indent=2) + "\n")
    logger.info("report: %s (%d clusters, %d clips, %.1f MB, %.1f s)", summary.index, summary.n_clusters,
                n_clips, summary.n_bytes / 1e6, summary.wall_s)
    return summary
