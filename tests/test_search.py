"""Search by example: the brute-force kernel on hand-made embeddings with known neighbours, chunked
top-k against a full sort, and `soundscape-ssl search` on a tiny run (the query cut from a tile of
the store finds that tile first, with similarity 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from soundscape_ssl.analysis import search
from soundscape_ssl.analysis.embed import EmbedConfig, embed_store
from soundscape_ssl.pipeline.cli import main as cli_main
from soundscape_ssl.tiles.store import TileStore


def full_sort_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, standardize: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every similarity at once (float64), fully sorted, ties by row."""
    x, q = embeddings.astype(np.float64), queries.astype(np.float64)
    if standardize:
        scaler = StandardScaler().fit(x)
        x, q = scaler.transform(x), scaler.transform(q)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ x.T
    rows = np.arange(len(x))
    order = np.stack([np.lexsort((rows, -s))[:k] for s in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def test_hand_made_neighbours_come_back_in_order_of_angle():
    # unit vectors at known angles from the query (1, 0): 0, 10, 30, 60, 90, 180 degrees, shuffled
    angles_deg = np.array([60.0, 0.0, 180.0, 10.0, 90.0, 30.0])
    embeddings = np.stack([np.cos(np.radians(angles_deg)), np.sin(np.radians(angles_deg))], axis=1)
    embeddings *= np.array([[2.0], [0.5], [1.0], [3.0], [1.0], [7.0]])   # length must not matter
    rows, similarity = search.top_k_cosine(embeddings.astype(np.float32), np.array([[1.0, 0.0]]), k=4,
                                           chunk_rows=2)
    assert rows.tolist() == [[1, 3, 5, 0]]
    np.testing.assert_allclose(similarity[0], np.cos(np.radians([0.0, 10.0, 30.0, 60.0])), atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 999, 1000, 5000])
@pytest.mark.parametrize("standardize", [False, True])
def test_chunked_top_k_equals_a_full_sort(chunk_rows, standardize):
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(1000, 24)).astype(np.float32) + np.linspace(0, 3, 24, dtype=np.float32)
    embeddings[500:520] = embeddings[10]          # twenty exact ties with row 10, across chunks
    queries = np.concatenate([embeddings[[10, 777]], rng.normal(size=(3, 24)).astype(np.float32)])
    mean, scale = search.embedding_scaler(embeddings, chunk_rows) if standardize else (None, None)
    rows, similarity = search.top_k_cosine(embeddings, queries, k=50, chunk_rows=chunk_rows, mean=mean,
                                           scale=scale)
    expected_rows, expected_similarity = full_sort_top_k(embeddings, queries, 50, standardize)
    np.testing.assert_allclose(similarity, expected_similarity, atol=2e-5)
    # the same rows, in the same order, except where float32 and float64 round a near-tie apart
    assert (rows == expected_rows).mean() > 0.98
    assert rows[0, :21].tolist() == [10, *range(500, 520)]   # the ties, in row order, whatever the chunks
    assert rows[1, 0] == 777 and similarity[1, 0] == pytest.approx(1.0, abs=1e-5)


def test_the_scaler_is_scikit_learns_and_k_larger_than_the_rows_returns_them_all():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(3.0, 2.0, size=(257, 5)).astype(np.float32)
    embeddings[:, 4] = 1.5                       # a constant dimension: scale 1, as StandardScaler
    mean, scale = search.embedding_scaler(embeddings, chunk_rows=10)
    scaler = StandardScaler().fit(embeddings.astype(np.float64))
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-6)
    np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-5)
    rows, _ = search.top_k_cosine(embeddings[:4], embeddings[:1], k=10)
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3] and rows[0, 0] == 0


def test_rows_that_are_not_finite_are_never_hits_before_finite_ones():
    embeddings = np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
    rows, similarity = search.top_k_cosine(embeddings, np.array([[1.0, 0.1]]), k=2, chunk_rows=3)
    assert rows.tolist() == [[0, 2]]
    assert np.isfinite(similarity).all()
    with pytest.raises(ValueError, match="dimensions"):
        search.top_k_cosine(embeddings, np.ones((1, 3)), k=1)


