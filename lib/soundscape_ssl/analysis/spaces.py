"""The output spaces the analysis notebooks score: a run's checkpoints, the untrained control, and
the embeddings of a tile store under every checkpoint and pooling.

An output space is an (N, D) array whose row i describes tile i of the store (or window i of a
labelled set). Notebooks 04-07 all start from the same question, which checkpoints does this run
have, and 04 and 06 embed the tile store with them; this module answers it once.

The untrained control is a freshly initialised copy of one method's backbone (same architecture,
same input normalisation, background removal included: `checkpoint.save_untrained_copy`). A
trained space counts only by what it gains over it: a random ViT already carries information,
and a pooling can help a random network too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .embed import EmbedConfig, embed_store, load_embeddings
from ..pretrain.checkpoint import save_untrained_copy

logger = logging.getLogger(__name__)

UNTRAINED_PREFIX = "untrained_"
CHECKPOINT_FILE = "checkpoint.pth"


def checkpoint_name(path: str | os.PathLike) -> str:
    """A checkpoint's name: its folder for runs/X/pretrain/<method>/checkpoint.pth, else its stem,
    with anything but letters, digits, `_`, `.` and `-` replaced by `_` (names become file names)."""
    path = Path(path)
    base = path.parent.name if path.stem == Path(CHECKPOINT_FILE).stem and path.parent.name else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "checkpoint"


def checkpoint_names(checkpoints: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]
                     ) -> dict[str, Path]:
    """{name: path}: the names given (a mapping), or `checkpoint_name` of each path, made unique
    with a suffix (two runs' pretrain/mae/checkpoint.pth become mae and mae_2)."""
    if isinstance(checkpoints, Mapping):
        return {str(name): Path(path) for name, path in checkpoints.items()}
    names: dict[str, Path] = {}
    for path in map(Path, checkpoints):
        base = checkpoint_name(path)
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names[name] = path
    return names


def run_checkpoints(run_dir: str | os.PathLike, methods: Sequence[str],
                    explicit: Sequence[str | os.PathLike] = ()) -> tuple[dict[str, Path], dict[str, Path]]:
    """(found, missing), each {name: checkpoint path}.

    With `explicit` paths, those (named by `checkpoint_name`); else the run's own
    `run_dir/pretrain/<method>/checkpoint.pth` for every method. A missing file is listed in
    `missing`, never an error: the notebooks skip it with a note.
    """
    if explicit:
        wanted = checkpoint_names(explicit)
    else:
        wanted = {method: Path(run_dir) / "pretrain" / method / CHECKPOINT_FILE for method in methods}
    found = {name: path for name, path in wanted.items() if path.is_file()}
    missing = {name: path for name, path in wanted.items() if not path.is_file()}
    if missing:
        logger.warning("no checkpoint for %s (looked for %s): skipped", sorted(missing),
                       [str(p) for p in missing.values()])
    return found, missing


def with_untrained_control(checkpoints: Mapping[str, Path], main_method: str, out_path: str | os.PathLike,
                           seed: int = 0) -> tuple[dict[str, Path], str]:
    """`checkpoints` plus "untrained_<main_method>": an untrained copy of main_method's backbone
    written to `out_path` (kept when it already is that copy). Returns (checkpoints, note); the
    note says why there is no control when main_method is not among the checkpoints."""
    checkpoints = dict(checkpoints)
    if main_method not in checkpoints:
        return checkpoints, f"no untrained control: {main_method!r} is not among the checkpoints {sorted(checkpoints)}"
    checkpoints[UNTRAINED_PREFIX + main_method] = save_untrained_copy(checkpoints[main_method], out_path, seed=seed)
    return checkpoints, ""


def embed_checkpoints(store_dir: str | os.PathLike, checkpoints: Mapping[str, Path],
                      embeddings_root: str | os.PathLike, config: EmbedConfig,
                      show_progress: bool = True) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Every checkpoint's embeddings of a tile store, for every pooling of `config`.

    Each checkpoint embeds into `embeddings_root/<name>/` (`embed.embed_store`: resumable). A
    finished folder (its config.json written) is read, never redone, so notebooks share it; a
    folder that cannot serve (started with another plan, lacking a pooling) is skipped with a
    note. Returns ({name: {pooling: (N, D) array}}, notes): each array is the file memory-mapped
    read-only, in its stored dtype (`embed.load_embeddings`), never read whole into memory; the
    analysis functions read it in chunks or subsamples.
    """
    spaces: dict[str, dict[str, np.ndarray]] = {}
    notes: list[str] = []
    for name, checkpoint in checkpoints.items():
        out_dir = Path(embeddings_root) / name
        try:
            if not (out_dir / "config.json").is_file():
                embed_store(store_dir, checkpoint, out_dir, config, show_progress=show_progress)
            spaces[name] = {pooling: load_embeddings(out_dir, pooling) for pooling in config.poolings}
        except ValueError as error:
            notes.append(f"{name}: embeddings in {out_dir} unusable ({error}), skipped")
            logger.warning(notes[-1])
    return spaces, notes


def flatten_spaces(spaces: Mapping[str, Mapping[str, np.ndarray]], with_pooling: bool = True
                   ) -> dict[str, np.ndarray]:
    """{name: {pooling: array}} -> {"<name>_<pooling>": array} (or {name: array}, one pooling each)."""
    flat: dict[str, np.ndarray] = {}
    for name, by_pooling in spaces.items():
        if not with_pooling and len(by_pooling) != 1:
            raise ValueError(f"{name} has poolings {sorted(by_pooling)}: name them with with_pooling=True")
        for pooling, array in by_pooling.items():
            flat[f"{name}_{pooling}" if with_pooling else name] = array
    return flat
