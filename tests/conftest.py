"""Shared test settings and helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soundscape_ssl.core.audio import WindowGrid, downmix, get_resampler
from soundscape_ssl.tiles.spectrogram import LogMelFrontEnd, SpectrogramConfig


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, where torch sees no CUDA device (`make test` on a
    CPU machine); `pytest -m gpu` selects them on a GPU node (benchmarks/gpu_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); torch sees none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tests use small tensors: extra threads only spin on a shared 2-core machine. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reference_tiles(samples: np.ndarray, sample_rate_hz: int,
                     config: SpectrogramConfig = SpectrogramConfig()
                     ) -> tuple[np.ndarray, WindowGrid]:
    """The known answer for the streaming reader + front end: the whole signal resampled at once
    (no blocks), the window rule's windows cut from it, every sample at or after the end of the
    audio set to zero, then the log-mel front end. Returns (log_mel_db float32 (n, mels, frames),
    the rule's grid)."""
    mono = downmix(np.asarray(samples, dtype=np.float32))
    grid = config.window_rule.grid(len(mono), sample_rate_hz)
    resampled = get_resampler(sample_rate_hz, config.sample_rate_hz,
                              config.resample_lowpass_filter_width,
                              config.resample_rolloff).resample(torch.from_numpy(mono))
    end = -(-len(mono) * config.sample_rate_hz // sample_rate_hz)     # first sample past the end
    if len(grid.starts) == 0:
        return np.zeros((0, config.n_mels, config.n_frames), np.float32), grid
    signal = torch.zeros(max(int(grid.starts[-1]) + config.tile_samples, end))
    signal[:end] = resampled[:end]
    waveforms = torch.stack([signal[int(s):int(s) + config.tile_samples] for s in grid.starts])
    return LogMelFrontEnd(config)(waveforms).log_mel_db.numpy(), grid


@pytest.fixture(scope="session")
def reference_tiles():
    """`_reference_tiles`: tiles of an in-memory signal computed without the streaming reader."""
    return _reference_tiles


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory) -> dict:
    """The inputs of the three resumable stages, small: an archive of six WAV files (one too short
    for a tile), its inventory, a finished tile store (1 s tiles of 32 mels x 64 frames, units of
    7 tiles) and a checkpoint 'trained' on it. Paths as strings, configs as dicts (JSON-ready, so
    that a test can hand them to a subprocess)."""
    import numpy as np
    import pandas as pd
    import soundfile as sf

    from soundscape_ssl.pretrain.checkpoint import build_checkpoint, save_checkpoint
    from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone
    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
    from soundscape_ssl.tiles.store import TileStore
    from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

    root = tmp_path_factory.mktemp("stage_inputs")
    rows = []
    specs = [("R2/R2_20190522_000000", 10.0, 22050), ("R1/R1_20190524_053000", 9.0, 44100),
             ("R1/R1_20190524_063000", 7.7, 44100), ("R1/R1_20190524_070000", 0.5, 44100),
             ("R1/unnamed", 6.0, 32000), ("R3/R3_20190601_120000", 4.0, 48000)]
    for seed, (stem, seconds, rate) in enumerate(specs):
        path = root / "archive" / f"{stem}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        t = np.arange(round(seconds * rate)) / rate
        tone = np.sin(2 * np.pi * (1500 + 700 * seed) * t) * (t % 1.0 < 0.4)
        sf.write(path, (0.03 * rng.standard_normal(len(t)) + 0.3 * tone).astype(np.float32),
                 rate, subtype="PCM_16")
        recorder, _, stamp = path.stem.partition("_")
        rows.append(dict(recorder=recorder, habitat="canopy", path=str(path),
                         relpath=path.relative_to(root / "archive").as_posix(),
                         start_time=pd.to_datetime(stamp, format="%Y%m%d_%H%M%S", errors="coerce"),
                         sample_rate_hz=rate, frames=sf.info(path).frames))
    files = pd.DataFrame(rows)
    files.to_parquet(root / "files.parquet")
    spectrogram = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512,
                                    hop_length=250, n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)
    tiling = TilingConfig(unit_max_tiles=7, decode_block_s=2.3)
    tile_archive(files, root / "store", config=spectrogram, tiling=tiling, rank=0, world_size=1,
                 show_progress=False)
    store = TileStore(root / "store")
    backbone = BackboneConfig(arch="vit_tiny", depth=2, embed_dim=32, num_heads=2, n_mels=32,
                              n_frames=64, drop_path_rate=0.0)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "checkpoint.pth", build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=backbone, method_config={},
        train_config={}, spectrogram_config=store.config.to_dict(),
        normalization=store.normalization, model_state={},
        backbone_state=build_backbone(backbone).state_dict(), optimizer_state={}))
    return {"files_parquet": str(root / "files.parquet"), "audio": str(root / "archive"),
            "spectrogram": spectrogram.to_dict(), "tiling": tiling.to_dict(),
            "store": str(root / "store"), "checkpoint": str(checkpoint), "n_tiles": len(store)}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """configs/smoke.yaml through the real driver, once per session: every notebook, then the
    report. The run folder (runs_root/smoke); the tests that need a whole run share it."""
    from pathlib import Path

    from soundscape_ssl.pipeline.runner import run_pipeline

    repo = Path(__file__).resolve().parents[1]
    return run_pipeline("smoke", run_id="smoke", repo_root=repo, runs_root=tmp_path_factory.mktemp("runs"))