def test_an_ivf_index_probing_every_list_is_exact_and_the_statistics_are_kept(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    embeddings = (rng.normal(size=(400, 16)) + rng.normal(size=(8, 16))[rng.integers(8, size=400)]).astype(np.float32)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    mean, scale = search.embedding_scaler(embeddings)
    statistics = search.SpaceStatistics(mean, scale, search.standardised_row_norms(embeddings, mean, scale))
    index = search.build_ivf_index(embeddings, statistics, chunk_rows=64)
    assert index.nlist == 20 and index.ntotal == 400
    exact_rows, exact_similarity = search.top_k_cosine(embeddings, queries, 10, 64, mean, scale, statistics.norms)
    rows, similarity = search.ivf_top_k(index, queries, 10, statistics, nprobe=index.nlist)
    assert rows.tolist() == exact_rows.tolist()
    np.testing.assert_allclose(similarity, exact_similarity, atol=1e-5)
    few_rows, _ = search.ivf_top_k(index, queries, 10, statistics, nprobe=1)     # approximate: a subset
    assert few_rows.shape[1] <= 10 and set(few_rows[0].tolist()) <= set(range(400))


def test_space_statistics_are_kept_and_made_again_when_the_rows_change(tmp_path):
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig

    rows_path = tmp_path / "rows.npy"
    np.save(rows_path, np.arange(12, dtype=np.float32).reshape(4, 3) ** 1.5)
    space = search.SearchSpace("toy", np.load(rows_path, mmap_mode="r"), None, None, SpectrogramConfig(),
                               rows_path, tmp_path)
    config = search.SearchConfig()
    first = search.space_statistics(space, config)
    mean, scale = search.embedding_scaler(np.load(rows_path))
    np.testing.assert_allclose(first.mean, mean)
    np.testing.assert_allclose(first.norms, np.linalg.norm((np.load(rows_path) - mean) / scale, axis=1), rtol=1e-6)
    kept = tmp_path / "search" / "spaces" / "toy.stats.npz"
    assert kept.is_file()
    np.testing.assert_array_equal(search.space_statistics(space, config).norms, first.norms)
    np.save(rows_path, np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None])   # other rows
    space.embeddings = np.load(rows_path, mmap_mode="r")
    again = search.space_statistics(space, config)
    np.testing.assert_allclose(again.mean, [1.5, 1.5, 1.5])
    raw = search.space_statistics(space, search.SearchConfig(standardize=False))
    assert raw.mean is None and (tmp_path / "search" / "spaces" / "toy-raw.stats.npz").is_file()
    np.testing.assert_allclose(raw.norms, np.sqrt(3) * np.arange(4), rtol=1e-6)


def test_precision_at_k_drops_the_query_tiles_and_counts_the_label():
    labels = ["a", "a", "b", "a", "b", "a"]
    assert search.precision_at_k([0, 1, 2, 3], labels, "a", excluded=[0], k=2) == pytest.approx(0.5)
    assert search.precision_at_k([0, 1, 3, 5], labels, "a", excluded=[0], k=3) == pytest.approx(1.0)
    assert search.precision_at_k([2, 4], labels, "a", k=50) == 0.0
    assert np.isnan(search.precision_at_k([0], labels, "a", excluded=[0]))
    index = pd.DataFrame({"relpath": ["f", "f", "f", "g"], "offset_s": [0.0, 3.0, 6.0, 3.0]})
    assert search.overlapping_tiles(index, "f", 4.0, 7.0, tile_s=3.0).tolist() == [1, 2]
    assert search.overlapping_tiles(index, "f", 3.0, 6.0, tile_s=3.0).tolist() == [1]


def _two_row_space(tmp_path: Path, rows: np.ndarray, name: str = "toy_band", pooling: str = "band"):
    """A hand-made "band"-pooled space: 2 frequency rows (mel bins 0-63, 64-127) of 3 dimensions."""
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig

    rows_path = tmp_path / f"{name}.npy"
    np.save(rows_path, rows.astype(np.float32))
    return search.SearchSpace(name, np.load(rows_path, mmap_mode="r"), None, pooling, SpectrogramConfig(),
                              rows_path, tmp_path, frequency_rows=2)


