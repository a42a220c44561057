"""The page of one search by example (`soundscape-ssl search`): the query and its nearest tiles,
each a spectrogram thumbnail with an audio player, in the report's style.

    <out_dir>/index.html     the query (its span as heard and seen), then the hits best first:
                             rank, similarity, recorder, time, file and offset
    <out_dir>/query.ogg/png  the query's span, cut and levelled as the tiles' clips are
    <out_dir>/clips/         the hits' clips and thumbnails (`report.clips`, resumable)
    <out_dir>/style.css

Clips are made by the report's own clip stage and the page is rendered by its templates
(autoescaped), so a search page plays and looks like a cluster page.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import soundfile as sf

from ..analysis.embed import audio_tiles_db
from ..analysis.search import query_span
from ..core.stage import PlanMismatchError, atomic_write_text
from ..tiles.store import TileStore
from .clips import AUDIO_FORMATS, ClipConfig, cut_clips, prepare_clip, read_tile_audio
from .site import _environment
from .tile_plots import TileThumbnails

CLIPS_DIR = "clips"
PAGE_FILE = "index.html"


@dataclass
class HitCard:
    rank: int
    tile_id: int
    similarity: float
    recorder: str
    when: str
    source: str
    thumbnail: str
    clip: str                 # "" when the audio could not be read
    gain_db: float | None
    loss_reason: str


def _query_media(query: str, offset_s: float, store: TileStore, out_dir: Path, config: ClipConfig
                 ) -> tuple[str, str, str]:
    """(clip, thumbnail, why there is no clip) of the query's span, written into `out_dir`."""
    with query_span(store.config, query, offset_s) as (path, on_grid_s):
        return _span_media(str(path), on_grid_s, store, out_dir, config)


def _span_media(query: str, offset_s: float, store: TileStore, out_dir: Path, config: ClipConfig
                ) -> tuple[str, str, str]:
    """`_query_media` of a span on the file's tile grid (`offset_s` a multiple of tile_hop_s)."""
    thumbnail = ""
    _, tiles_db, _ = audio_tiles_db(query, store.config, [offset_s])
    if len(tiles_db):
        thumbnail = "query.png"
        TileThumbnails(store.config, dpi=config.thumbnail_dpi).write_png(
            tiles_db[0].astype("float32"), out_dir / thumbnail, title="query")
    audio_of, lost = read_tile_audio(query, [offset_s], store.config)
    if 0 not in audio_of:
        return "", thumbnail, lost.get(0, "no audio")
    sound_format, subtype, suffix = AUDIO_FORMATS[config.audio_format]
    clip, _, _ = prepare_clip(audio_of[0], store.config.sample_rate_hz, config)
    sf.write(out_dir / f"query{suffix}", clip, store.config.sample_rate_hz, format=sound_format, subtype=subtype)
    return f"query{suffix}", thumbnail, ""


def write_search_page(run_dir: str | os.PathLike, hits: pd.DataFrame, record: dict[str, Any],
                      out_dir: str | os.PathLike, config: ClipConfig | None = None, threads: int = 2,
                      show_progress: bool = False) -> Path:
    """`out_dir/index.html` for the hits of one search (`analysis.search.SearchResult.table` and
    `.record()`); returns its path."""
    config = config or ClipConfig()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = TileStore(run_dir / "tiles")
    clips_dir = out_dir / CLIPS_DIR
    tile_ids = [int(t) for t in hits["tile_id"]]
    try:
        clips = cut_clips(store.store_dir, tile_ids, clips_dir, config, show_progress, threads)
    except PlanMismatchError:   # clips of an earlier search into the same folder: derived, redone
        shutil.rmtree(clips_dir)
        clips = cut_clips(store.store_dir, tile_ids, clips_dir, config, show_progress, threads)
    clips = clips.set_index("tile_id")
    cards = []
    for hit in hits.itertuples(index=False):
        clip = clips.loc[int(hit.tile_id)]
        stamp = pd.Timestamp(hit.time) if pd.notna(hit.time) else None
        cards.append(HitCard(
            rank=int(hit.rank), tile_id=int(hit.tile_id), similarity=float(hit.similarity),
            recorder=str(hit.recorder), when=f"{stamp:%Y-%m-%d %H:%M:%S}" if stamp is not None else "",
            source=f"{hit.file} at {hit.offset_s:.1f} s" + (
                f", best match at {hit.match_offset_s:.2f} s" if "match_offset_s" in hits else ""),
            thumbnail=f"{CLIPS_DIR}/{clip['thumbnail']}",
            clip=f"{CLIPS_DIR}/{clip['clip']}" if clip["clip"] else "",
            gain_db=None if pd.isna(clip["gain_db"]) else float(clip["gain_db"]),
            loss_reason=str(clip["loss_reason"])))
    query_clip, query_thumbnail, query_loss = _query_media(record["query"], float(record["offset_s"]), store,
                                                           out_dir, config)
    shutil.copyfile(Path(__file__).with_name("templates") / "style.css", out_dir / "style.css")
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    environment = manifest.get("environment", {})
    page = _environment().get_template("search.html.j2").render(
        # no cluster or outlier links in the top bar: this page lives outside the run's report
        root="", run_id=manifest.get("run_id", run_dir.name), clusters=[], outliers=[],
        profile=Path(str(manifest.get("profile", ""))).stem or "unknown",
        git_sha=environment.get("git_sha") or "unknown", git_dirty=environment.get("git_dirty"),
        record=record, cards=cards, query_clip=query_clip, query_thumbnail=query_thumbnail,
        query_loss=query_loss, config=config, query_name=Path(record["query"]).name,
        best=max((c.similarity for c in cards), default=math.nan))
    atomic_write_text(out_dir / PAGE_FILE, page)
    return out_dir / PAGE_FILE
