"""The pretraining entry point: configs, exact resume, checkpoints, NaN/collapse/signal stops, torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from soundscape_ssl.pretrain import train
from soundscape_ssl.pretrain.checkpoint import CHECKPOINT_FORMAT, load_backbone
from soundscape_ssl.pretrain.engine import NonFiniteLossError
from soundscape_ssl.pretrain.models import SpectrogramViT
from soundscape_ssl.pretrain.train import (
    CollapseDetectedError,
    ResumableShardSampler,
    StopRequested,
    TrainConfig,
    TrainData,
    load_config,
    main,
    run,
)
from soundscape_ssl.core.cli import UsageError
from soundscape_ssl.core.config import ConfigError, config_from_mapping

REPO = Path(__file__).resolve().parents[1]
N_TILES = 48  # 6 steps per epoch at 8 tiles per step


class _RandomTiles(Dataset):
    """Deterministic normalised 32 x 64 'tiles'; `fill` replaces every value (e.g. NaN)."""

    def __init__(self, n_tiles: int = N_TILES, fill: float | None = None) -> None:
        self.tiles = torch.randn(n_tiles, 1, 32, 64, generator=torch.Generator().manual_seed(0))
        if fill is not None:
            self.tiles.fill_(fill)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tiles[index]


class _SignalOnFetch(_RandomTiles):
    """Sends SIGTERM to this process when tile number `at_fetch` is read (num_workers=0)."""

    def __init__(self, at_fetch: int) -> None:
        super().__init__()
        self.fetches, self.at_fetch = 0, at_fetch

    def __getitem__(self, index: int) -> torch.Tensor:
        self.fetches += 1
        if self.fetches == self.at_fetch:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(index)


class _CrashOnFetch(_RandomTiles):
    """Raises when tile number `at_fetch` is read: a crash (or kill -9) in the middle of a step."""

    def __init__(self, at_fetch: int) -> None:
        super().__init__()
        self.fetches, self.at_fetch = 0, at_fetch

    def __getitem__(self, index: int) -> torch.Tensor:
        self.fetches += 1
        if self.fetches == self.at_fetch:
            raise RuntimeError("simulated crash")
        return super().__getitem__(index)


NORMALIZATION = {"mean": -60.0, "std": 12.0}


def tiny_tile_data(store_dir: str) -> TrainData:
    """Dataset factory for configs (`dataset_factory: test_train:tiny_tile_data`), also under torchrun."""
    return TrainData(_RandomTiles(), NORMALIZATION, {"n_mels": 32, "note": "in-memory test tiles"})


def nan_tile_data(store_dir: str) -> TrainData:
    return TrainData(_RandomTiles(fill=float("nan")), NORMALIZATION, None)


def _tiny_settings(out_dir: Path, method: str = "dino", **top_level) -> dict:
    settings = {
        "method": method, "store_dir": "in-memory", "out_dir": str(out_dir), "device": "cpu",
        "epochs": 2, "batch_size_per_gpu": 8, "num_workers": 0, "warmup_epochs": 1.0, "log_every": 2,
        "checkpoint_every_steps": 100, "base_lr": 1e-3,
        "cpu_threads": 1,  # tiny models gain nothing from threads, and spinning threads suffer on shared cores
        "model": {"arch": "vit_tiny", "depth": 2, "embed_dim": 64, "num_heads": 2, "n_mels": 32,
                  "n_frames": 64, "patch_size": 8, "drop_path_rate": 0.1},
        "dino": {"out_dim": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 32, "global_crop_frames": 48,
                 "local_crops": 2, "local_crop_frames": 16},
        "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        "vicreg": {"expander_dim": 128, "crop_frames": 48},
    }
    settings.update(top_level)
    return settings


def _tiny_config(out_dir: Path, method: str = "dino", **top_level) -> TrainConfig:
    return config_from_mapping(TrainConfig, _tiny_settings(out_dir, method, **top_level))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b, where: str = "") -> None:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


# -- configuration ------------------------------------------------------------------------------


def test_config_file_plus_flags(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.yaml"
    path.write_text("method: mae\nstore_dir: runs/r/tiles\nout_dir: runs/r/pretrain/mae\n"
                    "mae:\n  mask_ratio: 0.6\nmodel:\n  arch: vit_tiny\n")
    config = load_config(path, ["--mae.masking", "time", "--base-lr=1e-4", "--adam-betas", "0.9", "0.95",
                                "--max-steps", "none", "--compile", "true", "--model.depth", "4"])
    assert config.method == "mae" and config.mae.mask_ratio == 0.6 and config.mae.masking == "time"
    assert config.base_lr == 1e-4 and isinstance(config.base_lr, float)
    assert config.adam_betas == (0.9, 0.95) and config.max_steps is None and config.compile is True
    assert config.model.arch == "vit_tiny" and config.model.depth == 4


def test_a_runs_own_config_json_retrains_with_flags_over_it(tmp_path: Path) -> None:
    """The config.json written beside a checkpoint (stage, config, derived, git state) is a
    --config: its TrainConfig comes back whole, flags still override it."""
    from soundscape_ssl.core.provenance import write_config_json

    trained = load_config(None, ["--method", "vicreg", "--store-dir", "s", "--out-dir", "o", "--epochs", "4",
                                 "--vicreg.expander-dim", "1024"])
    written = write_config_json(tmp_path, "pretrain", trained, derived={"steps_per_epoch": 90}, git_sha="abc")
    again = load_config(written, ["--epochs", "16"])
    assert again == dataclasses.replace(trained, epochs=16)
    assert again.vicreg.expander_dim == 1024


@pytest.mark.parametrize("flags", [["--dino.outdim", "4"], ["--epochs", "many"], ["--compile", "1"],
                                   ["--epochs"], ["--adam-betas", "0.9"]])
def test_bad_flags_are_usage_errors(flags: list[str]) -> None:
    with pytest.raises(UsageError, match=flags[0]):
        load_config(None, ["--store-dir", "s", "--out-dir", "o", *flags])


def test_bad_config_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.yaml"
    path.write_text("store_dir: s\nout_dir: o\ndino:\n  out_dimm: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'out_dimm' in TrainConfig \(.*pretrain.yaml and "
                                          r"flags\)\.dino: did you mean 'out_dim'\?"):
        load_config(path)


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        _tiny_config(tmp_path, method="simclr").validate()
    with pytest.raises(ValueError, match="global_crop_frames"):
        config = _tiny_config(tmp_path)
        config.dino.global_crop_frames = 100
        config.validate()


def test_sampler_shards_are_disjoint_and_resumable() -> None:
    shards = []
    for rank in range(3):
        sampler = ResumableShardSampler(50, rank, 3, 4, seed=7)
        sampler.set_position(epoch=2)
        shards.append(list(sampler))
        assert sampler.steps_per_epoch == 4 and len(shards[-1]) == 16
        sampler.set_position(epoch=2, start_batch=3)
        assert list(sampler) == shards[-1][12:]
    assert len(set(sum(shards, []))) == 48
    other_epoch = ResumableShardSampler(50, 0, 3, 4, seed=7)
    other_epoch.set_position(epoch=3)
    assert list(other_epoch) != shards[0]


def test_default_data_is_the_tile_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path reads the store's normalisation and spectrogram config (contract of soundscape_ssl.tiles.store)."""
    import dataclasses
    import types

    @dataclasses.dataclass
    class FakeSpectrogramConfig:
        sample_rate_hz: int = 32000
        n_mels: int = 128

    class FakeStore:
        def __init__(self, store_dir):
            self.normalization = {"mean": -71.5, "std": 9.25}
            self.config = FakeSpectrogramConfig()

    opened = []
    fake_tiles = types.SimpleNamespace(TileStore=FakeStore,
                                       TileDataset=lambda store_dir, normalize: opened.append((store_dir, normalize)))
    monkeypatch.setitem(sys.modules, "soundscape_ssl.tiles.store", fake_tiles)
    assert train.resolve_data_factory(None) is train.tile_store_data
    data = train.tile_store_data("runs/r/tiles")
    assert opened == [("runs/r/tiles", True)]
    assert data.normalization == {"mean": -71.5, "std": 9.25}
    assert data.spectrogram_config == {"sample_rate_hz": 32000, "n_mels": 128}


