"""The run report: its tables and cluster data, and its pages opened in a real browser.

The browser tests open the smoke run's report in headless Chromium (Debian's `chromium`, driven by
playwright) and fail on any console error, failed request, broken image or link, and on any
`<audio>` whose source is missing or does not play. Each saves a screenshot under the pytest tmp
folder (`<basetemp>/report-screenshots0/`), printed in the test's output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.report import catalogue, site

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Tables and data, without a browser


def test_notebook_heading_reads_the_title_and_the_bold_question() -> None:
    source = "# 04 · Embeddings\n\n**Sorting millions of tiles\nby what they contain.** Every tile ..."
    assert site.notebook_heading(source) == ("04 · Embeddings", "Sorting millions of tiles by what they contain.")
    assert site.notebook_heading("no heading") == ("", "")


def test_scores_are_shown_with_their_intervals() -> None:
    frame = pd.DataFrame({"output_space": ["a", "b"], "nmi": [0.5, np.nan], "nmi_interval_low": [0.4, np.nan],
                          "nmi_interval_high": [0.61, np.nan], "ari": [0.1, 0.2]})
    shown = site.score_columns(frame, ["output_space"], [("NMI", "nmi", "nmi_interval_low", "nmi_interval_high"),
                                                         ("ARI", "ari", None, None), ("gone", "x", None, None)])
    assert shown.to_dict("list") == {"output_space": ["a", "b"], "NMI": ["0.500 [0.400, 0.610]", "–"],
                                     "ARI": ["0.100", "0.200"]}
    paired = pd.DataFrame({"output_space": ["a", "a"], "metric": ["nmi", "ari"], "difference": [0.05, -0.01],
                           "interval_low": [0.0, -0.03], "interval_high": [0.08, 0.02],
                           "share_not_better": [0.02, 0.7]})
    assert site.paired_columns(paired, ["output_space"]).to_dict("list") == {
        "output_space": ["a"], "nmi": ["+0.050 [+0.000, +0.080] (0.02)"], "ari": ["-0.010 [-0.030, +0.020] (0.70)"]}


def test_the_main_space_is_the_one_notebook_04_described(tmp_path) -> None:
    root = tmp_path / "clusters"
    assert site.find_main_space(tmp_path) is None
    for name in ("dino_mean", "vicreg_band"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        (root / name / "model.npz").write_bytes(b"")
    (root / "vicreg_band" / "clusters.csv").write_text("cluster,verdict\n")
    assert site.find_main_space(tmp_path) == "vicreg_band"
    assert site.find_main_space(tmp_path, "dino_mean") == "dino_mean"
    with pytest.raises(FileNotFoundError, match="no clustering of 'mae_cls'"):
        site.find_main_space(tmp_path, "mae_cls")


def test_figures_get_their_catalogue_entry_or_their_saved_title(tmp_path) -> None:
    figures = tmp_path / "figures"
    figures.mkdir()
    for name in ("04_map_panels", "05_masks_dino", "08_new_thing"):
        (figures / f"{name}.png").write_bytes(b"png")
    (figures / "08_new_thing.json").write_text(json.dumps({"title": "Something new · run r1"}))
    shown = {f.name: f for f in site.figure_infos(tmp_path)}
    assert shown["05_masks_dino"].question == catalogue.entry_for("05_masks_*").question
    assert shown["04_map_panels"].png == "../figures/04_map_panels.png" and shown["04_map_panels"].pdf is None
    assert (shown["08_new_thing"].caption, shown["08_new_thing"].catalogued) == ("Something new · run r1", False)


@pytest.mark.slow
def test_every_figure_of_the_smoke_run_is_in_the_catalogue(smoke_run: Path) -> None:
    """Each figure a notebook saves has a question and a caption (report/catalogue.py), and every
    published name is one a run makes."""
    names = sorted(p.stem for p in (smoke_run / "figures").glob("*.png"))
    assert [name for name in names if catalogue.entry_for(name) is None] == []
    assert all(catalogue.entry_for(name) for name in catalogue.PUBLISHED)


@pytest.mark.slow
def test_the_smoke_report_describes_every_cluster(smoke_run: Path) -> None:
    report = smoke_run / "report"
    summary = json.loads((report / "report.json").read_text())
    space = summary["space"]
    verdicts = pd.read_csv(smoke_run / "clusters" / space / "clusters.csv")
    pages = sorted((report / "clusters").glob("c*.html"))
    assert len(pages) == summary["n_clusters"] == len(verdicts)
    clips = pd.read_csv(report / "clips" / "clips.csv", keep_default_na=False)
    assert summary["n_clips"] == (clips["clip"] != "").sum() > 0
    first = pages[0].read_text()
    assert f"{verdicts['n_tiles'].iloc[0]} tiles" in first and "planted labels" in first   # synthetic archive
    assert "BirdNET pseudo-labels" in first                                                 # notebook 06 ran
    index = (report / "index.html").read_text()
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f'href="../notebooks/{path.stem}.html"' in index
    for png in (smoke_run / "figures").glob("*.png"):
        assert f'src="../figures/{png.name}"' in index


def _run_with_outliers(stage_inputs, tmp_path) -> tuple[Path, list[int], dict[int, list[int]]]:
    """A run folder on the small stage store: a clustering of a hand-made embedding with one planted
    outlier (row 5) and notebook 04's outliers.csv; returns (run, outlier tile ids, central ids)."""
    from soundscape_ssl.analysis import cluster, outliers
    from soundscape_ssl.tiles.store import TileStore

    run = tmp_path / "run"
    shutil.copytree(stage_inputs["store"], run / "tiles")
    index = TileStore(run / "tiles").index
    rng = np.random.default_rng(0)
    embeddings = np.repeat(np.eye(4)[:3] * 5.0, -(-len(index) // 3), axis=0)[:len(index)]
    embeddings = embeddings + 0.2 * rng.standard_normal(embeddings.shape)
    embeddings[5] = [0.0, 0.0, 0.0, 5.0]
    result = cluster.fit_clusters(embeddings, cluster.ClusterConfig(n_clusters=3, seed=0), progress=False)
    result.save(run / "clusters" / "toy_mean")
    ranked = outliers.outlier_scores(embeddings, outliers.OutlierConfig(n_neighbors=3), show_progress=False)
    table = outliers.top_outliers_table(ranked, index, n=10)
    table.to_csv(run / "clusters" / "toy_mean" / outliers.OUTLIERS_FILE, index=False)
    (run / "manifest.json").write_text(json.dumps({"run_id": "toy", "notebooks": []}))
    central = {c: [int(t) for t in rows] for c, rows in result.central_indices(2).items()}
    return run, table["tile_id"].head(4).tolist(), central


def test_the_report_lists_the_top_outliers_with_their_audio(stage_inputs, tmp_path) -> None:
    run, top, central = _run_with_outliers(stage_inputs, tmp_path)
    assert top[0] == 5
    config = site.ReportConfig(central_tiles=2, overview_tiles=1, outlier_tiles=4)
    summary = site.build_report(run, config, show_progress=False)
    page = (run / "report" / site.OUTLIERS_PAGE).read_text()
    clips = pd.read_csv(run / "report" / "clips" / "clips.csv", keep_default_na=False).set_index("tile_id")
    # One clips plan for both kinds of page: central tiles and outliers, each cut once.
    assert set(clips.index) == set(top) | {t for rows in central.values() for t in rows}
    assert summary.n_clips == (clips["clip"] != "").sum()
    positions = [page.index(f"<b>#{rank}</b> · tile {tile} ·") for rank, tile in enumerate(top, start=1)]
    assert positions == sorted(positions) and "#5</b>" not in page          # most outlying first, four of ten
    for tile in top:
        clip = clips.loc[tile, "clip"]
        assert clip and f'src="clips/{clip}"' in page and (run / "report" / "clips" / clip).is_file()
    assert 'href="outliers.html"' in (run / "report" / "index.html").read_text()
    # Without notebook 04's table the page goes, and nothing links to it.
    (run / "clusters" / "toy_mean" / "outliers.csv").unlink()
    site.build_report(run, config, show_progress=False)
    assert not (run / "report" / site.OUTLIERS_PAGE).exists()
    assert "outliers.html" not in (run / "report" / "index.html").read_text()


# --------------------------------------------------------------------------------------------
# In a real browser


def _chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: "
                                   "pip install -e '.[test]'")
    executable = _chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` (apt-get install chromium), "
                    "as .ci/run does")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root; the autoplay flag lets the test play each clip muted.
        chromium = playwright.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield chromium
        chromium.close()


def _local_path(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def inspect_page(browser, page_path: Path, screenshot: Path | None = None) -> dict:
    """Open `page_path` and list what is wrong: console errors, page errors, failed requests,
    images that did not load, links to files that do not exist or to missing anchors, and
    <audio> elements that do not play. Plays every clip (muted) to prove it decodes."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(30_000)
    problems: dict[str, list] = {"console": [], "requests": [], "images": [], "links": [], "audio": []}
    page.on("console", lambda message: message.type == "error" and problems["console"].append(message.text))
    page.on("pageerror", lambda error: problems["console"].append(str(error)))
    page.on("requestfailed", lambda request: problems["requests"].append(f"{request.url}: {request.failure}"))
    page.goto(page_path.resolve().as_uri())
    page.wait_for_load_state("load")
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(img => img.loading = 'eager')")
    page.wait_for_function("() => [...document.images].every(img => img.complete)", timeout=30_000)
    problems["images"] = page.evaluate(
        "() => [...document.images].filter(img => !(img.naturalWidth > 0)).map(img => img.src)")
    for link in page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)"):
        parsed = urlparse(link)
        if parsed.scheme != "file":
            problems["links"].append(f"not a relative link: {link}")
        elif not _local_path(link).exists():
            problems["links"].append(f"missing file: {link}")
        elif parsed.fragment and _local_path(link) == page_path.resolve():
            if not page.evaluate("id => !!document.getElementById(id)", parsed.fragment):
                problems["links"].append(f"missing anchor: {link}")
    # Each clip is played muted for a moment: proof that its source exists and decodes. play() on
    # an element without a usable source may never settle, so every wait has a deadline.
    audio_results = page.evaluate("""async () => {
        const deadline = (ms) => new Promise((_, reject) => setTimeout(() => reject(new Error('timed out')), ms));
        const results = [];
        for (const audio of document.querySelectorAll('audio')) {
            const src = audio.currentSrc || audio.src || (audio.querySelector('source') || {}).src || '';
            audio.muted = true;
            let played = false, why = '';
            try {
                await Promise.race([audio.play(), deadline(5000)]);
                const advanced = new Promise(resolve => {
                    const check = () => (audio.currentTime > 0 || audio.ended) ? resolve() : setTimeout(check, 50);
                    check();
                });
                await Promise.race([advanced, deadline(5000)]);
                played = audio.currentTime > 0;
                audio.pause();
            } catch (error) { why = String(error); }
            results.push({src, played, why, duration: audio.duration,
                          error: audio.error ? audio.error.code + ' ' + audio.error.message : ''});
        }
        return results;
    }""")
    for result in audio_results:
        if not result["src"] or not result["played"] or result["error"]:
            problems["audio"].append(result)
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    problems["n_audio"] = len(audio_results)
    problems["durations"] = [r["duration"] for r in audio_results]
    return problems


def _clean(problems: dict) -> dict:
    return {key: value for key, value in problems.items() if key in ("console", "requests", "images", "links",
                                                                     "audio") and value}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-screenshots")


def test_the_checker_sees_every_kind_of_breakage(browser, tmp_path) -> None:
    """A page with one of each fault: the inspection must report each (so a clean report is clean)."""
    (tmp_path / "real.png").write_bytes(b"not really a png")
    (tmp_path / "noise.ogg").write_bytes(b"not really ogg")
    page = tmp_path / "broken.html"
    page.write_text("""<!DOCTYPE html><html><body>
        <img src="real.png"><img src="missing.png">
        <a href="nowhere.html">a</a><a href="#no-such-anchor">b</a><a href="https://example.org/">c</a>
        <audio controls src="noise.ogg"></audio><audio controls src="absent.ogg"></audio><audio controls></audio>
        <script>console.error("boom")</script></body></html>""")
    problems = inspect_page(browser, page)
    assert any("boom" in text for text in problems["console"])
    assert len(problems["images"]) == 2
    assert len(problems["links"]) == 3
    assert len(problems["audio"]) == 3


@pytest.mark.slow
def test_the_report_index_opens_cleanly_in_chromium(smoke_run: Path, browser, screenshots: Path) -> None:
    screenshot = screenshots / "index.png"
    problems = inspect_page(browser, smoke_run / "report" / "index.html", screenshot)
    print(f"\nscreenshot of the report's index: {screenshot}")
    assert _clean(problems) == {}
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_cluster_page_plays_every_clip_in_chromium(smoke_run: Path, browser, screenshots: Path) -> None:
    clips = pd.read_csv(smoke_run / "report" / "clips" / "clips.csv", keep_default_na=False)
    page = sorted((smoke_run / "report" / "clusters").glob("c*.html"))[0]
    screenshot = screenshots / f"cluster-{page.stem}.png"
    problems = inspect_page(browser, page, screenshot)
    print(f"\nscreenshot of cluster page {page.name}: {screenshot}")
    assert _clean(problems) == {}
    n_audio = page.read_text().count("<audio ")
    assert problems["n_audio"] == n_audio > 0
    assert all(abs(d - clips["clip_s"].max()) < 0.05 for d in problems["durations"])   # 3 s clips
    overview = inspect_page(browser, smoke_run / "report" / "overview.html", screenshots / "overview.png")
    assert _clean(overview) == {}
