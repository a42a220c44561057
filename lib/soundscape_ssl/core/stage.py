"""The one resumable, rank-sharded stage runner, and the one atomic write of the library.

A stage (tiling, embedding a tile store, BirdNET, ...) turns its inputs into products in one
output folder. Its work is a fixed plan of units; each process (a torchrun rank, or the only
process) does its share, any process may be killed at any point, and a rerun finishes the job
with the same bytes. A stage plugs in like this::

    plan = StagePlan("indices", description, n_units=len(chunks), unit_noun="chunk",
                     units_dir="chunks", title="acoustic indices")
    with StageRun(out_dir, plan) as run:       # claim my share, clean up, pin plan.json
        if not run.finished:
            for k in run.todo:                 # my units (k % world_size == rank) not yet done
                with run.unit(k) as unit:      # all of a unit's files, or none of them
                    np.save(unit.output(run.unit_path(k, ".npy")), compute(k))
            if run.all_units_done():           # whoever finds every unit done finalises
                run.finalize(lambda: merge(out_dir))   # returns config.json's fields

What the runner guarantees, and how:

* A plan, pinned. `plan.json` holds the stage's description of everything its bytes depend on,
  with a `fingerprint`. A rerun whose fingerprint differs is refused (`PlanMismatchError`) with
  the fields that differ; same fingerprint, same work.
* Ranks. Unit k belongs to rank k % world_size (RANK / WORLD_SIZE as torchrun sets them,
  `resolve_rank`). The plan never depends on the world size, so unit k gives the same bytes
  whichever rank does it, and a job may be resumed on another number of processes.
* An exclusive claim on the folder. Each process registers its share under `.claims/` and
  holds an `fcntl.flock` on its record for as long as it works; the kernel drops the lock when
  the process dies, however it dies. A process whose share overlaps a live holder's (two
  independent writers, or two rank 0s) is refused at once (`FolderClaimedError`) with the
  holder's PID and host; the ranks of one job hold disjoint shares and work side by side.
* Atomic files. Every file is written through `atomic_write`: a temporary name unique to the
  process and the call, beside the target; write, flush + fsync, rename onto the target, fsync
  of the folder. A reader, a rerun or a crash never sees half a file. Temporary files are
  removed when a write fails, and the temporary files of writers that have died are removed by
  the next process that claims the folder.
* Units, all or nothing. `run.unit(k)` writes each of the unit's files atomically, then its done
  marker `<units_dir>/<noun>-NNNNNN.done` (JSON: every file's size and sha256). Only the marker
  means "done". On resume each process verifies the markers of its units against the files
  (sha256, about 1.5 GB/s) and redoes, from scratch, any unit without a marker or whose files
  differ from it (logged), so a truncated or zeroed unit is never trusted.
* Finalise once. `run.finalize(merge)` runs under `finalize.lock` (an flock), skips when
  `config.json` exists, checks every unit's marker against its files' sizes, calls the stage's
  `merge()` (which writes the merged products and returns config.json's fields) and writes
  `config.json` last: a folder without it is unfinished. Deterministic merges make a second
  finalisation, by another rank or a rerun, give the same bytes.
* Clear failures. A full disk raises `DiskFullError` naming the file, the free space and the
  space needed (where known), and saying that finished units are kept.

Fault injection (the resume tests): with SOUNDSCAPE_SSL_KILL_AT_WRITE=N in its environment, a
process that has completed N atomic writes SIGKILLs itself in the next one, after the temporary
file is complete and before it is renamed. Every gap between two steps of a stage is such a
point: plan.json, each file and marker of each unit, each merged product, config.json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no claims, a warning instead
    fcntl = None

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
FINALIZE_LOCK_FILE = "finalize.lock"
CLAIMS_DIR = ".claims"
_REGISTRY_LOCK = "registry.lock"
DONE_SUFFIX = ".done"

KILL_AT_WRITE_ENV = "SOUNDSCAPE_SSL_KILL_AT_WRITE"
REGISTRY_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------------
# Errors


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


class PlanMismatchError(StageError, ValueError):
    """The output folder was started with another plan (other inputs or settings)."""


class FolderClaimedError(StageError):
    """Another live process is writing the same share of the output folder."""


class DiskFullError(StageError):
    """No space left while writing `path`; what was finished before is kept."""

    def __init__(self, path: str | os.PathLike, free_bytes: int | None,
                 needed_bytes: int | None = None, kept: str = "") -> None:
        self.path, self.free_bytes, self.needed_bytes, self.kept = \
            Path(path), free_bytes, needed_bytes, kept
        super().__init__(str(self))

    def __str__(self) -> str:
        free = "unknown space" if self.free_bytes is None else format_bytes(self.free_bytes)
        text = f"disk full while writing {self.path}: {free} free on its file system"
        if self.needed_bytes:
            text += f", about {format_bytes(self.needed_bytes)} needed"
        return f"{text}. {self.kept or 'Files finished before are kept.'}"


def format_bytes(n_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n_bytes) < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} B" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


# Disk full as the layers below report it: errno ENOSPC / EDQUOT, pyarrow's message, and numpy's
# short write (`ndarray.tofile`, which np.save uses on real files, raises OSError without errno:
# "N requested and M written"; on a regular file a short write means no space or quota).
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\d+ requested and \d+ written")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and (error.errno in _DISK_FULL_ERRNOS
                                           or bool(_DISK_FULL_TEXT.search(str(error))))


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# The one atomic write

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
# .<target name>.<8 hex>.<pid>@<host>.tmp: hidden, never matched by a product's glob, and it
# names its writer, so that the stale ones of dead writers can be told from live ones.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<token>[0-9a-f]{8})\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]*)\.tmp$")

_write_lock = threading.Lock()
_writes_completed = 0


def temp_path_for(path: str | os.PathLike) -> Path:
    """A temporary name beside `path`, unique to this process and this call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{os.getpid()}@{_HOST}.tmp")


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary file, None for any other file name."""
    match = _TEMP_NAME.match(name)
    return (match["host"], int(match["pid"])) if match else None


def atomic_writes_completed() -> int:
    """Atomic writes this process has completed: what SOUNDSCAPE_SSL_KILL_AT_WRITE counts."""
    return _writes_completed


def _fault_point(path: Path) -> None:
    kill_at = os.environ.get(KILL_AT_WRITE_ENV)
    if kill_at and _writes_completed == int(kill_at):
        logger.error("fault injection (%s=%s): killing this process before renaming %s",
                     KILL_AT_WRITE_ENV, kill_at, path)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:   # fsync flushes the file's pages whatever the fd's mode
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (the folder's entry); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass   # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Write `path` atomically: the block writes the yielded temporary path (any writer that
    takes a path or a file opened on it), then the file is flushed to disk (fsync), renamed onto
    `path` and the rename made durable (fsync of the folder).

    Guarantees: `path` is either its old content or the complete new one, never a part; the
    temporary file is removed if the block or the commit fails; a full disk raises
    `DiskFullError` (with `expected_bytes` as the space needed, when given). The folder must exist.
    """
    global _writes_completed
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of {path} wrote nothing to {tmp.name} "
                                    "(a writer that appends its own suffix, such as np.save on a "
                                    "path? give it an open file instead)")
        _fsync_file(tmp)
        with _write_lock:
            _fault_point(path)
            os.replace(tmp, path)
            _writes_completed += 1
        _fsync_folder(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(error):
            raise DiskFullError(path, _free_bytes(path.parent), expected_bytes) from error
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`data` into `path` through `atomic_write`."""
    with atomic_write(path, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) into `path` through `atomic_write`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: Any) -> Path:
    """`np.save` of `array` into `path` through `atomic_write` (via an open file: given a path
    without .npy, as the temporary one is, np.save would add the suffix)."""
    import numpy as np

    with atomic_write(path, expected_bytes=getattr(array, "nbytes", None)) as tmp, \
            open(tmp, "wb") as handle:
        np.save(handle, array)
    return Path(path)


@contextlib.contextmanager
def atomic_npy_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any) -> Iterator[Any]:
    """Write a `.npy` file of `shape` and `dtype` piece by piece, atomically: the block fills the
    yielded writable memory map (its disk space reserved first), then the file is flushed and
    committed by `atomic_write`. An array larger than memory is written a chunk at a time."""
    import numpy as np

    n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with atomic_write(path, expected_bytes=n_bytes) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        reserve_space(tmp, tmp.stat().st_size)
        yield out
        out.flush()
        del out


def reserve_space(path: str | os.PathLike, n_bytes: int) -> None:
    """Allocate `n_bytes` of `path` on disk now. Memory-mapped writes to a file the disk cannot
    hold end in SIGBUS, not an error; reserving first turns a full disk into an OSError here."""
    if n_bytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, n_bytes)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):   # no fallocate on this file system
            return
        raise
    finally:
        os.close(descriptor)


def file_sha256(path: str | os.PathLike, block_bytes: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else RANK / WORLD_SIZE (torchrun), else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def resolve_device(device: Any) -> Any:
    """`cuda` means this process's GPU: cuda:LOCAL_RANK under torchrun; `auto` is CUDA when torch
    sees a device, else the CPU (the one home of "auto"). Returns a torch.device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block, restored after (None: untouched)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA's TF32 float32 matmuls and convolutions switched to `enabled` inside the block, the
    previous switches restored after: a process that trains and then tiles or embeds in-process
    must not carry training's TF32 into them. (The switches touch CUDA kernels only.)"""
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------
# The claim on an output folder


@contextlib.contextmanager
def _flocked(path: Path, timeout_s: float | None = None) -> Iterator[bool]:
    """An exclusive flock on `path` (created if needed), waiting at most `timeout_s` (None: as
    long as it takes; then FolderClaimedError). Yields False where the file system has no locks
    (the caller goes on unlocked, with a warning)."""
    with open(path, "a") as handle:
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "fcntl is not available")
            if timeout_s is None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise FolderClaimedError(
                                f"{path} has been locked by another process for {timeout_s:.0f} s "
                                "(one frozen while it claimed the folder?); find it with "
                                f"`fuser {path}` and end it, then rerun") from None
                        time.sleep(0.01)
        except OSError as error:
            logger.warning("no file lock on %s (%s): concurrent writers cannot be excluded", path,
                           error)
            yield False
            return
        yield True