def test_trains_on_a_real_tile_store(tmp_path: Path) -> None:
    """The default data path end to end: WAV -> inventory -> tile store -> TileDataset -> checkpoint."""
    import numpy as np
    import soundfile

    from soundscape_ssl.recordings.archive import scan_archive
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
    from soundscape_ssl.tiles.store import TileStore
    from soundscape_ssl.tiles.tiling import tile_archive

    archive = tmp_path / "archive"
    archive.mkdir()
    times_s = np.arange(20 * 32000) / 32000
    warble = np.sin(2 * np.pi * (3000 + 500 * np.sin(2 * np.pi * 2 * times_s)) * times_s)
    noise = np.random.default_rng(0).standard_normal(times_s.size)
    soundfile.write(archive / "REC1_20200101_050000.wav", (0.2 * warble + 0.05 * noise).astype(np.float32), 32000)
    store_dir = tmp_path / "tiles"
    # 0.75 s tiles at a 375-sample hop: 64 frames, the tiny model's width.
    tile_archive(scan_archive(archive, show_progress=False).files, store_dir, show_progress=False,
                 config=SpectrogramConfig(n_mels=32, tile_s=0.75, tile_hop_s=0.75))
    config = _tiny_config(tmp_path / "out", "vicreg", store_dir=str(store_dir), max_steps=2)
    assert run(config).step == 2
    checkpoint = _load(tmp_path / "out" / "checkpoint.pth")
    assert checkpoint["spectrogram_config"]["n_mels"] == 32 and checkpoint["spectrogram_config"]["tile_s"] == 0.75
    assert checkpoint["normalization"] == pytest.approx(TileStore(store_dir).normalization)


