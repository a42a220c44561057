"""Self-describing pretraining checkpoints: written atomically, loadable with `weights_only=True`.

A checkpoint is a plain dict of tensors, state_dicts and JSON-like values (no pickled classes,
no numpy arrays, no argparse Namespace), so `torch.load(path, weights_only=True)` reads it and
a later stage can rebuild the backbone from the checkpoint alone:

    format             CHECKPOINT_FORMAT
    package_version    soundscape_ssl version that wrote it
    method             "dino" | "mae" | "vicreg"
    step, epoch        optimizer steps completed; epoch the next step belongs to
    world_size         ranks that trained it (the data order depends on it)
    backbone_config    `models.BackboneConfig` as a dict
    method_config      the method's config as a dict
    train_config       the whole `train.TrainConfig` as a dict
    spectrogram_config the tile store's `SpectrogramConfig` as a dict (None for in-memory data)
    normalization      {"mean": dB, "std": dB} the tiles were normalised with (or None)
    git                {"git_sha", "git_dirty"}
    model              the method's state_dict (backbone, heads, EMA teacher, centre ...)
    backbone           state_dict of the backbone later stages should embed with
    optimizer          the optimizer's state_dict
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..core.config import config_from_mapping
from ..core.provenance import git_state, to_jsonable
from ..core.stage import atomic_write
from .models import BackboneConfig, SpectrogramViT, build_backbone

CHECKPOINT_NAME = "checkpoint.pth"
CHECKPOINT_FORMAT = "soundscape_ssl.pretrain.v1"
_TENSOR_KEYS = ("model", "backbone", "optimizer")


def build_checkpoint(*, method: str, step: int, epoch: int, world_size: int, backbone_config: Any,
                     method_config: Any, train_config: Any, spectrogram_config: Any,
                     normalization: dict[str, Any] | None, model_state: dict[str, torch.Tensor],
                     backbone_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     embedding_pooling: str | None = None) -> dict[str, Any]:
    """Assemble a checkpoint dict; configs (dataclasses or dicts) become plain JSON-like dicts.

    `embedding_pooling` names the pooling the method trained (`pooling.POOLINGS`): the embedding
    a scientist gets from `soundscape-ssl embed` when they name none."""
    return {
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "method": method,
        "step": int(step),
        "epoch": int(epoch),
        "world_size": int(world_size),
        "backbone_config": to_jsonable(backbone_config),
        "method_config": to_jsonable(method_config),
        "train_config": to_jsonable(train_config),
        "spectrogram_config": to_jsonable(spectrogram_config),
        # numbers as floats; "background" (the input's background removal) stays a name
        "embedding_pooling": embedding_pooling,
        "normalization": None if normalization is None else {
            key: value if isinstance(value, str) else float(value) for key, value in normalization.items()},
        "git": git_state(),
        "model": model_state,
        "backbone": backbone_state,
        "optimizer": optimizer_state,
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """Write `checkpoint` to `path` atomically: a reader (or a rerun after a kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary, open(temporary, "wb") as handle:
        torch.save(checkpoint, handle)
    return path


class CheckpointError(ValueError):
    """A path that is not a soundscape-ssl checkpoint; the message says what the path is instead."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with `torch.load(weights_only=True)`.

    Raises FileNotFoundError for a missing path and CheckpointError (a ValueError) for anything
    else that is not one of ours, saying what it is: a folder, an audio or text file, an empty
    file, a damaged or foreign torch file, a pickle that holds more than tensors and plain values
    ("refused to unpickle"; it is never unpickled with a weaker guard), or another format.
    Only zip (torch's format) and pickle streams reach the unpickler at all.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise CheckpointError(f"{path} is a folder, not a soundscape-ssl checkpoint file{hint}")
    kind = _file_kind(path)
    if kind not in (_ZIP, _PICKLE):
        raise CheckpointError(f"{path} is not a soundscape-ssl checkpoint: it is {kind}")
    try:
        with warnings.catch_warnings():  # its advice on pickle protocols is noise when we refuse anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error) + ("" if kind == _ZIP else " (in a plain Python pickle)")
        raise CheckpointError(f"{path} is not a soundscape-ssl checkpoint (refused to unpickle: {reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        what = "a damaged or foreign torch/zip file" if kind == _ZIP else "a damaged pickle"
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"{path} is not a soundscape-ssl checkpoint ({what}: "
                              f"{first_line.split('. ')[0].rstrip('.')})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a soundscape-ssl checkpoint (format: {found!r}, "
                              f"expected {CHECKPOINT_FORMAT!r})")
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a complete soundscape-ssl checkpoint (lacks {missing})")
    return checkpoint


_ZIP, _PICKLE = "a zip file", "a pickle"
_REQUIRED_KEYS = ("method", "backbone_config", "backbone")
# Leading bytes of files people pass by mistake, so the error can say what the file is.
_SIGNATURES = ((b"PK\x03\x04", _ZIP), (b"\x80", _PICKLE), (b"fLaC", "a FLAC audio file"),
               (b"OggS", "an Ogg audio file"), (b"ID3", "an MP3 audio file"), (b"\xff\xfb", "an MP3 audio file"),
               (b"\xff\xf3", "an MP3 audio file"), (b"PAR1", "a Parquet file"), (b"\x93NUMPY", "a NumPy array file"),
               (b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip file"))


def _file_kind(path: Path) -> str:
    """What the file looks like from its first bytes (a phrase for messages)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "an empty file"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "a WAV audio file"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unrecognised binary file of {path.stat().st_size} bytes"
    first_line = text.splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts {first_line!r})"