def test_a_band_names_its_mel_bins_and_the_columns_that_describe_them(tmp_path):
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig, mel_bin_centres_hz

    config = SpectrogramConfig()                                  # 128 mel bins, 50-15,000 Hz
    centres = mel_bin_centres_hz(config)
    between = ((centres[10] + centres[11]) / 2, (centres[12] + centres[13]) / 2)
    assert search.band_mel_bins(between, config).tolist() == [10, 11, 12, 13]
    assert search.band_mel_bins((centres[20], centres[22]), config).tolist() == [20, 21, 22]
    narrow = (centres[30] + 1.0, centres[30] + 2.0)              # inside one bin's spacing
    assert search.band_mel_bins(narrow, config).tolist() == [30, 31]
    logmel = search.SearchSpace(search.LOGMEL_SPACE, np.zeros((3, 256), np.float32), None, None, config,
                                tmp_path / "x.npy", tmp_path)
    assert search.band_columns(logmel, between).tolist() == [10, 11, 12, 13, 138, 139, 140, 141]
    banded = _two_row_space(tmp_path, np.zeros((3, 6)))
    assert search.band_columns(banded, between).tolist() == [0, 1, 2]                 # row 0 only
    assert search.band_columns(banded, (centres[62], centres[65])).tolist() == list(range(6))
    assert search.band_columns(banded, (centres[100], 14000.0)).tolist() == [3, 4, 5]
    with pytest.raises(search.SearchInputError, match="pools every frequency together"):
        search.band_columns(_two_row_space(tmp_path, np.zeros((3, 6)), "toy_mean", "mean"), between)
    with pytest.raises(search.SearchInputError, match="outside the tiles' 50-15000 Hz"):
        search.band_mel_bins((16000.0, 17000.0), config)
    for bad in [(2000.0, 1000.0), (-5.0, 100.0), (float("nan"), 10.0)]:
        with pytest.raises(search.SearchInputError, match="0 <= LOW < HIGH"):
            search.SearchConfig(band_hz=bad)
    with pytest.raises(search.SearchInputError, match="a band search is exact"):
        search.SearchConfig(band_hz=(1000.0, 2000.0), index="ivf")


def test_a_band_search_finds_the_call_that_a_louder_sound_elsewhere_hides(tmp_path):
    """The query holds call A low and a loud noise X high. In the whole vector the tile with
    another call B beside the same noise is nearest; in the call's band the tile with A is."""
    rows = np.array([
        [1, 0, 0, 0, 1, 0],     # 0: call A, something quiet high up
        [0, 1, 0, 0, 0, 5],     # 1: call B, the loud noise X
        [0, 0, 1, 1, 0, 0],     # 2: something else in both rows
    ])
    space = _two_row_space(tmp_path, rows)
    query = np.array([[1, 0, 0, 0, 0, 5]], np.float32)
    config = search.SearchConfig(k=3, standardize=False)
    whole, _ = search.nearest(space, query, 3, config)
    assert whole[0, 0] == 1
    low_band = (500.0, 1000.0)                                    # mel bins of row 0
    assert search.band_columns(space, low_band).tolist() == [0, 1, 2]
    banded, similarity = search.nearest(space, query, 3, search.SearchConfig(k=3, standardize=False,
                                                                             band_hz=low_band))
    assert banded[0].tolist() == [0, 1, 2] and similarity[0, 0] == pytest.approx(1.0)
    assert similarity[0, 1] == pytest.approx(0.0) and similarity[0, 2] == pytest.approx(0.0)
    standardised, _ = search.nearest(space, query, 3, search.SearchConfig(k=3, band_hz=low_band))
    assert standardised[0, 0] == 0            # standardised with the whole space's scaler, row 0 still first


# ----------------------------------------------------------------------------------------------
# The command on a tiny run


@pytest.fixture(scope="module")
def tiny_run(stage_inputs, tmp_path_factory) -> Path:
    """A run folder: the shared tiny tile store and its 'trained' (untrained) checkpoint's
    embeddings, laid out as notebooks 02 and 04 lay them out."""
    run_dir = tmp_path_factory.mktemp("search_run") / "run"
    shutil.copytree(stage_inputs["store"], run_dir / "tiles")
    (run_dir / "pretrain" / "mae").mkdir(parents=True)
    checkpoint = shutil.copyfile(stage_inputs["checkpoint"], run_dir / "pretrain" / "mae" / "checkpoint.pth")
    embed_store(run_dir / "tiles", checkpoint, run_dir / "embeddings" / "mae",
                EmbedConfig(pooling="all", device="cpu", num_workers=0, batch_size=8), rank=0, world_size=1,
                show_progress=False)
    return run_dir