def test_background_removal_is_what_the_model_sees_and_is_recorded(tmp_path: Path, monkeypatch) -> None:
    from soundscape_ssl.tiles.store import remove_band_background

    data = train.with_background_removal(tiny_tile_data("in-memory"), "band_median")
    assert data.normalization == {**NORMALIZATION, "background": "band_median"}
    plain = _RandomTiles()
    for index in (0, 5):   # the data stay as stored; each augmented view gets the removal
        assert torch.equal(data.dataset[index], plain[index])
    assert train.with_background_removal(tiny_tile_data("in-memory"), "none").normalization == NORMALIZATION

    seen = []
    original = train.build_method

    def recording_build_method(config, normalization, *args):
        seen.append(normalization)
        return original(config, normalization, *args)

    monkeypatch.setattr(train, "build_method", recording_build_method)
    run(_tiny_config(tmp_path, "vicreg", max_steps=2, background_removal="band_median"),
        data_factory=tiny_tile_data)
    assert seen[0].background == "band_median"
    tile = plain[0][None]
    torch.testing.assert_close(seen[0].model_input(tile), remove_band_background(tile))
    assert _load(tmp_path / "checkpoint.pth")["normalization"] == {**NORMALIZATION, "background": "band_median"}
    with pytest.raises(ValueError, match="background_removal must be one of"):
        _tiny_config(tmp_path, background_removal="median").validate()


def test_tf32_is_on_while_training_and_restored_after(tmp_path: Path) -> None:
    """Training allows TF32 for its own matmuls only: a later in-process tiling or embedding gets
    the switches as they were (here both off, so that either direction of a leak shows)."""
    from soundscape_ssl.core.stage import tf32_matmuls

    seen = []

    class _RecordingTiles(_RandomTiles):
        def __getitem__(self, index: int) -> torch.Tensor:
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().__getitem__(index)

    with tf32_matmuls(False):
        run(_tiny_config(tmp_path, "mae", max_steps=1),
            data_factory=lambda store: TrainData(_RecordingTiles(), NORMALIZATION, None))
        assert seen and set(seen) == {(True, True)}                     # on while training
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        with pytest.raises(NonFiniteLossError):                         # and after a failed run
            run(_tiny_config(tmp_path / "nan", "mae"), data_factory=nan_tile_data)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_fp32_is_faster(tmp_path: Path, caplog, monkeypatch,
                                                                      native: bool) -> None:
    """Emulated bf16 measured slower than fp32 (0.78x), so asking for it there deserves a word;
    on a CPU with hardware bf16 it is the fast path and trains without one."""
    monkeypatch.setattr(train, "cpu_computes_bf16_natively", lambda: native)
    with caplog.at_level(logging.WARNING, logger=train.logger.name):
        summary = run(_tiny_config(tmp_path, "vicreg", precision="bf16", max_steps=1), data_factory=tiny_tile_data)
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert summary.step == 1 and len(warned) == (0 if native else 1)
    assert json.loads((tmp_path / "config.json").read_text())["derived"]["autocast"] == "torch.bfloat16"


