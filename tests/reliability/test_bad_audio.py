"""Bad audio through inventory, tiling and `embed --audio`: every case has one exact outcome per
stage, and a good file beside the bad ones gives the products it gives alone.

The corpus is written by the test (`corpus.py`: zero bytes, header only, truncated, lying headers,
non-audio, NaN/inf, 8/24/32-bit and float, stereo, 8 and 192 kHz, 0.1 s, corrupt FLAC, half an MP3,
odd names, symbolic-link loops). Tiles are 1 s at 16 kHz, so a padded tile is kept when it holds at
least 0.5 s. Frame counts of the cut MP3 and the lost tiles of the corrupt FLAC are those of the
pinned soundfile wheel (libsndfile 1.2.2 with its LAME, mpg123 and libFLAC).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch

from corpus import CASES, GOOD_NAME, mp3_writable, write_corpus, write_good
from soundscape_ssl.analysis.embed import EmbedConfig, NothingEmbedded, embed_audio_files
from soundscape_ssl.pretrain.checkpoint import build_checkpoint, save_checkpoint
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
from soundscape_ssl.recordings.archive import scan_archive
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.store import TileStore
from soundscape_ssl.tiles.tiling import tile_archive

SPECTROGRAM = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512,
                                hop_length=250, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
BACKBONE = BackboneConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2, n_mels=32,
                          n_frames=64, drop_path_rate=0.0)
# Batch 1: a file's embeddings then do not depend on which other files share its batch (BLAS
# kernels may round differently for other batch sizes), so "byte-identical" is a fair test.
EMBED = EmbedConfig(pooling="mean", device="cpu", batch_size=1)


class Quarantined(NamedTuple):
    reason: str
    detail: str                    # a part of the detail


class Listed(NamedTuple):
    frames: int                    # readable frames
    duration_s: float
    damage: str | None = None      # the damage note's reason; its detail names the readable part


class Loss(NamedTuple):
    reason: str
    offset_s: float
    n_lost: int
    detail: str                    # a part of the detail


class Windows(NamedTuple):
    """What tiling and embed --audio both give: the tiles / spans, and the skip records."""

    offsets_s: tuple[float, ...]
    valid_s: tuple[float, ...]
    losses: tuple[Loss, ...] = ()


def whole(n: int) -> Windows:
    return Windows(tuple(float(k) for k in range(n)), (1.0,) * n)


# Inventory, then tiling and embed --audio (both the same windows and losses; files the
# inventory quarantines are not tiled, and embed --audio records the inventory's reason).
EXPECTED: dict[str, tuple[Quarantined | Listed, Windows | None]] = {
    "zero_bytes.wav": (Quarantined("empty_file", "0 bytes"), None),
    "header_only.wav": (Quarantined("no_frames", "data chunk of 0 B holds no complete frame"), None),
    "truncated.wav": (Listed(59200, 3.7, "truncated"),
                      Windows((0.0, 1.0, 2.0, 3.0), (1.0, 1.0, 1.0, 0.7))),
    "lying_larger.wav": (Listed(40000, 2.5, "truncated"), Windows((0.0, 1.0, 2.0), (1.0, 1.0, 0.5))),
    "lying_smaller.wav": (Listed(35200, 2.2), whole(2)),          # the header's 2.2 s; 0.2 s tail
    "not_audio.wav": (Quarantined("not_audio", "no RIFF/RF64 signature"), None),
    "nan_inf.wav": (Listed(96000, 6.0), Windows((0.0, 5.0), (1.0, 1.0), (
        Loss("non_finite_samples", 1.0, 4,
             "44103 non-finite sample(s) in 2 run(s), frames 20000-66501 (1.250-4.156 s)"),))),
    "pcm8.wav": (Listed(32000, 2.0), whole(2)),
    "pcm24.wav": (Listed(32000, 2.0), whole(2)),
    "pcm32.wav": (Listed(32000, 2.0), whole(2)),
    "float32.wav": (Listed(32000, 2.0), whole(2)),
    "stereo.wav": (Listed(32000, 2.0), whole(2)),
    "rate_8k.wav": (Listed(16000, 2.0), whole(2)),
    "rate_192k.wav": (Listed(384000, 2.0), whole(2)),
    "short_0.1s.wav": (Listed(1600, 0.1), Windows((0.0,), (0.1,))),   # a file's first window is kept
    "corrupt.flac": (Listed(480000, 30.0), Windows(
        tuple(float(k) for k in range(30) if k not in (14, 15)), (1.0,) * 28,
        (Loss("decode_error", 14.0, 2, "flac decoder lost sync"),))),
    "half.mp3": (Listed(62831, 62831 / 16000, "truncated"),
                 Windows((0.0, 1.0, 2.0, 3.0), (1.0, 1.0, 1.0, 62831 / 16000 - 3))),
    "with space.wav": (Listed(16000, 1.0), whole(1)),
    "ünïcødé_名前.wav": (Listed(16000, 1.0), whole(1)),
    "-leading-dash.wav": (Listed(16000, 1.0), whole(1)),
    "semi;colon $(touch PWNED).wav": (Listed(16000, 1.0), whole(1)),
    "loop_a.wav": (Quarantined("unreadable", "Too many levels of symbolic links"), None),
    "loop_b.wav": (Quarantined("unreadable", "Too many levels of symbolic links"), None),
    GOOD_NAME: (Listed(101430, 4.6), Windows((0.0, 1.0, 2.0, 3.0, 4.0), (1.0, 1.0, 1.0, 1.0, 0.6))),
}
# The folder link back to the archive is not followed (no cycle, no second copy of every file).
NOT_LISTED = ("folder_loop",)


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=BACKBONE, method_config={},
        train_config={}, spectrogram_config=SPECTROGRAM.to_dict(),
        normalization={"mean": -60.0, "std": 15.0}, model_state={},
        backbone_state=build_backbone(BACKBONE).state_dict(), optimizer_state={}))


class Products(NamedTuple):
    inventory: object
    store: TileStore
    rows: pd.DataFrame
    skipped: pd.DataFrame
    embeddings: np.ndarray


def run_stages(folder: Path, work: Path, ckpt: Path) -> Products:
    inventory = scan_archive(folder, show_progress=False)
    tile_archive(inventory.files, work / "tiles", config=SPECTROGRAM, show_progress=False,
                 rank=0, world_size=1)
    out = work / "EMB.npy"
    embed_audio_files([folder], ckpt, out, EMBED, show_progress=False)
    return Products(inventory, TileStore(work / "tiles"), pd.read_csv(out.with_suffix(".csv")),
                    pd.read_csv(work / "EMB.skipped.csv"), np.load(out))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Products, Path]:
    root = tmp_path_factory.mktemp("bad_audio")
    ckpt = checkpoint(root / "ckpt.pth")
    folder = root / "corpus"
    write_corpus(folder)
    cwd = os.getcwd()
    os.chdir(root)                     # where `$(touch PWNED)` would land if a shell ran the name
    try:
        products = run_stages(folder, root / "run", ckpt)
    finally:
        os.chdir(cwd)
    return root, products, ckpt


def written_cases() -> list[str]:
    return [name for name in EXPECTED if name != "half.mp3" or mp3_writable()]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_bad_file_has_its_exact_outcome_in_every_stage(corpus, name):
    if name not in written_cases():
        pytest.skip("this libsndfile cannot write MP3 (soundfile.available_formats())")
    _, products, _ = corpus
    inventory_outcome, windows = EXPECTED[name]
    files, quarantine = products.inventory.files, products.inventory.quarantine
    if isinstance(inventory_outcome, Quarantined):
        row = quarantine[quarantine["relpath"] == name]
        assert row["reason"].tolist() == [inventory_outcome.reason], name
        assert inventory_outcome.detail in row["detail"].iloc[0]
        assert name not in set(files["relpath"]) and name not in set(products.store.index["relpath"])
        notes = products.skipped[products.skipped["relpath"] == name]
        assert notes["reason"].tolist() == [inventory_outcome.reason], name      # embed --audio
        assert (products.rows["relpath"] != name).all()
        return
    row = files[files["relpath"] == name]
    assert len(row) == 1 and name not in set(quarantine["relpath"])
    row = row.iloc[0]
    assert (row["frames"], row["duration_s"]) == (inventory_outcome.frames,
                                                  pytest.approx(inventory_outcome.duration_s))
    damage = None if pd.isna(row["damage"]) else row["damage"]
    assert damage == inventory_outcome.damage, name
    readable = f"{inventory_outcome.frames} frames ({inventory_outcome.duration_s:.3f} s) are readable"
    expected_losses = list(windows.losses)
    if damage:
        assert readable in row["damage_detail"]
        expected_losses = [Loss(damage, math.nan, 0, readable)] + expected_losses
    index, skipped = products.store.index, products.store.skipped
    for stage, offsets, valid, records, lost_column in (
            ("tile", index.loc[index["relpath"] == name, "offset_s"],
             index.loc[index["relpath"] == name, "valid_s"], skipped[skipped["relpath"] == name],
             "n_tiles_lost"),
            ("embed", products.rows.loc[products.rows["relpath"] == name, "offset_s"],
             products.rows.loc[products.rows["relpath"] == name, "valid_s"],
             products.skipped[products.skipped["relpath"] == name], "n_spans_lost")):
        assert offsets.tolist() == list(windows.offsets_s), (stage, name)
        np.testing.assert_allclose(valid, windows.valid_s, atol=1e-6, err_msg=f"{stage} {name}")
        assert len(records) == len(expected_losses), (stage, name, records)
        for (_, record), loss in zip(records.iterrows(), expected_losses):
            assert record["reason"] == loss.reason, (stage, name)
            assert loss.detail in record["detail"], (stage, name, record["detail"])
            assert record[lost_column] == loss.n_lost, (stage, name)
            assert (math.isnan(record["offset_s"]) and math.isnan(loss.offset_s)) or \
                record["offset_s"] == loss.offset_s, (stage, name)


def test_nothing_else_is_listed_and_no_name_runs_as_code(corpus):
    root, products, _ = corpus
    listed = set(products.inventory.files["relpath"]) | set(products.inventory.quarantine["relpath"])
    assert listed == set(written_cases())
    assert not any(name.startswith(NOT_LISTED) for name in listed)
    assert not any(path.name == "PWNED" for path in root.rglob("*") if not path.is_symlink())
    assert np.isfinite(products.embeddings).all()
    assert len(products.embeddings) == len(products.rows)


def test_a_good_file_beside_bad_ones_gives_the_products_it_gives_alone(corpus, tmp_path):
    _, products, ckpt = corpus
    alone_folder = tmp_path / "corpus"            # the same folder name: the same recorder
    alone_folder.mkdir()
    write_good(alone_folder)
    alone = run_stages(alone_folder, tmp_path / "run", ckpt)

    def good(frame: pd.DataFrame, drop: tuple[str, ...]) -> pd.DataFrame:
        rows = frame[frame["relpath"] == GOOD_NAME].drop(columns=list(drop))
        return rows.reset_index(drop=True)

    beside_index = good(products.store.index, ("tile_id", "path", "shard", "shard_row"))
    alone_index = good(alone.store.index, ("tile_id", "path", "shard", "shard_row"))
    pd.testing.assert_frame_equal(beside_index, alone_index)
    beside_tiles = np.stack([products.store[int(i)] for i in
                             products.store.index.loc[products.store.index["relpath"] == GOOD_NAME,
                                                      "tile_id"]])
    assert beside_tiles.tobytes() == alone.store.read_range(0, len(alone.store)).tobytes()
    pd.testing.assert_frame_equal(good(products.rows, ("row", "path")), good(alone.rows, ("row", "path")))
    beside_rows = products.rows.index[products.rows["relpath"] == GOOD_NAME].to_numpy()
    assert products.embeddings[beside_rows].tobytes() == alone.embeddings.tobytes()
    assert alone.skipped.empty and products.skipped[products.skipped["relpath"] == GOOD_NAME].empty


# ----------------------------------------------------------------------------------------------
# embed --audio on its own (defect 17.3)


def test_embed_keeps_the_readable_spans_of_a_corrupt_flac_given_alone(corpus, tmp_path):
    """Defect 17.3: a FLAC with corrupt bytes mid-file gave tiles in `tile` but no span in
    `embed`, and alone crashed with "cannot reshape array of size 0". Now embed keeps exactly the
    spans tiling keeps."""
    _, products, ckpt = corpus
    folder = tmp_path / "one"
    folder.mkdir()
    CASES["corrupt.flac"](folder / "corrupt.flac")
    summary = embed_audio_files([folder / "corrupt.flac"], ckpt, tmp_path / "EMB.npy", EMBED,
                                show_progress=False)
    rows = pd.read_csv(tmp_path / "EMB.csv")
    tiles = products.store.index[products.store.index["relpath"] == "corrupt.flac"]
    assert summary.n_rows == len(tiles) == 28
    assert rows["offset_s"].tolist() == tiles["offset_s"].tolist()
    skipped = pd.read_csv(tmp_path / "EMB.skipped.csv")
    assert skipped[["reason", "offset_s", "n_spans_lost"]].values.tolist() == [["decode_error", 14.0, 2]]


@pytest.mark.parametrize("given", ["empty folder", "missing path", "every file unreadable"])
def test_embed_with_nothing_to_embed_writes_its_skip_table_and_says_so(corpus, tmp_path, given):
    """Defect 17.3: these crashed with "cannot reshape array of size 0" and wrote no skip table."""
    _, _, ckpt = corpus
    folder = tmp_path / "input"
    if given != "missing path":
        folder.mkdir()
    if given == "every file unreadable":
        for name in ("zero_bytes.wav", "not_audio.wav", "header_only.wav"):
            CASES[name](folder / name)
    out = tmp_path / "out" / "EMB.npy"
    with pytest.raises(NothingEmbedded) as error:
        embed_audio_files([folder], ckpt, out, EMBED, show_progress=False)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and str(out.parent / "EMB.skipped.csv") in message
    skipped = pd.read_csv(out.parent / "EMB.skipped.csv")
    expected = {"empty folder": [], "missing path": ["not_found"],
                "every file unreadable": ["empty_file", "no_frames", "not_audio"]}[given]
    assert sorted(skipped["reason"]) == expected
    assert np.load(out).shape == (0, BACKBONE.embed_dim)
    assert pd.read_csv(out.with_suffix(".csv")).empty