@pytest.mark.parametrize("space", ["mae_band", "mae_mean", "logmel_stats", "mae_mean ivf"])
def test_a_query_cut_from_a_tile_finds_that_tile_first(tiny_run, stage_inputs, space, capsys):
    space, _, index_kind = space.partition(" ")
    if index_kind:
        pytest.importorskip("faiss")
    index = TileStore(tiny_run / "tiles").index
    tile = index[(index["relpath"] == "R2/R2_20190522_000000.wav") & (index["offset_s"] == 2.0)].iloc[0]
    out_csv = tiny_run / "out" / f"{space}{index_kind}.csv"
    code = cli_main(["search", "--run", str(tiny_run), "--query", str(tile["path"]), "--offset-s", "2",
                     "-k", "5", "--space", space, "--out", str(out_csv)]
                    + (["--no-page"] if space != "mae_band" else [])
                    + (["--index", index_kind, "--nprobe", "2"] if index_kind else []))
    assert code == 0
    hits = pd.read_csv(out_csv)
    assert list(hits.columns) == search.RESULT_COLUMNS and len(hits) == 5
    assert hits.loc[0, "tile_id"] == tile["tile_id"]
    assert hits.loc[0, "similarity"] == pytest.approx(1.0, abs=1e-4)
    assert hits.loc[1, "similarity"] < 0.9999          # the other tiles are other sounds
    assert (hits["similarity"].diff().dropna() <= 0).all()
    assert hits.loc[0, "file"] == "R2/R2_20190522_000000.wav" and hits.loc[0, "offset_s"] == 2.0
    assert hits.loc[0, "recorder"] == "R2" and hits.loc[0, "time"].startswith("2019-05-22 00:00:02")
    statistics = tiny_run / "search" / "spaces" / f"{space}.stats.npz"
    assert statistics.is_file()                         # kept: a second query reads the rows once
    if index_kind:
        assert (tiny_run / "search" / "spaces" / f"{space}.ivf.faiss").is_file()
    if space == "mae_band":   # the page: the query and every hit with a player
        page = (tiny_run / "search" / f"R2_20190522_000000-{space}" / "index.html").read_text()
        assert page.count("<audio") == 6 and "query.ogg" in page


@pytest.mark.parametrize("space", ["mae_band", "logmel_stats"])
def test_a_clip_cut_out_of_the_recording_finds_its_tile_first(tiny_run, tmp_path, space):
    import soundfile as sf

    index = TileStore(tiny_run / "tiles").index
    tile = index[(index["relpath"] == "R1/R1_20190524_053000.wav") & (index["offset_s"] == 4.0)].iloc[0]
    samples, rate = sf.read(tile["path"], dtype="float32")
    clip = tmp_path / "call.wav"            # the tile's second, as a file of its own (the resampler
    sf.write(clip, samples[4 * rate:5 * rate], rate, subtype="FLOAT")   # sees no audio around it)
    result = search.search_run(tiny_run, clip, space, config=search.SearchConfig(k=3))
    assert result.table.loc[0, "tile_id"] == tile["tile_id"]
    assert result.table.loc[0, "similarity"] > 0.995, result.table
    assert result.table.loc[1, "similarity"] < result.table.loc[0, "similarity"]


def test_an_offset_off_the_tile_grid_is_cut_out_as_the_window_rule_cuts_a_tile(tiny_run, stage_inputs, tmp_path):
    query = Path(stage_inputs["audio"]) / "R2" / "R2_20190522_000000.wav"          # 1 s tiles
    space = search.open_space(tiny_run, "mae_mean")
    on_grid = search.embed_query(space, query, 2.0)
    span = search.cut_span(query, 2.0, space.spectrogram, tmp_path / "span.wav")  # the same span, cut out
    cut = search.embed_query(space, span, 0.0)
    assert np.dot(on_grid, cut) / np.linalg.norm(on_grid) / np.linalg.norm(cut) > 0.9999
    between = search.embed_query(space, query, 2.5)                                 # half-way to the next tile
    assert not np.allclose(between, on_grid, atol=1e-3)
    result = search.search_run(tiny_run, query, "mae_mean", offset_s=2.5, config=search.SearchConfig(k=3))
    assert len(result.table) == 3 and result.offset_s == 2.5