# -- training, checkpoints, resume --------------------------------------------------------------


@pytest.mark.parametrize("method", ["dino", "mae", "vicreg"])
def test_resume_continues_exactly(tmp_path: Path, method: str) -> None:
    """12 steps straight == 4 steps, stop, rerun (resuming mid-epoch and crossing an epoch end)."""
    straight = run(_tiny_config(tmp_path / "straight", method), data_factory=tiny_tile_data)
    assert straight.step == straight.total_steps == 12 and straight.finished

    first = run(_tiny_config(tmp_path / "resumed", method, max_steps=4), data_factory=tiny_tile_data)
    assert first.step == 4 and not first.finished
    assert _load(tmp_path / "resumed" / "checkpoint.pth")["step"] == 4
    second = run(_tiny_config(tmp_path / "resumed", method), data_factory=tiny_tile_data)
    assert second.step == 12 and second.last_loss == straight.last_loss

    a, b = _load(tmp_path / "straight" / "checkpoint.pth"), _load(tmp_path / "resumed" / "checkpoint.pth")
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    _assert_same_state(a["model"], b["model"], "model")
    _assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same_state(a["backbone"], b["backbone"], "backbone")
    starts = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    assert [record["resumed_from_step"] for record in starts] == [None, 4]


def test_checkpoint_is_self_describing_and_loads_weights_only(tmp_path: Path) -> None:
    run(_tiny_config(tmp_path, "dino", max_steps=3), data_factory=tiny_tile_data)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["method"] == "dino"
    assert checkpoint["step"] == 3 and checkpoint["epoch"] == 0 and checkpoint["world_size"] == 1
    assert checkpoint["backbone_config"]["embed_dim"] == 64
    assert checkpoint["method_config"]["out_dim"] == 256
    assert checkpoint["train_config"]["batch_size_per_gpu"] == 8
    assert checkpoint["normalization"] == NORMALIZATION
    assert checkpoint["spectrogram_config"]["note"] == "in-memory test tiles"
    assert "center" in checkpoint["model"]
    # The exported backbone is DINO's EMA teacher.
    for key, value in checkpoint["backbone"].items():
        assert torch.equal(value, checkpoint["model"][f"teacher.backbone.{key}"])

    model, meta = load_backbone(tmp_path / "checkpoint.pth")
    assert isinstance(model, SpectrogramViT) and not model.training
    json.dumps(meta)  # metadata is plain JSON: no pickled objects, no numpy
    assert meta["step"] == 3 and "model" not in meta and "optimizer" not in meta
    embeddings = model.embed(torch.randn(2, 1, 32, 64))
    assert embeddings.cls.shape == embeddings.mean.shape == (2, 64)

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["stage"] == "pretrain" and config_json["derived"]["peak_lr"] == pytest.approx(1e-3 * 8 / 256)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and "git_sha" in records[0]
    assert records[0]["config"]["model"]["depth"] == 2 and records[0]["derived"]["total_steps"] == 12
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [2, 3]
    for key in ("loss", "lr", "tiles_per_s", "teacher_entropy_fraction", "center_norm", "grad_norm"):
        assert key in train_records[-1]
    assert train_records[0]["lr"] == pytest.approx(1e-3 * 8 / 256 * 1 / 6)  # step 1 of a 6-step warm-up
    assert any((tmp_path / "tensorboard").iterdir())