def _refusal_reason(error: Exception) -> str:
    """What torch's safe unpickler refused, without torch's advice on how to lower the guard."""
    advice = re.compile(r"weights.only|torch\.load|trusted source|file an issue|safe_globals|allowlist", re.I)
    lines = [line.replace("WeightsUnpickler error:", "").strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not advice.search(line)]
    return "; ".join(kept) or "the file holds objects other than tensors and plain values"


def checkpoint_metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Everything but the weights and optimizer state: what produced the checkpoint."""
    return {key: value for key, value in checkpoint.items() if key not in _TENSOR_KEYS}


def checkpoint_backbone_config(checkpoint: dict[str, Any], source: str | os.PathLike) -> BackboneConfig:
    """The checkpoint's `backbone_config` as a BackboneConfig (fields it predates keep their
    defaults, which reproduce what it was trained with): compare these, not the stored dicts,
    so a checkpoint written before a field existed still matches the same model."""
    return config_from_mapping(BackboneConfig, checkpoint["backbone_config"], f"{source}: backbone_config")


def load_backbone(checkpoint_path: str | os.PathLike,
                  map_location: str | torch.device = "cpu") -> tuple[SpectrogramViT, dict[str, Any]]:
    """The trained backbone (in eval mode) and the checkpoint's metadata (configs, step, normalisation).

    For DINO this is the EMA teacher's backbone, for MAE the encoder, for VICReg the backbone.
    """
    checkpoint = load_checkpoint(checkpoint_path, map_location)
    model = build_backbone(checkpoint_backbone_config(checkpoint, checkpoint_path))
    try:
        model.load_state_dict(checkpoint["backbone"])
    except RuntimeError as error:  # weights of another shape than backbone_config describes
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint_path}: its backbone weights do not fit its backbone_config "
                              f"({first_line})") from None
    model.to(map_location)
    return model.eval(), checkpoint_metadata(checkpoint)


def save_untrained_copy(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
                        seed: int = 0) -> Path:
    """A freshly initialised backbone with everything else of `checkpoint_path`: the control.

    Same architecture, spectrogram config and input normalisation (background removal included),
    step 0 and method "untrained": embedding tiles with it shows how much of a space's score comes
    from the architecture and the input alone, and how much from pretraining.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    origin = {"initialised_like": str(Path(checkpoint_path).resolve()), "seed": seed}
    backbone_config = checkpoint_backbone_config(checkpoint, checkpoint_path)
    if Path(out_path).is_file():
        existing = load_checkpoint(out_path)
        if existing["train_config"] == origin and checkpoint_backbone_config(existing, out_path) == backbone_config \
                and existing["normalization"] == checkpoint["normalization"]:
            return Path(out_path)  # the same control: keep the file, so embeddings made from it stay valid
    torch.manual_seed(seed)
    model = build_backbone(backbone_config)
    untrained = build_checkpoint(
        method="untrained", step=0, epoch=0, world_size=1, backbone_config=backbone_config,
        method_config={}, train_config=origin,
        spectrogram_config=checkpoint["spectrogram_config"], normalization=checkpoint["normalization"],
        model_state={}, backbone_state=model.state_dict(), optimizer_state={},
        embedding_pooling=checkpoint.get("embedding_pooling"))
    return save_checkpoint(out_path, untrained)
