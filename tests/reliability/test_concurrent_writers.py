"""Two writers on one output folder: the second is refused at once; corrupt units are redone.

Issue 17.1: two `tile` processes on one folder used to share `unit-K.npy.tmp`; the loser died
with a raw FileNotFoundError, and a killed pair could leave a unit with zeroed tiles marked done,
which a rerun trusted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from soundscape_ssl.core import stage

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and stage.CLAIMS_DIR not in path.relative_to(folder).parts}


def start_tiling(inputs: dict, store: Path) -> subprocess.Popen:
    """A tiling process (rank 0 of 1) on the shared inputs, as `soundscape-ssl tile` runs one."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_kill_resume as t; "
            "t.run_stage('tiling', json.loads(sys.argv[2]), sys.argv[3])")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "lib"),
                                                       os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", code, str(HERE), json.dumps(inputs), str(store)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def registry_free(store: Path) -> bool:
    with open(store / stage.CLAIMS_DIR / "registry.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True    # closing the file drops the lock


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_folder_and_the_holders_pid(stage_inputs, tmp_path):
    store = tmp_path / "tiles"
    first = start_tiling(stage_inputs, store)
    # Freeze the first writer as soon as it holds its claim (its record is written and the
    # registry, locked for the milliseconds of claiming, is free again): it keeps the folder.
    deadline = time.monotonic() + 120
    while not (list((store / stage.CLAIMS_DIR).glob("*.json")) and registry_free(store)):
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the first writer never claimed the folder"
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert not (store / "config.json").exists()
        second = start_tiling(stage_inputs, store)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode != 0
        message = stderr.strip().splitlines()[-1]
        assert message.startswith(f"soundscape_ssl.core.stage.FolderClaimedError: {store} is being "
                                  f"written by another process: PID {first.pid} on host ")
        assert "(rank 0 of 1, since " in message
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    assert store_bytes(store) == store_bytes(Path(stage_inputs["store"]))


def test_a_zeroed_or_truncated_unit_marked_done_is_detected_and_redone(stage_inputs, tmp_path,
                                                                       caplog):
    import pandas as pd

    from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
    from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

    files = pd.read_parquet(stage_inputs["files_parquet"])
    settings = dict(config=SpectrogramConfig.from_dict(stage_inputs["spectrogram"]),
                    tiling=TilingConfig(**stage_inputs["tiling"]), show_progress=False)
    store = tmp_path / "tiles"
    first = tile_archive(files, store, rank=0, world_size=2, **settings)     # units 0, 2, 4
    assert (first.units_written, first.finalized) == (3, False)
    zeroed, truncated = store / "units" / "unit-000000.npy", store / "units" / "unit-000002.npy"
    shard = np.load(zeroed)
    shard[2:5] = 0                                  # tiles 2-4 zeroed, the file's size unchanged
    with open(zeroed, "r+b") as handle:
        np.save(handle, shard)
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    assert (store / "units" / "unit-000000.done").exists()

    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.core.stage"):
        summary = tile_archive(files, store, rank=0, world_size=1, **settings)
    assert "unit 0 of" in caplog.text and "units/unit-000000.npy differs from its marker's sha256" in caplog.text
    assert "unit 2 of" in caplog.text and "units/unit-000002.npy has" in caplog.text
    assert (summary.units_already_done, summary.units_written, summary.finalized) == (1, 5, True)
    assert store_bytes(store) == store_bytes(Path(stage_inputs["store"]))


def test_a_second_training_on_one_out_dir_is_refused_and_dead_temporary_files_go(tmp_path):
    from test_log_resume import NORMALIZATION, _Tiles, tiny_config

    from soundscape_ssl.pretrain.train import TrainData, run

    config = tiny_config(tmp_path)
    data = lambda _: TrainData(_Tiles(), NORMALIZATION, None)    # noqa: E731
    holder = stage.claim_folder(tmp_path)               # another run holds the folder
    try:
        with pytest.raises(stage.FolderClaimedError, match=f"{tmp_path} is being written by "
                                                           f"another process: PID {os.getpid()}"):
            run(config, data_factory=data)
    finally:
        holder.release()
    # A checkpoint write killed before its rename, by a process that is gone.
    stale = tmp_path / ".checkpoint.pth.0123abcd.999999999@elsewhere.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert run(config, data_factory=data).step == 12
    assert not stale.exists() and not list(tmp_path.rglob(".*.tmp"))
