"""Masked autoencoder (He et al. 2022) for log-mel tiles: hide most patches, reconstruct them.

The encoder (the shared ViT backbone) sees only the visible patches plus the class token; a
light transformer decoder gets the encoded tokens back in place, with a learned mask token
for every hidden patch, and predicts the hidden patches' values. The loss is the mean squared
error on hidden patches only, against per-patch normalised targets (MAE's `norm_pix_loss`),
so the model must reconstruct spectro-temporal shape rather than overall level.

Two ways to choose hidden patches:
* "random": independent patches (MAE's default; at 75% a ViT can still interpolate from
  neighbours in time and frequency);
* "time": whole time columns of patches (all frequencies of a time span), as in audio MAEs'
  time masking. A hidden call must then be inferred from what comes before and after it,
  which is harder and closer to what a listener does.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .augment import Normalization
from .models import BackboneConfig, MethodOutput, SpectrogramViT, SSLMethod, build_backbone, patchify

MASKING_MODES = ("random", "time")


@dataclasses.dataclass
class MaeConfig:
    """MAE hyper-parameters; the decoder is lighter than MAE's (512-d, 8 blocks) for small tiles."""

    mask_ratio: float = 0.75  # share of patches hidden; the study compares 0.3 to 0.8
    masking: str = "random"  # one of MASKING_MODES
    decoder_embed_dim: int = 256
    decoder_depth: int = 4
    decoder_num_heads: int = 8
    norm_pix_loss: bool = True  # normalise each target patch by its own mean and std

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"mae.masking must be one of {MASKING_MODES}, got {self.masking!r}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("mae.decoder_embed_dim must be divisible by mae.decoder_num_heads")


def patch_keep_order(batch: int, grid_hw: tuple[int, int], mask_ratio: float, masking: str,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """A random order of patches per tile, visible ones first: (order (batch, n_patches), n_visible).

    Patches are numbered row-major over the (frequency rows, time columns) grid. In "time" mode
    the order keeps whole columns together, so the first `n_visible` patches are complete columns.
    """
    rows, columns = grid_hw
    n_patches = rows * columns
    if masking == "random":
        n_visible = min(max(round(n_patches * (1.0 - mask_ratio)), 1), n_patches - 1)
        sort_key = torch.rand(batch, n_patches, generator=generator, device=device)
    elif masking == "time":
        n_hidden_columns = min(max(round(columns * mask_ratio), 1), columns - 1)
        n_visible = (columns - n_hidden_columns) * rows
        # A random rank per column; rank * rows + row is a unique key that keeps columns together.
        column_rank = torch.rand(batch, columns, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
        row_index = torch.arange(rows, device=device)[None, :, None]
        sort_key = (column_rank[:, None, :] * rows + row_index).reshape(batch, n_patches).float()
    else:
        raise ValueError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
    return sort_key.argsort(dim=1), n_visible


def normalized_patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean, divided by its standard deviation (MAE's norm_pix_loss targets)."""
    mean = patches.mean(dim=-1, keepdim=True)
    variance = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (variance + eps).sqrt()


class MaeMethod(SSLMethod):
    """Encoder (the backbone, visible patches only), light decoder and the masked-patch loss."""

    name = "mae"

    def __init__(self, backbone_config: BackboneConfig, config: MaeConfig,
                 normalization: Normalization | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.normalization = normalization or Normalization()
        self.patch_hw = backbone_config.patch_hw  # (mel bins, frames) of one reconstructed patch
        self.encoder = build_backbone(backbone_config)
        self.grid_hw = self.encoder.patch_grid_hw
        n_patches = self.grid_hw[0] * self.grid_hw[1]
        decoder_dim = config.decoder_embed_dim
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, config.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_hw[0] * self.patch_hw[1])
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def forward(self, tiles: torch.Tensor, step: int, generator: torch.Generator | None = None) -> MethodOutput:
        expected = (self.encoder.config.n_mels, self.encoder.config.n_frames)
        if tuple(tiles.shape[-2:]) != expected:
            raise ValueError(f"MAE trains on whole {expected[0]}x{expected[1]} tiles, got {tuple(tiles.shape[-2:])}")
        tiles = self.normalization.model_input(tiles)   # what the encoder sees at inference too
        batch = tiles.shape[0]
        order, n_visible = patch_keep_order(batch, self.grid_hw, self.config.mask_ratio, self.config.masking,
                                            generator, tiles.device)
        restore = order.argsort(dim=1)

        tokens = self.encoder.embed_tokens(tiles)
        cls_token, patch_tokens = tokens[:, :1], tokens[:, 1:]
        visible_index = order[:, :n_visible, None].expand(-1, -1, patch_tokens.shape[-1])
        encoded = self.encoder.encode_tokens(torch.cat([cls_token, patch_tokens.gather(1, visible_index)], dim=1))

        decoded = self.decoder_embed(encoded)
        n_hidden = order.shape[1] - n_visible
        shuffled = torch.cat([decoded[:, 1:], self.mask_token.expand(batch, n_hidden, -1)], dim=1)
        in_place = shuffled.gather(1, restore[:, :, None].expand(-1, -1, shuffled.shape[-1]))
        decoded = torch.cat([decoded[:, :1], in_place], dim=1) + self.decoder_pos_embed
        predicted = self.decoder_pred(self.decoder_norm(self.decoder_blocks(decoded)))[:, 1:].float()

        targets = patchify(tiles.float(), self.patch_hw)
        if self.config.norm_pix_loss:
            targets = normalized_patch_targets(targets)
        hidden = (restore >= n_visible).float()  # 1 where the patch was hidden from the encoder
        per_patch_error = (predicted - targets).pow(2).mean(dim=-1)
        loss = (per_patch_error * hidden).sum() / hidden.sum()
        metrics = {"hidden_fraction": hidden.mean().detach()}
        return MethodOutput(loss, metrics)

    def export_backbone(self) -> SpectrogramViT:
        return self.encoder