def test_bad_input_gets_one_line_and_a_non_zero_exit(tiny_run, stage_inputs, tmp_path, capsys):
    import soundfile as sf

    query = str(Path(stage_inputs["audio"]) / "R2" / "R2_20190522_000000.wav")   # 10 s, 1 s tiles
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(4000, np.float32), 16000)                          # 0.25 s < half a tile
    cases = {
        "no run folder": ["--run", str(tmp_path / "missing"), "--query", query, "--space", "mae_mean"],
        "unknown space 'nope'": ["--run", str(tiny_run), "--query", query, "--space", "nope"],
        "past the end": ["--run", str(tiny_run), "--query", query, "--space", "mae_mean", "--offset-s", "10"],
        "must be >= 0 s": ["--run", str(tiny_run), "--query", query, "--space", "mae_mean", "--offset-s", "-1"],
        "a search needs at least 0.5 s": ["--run", str(tiny_run), "--query", str(short), "--space", "mae_mean"],
        "no query file": ["--run", str(tiny_run), "--query", str(tmp_path / "none.wav"), "--space", "mae_mean"],
        "no clustering": ["--run", str(tiny_run), "--query", query],
        "pools every frequency together": ["--run", str(tiny_run), "--query", query, "--space", "mae_mean",
                                           "--band-hz", "500", "2000"],
        "0 <= LOW < HIGH": ["--run", str(tiny_run), "--query", query, "--space", "mae_band",
                            "--band-hz", "2000", "500"],
    }
    for expected, arguments in cases.items():
        code = cli_main(["search", *arguments, "--no-page"])
        error = capsys.readouterr().err.strip().splitlines()
        assert code != 0, expected
        assert len(error) == 1 and error[0].startswith("soundscape-ssl search: error:"), error
        assert expected in error[0], error[0]


def test_planted_query_calls_are_the_loudest_short_call_of_each_recorder():
    annotations = pd.DataFrame([
        # file, recorder, start_s, end_s, label, kind, snr_db
        ("R1/a.wav", "R1", 1.0, 1.5, "hooter", "bird", 20.0),
        ("R1/a.wav", "R1", 9.0, 9.5, "hooter", "bird", 30.0),      # R1's loudest hooter
        ("R2/b.wav", "R2", 4.0, 4.2, "hooter", "bird", 25.0),
        ("R3/c.wav", "R3", 0.0, 5.0, "hooter", "bird", 40.0),      # longer than a tile: not a query
        ("R1/a.wav", "R1", 2.0, 2.1, "chipper", "bird", 10.0),
        ("R1/a.wav", "R1", 0.0, 60.0, "rain", "rain", 50.0),       # not a bird
    ], columns=["file", "recorder", "start_s", "end_s", "label", "kind", "snr_db"])
    calls = search.planted_query_calls(annotations, tile_s=3.0, per_label=2)
    assert list(zip(calls["label"], calls["recorder"], calls["start_s"])) == [
        ("chipper", "R1", 2.0), ("hooter", "R1", 9.0), ("hooter", "R2", 4.0)]
    assert len(search.planted_query_calls(annotations, tile_s=3.0, per_label=1)) == 2


def test_query_precision_excludes_the_query_tiles_and_counts_the_label(tiny_run, tmp_path):
    import soundfile as sf

    index = TileStore(tiny_run / "tiles").index
    path = index.loc[index["relpath"] == "R2/R2_20190522_000000.wav", "path"].iloc[0]
    samples, rate = sf.read(path, dtype="float32")
    clip = tmp_path / "clip.wav"                      # 3.5-4.5 s: overlaps the tiles at 3 and 4 s
    sf.write(clip, samples[int(3.5 * rate):int(4.5 * rate)], rate, subtype="FLOAT")
    queries = pd.DataFrame([{"label": "a", "clip": str(clip), "relpath": "R2/R2_20190522_000000.wav",
                             "start_s": 3.5, "stop_s": 4.5}])
    own = index.index[(index["relpath"] == "R2/R2_20190522_000000.wav") & index["offset_s"].isin([3.0, 4.0])]
    everything = search.query_precision(tiny_run, "mae_mean", queries, ["a"] * len(index), k=5)
    assert everything.loc[0, "precision_at_k"] == 1.0
    assert everything.loc[0, "n_label_tiles"] == len(index) - 2
    assert everything.loc[0, "excluded_tiles"] == ";".join(str(t) for t in own)
    only_own = np.where(index.index.isin(own), "a", "b")
    present = np.where(index.index.isin(own), "a", "a;b")          # "a" is in every tile, dominant in none left
    scored = search.query_precision(tiny_run, "mae_mean", queries, only_own, k=5, present_labels=present)
    assert scored.loc[0, "precision_at_k"] == 0.0 and scored.loc[0, "max_precision"] == 0.0
    assert scored.loc[0, "precision_present_at_k"] == 1.0
    boxed = search.query_precision(tiny_run, "mae_band", queries.assign(f_low_hz=500.0, f_high_hz=2000.0),
                                   ["a"] * len(index), k=5, in_band=True)
    assert boxed.loc[0, "precision_at_k"] == 1.0 and boxed.loc[0, "excluded_tiles"] == ";".join(str(t) for t in own)
    timed = search.query_precision(tiny_run, "logmel_stats", queries.assign(call_start_s=0.2, call_end_s=0.6),
                                   only_own, k=5, present_labels=present, in_time=True)
    assert timed.loc[0, "precision_at_k"] == 0.0 and timed.loc[0, "precision_present_at_k"] == 1.0