def test_untrained_copy_keeps_everything_but_the_weights(tmp_path: Path) -> None:
    from soundscape_ssl.pretrain.checkpoint import save_untrained_copy

    run(_tiny_config(tmp_path / "trained", "vicreg", max_steps=3, background_removal="band_median"),
        data_factory=tiny_tile_data)
    trained_path = tmp_path / "trained" / "checkpoint.pth"
    copy_path = save_untrained_copy(trained_path, tmp_path / "untrained.pth", seed=0)
    written = copy_path.stat().st_mtime_ns
    assert save_untrained_copy(trained_path, copy_path, seed=0).stat().st_mtime_ns == written  # reused on a rerun
    assert load_backbone(save_untrained_copy(trained_path, tmp_path / "other.pth", seed=1))[1]["train_config"]["seed"] == 1
    trained, trained_meta = load_backbone(trained_path)
    untrained, meta = load_backbone(copy_path)
    assert meta["method"] == "untrained" and meta["step"] == 0
    for key in ("backbone_config", "spectrogram_config", "normalization"):
        assert meta[key] == trained_meta[key]
    assert meta["normalization"]["background"] == "band_median"
    assert trained.state_dict().keys() == untrained.state_dict().keys()
    assert not torch.equal(trained.pos_embed, untrained.pos_embed)
    torch.manual_seed(0)  # the same seed gives the same initialisation as a fresh backbone
    fresh = SpectrogramViT(untrained.config)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, untrained.state_dict()[key]), key


def test_rerun_after_the_end_does_nothing(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path, "mae", epochs=1)
    run(config, data_factory=tiny_tile_data)
    before = (tmp_path / "checkpoint.pth").stat().st_mtime_ns
    again = run(config, data_factory=tiny_tile_data)
    assert again.step == 6 and again.finished
    assert (tmp_path / "checkpoint.pth").stat().st_mtime_ns == before


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    run(_tiny_config(tmp_path, "mae", max_steps=1), data_factory=tiny_tile_data)
    config = _tiny_config(tmp_path, "mae")
    config.model.depth = 3
    with pytest.raises(ValueError, match="different model"):
        run(config, data_factory=tiny_tile_data)


def test_rectangular_patches_from_flags_train_resume_and_reload(tmp_path: Path) -> None:
    """`--model.patch-frames` sets the patch width through the one config path; crops are checked
    against it, the checkpoint records it, a resume needs the same one, and the backbone reloads."""
    path = _write_config(tmp_path / "pretrain.json", _tiny_settings(tmp_path / "run", "vicreg"))
    rectangular = ["--model.patch-size", "4", "--model.patch-frames", "16"]
    config = load_config(path, [*rectangular, "--max-steps", "3"])
    assert config.model.patch_hw == (4, 16)
    with pytest.raises(ValueError, match="patch width 16 frames"):
        load_config(path, [*rectangular, "--vicreg.crop-frames", "40"]).validate()  # 40: whole 8-frame steps only
    run(config, data_factory=tiny_tile_data)
    checkpoint = _load(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["backbone_config"]["patch_size"] == 4 and checkpoint["backbone_config"]["patch_frames"] == 16
    model, _ = load_backbone(tmp_path / "run" / "checkpoint.pth")
    assert model.patch_grid_hw == (8, 4) and model.band_dim == 8 * 64
    fresh = SpectrogramViT(model.config)
    fresh.load_state_dict(checkpoint["backbone"])
    tiles = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.embed(tiles).band, fresh.eval().embed(tiles).band, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different model"):
        run(load_config(path, ["--model.patch-size", "4", "--model.patch-frames", "8"]), data_factory=tiny_tile_data)
    assert run(load_config(path, rectangular), data_factory=tiny_tile_data).step == 12


def test_checkpoint_from_before_patch_frames_resumes_exactly_and_keeps_its_control(tmp_path: Path) -> None:
    """A checkpoint whose backbone_config has no patch_frames key (written before the field) is the
    square model: it resumes (bit for bit as a straight run), loads, and its untrained control is reused."""
    from soundscape_ssl.pretrain.checkpoint import save_untrained_copy

    straight = run(_tiny_config(tmp_path / "straight", "vicreg"), data_factory=tiny_tile_data)
    run(_tiny_config(tmp_path / "old", "vicreg", max_steps=4), data_factory=tiny_tile_data)
    old_path = tmp_path / "old" / "checkpoint.pth"
    checkpoint = _load(old_path)
    assert checkpoint["backbone_config"].pop("patch_frames") is None
    torch.save(checkpoint, old_path)
    model, meta = load_backbone(old_path)
    assert "patch_frames" not in meta["backbone_config"] and model.config.patch_hw == (8, 8)
    control = save_untrained_copy(old_path, tmp_path / "untrained.pth")
    written = control.stat().st_mtime_ns
    assert save_untrained_copy(old_path, control).stat().st_mtime_ns == written  # the same control: reused
    resumed = run(_tiny_config(tmp_path / "old", "vicreg"), data_factory=tiny_tile_data)
    assert resumed.step == 12 and resumed.last_loss == straight.last_loss
    _assert_same_state(_load(tmp_path / "straight" / "checkpoint.pth")["backbone"], _load(old_path)["backbone"])


def test_sigterm_writes_a_checkpoint_and_rerun_finishes(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path, "vicreg")
    with pytest.raises(StopRequested) as stop:
        # Fetch 1 is run()'s shape check; fetch 1 + 3 * 8 + 1 is the first tile of the fourth batch.
        run(config, data_factory=lambda store_dir: TrainData(_SignalOnFetch(at_fetch=1 + 3 * 8 + 1), NORMALIZATION,
                                                             None))
    assert stop.value.signum == signal.SIGTERM
    assert _load(tmp_path / "checkpoint.pth")["step"] == 4  # the step whose batch was loading completed
    assert run(config, data_factory=tiny_tile_data).step == 12


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path, "mae", checkpoint_every_steps=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Fetch 1 is the shape check; the crash hits the batch of the sixth step, before any epoch end.
        run(config, data_factory=lambda store_dir: TrainData(_CrashOnFetch(at_fetch=1 + 5 * 8 + 1), NORMALIZATION,
                                                             None))
    assert _load(tmp_path / "checkpoint.pth")["step"] == 3
    assert run(config, data_factory=tiny_tile_data).step == 12
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["resumed_from_step"] for r in records if r["event"] == "start"] == [None, 3]


