"""Spectrogram views for joint-embedding SSL (DINO, VICReg): crops and augmentations of log-mel tiles.

Image SSL recipes lean on colour jitter, grey-scale, blur and solarisation; none of them means
anything for a log-mel spectrogram, whose axes are frequency and time and whose values are
levels in dB. The views here are built from what actually varies between two recordings of
the same kind of sound in a passive-acoustic archive:

* time crops: a call can sit anywhere in a 3 s tile, and the tile grid is arbitrary with respect
  to it. Global crops (most of the tile) and local crops (a fraction of it) at random offsets
  teach the model that a sound is the same wherever it starts ("local-to-global"
  correspondence in DINO). Random offsets also provide the small time shifts.
* random gain in dB: the same call is louder or quieter with distance to the microphone and
  with recorder gain settings; in log-mel space a gain is one constant added to every bin.
* mixing with another tile as background: real soundscapes overlap (wind, insects, rain, other
  birds); the power spectra of independent sources add, so mixing is done in the power domain
  (log-add-exp of the dB values), with the background turned down by a random attenuation.
* optional frequency shift by a few mel bins: small pitch differences between individuals. Off
  by default because pitch is a species cue; turn it on to test that trade-off.
* SpecAugment-style time and frequency masks (Park et al. 2019), for the student only: the
  student must infer the teacher's view of the full crop from a partially hidden one.

All functions work on whole batches on the training device (one kernel per operation, no
per-sample Python loop), on tiles normalised with the tile store's mean and standard deviation
in dB; `Normalization` converts between those units and dB where physics needs dB.
"""

from __future__ import annotations

import dataclasses
import math

import torch

_DB_TO_NATURAL_LOG = math.log(10.0) / 10.0  # 10 * log10(p) dB = ln(p) / _DB_TO_NATURAL_LOG