def test_a_band_search_of_a_tiles_own_span_finds_it_first_and_says_so_on_the_page(tiny_run):
    index = TileStore(tiny_run / "tiles").index
    tile = index[(index["relpath"] == "R2/R2_20190522_000000.wav") & (index["offset_s"] == 2.0)].iloc[0]
    out_csv = tiny_run / "out" / "band.csv"
    code = cli_main(["search", "--run", str(tiny_run), "--query", str(tile["path"]), "--offset-s", "2",
                     "-k", "4", "--space", "mae_band", "--band-hz", "3000", "7000", "--out", str(out_csv)])
    assert code == 0
    hits = pd.read_csv(out_csv)
    assert hits.loc[0, "tile_id"] == tile["tile_id"] and hits.loc[0, "similarity"] == pytest.approx(1.0, abs=1e-4)
    page = (tiny_run / "search" / "R2_20190522_000000-mae_band-3000-7000Hz" / "index.html").read_text()
    assert "3000-7000 Hz" in page           # a folder of its own: the whole-tile search's page is kept


# ----------------------------------------------------------------------------------------------
# The call's time span


def test_sliding_means_and_the_frames_a_call_covers():
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig

    values = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert search.sliding_means(values, 3, axis=1).tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert search.sliding_means(values, 1, axis=0).tolist() == values.tolist()
    with pytest.raises(ValueError, match="width"):
        search.sliding_means(values, 7, axis=1)
    config = SpectrogramConfig()                # 3 s tiles, 375-sample hops at 32 kHz: 11.72 ms frames
    assert search.call_frames((0.0, 3.0), config) == (0, 256)
    assert search.call_frames((0.75, 1.5), config) == (64, 128)
    assert search.call_frames((2.999, 5.0), config) == (255, 256)      # clipped to the tile, >= 1 frame
    with pytest.raises(search.SearchInputError, match="after the end of the 3 s query tile"):
        search.call_frames((3.0, 3.5), config)
    for bad in [(1.0, 1.0), (-0.5, 1.0), (0.2, float("inf"))]:
        with pytest.raises(search.SearchInputError, match="0 <= START < END"):
            search.SearchConfig(call_s=bad)