# -- stops with a clear message and exit code ---------------------------------------------------


def _write_config(path: Path, settings: dict) -> Path:
    path.write_text(json.dumps(settings))
    return path


def test_non_finite_loss_stops_with_exit_code_3(tmp_path: Path) -> None:
    settings = _tiny_settings(tmp_path / "out", "mae", dataset_factory="test_train:nan_tile_data")
    assert main(["--config", str(_write_config(tmp_path / "c.json", settings))]) == train.EXIT_NON_FINITE_LOSS
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        run(config_from_mapping(TrainConfig, settings))


def test_dino_uniform_collapse_stops_with_exit_code_4(tmp_path: Path) -> None:
    # A huge teacher temperature makes the teacher's output uniform: the collapse DINO must avoid.
    settings = _tiny_settings(tmp_path / "out", "dino", dataset_factory="test_train:tiny_tile_data",
                              log_every=1, collapse_check_after_steps=0, collapse_patience=2)
    settings["dino"].update(teacher_temp=100.0, warmup_teacher_temp=100.0)
    assert main(["--config", str(_write_config(tmp_path / "c.json", settings))]) == train.EXIT_COLLAPSE
    with pytest.raises(CollapseDetectedError, match="uniform distribution"):
        run(config_from_mapping(TrainConfig, settings))
    stopped = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["step"] == 2


def test_bad_config_exits_with_code_2(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "c.json", _tiny_settings(tmp_path / "out"))
    assert main(["--config", str(path), "--no-such-key", "1"]) == train.EXIT_CONFIG_ERROR
    assert main(["--config", str(path), "--method", "byol"]) == train.EXIT_CONFIG_ERROR