def _shares_overlap(mine: tuple[int, int] | None, theirs: tuple[int, int] | None) -> bool:
    """Whether two rank shares can hold a common unit: k = r1 (mod w1) and k = r2 (mod w2) has a
    solution iff r1 = r2 (mod gcd(w1, w2)). A share of None (finalising only) holds no unit."""
    if mine is None or theirs is None:
        return False
    return (mine[0] - theirs[0]) % math.gcd(mine[1], theirs[1]) == 0


def _share_text(share: Sequence[int] | None) -> str:
    return "finalising" if share is None else f"rank {share[0]} of {share[1]}"


@dataclass
class _Claim:
    """This process's registered, flock-held claim on a share of a folder."""

    folder: Path
    share: tuple[int, int] | None
    record_path: Path | None = None
    handle: Any = None

    def acquire(self) -> "_Claim":
        claims = self.folder / CLAIMS_DIR
        claims.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": _HOST, "share": self.share,
                  "since": dt.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv[:4])}
        # Claiming takes milliseconds; a registry lock held for long means a frozen process.
        with _flocked(claims / _REGISTRY_LOCK, timeout_s=REGISTRY_TIMEOUT_S) as locked:
            if not locked:
                self._remove_stale_temps(live_owners=None)
                return self
            self.record_path = claims / f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.json"
            self.handle = open(self.record_path, "w+")
            try:
                self.handle.write(json.dumps(record) + "\n")
                self.handle.flush()
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holders = self._live_holders()
                for holder in holders:
                    if _shares_overlap(self.share, holder.get("share")):
                        raise FolderClaimedError(
                            f"{self.folder} is being written by another process: PID "
                            f"{holder.get('pid')} on host {holder.get('host')} "
                            f"({_share_text(holder.get('share'))}, since {holder.get('since')}; "
                            f"this process would do {_share_text(self.share)}). Two writers would "
                            "corrupt it: wait for that process to end, stop it, or use another "
                            "folder.")
                owners = {(h.get("host"), h.get("pid")) for h in holders} | {(_HOST, os.getpid())}
                self._remove_stale_temps(owners)
            except BaseException as error:
                self.release()
                if is_disk_full(error):
                    raise DiskFullError(self.record_path or claims, _free_bytes(claims)) from error
                raise
        return self

    def _live_holders(self) -> list[dict[str, Any]]:
        """Records of the other live claims; stale ones (their process died) are removed.
        Called under the registry lock, so no record is half-written or half-removed."""
        holders = []
        for path in sorted((self.folder / CLAIMS_DIR).glob("*.json")):
            if path == self.record_path:
                continue
            try:
                handle = open(path, "r")
            except FileNotFoundError:
                continue  # released meanwhile
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    try:
                        holders.append(json.loads(handle.read() or "{}"))
                    except ValueError:
                        holders.append({"pid": "?", "host": "?", "share": [0, 1]})
                    continue
                path.unlink(missing_ok=True)   # its holder died: the kernel dropped its lock
        return holders

    def _remove_stale_temps(self, live_owners: set[tuple[Any, Any]] | None) -> None:
        """Remove the temporary files of writers that are no longer alive. Without locks only
        this host's temporary files of dead PIDs can be judged. A subfolder with claims of its
        own is another stage's folder: its writers are judged by its own claims, not here."""
        removed, freed = 0, 0
        for root, folders, files in os.walk(self.folder):
            if CLAIMS_DIR in folders and Path(root) != self.folder:
                folders[:] = []
                continue
            folders[:] = [name for name in folders if name != CLAIMS_DIR]
            for name in files:
                owner = _temp_owner(name)
                if owner is None:
                    continue
                if live_owners is not None:
                    stale = owner not in live_owners
                else:
                    stale = owner[0] == _HOST and not _pid_alive(owner[1])
                if stale:
                    path = Path(root) / name
                    with contextlib.suppress(OSError):
                        freed += path.stat().st_size
                        path.unlink()
                        removed += 1
        if removed:
            logger.warning("removed %d temporary file(s) (%s) left in %s by writers that died",
                           removed, format_bytes(freed), self.folder)

    def release(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.record_path.unlink()
            self.handle.close()   # closing drops the flock
            self.handle = None


def claim_folder(folder: str | os.PathLike) -> _Claim:
    """Claim a whole output folder for this process (for a writer that is not a `StageRun`, such
    as pretraining's rank 0): a second claimant is refused while this one lives, and temporary
    files of writers that died are removed. Call `.release()` when done."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _Claim(folder, (0, 1)).acquire()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# The stage runner


@dataclass(frozen=True)
class StagePlan:
    """What a stage computes in its folder: the description pinned in plan.json, and its units.

    `description` must hold a "fingerprint" (a digest of everything the products' bytes depend
    on); it is written to plan.json as sorted, indented JSON. `unpinned` names dotted keys of the
    description that may differ on a rerun without changing the work (a moved input's path, a
    batch size); they are left out of the differences a refusal lists.
    """

    stage: str                        # the stage's name, as config.json records it
    description: Mapping[str, Any]
    n_units: int
    unit_noun: str = "unit"           # unit k's files are <units_dir>/<noun>-NNNNNN.*
    units_dir: str = "units"
    title: str = "products"           # what the folder holds, for messages ("a tile store")
    unpinned: tuple[str, ...] = ()
    keep_units: bool = True           # False: the units folder is removed once config.json exists

    @property
    def fingerprint(self) -> str:
        return str(self.description["fingerprint"])

    def unit_name(self, unit_id: int) -> str:
        return f"{self.unit_noun}-{unit_id:06d}"

    def units_for_rank(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.n_units, world_size))


def read_plan(folder: str | os.PathLike) -> dict[str, Any]:
    """A stage folder's plan.json; a clear error when there is none."""
    path = Path(folder) / PLAN_FILE
    if not path.exists():
        raise StageError(f"{path} not found: {folder} is not a started stage folder")
    return json.loads(path.read_text())


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def plan_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                     unpinned: Sequence[str] = ()) -> list[str]:
    """'key: old -> new' for each (dotted) key whose value differs, fingerprint and `unpinned` aside."""
    before, after = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    skip = set(unpinned) | {"fingerprint"}
    return [f"{key}: {_short(before.get(key))} -> {_short(after.get(key))}"
            for key in sorted(set(before) | set(after))
            if key not in skip and before.get(key) != after.get(key)]


