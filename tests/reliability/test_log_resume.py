"""A pretraining run killed and resumed logs each step once (issue 17.9).

The resumed run trains again the steps after its checkpoint's; it used to append their records
to log.jsonl beside the first attempt's, so those steps appeared twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from soundscape_ssl.core.config import config_from_mapping
from soundscape_ssl.pretrain.train import TrainConfig, TrainData, run

NORMALIZATION = {"mean": -60.0, "std": 12.0}


class _Tiles(Dataset):
    """48 deterministic 32 x 64 'tiles' (6 steps of 8 per epoch); raises at fetch `crash_at`."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.tiles = torch.randn(48, 1, 32, 64, generator=torch.Generator().manual_seed(0))
        self.fetches, self.crash_at = 0, crash_at

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.fetches += 1
        if self.fetches == self.crash_at:
            raise RuntimeError("simulated crash")
        return self.tiles[index]


def tiny_config(out_dir: Path) -> TrainConfig:
    return config_from_mapping(TrainConfig, {
        "method": "mae", "store_dir": "in-memory", "out_dir": str(out_dir), "device": "cpu",
        "epochs": 2, "batch_size_per_gpu": 8, "num_workers": 0, "warmup_epochs": 1.0,
        "log_every": 2, "checkpoint_every_steps": 3, "base_lr": 1e-3, "cpu_threads": 1,
        "model": {"arch": "vit_tiny", "depth": 1, "embed_dim": 32, "num_heads": 2, "n_mels": 32,
                  "n_frames": 64, "patch_size": 8, "drop_path_rate": 0.0},
        "mae": {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}})


def test_a_resumed_run_logs_each_step_once(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # Fetch 1 is run()'s shape check; the crash hits the batch of step 6, after the
        # checkpoint of step 3 and the log record of step 4.
        run(config, data_factory=lambda _: TrainData(_Tiles(crash_at=1 + 5 * 8 + 1),
                                                     NORMALIZATION, None))
    log = tmp_path / "log.jsonl"
    with open(log, "a") as handle:                  # a record torn by a kill mid-write
        handle.write('{"event": "train", "step": 5, "lo')
    assert run(config, data_factory=lambda _: TrainData(_Tiles(), NORMALIZATION, None)).step == 12

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert [r["resumed_from_step"] for r in records if r["event"] == "start"] == [None, 3]
    assert [r["event"] for r in records] == ["start", "train", "start", "train", "train", "train",
                                             "train", "train"]