@dataclasses.dataclass
class AugmentConfig:
    """Augmentations for joint-embedding views; every probability or range of 0 turns one off."""

    gain_db: float = 6.0  # each view gets a gain drawn uniformly from [-gain_db, +gain_db] dB
    mix_probability: float = 0.5  # chance that a view is mixed with another tile of the batch
    mix_attenuation_db: tuple[float, float] = (6.0, 20.0)  # background turned down by this much
    frequency_shift_bins: int = 0  # max shift in mel bins (edge bins repeated); 0 = off
    time_masks: int = 2  # SpecAugment time masks per student view
    max_time_mask_frames: int = 16  # each time mask is 0..this many frames (at most a quarter of the crop)
    frequency_masks: int = 2  # SpecAugment frequency masks per student view
    max_frequency_mask_bins: int = 12  # each frequency mask is 0..this many mel bins

    def validate(self) -> None:
        low, high = self.mix_attenuation_db
        if not 0.0 <= self.mix_probability <= 1.0:
            raise ValueError(f"mix_probability must be in [0, 1], got {self.mix_probability}")
        if low > high:
            raise ValueError(f"mix_attenuation_db must be (low, high), got {self.mix_attenuation_db}")
        for name in ("gain_db", "frequency_shift_bins", "time_masks", "max_time_mask_frames",
                     "frequency_masks", "max_frequency_mask_bins"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How tiles were normalised, value = (level_db - mean_db) / std_db (the tile store's
    statistics), and the background removal that turns a normalised tile into the model's input
    (`tiles.store.remove_background`; "none" leaves it as it is)."""

    mean_db: float = 0.0
    std_db: float = 1.0
    background: str = "none"

    def to_db(self, tiles: torch.Tensor) -> torch.Tensor:
        return tiles * self.std_db + self.mean_db

    def from_db(self, level_db: torch.Tensor) -> torch.Tensor:
        return (level_db - self.mean_db) / self.std_db

    def model_input(self, tiles: torch.Tensor) -> torch.Tensor:
        """Normalised whole tiles (..., n_mels, n_frames) -> what the backbone sees, exactly as
        every inference path makes it (`tiles.store.normalize_tiles`)."""
        from ..tiles.store import remove_background

        return remove_background(tiles, {"mean": self.mean_db, "std": self.std_db,
                                         "background": self.background})


def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _random_integers(high_inclusive: torch.Tensor | int, shape: tuple[int, ...], like: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Integers uniform in [0, high_inclusive] (elementwise when `high_inclusive` is a tensor)."""
    return (_uniform(shape, like, generator) * (torch.as_tensor(high_inclusive, device=like.device) + 1)).long()


def random_time_crop(tiles: torch.Tensor, crop_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop `crop_frames` consecutive frames at an independent random offset per tile."""
    batch, channels, n_mels, n_frames = tiles.shape
    if not 0 < crop_frames <= n_frames:
        raise ValueError(f"crop_frames must be in (0, {n_frames}], got {crop_frames}")
    if crop_frames == n_frames:
        return tiles
    offsets = _random_integers(n_frames - crop_frames, (batch,), tiles, generator)
    frame_index = offsets[:, None] + torch.arange(crop_frames, device=tiles.device)
    return tiles.gather(3, frame_index[:, None, None, :].expand(batch, channels, n_mels, crop_frames))


def shift_frequency(tiles: torch.Tensor, max_bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each tile up or down by up to `max_bins` mel bins, repeating the edge bin (no wrap-around)."""
    if max_bins == 0:
        return tiles
    batch, channels, n_mels, n_frames = tiles.shape
    shifts = _random_integers(2 * max_bins, (batch,), tiles, generator) - max_bins
    source_bin = (torch.arange(n_mels, device=tiles.device)[None, :] - shifts[:, None]).clamp(0, n_mels - 1)
    return tiles.gather(2, source_bin[:, None, :, None].expand(batch, channels, n_mels, n_frames))


def apply_random_gain(tiles: torch.Tensor, gain_db: float, normalization: Normalization,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Add one gain in [-gain_db, +gain_db] dB per tile (a constant offset in log-mel space)."""
    if gain_db == 0:
        return tiles
    gains_db = (2.0 * _uniform((tiles.shape[0],), tiles, generator) - 1.0) * gain_db
    return tiles + (gains_db / normalization.std_db).to(tiles.dtype)[:, None, None, None]


def mix_with_background(tiles: torch.Tensor, background: torch.Tensor, probability: float,
                        attenuation_db: tuple[float, float], normalization: Normalization,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """With `probability`, add `background` (turned down by a random attenuation) in the power domain.

    Mixed level = 10 log10(10^(a/10) + 10^((b - attenuation)/10)) dB per bin: the power spectra of
    independent sources add, so a quiet background fills in silent bins and barely changes loud ones.
    """
    if probability == 0:
        return tiles
    batch = tiles.shape[0]
    low_db, high_db = attenuation_db
    attenuation = low_db + (high_db - low_db) * _uniform((batch,), tiles, generator)
    chosen = _uniform((batch,), tiles, generator) < probability
    signal_db = normalization.to_db(tiles.float())
    background_db = normalization.to_db(background.float()) - attenuation[:, None, None, None]
    mixed_db = torch.logaddexp(signal_db * _DB_TO_NATURAL_LOG, background_db * _DB_TO_NATURAL_LOG) / _DB_TO_NATURAL_LOG
    mixed = normalization.from_db(mixed_db).to(tiles.dtype)
    return torch.where(chosen[:, None, None, None], mixed, tiles)


def _band_mask(length: int, n_masks: int, max_width: int, batch: int, like: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
    """(batch, length) boolean: the union of `n_masks` random bands of width 0..max_width per row."""
    max_width = min(max_width, length)
    widths = _random_integers(max_width, (batch, n_masks), like, generator)
    starts = _random_integers(length - widths, (batch, n_masks), like, generator)
    positions = torch.arange(length, device=like.device)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return inside.any(dim=1)


def spec_augment(tiles: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment-style masking: random time and frequency bands set to 0 (the archive's mean level).

    Time masks are capped at a quarter of the crop so a narrow local crop is not wiped out.
    """
    batch, _, n_mels, n_frames = tiles.shape
    hidden = torch.zeros(batch, n_mels, n_frames, dtype=torch.bool, device=tiles.device)
    if config.time_masks and config.max_time_mask_frames:
        time_hidden = _band_mask(n_frames, config.time_masks, min(config.max_time_mask_frames, n_frames // 4),
                                 batch, tiles, generator)
        hidden |= time_hidden[:, None, :]
    if config.frequency_masks and config.max_frequency_mask_bins:
        frequency_hidden = _band_mask(n_mels, config.frequency_masks, config.max_frequency_mask_bins,
                                      batch, tiles, generator)
        hidden |= frequency_hidden[:, :, None]
    return tiles.masked_fill(hidden[:, None], 0.0)


def roll_time(tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each tile along time by its own random number of frames (a new alignment)."""
    batch, channels, n_mels, n_frames = tiles.shape
    offsets = _random_integers(n_frames - 1, (batch,), tiles, generator)
    frame_index = (offsets[:, None] + torch.arange(n_frames, device=tiles.device)) % n_frames
    return tiles.gather(3, frame_index[:, None, None, :].expand(batch, channels, n_mels, n_frames))


def augmented_views(tiles: torch.Tensor, n_views: int, crop_frames: int, config: AugmentConfig,
                    normalization: Normalization, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n_views` independently augmented time crops of every tile, stacked view-major.

    Returns (n_views * batch, 1, n_mels, crop_frames); rows [v * batch, (v + 1) * batch) are view v
    of every tile. The order follows the signal path: what happens to sound (mixing with another
    tile of the batch, at a random time alignment, and a gain) happens on whole normalised tiles;
    then the tile becomes the model's input as at inference (`Normalization.model_input`, e.g. the
    band-median background removal over all 256 frames, so a view never sees a background level
    that inference would not compute); then the crop and the frequency shift. No masking here:
    see `spec_augment`.
    """
    views = tiles.repeat(n_views, 1, 1, 1)
    if config.mix_probability > 0:
        background = roll_time(tiles.roll(1, dims=0).repeat(n_views, 1, 1, 1), generator)
        views = mix_with_background(views, background, config.mix_probability, config.mix_attenuation_db,
                                    normalization, generator)
    views = apply_random_gain(views, config.gain_db, normalization, generator)
    views = normalization.model_input(views)
    views = random_time_crop(views, crop_frames, generator)
    return shift_frequency(views, config.frequency_shift_bins, generator)