# -- two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_gloo_run_under_torchrun(tmp_path: Path) -> None:
    settings = _tiny_settings(tmp_path / "out", "dino", dataset_factory="test_train:tiny_tile_data",
                              epochs=2)
    config_path = _write_config(tmp_path / "pretrain.json", settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "lib")]),
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "soundscape_ssl.pretrain.train", "--config", str(config_path), "--max-steps", "2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    checkpoint = _load(tmp_path / "out" / "checkpoint.pth")
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("start") == 1  # rank 0 alone logs
    assert records[0]["derived"]["effective_batch_size"] == 16 and records[0]["derived"]["steps_per_epoch"] == 3

    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "soundscape_ssl.pretrain.train", "--config", str(config_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load(tmp_path / "out" / "checkpoint.pth")["step"] == 6


def rank_fault_data(store_dir: str) -> TrainData:
    """Dataset factory for the rank-exit test: rank 1 alone meets TEST_RANK_FAULT, either NaN tiles
    ("nan") or a SIGTERM to itself on the first tile of its second batch ("sigterm")."""
    fault = (os.environ.get("TEST_RANK_FAULT") or None) if os.environ.get("RANK") == "1" else None
    dataset = {None: _RandomTiles, "nan": lambda: _RandomTiles(fill=float("nan")),
               "sigterm": lambda: _SignalOnFetch(at_fetch=1 + 8 + 1)}[fault]()
    return TrainData(dataset, NORMALIZATION, None)


@pytest.mark.slow
@pytest.mark.parametrize("fault, exit_code, checkpoint_step", [
    ("nan", train.EXIT_NON_FINITE_LOSS, None), ("sigterm", 128 + signal.SIGTERM, 2)])
def test_every_rank_exits_with_the_runs_code(tmp_path: Path, fault, exit_code, checkpoint_step) -> None:
    """The rank-exit path of a distributed run (NCCL on a GPU node; gloo here, the same code): a
    fault on rank 1 alone ends both ranks with the run's exit code and without a hang, rank 0
    having saved what it must (nothing after a NaN; the stopped step after a SIGTERM). A clean
    exit under torchrun: test_two_process_gloo_run_under_torchrun."""
    import socket

    settings = _tiny_settings(tmp_path / "out", "vicreg", dataset_factory="test_train:rank_fault_data",
                              max_steps=2)
    config_path = _write_config(tmp_path / "pretrain.json", settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "lib")]),
                "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TEST_RANK_FAULT": fault or ""}
    ranks = [subprocess.Popen([sys.executable, "-m", "soundscape_ssl.pretrain.train", "--config", str(config_path)],
                              env={**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        outcomes = [(rank.communicate(timeout=240)[1], rank.returncode)[::-1] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert [code for code, _ in outcomes] == [exit_code, exit_code], [err[-2000:] for _, err in outcomes]
    checkpoint = tmp_path / "out" / "checkpoint.pth"
    assert (_load(checkpoint)["step"] if checkpoint.exists() else None) == checkpoint_step


def test_activity_selection_trains_on_the_tiles_where_calls_stand_out(tmp_path: Path) -> None:
    """A recording whose odd seconds hold a loud warble over noise and whose even seconds hold the
    noise alone: activity_top_fraction=0.5 keeps exactly the warble's tiles."""
    import numpy as np
    import soundfile

    from soundscape_ssl.recordings.archive import scan_archive
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
    from soundscape_ssl.tiles.store import TileStore, activity_above_floor_db
    from soundscape_ssl.tiles.tiling import tile_archive

    rate = 32000
    times_s = np.arange(16 * rate) / rate
    warble = np.sin(2 * np.pi * (3000 + 500 * np.sin(2 * np.pi * 3 * times_s)) * times_s)
    calls = (times_s % 2.0 >= 1.0) & (times_s % 0.25 < 0.12)        # chirps in every odd second
    noise = 0.01 * np.random.default_rng(1).standard_normal(times_s.size)
    archive = tmp_path / "archive"
    archive.mkdir()
    soundfile.write(archive / "REC1_20200101_050000.wav", (0.3 * warble * calls + noise).astype(np.float32), rate)
    store_dir = tmp_path / "tiles"
    tile_archive(scan_archive(archive, show_progress=False).files, store_dir, show_progress=False,
                 config=SpectrogramConfig(n_mels=32, tile_s=1.0, tile_hop_s=1.0, hop_length=500))
    store = TileStore(store_dir)
    activity = activity_above_floor_db(store.read_range(0, len(store)), store.config)
    odd = store.index["offset_s"].to_numpy() % 2.0 == 1.0
    assert activity[odd].min() > activity[~odd].max() + 3.0            # calls stand out by > 3 dB

    data = train.with_active_tiles(train.tile_store_data(str(store_dir)), str(store_dir), 0.5, (1000.0, 8000.0))
    assert list(data.dataset.indices) == np.flatnonzero(odd).tolist()
    assert train.with_active_tiles(data, str(store_dir), 1.0, (1000.0, 8000.0)) is data
    with pytest.raises(ValueError, match="activity_top_fraction"):
        _tiny_config(tmp_path, activity_top_fraction=0.0).validate()
