"""Attention heads as unsupervised segmenters: per-head maps, DINO-style masks, scores against planted calls.

For every tile the last block's CLS-to-patch attention of each head is a distribution over the
(frequency x time) patch grid (`head_attention_maps`). DINO's segmentation keeps, per head, the
smallest set of patches holding a share of that mass (60% by default, `attention_mass_mask`).
Heads are scored against the planted events' time-frequency boxes (`box_masks_for_tiles`):

- IoU of the mask with the foreground (bird, and rare-event) boxes, with the best IoU any patch-aligned mask
  could reach on that tile (`iou_ceiling`): boxes do not follow patch borders, so 1.0 is often
  out of reach, for every patch-level method alike;
- the share of the head's attention mass inside the boxes, next to the share of the tile the
  boxes cover (what a uniform map would put there: the chance level);
- on tiles without birds, where the mass goes instead (into insect, rain, wind ... boxes or
  into unannotated background).

Everything is scored at patch level, at the resolution the model sees: a mask is a set of
patches, and its overlap with the boxes is counted in spectrogram cells (mel bins x frames),
which is exact for a patch-aligned mask given each patch's covered fraction. Upsampling to the
spectrogram is by repetition (nearest patch): the model has no finer spatial resolution, and
bilinear smoothing would invent sub-patch detail and move mass across patch borders
(`upsample_to_tile` offers it for display only).

The trivial baseline needs no learning: an energy threshold on the spectrogram. Each cell is
measured in dB above its mel band's median over the tile (`band_median_excess_db`): that
removes what is stationary in the band (the ambient floor and its spectral tilt, a steady
insect chorus, wind rumble), so transient calls stand out at any frequency.
`energy_threshold_mask` keeps a patch when at least 5% of its cells (13 of 256: a one-bin
whistle over 150 ms) lie 10 dB or more above their band's median. Why 10 dB: a noise-only
cell's power varies at most like an exponential variable (one FFT bin; wide bands average
many), so it exceeds 10x its median with probability at most 2^-10 (0.1%), and 13 such cells
in one patch are practically never noise. Measured
on 160 tiles of the demo's synthetic archive: at 6 dB (6% of noise cells) the mask covered 19%
of bird-free tiles (4% at 10 dB), and its mean IoU with bird boxes was 0.20 (0.40). For the
attention-mass score the baseline's "map" (`energy_maps`) is each patch's mean dB beyond that
margin, as a distribution. Mask size drives IoU, so every head is also compared with the
baseline's *same number* of loudest patches (`energy_iou_same_area`, loudness = the patch's
mean dB above the band medians): that paired comparison asks only whether the head picks
better patches than loudness does.

Works for any `SpectrogramViT` (DINO, VICReg, MAE encoders from `checkpoint.load_backbone`):
tiles go in whole and normalised as in training; MAE's encoder attention is computed on the
full, unmasked tile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..recordings.groundtruth import GroundTruthConfig, box_mask, tile_event_overlaps
from ..pretrain.models import SpectrogramViT, patch_grid_hw
from ..core.config import config_from_mapping
from ..core.provenance import write_config_json
from ..core.stage import atomic_write
from ..core.stats import GroupBootstrap, Interval
from ..tiles.spectrogram import SpectrogramConfig, frame_times_s, mel_bin_centres_hz
from ..tiles.store import band_median, normalize_tiles

logger = logging.getLogger(__name__)

STAGE = "attention"
SCORES_FILE = "scores.parquet"
RANKING_FILE = "head_ranking.csv"
ENERGY_SOURCE = "energy"  # `source` of the baseline's rows in the scores table

# A share counts as reaching a target when it is within this of it: float sums of equal weights
# (0.1 six times) must not need a seventh patch for 60%.
_SHARE_TOLERANCE = 1e-9

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


@dataclass
class AttentionConfig:
    """How attention heads are thresholded, the baseline built and the heads ranked. Serialisable."""

    # score_tiles / score_model_attention
    attention_mass: float = 0.6        # share of attention mass a mask keeps (DINO's 60%)
    energy_margin_db: float = 10.0     # baseline: dB above the band's median for a loud cell
    energy_min_cell_fraction: float = 0.05  # baseline: share of loud cells that makes a patch foreground
    batch_size: int = 64               # tiles per forward pass
    # box_masks_for_tiles
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)  # which events count
    counting_only: bool = True         # truth boxes only from events that count in the tile
    # rank_heads / choose_head_on_half
    n_bootstrap: int = 1000            # resamples of groups (or tiles) for the ranking's intervals; 0 = none
    confidence: float = 0.95           # level of the percentile bootstrap intervals
    seed: int = 0                      # bootstrap draws and the split of the groups in halves

    def __post_init__(self) -> None:
        if isinstance(self.ground_truth, dict):
            self.ground_truth = GroundTruthConfig(**self.ground_truth)
        if not 0 < self.attention_mass <= 1:
            raise ValueError(f"attention_mass must be in (0, 1], got {self.attention_mass}")
        if self.energy_margin_db < 0:
            raise ValueError(f"energy_margin_db must be >= 0, got {self.energy_margin_db}")
        if not 0 < self.energy_min_cell_fraction <= 1:
            raise ValueError(f"energy_min_cell_fraction must be in (0, 1], got {self.energy_min_cell_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["ground_truth"]["foreground_kinds"] = list(self.ground_truth.foreground_kinds)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AttentionConfig":
        """Inverse of `to_dict`; unknown keys are an error so a typo never passes silently."""
        return config_from_mapping(cls, values)


# --- Attention maps and masks ----------------------------------------------------------------

@torch.no_grad()
def head_attention_maps(model: SpectrogramViT, tiles: torch.Tensor) -> torch.Tensor:
    """Every head's last-block CLS-to-patch attention: (batch, heads, grid rows, grid columns).

    `tiles` (batch, 1, n_mels, n_frames) must be normalised as in training and a whole number
    of patches on both sides (non-square grids are fine). Each map sums to 1 over patches (the
    CLS token's attention to itself is left out). Run in eval mode (no stochastic depth); the
    model's mode is restored afterwards. Returned as float32 on the model's device.
    """
    if tiles.dim() != 4 or tiles.shape[1] != 1:
        raise ValueError(f"expected tiles of shape (batch, 1, n_mels, n_frames), got {tuple(tiles.shape)}")
    patch_mels, patch_frames = model.config.patch_hw
    if tiles.shape[-2] % patch_mels or tiles.shape[-1] % patch_frames:
        raise ValueError(f"tile {tiles.shape[-2]}x{tiles.shape[-1]} is not a whole number of "
                         f"{patch_mels}x{patch_frames} patches")
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        maps = model.cls_attention_maps(tiles.to(parameter.device, parameter.dtype), renormalize=True)
    finally:
        model.train(was_training)
    return maps.float()


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _like(result: np.ndarray, template: ArrayOrTensor) -> ArrayOrTensor:
    """`result` as the same kind of array as `template` (a tensor on its device, or numpy)."""
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(template.device)
    return result


def upsample_to_tile(maps: ArrayOrTensor, tile_hw: tuple[int, int], mode: str = "nearest") -> ArrayOrTensor:
    """Patch-grid maps or masks (..., grid rows, grid columns) to the spectrogram (..., n_mels, n_frames).

    "nearest" repeats each patch's value over its cells (exact; masks stay patch-aligned);
    "bilinear" smooths across patch borders, for display only (not for masks or scores).
    Values are not divided by the patch area: divide by it for a per-cell distribution.
    """
    height, width = (int(v) for v in tile_hw)
    rows, columns = maps.shape[-2:]
    if mode == "nearest":
        if height % rows or width % columns:
            raise ValueError(f"tile {height}x{width} is not a whole number of patches of a "
                             f"{rows}x{columns} grid")
        if isinstance(maps, torch.Tensor):
            return maps.repeat_interleave(height // rows, dim=-2).repeat_interleave(width // columns, dim=-1)
        return np.repeat(np.repeat(maps, height // rows, axis=-2), width // columns, axis=-1)
    if mode == "bilinear":
        is_mask = maps.dtype == (torch.bool if isinstance(maps, torch.Tensor) else np.bool_)
        if is_mask:
            raise ValueError("bilinear upsampling of a mask is not a mask: use mode='nearest'")
        tensor = torch.as_tensor(_as_numpy(maps), dtype=torch.float32)
        leading = tensor.shape[:-2]
        flat = tensor.reshape(-1, 1, rows, columns)
        smooth = torch.nn.functional.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False)
        return _like(smooth.reshape(*leading, height, width).numpy(), maps)
    raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def _top_patch_mask(values: np.ndarray, n_keep: np.ndarray) -> np.ndarray:
    """Boolean mask of the `n_keep` highest patches of each flattened map (..., n_patches).

    Ties are broken towards the lower flat index (lower frequency row, then earlier time), so
    the result never depends on the sorting algorithm.
    """
    order = np.argsort(-values, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[-1]), axis=-1)
    return ranks < np.asarray(n_keep)[..., None]


def attention_mass_mask(maps: ArrayOrTensor, mass: float = 0.6) -> ArrayOrTensor:
    """Per map, the smallest set of patches holding at least `mass` of its total: (..., rows, columns) bool.

    DINO's thresholding: patches sorted by attention (ties: lower row-major index first), the
    shortest prefix whose cumulative share reaches `mass` (to within 1e-9). A map need not sum
    to 1; it is taken relative to its own total. Returns the same kind of array as `maps`.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    values = _as_numpy(maps).astype(np.float64)
    rows, columns = values.shape[-2:]
    flat = values.reshape(*values.shape[:-2], rows * columns)
    if not np.isfinite(flat).all() or (flat < 0).any():
        raise ValueError("attention maps must be finite and non-negative")
    totals = flat.sum(axis=-1, keepdims=True)
    if (totals <= 0).any():
        raise ValueError("every map needs a positive total to be thresholded")
    shares = np.sort(flat, axis=-1)[..., ::-1] / totals
    # Shortest prefix reaching the target = one more than the number of prefixes still below it.
    n_keep = (np.cumsum(shares, axis=-1) < mass - _SHARE_TOLERANCE).sum(axis=-1) + 1
    mask = _top_patch_mask(flat, np.minimum(n_keep, rows * columns))
    return _like(mask.reshape(values.shape), maps)


def patch_means(cells: np.ndarray, patch_hw: tuple[int, int]) -> np.ndarray:
    """Mean of each patch's cells: (..., n_mels, n_frames) -> (..., rows, columns) float64.

    `patch_hw` is (mel bins, frames) of a patch (`BackboneConfig.patch_hw`). For a boolean cell
    mask (e.g. event boxes) this is the fraction of each patch inside it.
    """
    cells = np.asarray(cells)
    height, width = cells.shape[-2:]
    patch_mels, patch_frames = patch_hw
    if height % patch_mels or width % patch_frames:
        raise ValueError(f"cells {height}x{width} are not a whole number of {patch_mels}x{patch_frames} patches")
    rows, columns = patch_grid_hw((height, width), patch_hw)
    blocks = cells.reshape(*cells.shape[:-2], rows, patch_mels, columns, patch_frames)
    return blocks.mean(axis=(-3, -1), dtype=np.float64)


# --- The energy baseline ---------------------------------------------------------------------

def band_median_excess_db(tiles_db: np.ndarray) -> np.ndarray:
    """dB above each mel band's median over the tile's frames (`store.band_median`, the lower
    median the model's background removal uses): (..., n_mels, n_frames) float32."""
    tiles_db = np.asarray(tiles_db, dtype=np.float32)  # float16 store tiles: compute in float32
    return tiles_db - band_median(tiles_db)


def energy_threshold_mask(tiles_db: np.ndarray, patch_hw: tuple[int, int], margin_db: float = 10.0,
                          min_cell_fraction: float = 0.05) -> np.ndarray:
    """The baseline segmentation: patches where enough cells are loud relative to their band.

    (..., n_mels, n_frames) dB tiles -> (..., rows, columns) bool: a patch is kept when at least
    `min_cell_fraction` of its cells lie `margin_db` or more above their band's median over the
    tile. May be empty (nothing loud in the tile).
    """
    loud = band_median_excess_db(tiles_db) >= margin_db
    return patch_means(loud, patch_hw) >= min_cell_fraction - _SHARE_TOLERANCE


def patch_loudness_db(tiles_db: np.ndarray, patch_hw: tuple[int, int]) -> np.ndarray:
    """Mean dB above the band medians per patch: (..., rows, columns); ranks patches for the same-area baseline."""
    return patch_means(band_median_excess_db(tiles_db), patch_hw)


def energy_maps(tiles_db: np.ndarray, patch_hw: tuple[int, int], margin_db: float = 10.0) -> np.ndarray:
    """The baseline's "attention": per patch, the mean dB beyond `margin_db` above the band medians.

    (..., n_mels, n_frames) dB tiles -> (..., rows, columns) float32 maps summing to 1 per tile.
    A tile with nothing above the margin (stationary noise, digital silence) gets a uniform
    map: the baseline then has no preference.
    """
    excess = np.clip(band_median_excess_db(tiles_db) - margin_db, 0.0, None)
    weights = patch_means(excess, patch_hw)
    totals = weights.sum(axis=(-2, -1), keepdims=True)
    flat = totals <= 0
    if flat.any():
        logger.debug("%d tile(s) have nothing %.1f dB above their band medians: uniform baseline map",
                     int(flat.sum()), margin_db)
    uniform = np.full_like(weights, 1.0 / (weights.shape[-2] * weights.shape[-1]))
    maps = np.where(flat, uniform, weights / np.where(flat, 1.0, totals))
    return maps.astype(np.float32)


# --- Ground truth on the tile grid -------------------------------------------------------------

class TileTruth(NamedTuple):
    """Planted events of N tiles, rasterised on the spectrogram or as per-patch coverage.

    `foreground` / `other`: (N, n_mels, n_frames) bool cell masks, or (N, rows, columns) float64
    covered fractions when made with a `patch_hw` (mel bins, frames). Foreground kinds are those
    of the ground truth config (birds, and the rare bird, chainsaw and gunshot); `other` holds every other counting event (insects, rain,
    wind ...). `boxes` has one row per event box: tile (row position), label, kind, start_s,
    end_s (tile-relative), f_low_hz, f_high_hz, snr_db, counts, foreground.
    """

    foreground: np.ndarray
    other: np.ndarray
    boxes: pd.DataFrame
    patch_hw: tuple[int, int] | None

    @property
    def has_foreground(self) -> np.ndarray:
        """(N,) bool: the tile has at least one foreground cell to find."""
        return self.foreground.reshape(len(self.foreground), -1).any(axis=1)

    def coverage(self, patch_hw: tuple[int, int]) -> "TileTruth":
        """The same truth as per-patch covered fractions (a no-op if it already is, at that shape)."""
        patch_hw = tuple(patch_hw)
        if self.patch_hw is not None:
            if self.patch_hw != patch_hw:
                raise ValueError(f"truth is on {self.patch_hw[0]}x{self.patch_hw[1]} patches, "
                                 f"not {patch_hw[0]}x{patch_hw[1]}")
            return self
        return TileTruth(patch_means(self.foreground, patch_hw), patch_means(self.other, patch_hw),
                         self.boxes, patch_hw)

    def rows(self, start: int, stop: int) -> "TileTruth":
        """Tiles start..stop-1 as their own truth (boxes renumbered from 0)."""
        in_range = self.boxes["tile"].between(start, stop - 1)
        boxes = self.boxes[in_range].assign(tile=lambda frame: frame["tile"] - start).reset_index(drop=True)
        return TileTruth(self.foreground[start:stop], self.other[start:stop], boxes, self.patch_hw)


def box_masks_for_tiles(annotations: pd.DataFrame, tiles: pd.DataFrame, spectrogram_config: SpectrogramConfig,
                        ground_truth: GroundTruthConfig | None = None, counting_only: bool = True,
                        patch_hw: tuple[int, int] | None = None) -> TileTruth:
    """Foreground and other event boxes of each tile on the spectrogram grid of the front end.

    `tiles` needs relpath (as the annotations' `file`) and offset_s; row i is tile i, e.g. rows
    of a tile store's index. A cell is inside a box when its frame centre time and its mel
    band's centre frequency are (`groundtruth.box_mask`). `counting_only` keeps the events that
    count in the tile (audible, enough of them inside); `patch_hw` (mel bins, frames of a patch)
    returns per-patch covered fractions instead of cell masks (N x rows x columns floats instead
    of N x cells booleans).
    """
    ground_truth = ground_truth or GroundTruthConfig()
    pairs = tile_event_overlaps(annotations, tiles, spectrogram_config.tile_s, ground_truth)
    if counting_only:
        pairs = pairs[pairs["counts"]]
    boxes = pairs.drop(columns=["event", "overlap_s"]).assign(
        foreground=pairs["kind"].isin(ground_truth.foreground_kinds).to_numpy()).reset_index(drop=True)
    times_s, centres_hz = frame_times_s(spectrogram_config), mel_bin_centres_hz(spectrogram_config)
    cell_shape = (spectrogram_config.n_mels, spectrogram_config.n_frames)
    if patch_hw is None:
        shape, dtype = cell_shape, bool
    else:
        patch_hw = tuple(patch_hw)
        if cell_shape[0] % patch_hw[0] or cell_shape[1] % patch_hw[1]:
            raise ValueError(f"tiles of {cell_shape[0]}x{cell_shape[1]} are not whole "
                             f"{patch_hw[0]}x{patch_hw[1]} patches")
        shape, dtype = patch_grid_hw(cell_shape, patch_hw), np.float64
    foreground = np.zeros((len(tiles),) + shape, dtype=dtype)
    other = np.zeros_like(foreground)
    for tile, tile_boxes in boxes.groupby("tile", sort=True):
        for target, selected in ((foreground, tile_boxes["foreground"]), (other, ~tile_boxes["foreground"])):
            if selected.any():
                cells = box_mask(tile_boxes[selected.to_numpy()], times_s, centres_hz)
                target[tile] = cells if patch_hw is None else patch_means(cells, patch_hw)
    return TileTruth(foreground, other, boxes, patch_hw)


# --- Scores ----------------------------------------------------------------------------------

def best_patch_iou(coverage: np.ndarray) -> np.ndarray:
    """The highest IoU any set of patches can reach against a truth given as patch coverage.

    (..., rows, columns) covered fractions -> (...,); NaN where there is no truth. For a fixed
    number k of patches the best set is the k most covered ones, so the optimum is the best
    prefix of the patches sorted by coverage.
    """
    coverage = np.asarray(coverage, dtype=np.float64)
    flat = np.sort(coverage.reshape(*coverage.shape[:-2], -1), axis=-1)[..., ::-1]
    truth = flat.sum(axis=-1, keepdims=True)
    overlap = np.cumsum(flat, axis=-1)
    n_patches = np.arange(1, flat.shape[-1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        best = (overlap / (truth + n_patches - overlap)).max(axis=-1)
    return np.where(truth[..., 0] > 0, best, np.nan)


def mask_scores(masks: np.ndarray, maps: np.ndarray, foreground_coverage: np.ndarray,
                other_coverage: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scores of patch masks and maps against truth given as per-patch covered fractions.

    `masks` (..., rows, columns) bool, `maps` the same shape (distributions over patches), the
    coverages broadcastable to them. Areas are in cells, so IoU is exact at spectrogram
    resolution for these patch-aligned masks. Returns arrays of shape `masks.shape[:-2]`:
    iou (NaN without foreground), precision (share of the mask inside foreground boxes), recall,
    mask_share and foreground_share (of the tile), mass_in_foreground, and, with
    `other_coverage`, other_share and mass_in_other.
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    foreground = np.broadcast_to(np.asarray(foreground_coverage, dtype=np.float64), masks.shape)
    n_patches = masks.shape[-1] * masks.shape[-2]
    axes = (-2, -1)
    mask_patches = masks.sum(axis=axes)
    truth_patches = foreground.sum(axis=axes)
    overlap = (foreground * masks).sum(axis=axes)
    union = mask_patches + truth_patches - overlap
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = {
            "iou": np.where(truth_patches > 0, overlap / union, np.nan),
            "precision": np.where(mask_patches > 0, overlap / mask_patches, np.nan),
            "recall": np.where(truth_patches > 0, overlap / truth_patches, np.nan),
        }
    scores["mask_share"] = mask_patches / n_patches
    scores["foreground_share"] = truth_patches / n_patches
    scores["mass_in_foreground"] = (maps * foreground).sum(axis=axes)
    if other_coverage is not None:
        other = np.broadcast_to(np.asarray(other_coverage, dtype=np.float64), masks.shape)
        scores["other_share"] = other.sum(axis=axes) / n_patches
        scores["mass_in_other"] = (maps * other).sum(axis=axes)
    return scores


def score_tiles(head_maps: np.ndarray | torch.Tensor, tiles_db: np.ndarray, truth: TileTruth,
                patch_hw: tuple[int, int], config: AttentionConfig | None = None,
                tile_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (tile, source): every head's mass mask and the energy-threshold baseline against the truth.

    `head_maps` (N, heads, rows, columns) from `head_attention_maps`; `tiles_db` the same tiles
    in dB, unnormalised (N, n_mels, n_frames), for the baseline; `truth` for the same N tiles;
    `patch_hw` the model's (mel bins, frames) per patch (`BackboneConfig.patch_hw`).
    Columns: tile (position), tile_id, source ("head_<h>" or "energy"), head (<NA> for the
    baseline), has_foreground, the `mask_scores`, mask_patches, iou_ceiling (best patch-aligned
    IoU on that tile) and, on head rows, energy_iou_same_area (the baseline's IoU with as many
    patches as the head's mask).
    """
    config = config or AttentionConfig()
    head_maps = _as_numpy(head_maps).astype(np.float64)
    tiles_db = np.asarray(tiles_db)
    n_tiles, n_heads, rows, columns = head_maps.shape
    if tiles_db.shape[0] != n_tiles or truth.foreground.shape[0] != n_tiles:
        raise ValueError(f"{n_tiles} maps, {tiles_db.shape[0]} spectrograms and "
                         f"{truth.foreground.shape[0]} truth rows: they must be the same tiles")
    patch_hw = tuple(patch_hw)
    if tiles_db.shape[-2:] != (rows * patch_hw[0], columns * patch_hw[1]):
        raise ValueError(f"spectrograms {tiles_db.shape[-2:]} do not match a {rows}x{columns} grid of "
                         f"{patch_hw[0]}x{patch_hw[1]} patches")
    truth = truth.coverage(patch_hw)
    if truth.foreground.shape[1:] != (rows, columns):
        raise ValueError(f"truth on a {truth.foreground.shape[1:]} grid, maps on {(rows, columns)}")
    tile_ids = np.arange(n_tiles) if tile_ids is None else np.asarray(tile_ids)
    if len(tile_ids) != n_tiles:
        raise ValueError(f"{len(tile_ids)} tile ids for {n_tiles} tiles")

    head_masks = attention_mass_mask(head_maps, config.attention_mass)
    baseline_map = energy_maps(tiles_db, patch_hw, config.energy_margin_db).astype(np.float64)
    baseline_mask = energy_threshold_mask(tiles_db, patch_hw, config.energy_margin_db,
                                          config.energy_min_cell_fraction)
    # The loudest patches, as many as each head's mask holds: (N, heads, rows, columns).
    loudness = patch_loudness_db(tiles_db, patch_hw).reshape(n_tiles, 1, -1)
    same_area = _top_patch_mask(np.repeat(loudness, n_heads, axis=1),
                                head_masks.sum(axis=(-2, -1))).reshape(head_masks.shape)

    # Sources along axis 1: heads first, then the baseline.
    masks = np.concatenate([head_masks, baseline_mask[:, None]], axis=1)
    maps = np.concatenate([head_maps, baseline_map[:, None]], axis=1)
    foreground, other = truth.foreground[:, None], truth.other[:, None]
    scores = mask_scores(masks, maps, foreground, other)
    same_area_iou = mask_scores(same_area, np.zeros(same_area.shape), foreground)["iou"]

    n_sources = n_heads + 1
    sources = [f"head_{h}" for h in range(n_heads)] + [ENERGY_SOURCE]
    table = pd.DataFrame({
        "tile": np.repeat(np.arange(n_tiles), n_sources),
        "tile_id": np.repeat(tile_ids, n_sources),
        "source": np.tile(sources, n_tiles),
        "head": pd.array(np.tile(list(range(n_heads)) + [None], n_tiles), dtype="Int64"),
        "has_foreground": np.repeat(truth.has_foreground, n_sources),
        "mask_patches": masks.sum(axis=(-2, -1)).reshape(-1),
        **{name: values.reshape(-1) for name, values in scores.items()},
        "iou_ceiling": np.repeat(best_patch_iou(truth.foreground), n_sources),
        "energy_iou_same_area": np.concatenate(
            [same_area_iou, np.full((n_tiles, 1), np.nan)], axis=1).reshape(-1),
    })
    return table


class AttentionResult(NamedTuple):
    scores: pd.DataFrame   # `score_tiles` table
    maps: np.ndarray       # (N, heads, rows, columns) float32 head maps, for figures


def score_model_attention(model: SpectrogramViT, tiles_db: np.ndarray, truth: TileTruth,
                          normalization: dict[str, float] | None, config: AttentionConfig | None = None,
                          tile_ids: Sequence[int] | None = None, show_progress: bool = True) -> AttentionResult:
    """Head maps of `model` for dB tiles (N, n_mels, n_frames), scored with `score_tiles`, batch by batch.

    `tiles_db` may be a memory map (float16 store shards): only one batch is in memory as
    float32 at a time. `normalization` ({"mean", "std"} in dB) must be what the model was
    trained with: the checkpoint's `normalization` (or the tile store's); None feeds the dB
    values as they are.
    """
    config = config or AttentionConfig()
    if len(tiles_db.shape) != 3:
        raise ValueError(f"expected dB tiles (N, n_mels, n_frames), got shape {tiles_db.shape}")
    n_tiles = tiles_db.shape[0]
    if n_tiles == 0:
        raise ValueError("no tiles to score")
    if len(truth.foreground) != n_tiles:
        raise ValueError(f"{n_tiles} tiles but truth for {len(truth.foreground)}")
    if normalization is None:
        logger.warning("no normalization given: feeding dB values to the model unnormalised")
    tile_ids = np.arange(n_tiles) if tile_ids is None else np.asarray(tile_ids)
    truth = truth.coverage(model.config.patch_hw)
    maps, tables = [], []
    for start in tqdm(range(0, n_tiles, config.batch_size), desc="attention maps", unit="batch",
                      disable=not show_progress):
        stop = min(start + config.batch_size, n_tiles)
        batch_db = np.asarray(tiles_db[start:stop], dtype=np.float32)
        tensor = normalize_tiles(batch_db, normalization) if normalization is not None else torch.from_numpy(batch_db)
        batch_maps = head_attention_maps(model, tensor.unsqueeze(1)).cpu().numpy()
        table = score_tiles(batch_maps, batch_db, truth.rows(start, stop), model.config.patch_hw, config,
                            tile_ids[start:stop])
        tables.append(table.assign(tile=table["tile"] + start))
        maps.append(batch_maps)
    return AttentionResult(pd.concat(tables, ignore_index=True), np.concatenate(maps))


# --- Ranking ---------------------------------------------------------------------------------

_RANKING_REQUIRED = {"tile", "source", "head", "has_foreground", "iou", "mass_in_foreground", "foreground_share",
                     "precision", "recall", "mask_share", "iou_ceiling", "energy_iou_same_area"}


def rank_heads(scores: pd.DataFrame, by: str = "iou", n_bootstrap: int = 1000, confidence: float = 0.95,
               seed: int = 0, group_column: str | None = None) -> pd.DataFrame:
    """Rank sources (heads and the energy baseline) by how well they pick out foreground events.

    Means are over the tiles with at least one foreground (bird) cell, with standard errors and
    paired percentile-bootstrap intervals (`core.stats.GroupBootstrap`, the same draws for every
    source). With `group_column` (a column of `scores`, e.g. the recorder or file of each tile)
    the groups are resampled, as they should be: tiles of one recording or recorder share birds
    and background and are not independent. Without it the tiles are resampled, and the intervals
    are optimistic when many tiles come from few recordings. `by` is "iou" or
    "mass_in_foreground". Every mean here is that source's own mean on these tiles; the highest
    of them is an optimistic estimate of the best head's score (it was chosen on the same tiles):
    `choose_head_on_half` chooses and reports on different tiles.

    Columns: rank, source, head, n_tiles, mean_iou (+ _se, _interval_low, _interval_high),
    mean_mass_in_foreground (+ the same), interval_level, interval_method,
    mean_foreground_share (a uniform map's mass there: chance), mass_lift (mean mass / mean
    share), mean_precision (over tiles where the mask is not empty), mean_recall,
    mean_mask_share, mean_iou_ceiling, mean_iou_minus_energy_same_area (+ _se; heads only), and
    the background check over tiles without foreground: n_background_tiles,
    background_mass_in_other, background_other_share. The baseline is ranked with the heads, so
    its rank shows how many heads beat it.
    """
    if by not in ("iou", "mass_in_foreground"):
        raise ValueError(f"by must be 'iou' or 'mass_in_foreground', got {by!r}")
    missing = _RANKING_REQUIRED - set(scores.columns)
    if group_column is not None and group_column not in scores.columns:
        missing.add(group_column)
    if missing:
        raise ValueError(f"scores lack columns {sorted(missing)}")
    sources = list(pd.unique(scores["source"]))
    heads = scores.drop_duplicates("source").set_index("source")["head"].reindex(sources)
    foreground = scores[scores["has_foreground"].astype(bool)]
    background = scores[~scores["has_foreground"].astype(bool)]

    def per_tile(frame: pd.DataFrame, column: str) -> np.ndarray:
        """(n_tiles, n_sources) matrix of one score, tiles in sorted order."""
        return frame.pivot(index="tile", columns="source", values=column).reindex(columns=sources).to_numpy(float)

    n_tiles = foreground["tile"].nunique()
    ranking = pd.DataFrame({"source": sources, "head": pd.array(heads.to_numpy(), dtype="Int64"),
                            "n_tiles": n_tiles})
    if n_tiles == 0:
        logger.warning("no tile with a foreground event: heads cannot be ranked")
    bootstrap = None
    if n_tiles > 0 and n_bootstrap > 0:
        tile_groups = (foreground.drop_duplicates("tile").set_index("tile")[group_column].sort_index().to_numpy()
                       if group_column is not None else np.sort(foreground["tile"].unique()))
        bootstrap = GroupBootstrap(tile_groups, n_bootstrap, seed, unit=group_column or "tile")
    for column in ("iou", "mass_in_foreground"):
        values = per_tile(foreground, column) if n_tiles else np.zeros((0, len(sources)))
        with np.errstate(invalid="ignore", divide="ignore"):
            ranking[f"mean_{column}"] = values.mean(axis=0) if n_tiles else np.nan
            ranking[f"{column}_se"] = values.std(axis=0, ddof=1) / np.sqrt(n_tiles) if n_tiles > 1 else np.nan
        if bootstrap is None:
            intervals = [Interval.undefined(confidence, "no bootstrap")] * len(sources)
        else:
            finite = np.isfinite(values)
            intervals = bootstrap.intervals(bootstrap.resampled_means(np.where(finite, values, 0.0), finite),
                                            confidence)
        ranking[f"{column}_interval_low"] = [interval.low for interval in intervals]
        ranking[f"{column}_interval_high"] = [interval.high for interval in intervals]
    ranking["interval_level"] = confidence
    ranking["interval_method"] = bootstrap.method if bootstrap is not None else "no bootstrap"
    for column in ("foreground_share", "precision", "recall", "mask_share", "iou_ceiling"):
        # Precision is undefined (NaN) for an empty mask (the baseline on a quiet tile): left out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            ranking[f"mean_{column}"] = np.nanmean(per_tile(foreground, column), axis=0) if n_tiles else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        ranking["mass_lift"] = ranking["mean_mass_in_foreground"] / ranking["mean_foreground_share"]
    if n_tiles:
        gain = per_tile(foreground, "iou") - per_tile(foreground, "energy_iou_same_area")
        ranking["mean_iou_minus_energy_same_area"] = gain.mean(axis=0)  # NaN for the baseline itself
        ranking["iou_minus_energy_same_area_se"] = (gain.std(axis=0, ddof=1) / np.sqrt(n_tiles)
                                                    if n_tiles > 1 else np.nan)
    else:
        ranking["mean_iou_minus_energy_same_area"] = ranking["iou_minus_energy_same_area_se"] = np.nan
    ranking["n_background_tiles"] = background["tile"].nunique()
    for column in ("mass_in_other", "other_share"):
        if column in background.columns and len(background):
            ranking[f"background_{column}"] = per_tile(background, column).mean(axis=0)
        else:
            ranking[f"background_{column}"] = np.nan
    ranking = ranking.sort_values(f"mean_{by}", ascending=False, kind="mergesort", na_position="last")
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return ranking.reset_index(drop=True)


def with_tile_groups(scores: pd.DataFrame, column: str, groups_of_tiles: Any) -> pd.DataFrame:
    """`scores` (a `score_tiles` table) with a `column` holding each row's tile's group:
    `groups_of_tiles[i]` is the group (e.g. the recorder) of tile position i."""
    groups_of_tiles = np.asarray(groups_of_tiles)
    tiles = scores["tile"].to_numpy()
    if len(tiles) and (tiles.max() >= len(groups_of_tiles) or tiles.min() < 0):
        raise ValueError(f"scores have tiles up to {tiles.max()}, but groups are given for {len(groups_of_tiles)}")
    return scores.assign(**{column: groups_of_tiles[tiles]})


def split_groups_in_halves(groups: Any, seed: int = 0) -> tuple[list[str], list[str]]:
    """The distinct groups in two halves, at random (seeded): (choosing half, reporting half).

    The choosing half gets the extra group when their number is odd. Needs at least two groups.
    """
    names = np.unique(np.asarray(groups).astype(str))
    if len(names) < 2:
        raise ValueError(f"{len(names)} group(s): choosing on one half and reporting on the other needs at least 2")
    order = np.random.default_rng(seed).permutation(len(names))
    n_choose = (len(names) + 1) // 2
    return sorted(names[order[:n_choose]].tolist()), sorted(names[order[n_choose:]].tolist())


@dataclass
class HeadChoice:
    """A best head chosen on one half of the tiles (by group) and reported on the other.

    `choose_ranking` ranks every source on the choosing half: the chosen head is its best head,
    and its score there (`chosen_score_on_choosing_half`) is optimistic, since the choice took the
    maximum of noisy means. `report_ranking` ranks every source on the reporting half, which took
    no part in the choice: the chosen head's score there (`reported`) is the honest one.
    """

    head: int
    source: str
    by: str                          # the score the head was chosen by ("iou" or "mass_in_foreground")
    grouping: str                    # what the halves are made of (a column of the scores)
    choose_groups: list[str]
    report_groups: list[str]
    choose_ranking: pd.DataFrame
    report_ranking: pd.DataFrame

    def _row(self, ranking: pd.DataFrame, source: str) -> pd.Series:
        return ranking.set_index("source").loc[source]

    @property
    def chosen_score_on_choosing_half(self) -> float:
        return float(self._row(self.choose_ranking, self.source)[f"mean_{self.by}"])

    @property
    def reported(self) -> pd.Series:
        """The chosen head's row of the reporting half's ranking."""
        return self._row(self.report_ranking, self.source)

    def summary(self) -> dict[str, Any]:
        """One table row: the choice, where it was made, and the held-out scores beside the baseline's."""
        reported, energy = self.reported, self._row(self.report_ranking, ENERGY_SOURCE)
        heads = self.report_ranking[self.report_ranking["source"] != ENERGY_SOURCE]
        return {
            "best_head": self.head, "chosen_by": self.by, "split_by": self.grouping,
            "chosen_on": ", ".join(self.choose_groups), "reported_on": ", ".join(self.report_groups),
            "n_tiles_choosing": int(self.choose_ranking["n_tiles"].iloc[0]),
            "n_tiles_reporting": int(self.report_ranking["n_tiles"].iloc[0]),
            f"best_head_{self.by}_on_choosing_half": self.chosen_score_on_choosing_half,
            "best_head_iou": float(reported["mean_iou"]),
            "best_head_iou_interval_low": float(reported["iou_interval_low"]),
            "best_head_iou_interval_high": float(reported["iou_interval_high"]),
            "interval_method": str(reported["interval_method"]),
            "best_head_mass_lift": float(reported["mass_lift"]),
            "energy_iou": float(energy["mean_iou"]),
            "best_head_iou_minus_energy_same_area": float(reported["mean_iou_minus_energy_same_area"]),
            "heads_beating_energy": int((heads["mean_iou"] > energy["mean_iou"]).sum()),
            "n_heads": len(heads),
        }


def choose_head_on_half(scores: pd.DataFrame, group_column: str, by: str = "iou", seed: int = 0,
                        n_bootstrap: int = 1000, confidence: float = 0.95,
                        choose_groups: Sequence[str] | None = None) -> HeadChoice:
    """Choose the best head on one half of the tiles and report it on the other.

    The tiles are split by `group_column` (the recorder or the file of each tile: halves never
    share a group, so the reported tiles share no recording with the choosing ones), at random
    with `seed` (`split_groups_in_halves`), or with the given `choose_groups` (the rest report).
    Both halves are ranked with `rank_heads` (intervals over that half's groups). Raises
    ValueError when a half holds no tile with a foreground event.
    """
    if group_column not in scores.columns:
        raise ValueError(f"scores lack the column {group_column!r} to split the tiles by")
    groups = scores[group_column].astype(str)
    if choose_groups is None:
        choose, report = split_groups_in_halves(groups, seed)
    else:
        choose = sorted(set(map(str, choose_groups)))
        report = sorted(set(groups) - set(choose))
    halves = {}
    for name, members in (("choosing", choose), ("reporting", report)):
        half = scores[groups.isin(members).to_numpy()]
        if not half["has_foreground"].astype(bool).any():
            raise ValueError(f"the {name} half ({group_column} {', '.join(members)}) has no tile with a "
                             "foreground event: too few scored tiles or groups to choose and report a head")
        halves[name] = rank_heads(half, by, n_bootstrap, confidence, seed, group_column)
    heads = halves["choosing"][halves["choosing"]["source"] != ENERGY_SOURCE]
    best = heads.iloc[0]
    return HeadChoice(int(best["head"]), str(best["source"]), by, group_column, choose, report,
                      halves["choosing"], halves["reporting"])


def save_attention_products(out_dir: str | os.PathLike, scores: pd.DataFrame, ranking: pd.DataFrame,
                            config: AttentionConfig, **extra: Any) -> Path:
    """Write scores.parquet, head_ranking.csv and config.json (with `extra`, e.g. the checkpoint) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / SCORES_FILE) as tmp:
        scores.to_parquet(tmp, index=False)
    with atomic_write(out_dir / RANKING_FILE) as tmp:
        ranking.to_csv(tmp, index=False)
    write_config_json(out_dir, STAGE, config.to_dict(), n_tiles=int(scores["tile"].nunique()), **extra)
    return out_dir