class UnitOutput:
    """The files of one unit being written: `output(path)` gives the temporary path to write
    `path` through. `StageRun.unit` commits them, in the order they were opened, when its block
    ends, or removes them all if it fails."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._writes: list[contextlib.AbstractContextManager] = []

    def output(self, path: str | os.PathLike, *, expected_bytes: int | None = None) -> Path:
        path = Path(path)
        if path in self.paths:
            raise ValueError(f"{path} is already an output of this unit")
        write = atomic_write(path, expected_bytes=expected_bytes)
        tmp = write.__enter__()
        self.paths.append(path)
        self._writes.append(write)
        return tmp

    def _close(self, error: BaseException | None) -> None:
        """Commit every file (`error` None) or remove every temporary file. If a commit fails,
        the files not yet committed are removed and that failure is raised. A full disk met by
        the unit's own writing is raised as the DiskFullError of the file opened last (the one
        being written)."""
        failure = disk_full = None
        for write in self._writes:
            if error is None and failure is None:
                try:
                    write.__exit__(None, None, None)
                except BaseException as commit_error:
                    failure = commit_error
                continue
            cause = error or failure
            try:
                write.__exit__(type(cause), cause, cause.__traceback__)
            except DiskFullError as converted:
                disk_full = converted
            except BaseException:
                pass   # the cause itself, re-raised by the caller
        self._writes = []
        if failure is not None:
            raise failure
        if error is not None and disk_full is not None:
            raise disk_full


class StageRun:
    """This process's run of a stage in `folder` (a context manager; see the module docstring).

    On entry: refuse a folder started with another plan; if config.json exists the stage is
    `finished` (nothing to do, no claim); otherwise claim this process's share (refusing an
    overlapping live writer), remove stale temporary files, write plan.json if missing and
    compute `todo`: this rank's units whose done marker is missing or does not match their files.
    `work=False` claims no units (finalising only). On exit the claim is released.
    """

    def __init__(self, folder: str | os.PathLike, plan: StagePlan, rank: int | None = None,
                 world_size: int | None = None, *, work: bool = True) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.rank, self.world_size = resolve_rank(rank, world_size) if work else (0, 1)
        self.work = work
        self.assigned: list[int] = plan.units_for_rank(self.rank, self.world_size) if work else []
        self.todo: list[int] = []
        self.finished = False
        self._claim: _Claim | None = None

    # -- entry and exit ---------------------------------------------------------------------------

    def __enter__(self) -> "StageRun":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_plan()
        if (self.folder / CONFIG_FILE).exists() and (self.folder / PLAN_FILE).exists():
            self.finished = True
            return self
        self._claim = _Claim(self.folder, (self.rank, self.world_size) if self.work else None)
        self._claim.acquire()
        try:
            if not self._check_plan():
                atomic_write_text(self.folder / PLAN_FILE,
                                  json.dumps(dict(self.plan.description), indent=2,
                                             sort_keys=True) + "\n")
            (self.folder / self.plan.units_dir).mkdir(parents=True, exist_ok=True)
            self.todo = [k for k in self.assigned if not self._verified(k)]
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def _check_plan(self) -> bool:
        """False when there is no plan.json yet; raises when it pins another plan."""
        path = self.folder / PLAN_FILE
        if not path.exists():
            return False
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") != self.plan.fingerprint:
            differences = plan_differences(existing, self.plan.description, self.plan.unpinned)
            what = ", ".join(differences) or "the inputs themselves (same settings and counts)"
            raise PlanMismatchError(
                f"{self.folder} holds {self.plan.title} of a different plan (plan.json differs "
                f"in: {what}; fingerprint {str(existing.get('fingerprint'))[:12]} vs "
                f"{self.plan.fingerprint[:12]}); use a new folder or delete it")
        return True

    # -- units ------------------------------------------------------------------------------------

    def unit_path(self, unit_id: int, suffix: str) -> Path:
        """<folder>/<units_dir>/<noun>-NNNNNN<suffix>: where a stage may keep unit k's files."""
        return self.folder / self.plan.units_dir / f"{self.plan.unit_name(unit_id)}{suffix}"

    def marker_path(self, unit_id: int) -> Path:
        return self.unit_path(unit_id, DONE_SUFFIX)

    def unit_done(self, unit_id: int) -> bool:
        """Whether unit k has its done marker (not verified; see `todo` for that)."""
        return self.marker_path(unit_id).exists()

    def all_units_done(self) -> bool:
        return self.finished or all(self.unit_done(k) for k in range(self.plan.n_units))

    def _marker_problem(self, unit_id: int, checksums: bool) -> str | None:
        """None when unit k's marker matches its files (sizes; and sha256 if `checksums`), else why not."""
        try:
            marker = json.loads(self.marker_path(unit_id).read_text())
            files = marker["files"]
        except FileNotFoundError:
            return "no done marker"
        except (ValueError, KeyError, TypeError) as error:
            return f"unreadable done marker ({error})"
        for relpath, expected in files.items():
            path = self.folder / relpath
            if not path.exists():
                return f"{relpath} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{relpath} has {size} bytes, its marker says {expected['bytes']}"
            if checksums and file_sha256(path) != expected["sha256"]:
                return f"{relpath} differs from its marker's sha256"
        return None

    def _verified(self, unit_id: int) -> bool:
        problem = self._marker_problem(unit_id, checksums=True)
        if problem is None:
            return True
        if problem != "no done marker":
            logger.warning("%s %d of %s is marked done but %s: redoing it", self.plan.unit_noun,
                           unit_id, self.folder, problem)
            self.marker_path(unit_id).unlink(missing_ok=True)
        return False

    def _kept_note(self, finalising: bool = False) -> str:
        n_done = sum(self.unit_done(k) for k in range(self.plan.n_units))
        noun = self.plan.unit_noun
        if finalising:
            return (f"All {self.plan.n_units} {noun}s are finished and kept: free some space and "
                    "rerun the same command to finalise.")
        return (f"{n_done} of {self.plan.n_units} {noun}s are finished and kept: free some space "
                "and rerun the same command to resume.")

    @contextlib.contextmanager
    def unit(self, unit_id: int) -> Iterator[UnitOutput]:
        """Commit unit k as a whole: the block writes its files through `output(path)`; when it
        ends, each file is renamed into place, then the done marker records their sizes and
        sha256. If the block fails, nothing of the unit is left. Safe to use from a worker thread."""
        if not 0 <= unit_id < self.plan.n_units:
            raise ValueError(f"{self.plan.unit_noun} {unit_id} is not in the plan "
                             f"(0 .. {self.plan.n_units - 1})")
        unit = UnitOutput()
        try:
            try:
                yield unit
            except BaseException as error:
                unit._close(error)
                raise
            unit._close(None)
            files = {path.relative_to(self.folder).as_posix():
                     {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                     for path in unit.paths}
            atomic_write_text(self.marker_path(unit_id),
                              json.dumps({"unit": unit_id, "files": files}, indent=2,
                                         sort_keys=True) + "\n")
        except DiskFullError as error:
            error.kept = self._kept_note()
            raise

    # -- finalising -------------------------------------------------------------------------------

    def finalize(self, merge: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """Merge the finished units once, under the finalise lock; returns config.json's content.

        `merge()` writes the merged products (through `atomic_write`) and returns config.json's
        fields: "config" (the stage's config) and any others; config.json is written last. When it
        exists already (another rank or an earlier run finalised) nothing is done. Raises
        StageError while units are missing or no longer match their done markers.
        """
        from .provenance import write_config_json   # provenance writes through atomic_write

        config_path = self.folder / CONFIG_FILE
        with _flocked(self.folder / FINALIZE_LOCK_FILE):
            if config_path.exists():
                return json.loads(config_path.read_text())
            missing = [k for k in range(self.plan.n_units) if not self.unit_done(k)]
            if missing:
                raise StageError(f"{len(missing)} of {self.plan.n_units} {self.plan.unit_noun}s "
                                 f"of {self.folder} are not done yet (first: {missing[:5]}); run "
                                 "the remaining ranks before finalising")
            problems = [(k, problem) for k in range(self.plan.n_units)
                        if (problem := self._marker_problem(k, checksums=False))]
            if problems:
                k, problem = problems[0]
                raise StageError(f"{len(problems)} {self.plan.unit_noun}(s) of {self.folder} no "
                                 f"longer match their done markers ({self.plan.unit_noun} {k}: "
                                 f"{problem}); rerun the stage to redo them")
            try:
                record = dict(merge())
                write_config_json(self.folder, self.plan.stage, **record)
            except DiskFullError as error:
                error.kept = self._kept_note(finalising=True)
                raise
            if not self.plan.keep_units:
                shutil.rmtree(self.folder / self.plan.units_dir, ignore_errors=True)
            self.finished = True
            return json.loads(config_path.read_text())
