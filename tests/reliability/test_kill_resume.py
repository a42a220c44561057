"""A kill at a random point of each resumable stage, then a rerun: byte-identical products.

Each stage runs once in this process (the reference, counting its atomic writes), then in
subprocesses that SIGKILL themselves inside their N-th write (SOUNDSCAPE_SSL_KILL_AT_WRITE: after
the temporary file is complete, before the rename), each followed by a rerun here. The kill
points are drawn with a fixed seed (reported on failure), plus a point inside a unit and one
inside the final merge, so every failure can be replayed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soundscape_ssl.analysis import birdnet
from soundscape_ssl.core import stage

SEED = 20240613
REPO = Path(__file__).resolve().parents[2]


def run_stage(name: str, inputs: dict, out_dir: str) -> None:
    """Run one stage on the shared inputs into `out_dir` (here, or in a subprocess)."""
    if name == "tiling":
        from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
        from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

        tile_archive(pd.read_parquet(inputs["files_parquet"]), out_dir,
                     config=SpectrogramConfig.from_dict(inputs["spectrogram"]),
                     tiling=TilingConfig(**inputs["tiling"]), rank=0, world_size=1,
                     show_progress=False)
    elif name == "embed":
        from soundscape_ssl.analysis.embed import EmbedConfig, embed_store

        embed_store(inputs["store"], inputs["checkpoint"], out_dir,
                    EmbedConfig(pooling="both", batch_size=3, chunk_tiles=8, device="cpu", num_workers=1),
                    rank=0, world_size=1, show_progress=False)
    elif name == "birdnet_tiles":
        index = pd.read_parquet(Path(inputs["store"]) / "index.parquet").iloc[::2]
        birdnet.run_on_tiles(index, out_dir, birdnet.BirdNetConfig(
            shard_max_windows=5, save_confidences=True, batch_size=2), progress=False)
    elif name == "birdnet_files":
        birdnet.run_on_files(sorted(Path(inputs["audio"]).rglob("*.wav")), out_dir,
                             birdnet.BirdNetConfig(shard_max_windows=4, batch_size=2),
                             progress=False)
    else:
        raise ValueError(name)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and stage.CLAIMS_DIR not in path.relative_to(folder).parts}


def killed_run(name: str, inputs: dict, out_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_kill_resume as t; "
            "t.run_stage(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])")
    env = {**os.environ, stage.KILL_AT_WRITE_ENV: str(kill_at), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"),
                                                       os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name,
                           json.dumps(inputs), str(out_dir)],
                          env=env, capture_output=True, text=True, timeout=300)


# Writes of a run, in order: plan.json; per unit its files, then its marker; the merged products;
# config.json. `finals` is the number of writes of the merge plus config.json.
STAGES = {
    "tiling": {"finals": 3, "files_per_unit": 3},
    "embed": {"finals": 3, "files_per_unit": 1},
    "birdnet_tiles": {"finals": 5, "files_per_unit": 3},
    "birdnet_files": {"finals": 4, "files_per_unit": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_a_kill_at_a_random_point_then_a_rerun_gives_the_same_bytes(name, stage_inputs, tmp_path):
    if name.startswith("birdnet") and not birdnet.birdnet_available()[0]:
        pytest.skip(f"BirdNET is not installed here: {birdnet.birdnet_available()[1]}")
    reference = tmp_path / "reference"
    before = stage.atomic_writes_completed()
    run_stage(name, stage_inputs, str(reference))
    n_writes = stage.atomic_writes_completed() - before
    expected = folder_bytes(reference)
    assert (reference / "config.json").exists() and not list(reference.rglob(".*.tmp"))

    layout = STAGES[name]
    n_units = (n_writes - 1 - layout["finals"]) // (layout["files_per_unit"] + 1)
    assert n_writes == 1 + n_units * (layout["files_per_unit"] + 1) + layout["finals"] and n_units > 2
    mid_unit = 1 + (n_units // 2) * (layout["files_per_unit"] + 1)   # a middle unit's first file
    mid_finalise = n_writes - layout["finals"]                       # the merge's first product
    rng = np.random.default_rng([SEED, list(STAGES).index(name)])
    kill_points = sorted({mid_unit, mid_finalise, *rng.choice(n_writes, size=2, replace=False).tolist()})
    for kill_at in kill_points:
        out = tmp_path / f"killed-at-{kill_at}"
        killed = killed_run(name, stage_inputs, out, kill_at)
        where = f"{name}, killed in write {kill_at} of {n_writes} (seed {SEED})"
        assert killed.returncode == -9, f"{where}: {killed.stderr[-2000:]}"
        assert not (out / "config.json").exists(), where
        assert list(out.rglob(".*.tmp")), where   # the files it was writing, left by the kill
        run_stage(name, stage_inputs, str(out))
        assert not list(out.rglob(".*.tmp")), where
        assert folder_bytes(out) == expected, where
