"""Tiling into a disk that fills up: one clear error, no temporary file, finished units kept,
and a rerun with space gives the same store byte for byte.

Issue 17.5: a full disk during finalisation left `index.parquet.<pid>.tmp` (which a successful
rerun kept) and surfaced as a raw OSError traceback. The disk here is a small tmpfs mounted by
the test (root only), filled with a preallocated file to leave exactly the space wanted; tmpfs
counts only whole pages of file data, so the space each step needs is known from a store made
beforehand by the same code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from soundscape_ssl.core import stage
from soundscape_ssl.core.stage import DiskFullError
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.tiling import TilingConfig, tile_archive

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_disk(tmp_path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


def leave_free(disk: Path, n_bytes: int) -> Path:
    """Preallocate a filler file so that exactly `n_bytes` stay free."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(descriptor, 0, shutil.disk_usage(disk).free - n_bytes)
    finally:
        os.close(descriptor)
    assert shutil.disk_usage(disk).free == n_bytes
    return filler


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and stage.CLAIMS_DIR not in path.relative_to(folder).parts}


def no_temporary_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if "tmp" in path.name]


def tile(inputs: dict, store: Path, rank: int, world_size: int):
    return tile_archive(pd.read_parquet(inputs["files_parquet"]), store,
                        config=SpectrogramConfig.from_dict(inputs["spectrogram"]),
                        tiling=TilingConfig(**inputs["tiling"]), rank=rank, world_size=world_size,
                        show_progress=False)


def test_a_disk_full_in_a_unit_keeps_the_finished_units(stage_inputs, small_disk):
    reference = Path(stage_inputs["store"])
    store = small_disk / "tiles"
    assert not tile(stage_inputs, store, rank=0, world_size=2).finalized    # units 0, 2, 4
    filler = leave_free(small_disk, 2 * PAGE)      # the claim record's page, and one to spare
    with pytest.raises(DiskFullError) as error:
        tile(stage_inputs, store, rank=1, world_size=2)
    shard_bytes = (reference / "units" / "unit-000001.npy").stat().st_size
    assert str(error.value) == (
        f"disk full while writing {store / 'units' / 'unit-000001.npy'}: 4.0 KiB free on its file "
        f"system, about {shard_bytes / 1024:.1f} KiB needed. 3 of 6 units are finished and kept: "
        "free some space and rerun the same command to resume.")
    assert no_temporary_files(store)
    assert sorted(path.name for path in (store / "units").glob("*.done")) == [
        "unit-000000.done", "unit-000002.done", "unit-000004.done"]

    filler.unlink()
    summary = tile(stage_inputs, store, rank=0, world_size=1)
    assert (summary.units_already_done, summary.units_written, summary.finalized) == (3, 3, True)
    assert store_bytes(store) == store_bytes(reference)


def test_a_disk_full_while_finalising_keeps_every_unit_and_no_temporary_file(stage_inputs,
                                                                          small_disk):
    reference = Path(stage_inputs["store"])
    store = small_disk / "tiles"
    assert not tile(stage_inputs, store, rank=0, world_size=2).finalized    # units 0, 2, 4
    # Exactly what rank 1 needs for units 1, 3, 5 (four files each) and its claim record:
    # its units fit, the merged index does not.
    units_bytes = sum(pages(path.stat().st_size) for k in (1, 3, 5)
                      for path in (reference / "units").glob(f"unit-{k:06d}.*"))
    filler = leave_free(small_disk, units_bytes + PAGE)
    with pytest.raises(DiskFullError) as error:
        tile(stage_inputs, store, rank=1, world_size=2)
    assert str(error.value) == (
        f"disk full while writing {store / 'index.parquet'}: 0 B free on its file system. All 6 "
        "units are finished and kept: free some space and rerun the same command to finalise.")
    assert no_temporary_files(store)
    assert len(list((store / "units").glob("*.done"))) == 6
    assert not (store / "index.parquet").exists() and not (store / "config.json").exists()

    filler.unlink()
    summary = tile(stage_inputs, store, rank=0, world_size=1)
    assert (summary.units_already_done, summary.units_written, summary.finalized) == (6, 0, True)
    assert store_bytes(store) == store_bytes(reference)