def test_the_calls_window_finds_the_call_that_a_louder_longer_sound_hides(tmp_path):
    """Log-mel tiles by hand. The query holds call A (bins 10-13, 0.2 s) beside a loud, long sound X
    (bins 60-80) in the same band-less view. Tile 1 holds X alone, tile 2 holds A later in the tile
    among silence: over the whole tile the query is nearest tile 1; by the call's best window, tile
    2, matched where its call starts."""
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig

    config = SpectrogramConfig()
    frames = config.n_frames
    quiet = np.full((config.n_mels, frames), -80.0, np.float32)
    call_a, loud_x = (slice(10, 14), slice(60, 81))
    query, only_x, later_a, noise = quiet.copy(), quiet.copy(), quiet.copy(), quiet.copy()
    query[call_a, 20:37] = -20.0
    query[loud_x, 40:240] = -10.0
    only_x[loud_x, 30:230] = -10.0
    later_a[call_a, 150:167] = -20.0
    noise[:, ::2] = -60.0
    tiles = np.stack([noise, only_x, later_a])
    space = search.SearchSpace(search.LOGMEL_SPACE, np.zeros((3, 2 * config.n_mels), np.float32), None, None,
                               config, tmp_path / "x.npy", tmp_path)
    whole = np.concatenate([tiles.mean(axis=2), tiles.std(axis=2)], axis=1)
    whole_query = np.concatenate([query.mean(axis=1), query.std(axis=1)])
    cosine = whole @ whole_query / np.linalg.norm(whole, axis=1) / np.linalg.norm(whole_query)
    assert np.argmax(cosine) == 1                                   # the whole tile: X wins
    frame_s = config.hop_length / config.sample_rate_hz
    windows = search.CallWindows(space, (20 * frame_s, 37 * frame_s), None)
    assert (windows.first, windows.width) == (20, 17)
    similarity, best = search.best_windows(windows.vectors(tiles), windows.query_vector(query), None, None)
    assert np.argmax(similarity) == 2 and best[2] == 150           # the call's window: A, where it starts
    assert similarity[2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("space", ["mae_band", "mae_mean", "logmel_stats"])
def test_a_call_span_of_a_tile_finds_that_tile_first_where_the_call_is(tiny_run, space):
    """The query is a tile of the store and the call is its 0.25-0.75 s: the tile itself has that
    window exactly (similarity 1, matched 0.25 s into it), whatever the pooled shortlist's order."""
    index = TileStore(tiny_run / "tiles").index
    tile = index[(index["relpath"] == "R2/R2_20190522_000000.wav") & (index["offset_s"] == 2.0)].iloc[0]
    config = search.SearchConfig(k=4, call_s=(0.25, 0.75), shortlist=len(index),
                                 band_hz=(500.0, 6000.0) if space != "mae_mean" else None)
    result = search.search_run(tiny_run, tile["path"], space, offset_s=2.0, config=config)
    table = result.table
    assert list(table.columns) == search.RESULT_COLUMNS + ["match_offset_s"] and len(table) == 4
    assert table.loc[0, "tile_id"] == tile["tile_id"]
    assert table.loc[0, "similarity"] == pytest.approx(1.0, abs=1e-4)
    # Windows slide by an STFT frame (log-mel) or a patch column: the match starts at the step
    # that holds 0.25 s.
    windows = search.CallWindows(search.open_space(tiny_run, space), (0.25, 0.75), config.band_hz)
    assert table.loc[0, "match_offset_s"] == pytest.approx(2.0 + windows.first * windows.window_s, abs=1e-3)
    assert 2.25 - windows.window_s < table.loc[0, "match_offset_s"] <= 2.25 + 1e-6
    assert (table["similarity"].diff().dropna() <= 0).all()
    assert (table["match_offset_s"] >= table["offset_s"]).all()
    assert result.record()["call_s"] == [0.25, 0.75] and result.record()["shortlist"] == len(index)


def test_a_call_search_writes_its_own_folder_and_refuses_what_it_cannot_do(tiny_run, capsys):
    index = TileStore(tiny_run / "tiles").index
    tile = index[(index["relpath"] == "R2/R2_20190522_000000.wav") & (index["offset_s"] == 2.0)].iloc[0]
    base = ["search", "--run", str(tiny_run), "--query", str(tile["path"]), "--offset-s", "2", "-k", "3"]
    assert cli_main(base + ["--space", "mae_band", "--call-s", "0.25", "0.75", "--shortlist", "20"]) == 0
    folder = tiny_run / "search" / "R2_20190522_000000-mae_band-call-0.25-0.75s"
    hits = pd.read_csv(folder / "hits.csv")
    assert "match_offset_s" in hits and hits.loc[0, "tile_id"] == tile["tile_id"]
    page = (folder / "index.html").read_text()
    assert "0.25-0.75 s of the query" in page and "best match at 2.25 s" in page
    capsys.readouterr()
    for expected, extra in {"keeps time apart before pooling": ["--space", "mae_cls", "--call-s", "0.1", "0.5"],
                            "after the end of the 1 s query tile": ["--space", "mae_band", "--call-s", "1.5", "2"],
                            "0 <= START < END": ["--space", "logmel_stats", "--call-s", "0.5", "0.2"],
                            "shortlist must be >= 1": ["--space", "mae_band", "--call-s", "0.1", "0.5",
                                                       "--shortlist", "0"]}.items():
        code = cli_main(base + extra + ["--no-page"])
        error = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(error) == 1 and expected in error[0], (expected, error)
