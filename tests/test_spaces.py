"""The output spaces of a run: its checkpoints, the untrained control, a store embedded under each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from soundscape_ssl.analysis import spaces
from soundscape_ssl.analysis.embed import EmbedConfig
from soundscape_ssl.pretrain.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.store import TileStore
from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

SPECTROGRAM = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512,
                                hop_length=250, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
BACKBONE = BackboneConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2, n_mels=32,
                          n_frames=64, drop_path_rate=0.0)


def save_tiny_checkpoint(path: Path, seed: int, normalization: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = build_backbone(BACKBONE)
    return save_checkpoint(path, build_checkpoint(
        method="mae", step=3, epoch=0, world_size=1, backbone_config=BACKBONE, method_config={},
        train_config={}, spectrogram_config=SPECTROGRAM.to_dict(),
        normalization=normalization or {"mean": -60.0, "std": 15.0}, model_state={},
        backbone_state=model.state_dict(), optimizer_state={}))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A tile store of one 5 s recording: five 1 s tiles."""
    root = tmp_path_factory.mktemp("spaces")
    path = root / "archive" / "R1" / "R1_20240524_050000.wav"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(path, (0.05 * rng.standard_normal(5 * 16000)).astype(np.float32), 16000, subtype="PCM_16")
    info = sf.info(path)
    files = pd.DataFrame([dict(recorder="R1", habitat="canopy", path=str(path), relpath="R1/R1_20240524_050000.wav",
                               start_time=pd.Timestamp("2024-05-24 05:00"), sample_rate_hz=info.samplerate,
                               frames=info.frames, duration_s=info.duration, channels=info.channels)])
    tile_archive(files, root / "store", config=SPECTROGRAM, tiling=TilingConfig(), rank=0, world_size=1,
                 show_progress=False)
    return root / "store"


def test_run_checkpoints_finds_names_and_lists_the_missing(tmp_path):
    save_tiny_checkpoint(tmp_path / "pretrain" / "mae" / "checkpoint.pth", 0)
    found, missing = spaces.run_checkpoints(tmp_path, ["dino", "mae"])
    assert found == {"mae": tmp_path / "pretrain" / "mae" / "checkpoint.pth"}
    assert missing == {"dino": tmp_path / "pretrain" / "dino" / "checkpoint.pth"}
    other = save_tiny_checkpoint(tmp_path / "elsewhere" / "best.pth", 1)
    found, missing = spaces.run_checkpoints(tmp_path, ["dino"], explicit=[other, tmp_path / "pretrain" / "mae" /
                                                                         "checkpoint.pth"])
    assert sorted(found) == ["best", "mae"] and not missing


def test_untrained_control_is_an_untrained_copy_of_the_main_method(tmp_path):
    trained = save_tiny_checkpoint(tmp_path / "mae.pth", 0, {"mean": -50.0, "std": 9.0, "background": "band_median"})
    checkpoints, note = spaces.with_untrained_control({"mae": trained}, "mae", tmp_path / "untrained.pth", seed=0)
    assert note == "" and sorted(checkpoints) == ["mae", "untrained_mae"]
    control = load_checkpoint(checkpoints["untrained_mae"])
    assert control["method"] == "untrained" and control["step"] == 0
    assert control["normalization"] == load_checkpoint(trained)["normalization"]
    unchanged, note = spaces.with_untrained_control({"mae": trained}, "vicreg", tmp_path / "u2.pth")
    assert list(unchanged) == ["mae"] and "'vicreg' is not among the checkpoints" in note


def test_embed_checkpoints_gives_every_pooling_and_reuses_finished_folders(store_dir, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "mae.pth", 0, TileStore(store_dir).normalization)
    config = EmbedConfig(pooling="all", batch_size=4, device="cpu", num_workers=0)
    embedded, notes = spaces.embed_checkpoints(store_dir, {"mae": checkpoint}, tmp_path / "embeddings", config,
                                               show_progress=False)
    assert notes == []
    assert {pooling: array.shape for pooling, array in embedded["mae"].items()} == {
        "mean": (5, 32), "cls": (5, 32), "band": (5, 64), "band_active": (5, 64)}
    # A finished folder is read back, not redone; a pooling it lacks is a note, not a crash.
    again, _ = spaces.embed_checkpoints(store_dir, {"mae": checkpoint}, tmp_path / "embeddings",
                                        EmbedConfig(pooling="band", device="cpu", num_workers=0), show_progress=False)
    np.testing.assert_array_equal(again["mae"]["band"], embedded["mae"]["band"])
    flat = spaces.flatten_spaces(embedded)
    assert sorted(flat) == ["mae_band", "mae_band_active", "mae_cls", "mae_mean"]
    assert list(spaces.flatten_spaces(again, with_pooling=False)) == ["mae"]
    with pytest.raises(ValueError, match="with_pooling=True"):
        spaces.flatten_spaces(embedded, with_pooling=False)
    (tmp_path / "partial" / "mae").mkdir(parents=True)
    (tmp_path / "partial" / "mae" / "config.json").write_text('{"arrays": {}}')
    broken, notes = spaces.embed_checkpoints(store_dir, {"mae": checkpoint}, tmp_path / "partial", config,
                                             show_progress=False)
    assert broken == {} and len(notes) == 1 and notes[0].startswith("mae: embeddings in")
