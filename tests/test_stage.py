"""The stage runner's contract on a toy stage, and the one atomic write."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soundscape_ssl.core import stage
from soundscape_ssl.core.stage import (DiskFullError, FolderClaimedError, PlanMismatchError,
                                       StageError, StagePlan, StageRun, atomic_write,
                                       atomic_write_text, plan_differences, resolve_rank,
                                       torch_threads)

REPO = Path(__file__).resolve().parents[1]


# -- a toy stage: unit k holds the squares of 10k .. 10k+9; the merge concatenates them ----------


def toy_plan(n_units: int = 5, scale: int = 1, batch: int = 8) -> StagePlan:
    description = {"stage": "toy", "n_units": n_units, "scale": scale, "batch": batch,
                   "fingerprint": hashlib.sha256(f"{n_units}/{scale}".encode()).hexdigest()}
    return StagePlan("toy", description, n_units, title="toy products", unpinned=("batch",))


def run_toy(folder: Path, plan: StagePlan, rank: int = 0, world_size: int = 1,
            fail_in_unit: int | None = None, merges: list | None = None,
            merge=None) -> StageRun:
    scale = plan.description["scale"]
    with StageRun(folder, plan, rank, world_size) as run:
        for k in run.todo:
            with run.unit(k) as unit:
                with open(unit.output(run.unit_path(k, ".npy")), "wb") as handle:
                    np.save(handle, scale * np.arange(10 * k, 10 * k + 10) ** 2)
                if k == fail_in_unit:
                    raise RuntimeError(f"failure in unit {k}")
                unit.output(run.unit_path(k, ".txt")).write_text(f"unit {k}\n")
        if run.all_units_done() and not run.finished:
            run.finalize(merge or (lambda: merge_toy(folder, plan, merges)))
    return run


def merge_toy(folder: Path, plan: StagePlan, merges: list | None) -> dict:
    assert not (folder / "config.json").exists()       # config.json comes after the merge
    if merges is not None:
        merges.append(os.getpid())
    values = np.concatenate([np.load(folder / "units" / f"unit-{k:06d}.npy")
                             for k in range(plan.n_units)])
    with atomic_write(folder / "all.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, values)
    return {"config": {"scale": plan.description["scale"]}, "n_values": len(values)}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and stage.CLAIMS_DIR not in path.parts}


@pytest.fixture
def reference(tmp_path) -> dict[str, bytes]:
    run_toy(tmp_path / "reference", toy_plan())
    return folder_bytes(tmp_path / "reference")


# -- the atomic write ---------------------------------------------------------------------------


def test_atomic_write_commits_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_write(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["a.json"]
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.json.") and tmp.suffix == ".tmp"
        assert stage._temp_owner(tmp.name) == (stage._HOST, os.getpid())
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        with atomic_write(tmp_path / "b.npy") as tmp:
            np.save(str(tmp), np.zeros(3))            # np.save appends .npy to such a path
    (tmp_path / f"{tmp.name}.npy").unlink()
    assert os.listdir(tmp_path) == ["a.json"]
    assert stage._temp_owner("unit-000001.npy") is None


def test_a_full_disk_is_one_clear_error_and_no_temporary_file(tmp_path):
    def write_until_full(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as error:
        with atomic_write(tmp_path / "index.parquet", expected_bytes=3 << 20) as tmp:
            write_until_full(tmp)
    message = str(error.value)
    assert message.startswith(f"disk full while writing {tmp_path / 'index.parquet'}: ")
    assert " free on its file system, about 3.0 MiB needed." in message
    assert os.listdir(tmp_path) == []
    # numpy reports a short write without errno; pyarrow with a message of its own.
    assert stage.is_disk_full(OSError("1000 requested and 24 written"))
    assert stage.is_disk_full(OSError("Error writing bytes to file. Detail: [errno 28] "
                                      "No space left on device"))
    assert not stage.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_full_disk_in_a_unit_says_which_units_are_kept(tmp_path):
    plan = toy_plan()
    run_toy(tmp_path / "toy", plan, rank=0, world_size=2)         # units 0, 2, 4
    with pytest.raises(DiskFullError) as error:
        with StageRun(tmp_path / "toy", plan, 1, 2) as run:
            with run.unit(1) as unit:
                unit.output(run.unit_path(1, ".npy")).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert str(error.value).endswith("3 of 5 units are finished and kept: free some space and "
                                     "rerun the same command to resume.")
    assert sorted(p.name for p in (tmp_path / "toy" / "units").iterdir()) == [
        "unit-000000.done", "unit-000000.npy", "unit-000000.txt", "unit-000002.done",
        "unit-000002.npy", "unit-000002.txt", "unit-000004.done", "unit-000004.npy",
        "unit-000004.txt"]


# -- plan, ranks, resume, finalise --------------------------------------------------------------


def test_a_folder_refuses_another_plan_and_says_what_differs(tmp_path, reference):
    folder = tmp_path / "toy"
    run_toy(folder, toy_plan())
    with pytest.raises(PlanMismatchError) as error:
        run_toy(folder, toy_plan(scale=3))
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"{folder} holds toy products of a different plan "
                                       "(plan.json differs in: scale: 1 -> 3; fingerprint ")
    assert plan_differences({"a": {"b": 1, "c": 2}, "fingerprint": "x"},
                            {"a": {"b": 1, "c": 3}, "d": [1], "fingerprint": "y"}) == [
        "a.c: 2 -> 3", "d: null -> [1]"]
    # A field that changes no product (listed as unpinned, outside the fingerprint) is accepted.
    run_toy(folder, toy_plan(batch=64))
    assert folder_bytes(folder) == reference


def test_units_go_to_ranks_by_k_mod_world_size_and_give_the_same_bytes(tmp_path, reference):
    plan = toy_plan(n_units=5)
    assert [plan.units_for_rank(r, 3) for r in range(3)] == [[0, 3], [1, 4], [2]]
    folder = tmp_path / "ranks"
    first = run_toy(folder, plan, rank=2, world_size=3)
    assert first.assigned == first.todo == [2] and not first.all_units_done()
    assert not (folder / "config.json").exists()
    with pytest.raises(StageError, match=r"4 of 5 units of .* are not done yet \(first: \[0, 1, 3, 4\]\)"):
        with StageRun(folder, plan, work=False) as run:
            run.finalize(lambda: merge_toy(folder, plan, None))
    run_toy(folder, plan, rank=0, world_size=3)
    last = run_toy(folder, plan, rank=1, world_size=3)
    assert last.finished and folder_bytes(folder) == reference
    again = run_toy(folder, plan, rank=0, world_size=1)
    assert again.finished and again.todo == [] and folder_bytes(folder) == reference


def test_a_failed_unit_leaves_nothing_and_a_rerun_does_only_what_is_missing(tmp_path, reference):
    folder, plan = tmp_path / "toy", toy_plan()
    with pytest.raises(RuntimeError, match="failure in unit 3"):
        run_toy(folder, plan, fail_in_unit=3)
    units = folder / "units"
    assert sorted(p.name for p in units.glob("*.done")) == [f"unit-00000{k}.done" for k in range(3)]
    assert not list(units.glob("unit-000003*")) and not list(units.glob(".*"))
    mtime = (units / "unit-000000.npy").stat().st_mtime_ns
    with StageRun(folder, plan) as run:
        assert run.todo == [3, 4]
    run_toy(folder, plan)
    assert (units / "unit-000000.npy").stat().st_mtime_ns == mtime
    assert folder_bytes(folder) == reference


def test_a_unit_whose_files_changed_after_its_marker_is_redone(tmp_path, reference, caplog):
    folder, plan = tmp_path / "toy", toy_plan()
    run_toy(folder, plan, rank=0, world_size=2)
    shard = folder / "units" / "unit-000002.npy"
    data = bytearray(shard.read_bytes())
    data[-40:] = bytes(40)                                    # zeroed, same size
    shard.write_bytes(bytes(data))
    (folder / "units" / "unit-000004.txt").write_text("unit")  # truncated
    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.core.stage"):
        with StageRun(folder, plan, 0, 2) as run:
            assert run.todo == [2, 4]
    assert "unit 2 of" in caplog.text and "units/unit-000002.npy differs from its marker's sha256" in caplog.text
    assert "units/unit-000004.txt has 4 bytes, its marker says 7" in caplog.text
    run_toy(folder, plan, rank=0, world_size=2)
    run_toy(folder, plan, rank=1, world_size=2)
    assert folder_bytes(folder) == reference


def test_finalise_runs_once_and_writes_config_json_last(tmp_path, reference):
    folder, plan = tmp_path / "toy", toy_plan()
    merges: list[int] = []
    run_toy(folder, plan, rank=0, world_size=2, merges=merges)
    run_toy(folder, plan, rank=1, world_size=2, merges=merges)
    with StageRun(folder, plan, work=False) as run:        # a late finaliser finds it done
        record = run.finalize(lambda: merge_toy(folder, plan, merges))
    assert merges == [os.getpid()]
    assert record["stage"] == "toy" and record["n_values"] == 50 and record["config"] == {"scale": 1}
    assert folder_bytes(folder) == reference

    def failing_merge() -> dict:
        raise RuntimeError("merge failed")

    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="merge failed"):
        run_toy(broken, plan, merge=failing_merge)
    assert not (broken / "config.json").exists()
    run_toy(broken, plan)
    assert folder_bytes(broken) == reference


# -- the claim ----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    folder, plan = tmp_path / "toy", toy_plan()
    with StageRun(folder, plan, 0, 1):
        with pytest.raises(FolderClaimedError) as error:
            with StageRun(folder, plan, 0, 1):
                pass
        message = str(error.value)
        assert message.startswith(f"{folder} is being written by another process: PID "
                                  f"{os.getpid()} on host {stage._HOST} (rank 0 of 1, since ")
        assert "this process would do rank 0 of 1" in message
        with pytest.raises(FolderClaimedError):           # rank 2 of 4 shares units with 0 of 1
            with StageRun(folder, plan, 2, 4):
                pass
    # The ranks of one job hold disjoint shares; a finaliser holds none.
    with StageRun(folder, plan, 0, 2), StageRun(folder, plan, 1, 2), \
            StageRun(folder, plan, work=False):
        with pytest.raises(FolderClaimedError, match="rank 0 of 2"):
            with StageRun(folder, plan, 2, 4):            # 2 = 0 (mod gcd(2, 4))
                pass
        with pytest.raises(FolderClaimedError, match="rank 1 of 2"):
            with StageRun(folder, plan, 3, 4):            # 3 = 1 (mod 2)
                pass
    assert [p.name for p in (folder / ".claims").iterdir()] == ["registry.lock"]


def test_a_registry_locked_for_long_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import fcntl

    folder = tmp_path / "toy"
    (folder / ".claims").mkdir(parents=True)
    monkeypatch.setattr(stage, "REGISTRY_TIMEOUT_S", 0.2)
    with open(folder / ".claims" / "registry.lock", "a") as frozen:    # a claimant frozen midway
        fcntl.flock(frozen, fcntl.LOCK_EX)
        with pytest.raises(FolderClaimedError, match="registry.lock has been locked by another "
                                                     "process for 0 s"):
            with StageRun(folder, toy_plan()):
                pass


@pytest.mark.parametrize("mine, theirs, overlap", [
    ((0, 1), (0, 1), True), ((0, 2), (1, 2), False), ((0, 2), (0, 3), True),
    ((1, 2), (2, 4), False), ((3, 4), (1, 2), True), ((0, 1), None, False)])
def test_shares_overlap_when_some_unit_is_in_both(mine, theirs, overlap):
    assert stage._shares_overlap(mine, theirs) is overlap
    if theirs is not None:
        both = [k for k in range(100) if k % mine[1] == mine[0] and k % theirs[1] == theirs[0]]
        assert bool(both) is overlap


def test_claims_and_temporary_files_of_dead_writers_are_cleared(tmp_path, caplog):
    folder, plan = tmp_path / "toy", toy_plan()
    code = ("import sys, os; sys.path.insert(0, sys.argv[2]);"
            "from test_stage import *;"
            "run = StageRun(Path(sys.argv[1]), toy_plan(), 0, 1).__enter__();"
            "tmp = stage.temp_path_for(run.unit_path(0, '.npy')); tmp.write_bytes(b'half');"
            "os.kill(os.getpid(), 9)")
    dead = subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)],
                          env={**os.environ, "PYTHONPATH": str(REPO / "lib")}, capture_output=True,
                          text=True, timeout=120)
    assert dead.returncode == -9, dead.stderr
    assert len(list((folder / ".claims").glob("*.json"))) == 1          # its claim record stays
    assert len(list((folder / "units").glob(".unit-000000.npy.*.tmp"))) == 1
    with caplog.at_level(logging.WARNING, logger="soundscape_ssl.core.stage"):
        with StageRun(folder, plan, 0, 2) as live:
            assert [p.name for p in (folder / ".claims").iterdir()] != []
            kept = stage.temp_path_for(live.unit_path(0, ".npy"))   # a live writer's temp file
            kept.write_bytes(b"in flight")
            with StageRun(folder, plan, 1, 2):
                assert [p for p in (folder / "units").iterdir()] == [kept]
            kept.unlink()
    assert f"removed 1 temporary file(s) (4 B) left in {folder} by writers that died" in caplog.text
    assert [p.name for p in (folder / ".claims").iterdir()] == ["registry.lock"]
    # A stage folder inside this one is judged by its own claims, not by this folder's.
    with StageRun(folder / "nested", plan) as nested:    # its writer: some other live process
        in_flight = nested.unit_path(1, f".npy.0123abcd.1@{stage._HOST}.tmp")
        in_flight = in_flight.with_name("." + in_flight.name)
        in_flight.write_bytes(b"in flight")
        with StageRun(folder, plan):
            assert in_flight.exists()
        in_flight.unlink()


# -- fault injection, distributed helpers ------------------------------------------------------


def test_a_process_killed_at_any_write_resumes_to_the_same_bytes(tmp_path, reference):
    before = stage.atomic_writes_completed()
    run_toy(tmp_path / "count", toy_plan())
    n_writes = stage.atomic_writes_completed() - before
    assert n_writes == 1 + 5 * 3 + 2      # plan.json; per unit two files + marker; all.npy, config
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_stage import *;"
            "run_toy(Path(sys.argv[1]), toy_plan())")
    # 0: plan.json; 5: unit 1's second file; 15: unit 4's marker; 16: the merge; 17: config.json
    for kill_at in (0, 5, 15, 16, 17):
        folder = tmp_path / f"killed-{kill_at}"
        killed = subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)],
                                env={**os.environ, "PYTHONPATH": str(REPO / "lib"),
                                     stage.KILL_AT_WRITE_ENV: str(kill_at)},
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
        assert not (folder / "config.json").exists()
        run_toy(folder, toy_plan())
        assert folder_bytes(folder) == reference, kill_at


def test_rank_and_threads_helpers(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (3, 4) and resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError):
        resolve_rank(4, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert stage.resolve_device("cuda") == torch.device("cuda", 1)
    assert stage.resolve_device("cpu") == torch.device("cpu")
    # "auto" is this rank's GPU where torch sees one, else the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage.resolve_device("auto") == torch.device("cuda", 1)
    previous = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == previous


def test_atomic_npy_memmap_writes_in_pieces_and_leaves_nothing_on_failure(tmp_path):
    import numpy as np

    from soundscape_ssl.core.stage import atomic_npy_memmap

    path = tmp_path / "features.npy"
    with atomic_npy_memmap(path, (5, 3), np.float32) as out:
        assert not path.exists()                   # nothing visible until the block ends
        for row in range(5):
            out[row] = row
    np.testing.assert_array_equal(np.load(path), np.repeat(np.arange(5, dtype=np.float32)[:, None], 3, axis=1))
    with pytest.raises(RuntimeError, match="broken"):
        with atomic_npy_memmap(path, (5, 3), np.float32) as out:
            out[:] = -1
            raise RuntimeError("broken writer")
    assert np.load(path)[4, 0] == 4                # the old complete file, not a part of the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]
