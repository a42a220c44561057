"""Vision Transformer backbones for 1-channel log-mel tiles (models only: no training code here).

A backbone is timm's `VisionTransformer` with `in_chans=1` and `img_size=(n_mels, n_frames)`,
so a 128 x 256 tile with 16 x 16 patches gives an 8 x 16 (frequency x time) patch grid. Patches
may be rectangular (`BackboneConfig.patch_hw`): 8 mel bins x 32 frames give the same 128 tokens
as a 16 x 8 grid, with twice the frequency resolution and half the time resolution.
Two spectrogram-specific choices:

* Positional embeddings of narrower time crops are *sliced*, not interpolated. A local DINO crop
  of 96 frames keeps the frequency rows' embeddings exactly and takes 6 consecutive time columns;
  timm's default (bicubic resampling) would stretch the time axis and tell the model that 96
  frames span the same duration as 256. Frequency position is absolute in a spectrogram (a
  4 kHz call is not an 8 kHz call); time position within a 3 s tile is arbitrary.
  Which 6: in training, a window at a random column offset (uniform over the valid offsets);
  in eval mode, and for full-width inputs, the first columns / the whole grid. Always taking
  the first columns left the last ones untrained (224-frame global crops use 14 of 16 columns,
  so columns 14-15 never got a gradient) while inference on 256-frame tiles uses all 16. The
  window is not tied to the crop's real place in the tile: crops start at any frame, not on
  patch boundaries, and since time position is arbitrary a random window trains every column
  alike and teaches relative time. One offset per forward call, not per crop: the addition
  stays a broadcast and the draw is one CPU integer (no device sync); each crop's content
  already sits at its own random place, so nothing correlates with the shared offset. It comes
  from torch's global generator, which the engine seeds per (seed, rank, step), so runs are
  deterministic and resume bit-exactly; full-width inputs (MAE) draw nothing. DINO's teacher
  runs in eval mode (offset 0) and follows the student's columns through its EMA.
* The last block's self-attention is recomputed from that block's own qkv projection, because
  timm uses fused scaled-dot-product attention and never materialises the weights. Nothing is
  patched globally: the recomputation reads the same input the block sees in the forward pass.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from .pooling import BAND_POOLINGS, POOLINGS

logger = logging.getLogger(__name__)

# (embed_dim, depth, num_heads) of the standard ViT sizes (Dosovitskiy et al.; DeiT for Ti/S).
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


@dataclasses.dataclass
class BackboneConfig:
    """Shape of a spectrogram ViT; serialised into every checkpoint so it can be rebuilt.

    `embed_dim`, `depth` and `num_heads` override the named architecture (tests use 2-layer
    models); None keeps the architecture's value.
    """

    arch: str = "vit_small"  # one of ARCHITECTURES
    patch_size: int = 16  # patch height in mel bins (and its width too, unless patch_frames is set)
    n_mels: int = 128  # tile height (frequency bins)
    n_frames: int = 256  # tile width (time frames) the positional embedding is laid out for
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.1  # stochastic depth (DINO's ViT-S setting)
    # Patch width in time frames; None: square patches (patch_size wide), as every config and
    # checkpoint made before this field had.
    patch_frames: int | None = None

    @property
    def patch_hw(self) -> tuple[int, int]:
        """(mel bins, time frames) of one patch: the one definition of the patch shape."""
        return self.patch_size, self.patch_size if self.patch_frames is None else self.patch_frames

    def resolved(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) after applying the overrides to the named architecture."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        embed_dim, depth, num_heads = ARCHITECTURES[self.arch]
        return (self.embed_dim or embed_dim, self.depth or depth, self.num_heads or num_heads)

    def validate(self) -> None:
        embed_dim, depth, num_heads = self.resolved()
        patch_mels, patch_frames = self.patch_hw
        if patch_mels < 1 or patch_frames < 1:
            raise ValueError(f"patch_size and patch_frames must be >= 1, got {patch_mels}x{patch_frames}")
        if self.n_mels % patch_mels or self.n_frames % patch_frames:
            raise ValueError(
                f"tile {self.n_mels}x{self.n_frames} is not a whole number of "
                f"{patch_mels}x{patch_frames} (mel bins x frames) patches")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError("depth must be at least 1")


class PooledEmbeddings(NamedTuple):
    """Tile-level embeddings from the final (layer-normed) tokens, one field per name of
    `pooling.POOLINGS`, in that order: `getattr(pooled, name)` is the pooling called `name`."""

    mean: torch.Tensor  # (batch, embed_dim) the mean over patch tokens (did better than CLS for MAE)
    cls: torch.Tensor  # (batch, embed_dim) the class token
    # (batch, frequency rows * embed_dim): the mean over time of each frequency row of patch
    # tokens, rows concatenated from low to high frequency. Keeps *where in frequency* the content
    # lies, which a mean over all patches blurs and which separates congeneric species.
    band: torch.Tensor
    # (batch, frequency rows * embed_dim): "band" over the active time columns only (those whose
    # mean input is at or above the tile's median column, `active_columns`).
    band_active: torch.Tensor


class LastBlockAttention(NamedTuple):
    tokens: torch.Tensor  # (batch, n_prefix + n_patches, embed_dim), after the final norm
    attention: torch.Tensor  # (batch, heads, n_tokens, n_tokens), rows sum to 1 over keys
    grid_hw: tuple[int, int]  # patch grid (frequency rows, time columns)


def attention_weights(attention: Attention, normed_tokens: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights (batch, heads, n_tokens, n_tokens) of a timm `Attention` module.

    Recomputed in float32 from the module's own qkv projection (and q/k norms, if any), given the
    tokens the module receives (i.e. after the block's `norm1`).
    """
    if not isinstance(attention, Attention):
        raise TypeError(f"expected timm.layers.Attention, got {type(attention).__name__}")
    batch, n_tokens, _ = normed_tokens.shape
    qkv = attention.qkv(normed_tokens).float()
    qkv = qkv.reshape(batch, n_tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    query, key, _ = qkv.unbind(0)
    query, key = attention.q_norm(query), attention.k_norm(key)
    logits = (query * attention.scale) @ key.transpose(-2, -1)
    return logits.softmax(dim=-1)


class SpectrogramViT(VisionTransformer):
    """A timm ViT for (batch, 1, n_mels, n_frames) log-mel tiles; `forward` returns the CLS embedding.

    Inputs may be narrower (or wider) in time than `n_frames`, as long as both sides are whole
    patches; see the module docstring for how positions are handled.
    """

    def __init__(self, config: BackboneConfig) -> None:
        config.validate()
        embed_dim, depth, num_heads = config.resolved()
        super().__init__(
            img_size=(config.n_mels, config.n_frames),
            patch_size=config.patch_hw,
            in_chans=1,
            num_classes=0,  # no classifier: the backbone outputs embeddings
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path_rate=config.drop_path_rate,
            dynamic_img_size=True,  # patch grid follows the input, e.g. 8x6 for a 96-frame crop
        )
        self.config = config
        self._warned_wide_input = False

    @property
    def patch_grid_hw(self) -> tuple[int, int]:
        """Patch grid of a full tile: (frequency rows, time columns)."""
        return tuple(self.patch_embed.grid_size)

    def grid_hw_for(self, tiles: torch.Tensor) -> tuple[int, int]:
        """Patch grid of an input batch of shape (batch, 1, n_mels, n_frames)."""
        return patch_grid_hw(tiles.shape[-2:], self.config.patch_hw)

    def time_column_offset(self, columns: int) -> int:
        """First positional column used for an input `columns` patches wide (at most a full tile).

        0 in eval mode and for full-width inputs; in training, uniform over the valid offsets,
        drawn on the CPU from torch's global generator (see the module docstring for why).
        """
        n_offsets = self.patch_grid_hw[1] - columns + 1
        if not self.training or n_offsets == 1:
            return 0
        return int(torch.randint(n_offsets, ()))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add positions to NHWC patch embeddings and prepend the class token.

        Same frequency rows and no more time columns than a full tile: slice a window of time
        columns (see `time_column_offset`). Anything else (a wider input, another number of mel
        bins) falls back to timm's interpolation, with a one-off warning because it changes what
        a time step means.
        """
        batch, rows, columns, channels = x.shape
        full_rows, full_columns = self.patch_grid_hw
        if rows != full_rows or columns > full_columns:
            if not self._warned_wide_input:
                logger.warning("input grid %dx%d differs from the %dx%d the model was built for: "
                               "interpolating positional embeddings", rows, columns, full_rows, full_columns)
                self._warned_wide_input = True
            return super()._pos_embed(x)
        prefix_pos = self.pos_embed[:, : self.num_prefix_tokens]
        patch_pos = self.pos_embed[:, self.num_prefix_tokens:].reshape(1, full_rows, full_columns, channels)
        offset = self.time_column_offset(columns)
        patch_pos = patch_pos[:, :, offset:offset + columns].reshape(1, rows * columns, channels)
        patches = x.reshape(batch, rows * columns, channels) + patch_pos
        cls = (self.cls_token + prefix_pos).expand(batch, -1, -1)
        return self.pos_drop(torch.cat([cls, patches], dim=1))

    def embed_tokens(self, tiles: torch.Tensor) -> torch.Tensor:
        """Patch embedding + positions: (batch, 1 + n_patches, embed_dim), class token first."""
        tokens = self._pos_embed(self.patch_embed(tiles))
        return self.norm_pre(self.patch_drop(tokens))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run embedded tokens (any subset of patches, class token first) through blocks and final norm."""
        return self.norm(self.blocks(tokens))

    def pooled(self, tokens: torch.Tensor, tiles: torch.Tensor) -> PooledEmbeddings:
        """Every pooling (`pooling.POOLINGS`) of the final tokens of the input `tiles`
        (batch, 1, n_mels, n_frames), which "band_active" needs to find the active columns.

        The patch tokens are in row-major order of the (frequency, time) grid, and every input
        spans all mel bins, so a time crop of any width has `patch_grid_hw[0]` rows.
        """
        patches = tokens[:, self.num_prefix_tokens:]
        grid = self.token_grid(tokens)
        active = self.active_columns(tiles).to(grid.dtype)[:, None, :, None]   # (batch, 1, columns, 1)
        band_active = (grid * active).sum(dim=2) / active.sum(dim=2)
        return PooledEmbeddings(mean=patches.mean(dim=1), cls=tokens[:, 0], band=grid.mean(dim=2).flatten(1),
                                band_active=band_active.flatten(1))

    def active_columns(self, tiles: torch.Tensor) -> torch.Tensor:
        """(batch, columns) bool: the time columns of patches whose mean input (all mel bins, the
        column's frames) is at or above the tile's median column (linear interpolation between
        the two middle ones for an even count, so half the columns when no two are equal, and at
        least one whatever the input)."""
        columns = self.grid_hw_for(tiles)[1]
        activity = tiles.float().mean(dim=(1, 2)).unflatten(-1, (columns, -1)).mean(dim=-1)
        return activity >= torch.quantile(activity, 0.5, dim=1, keepdim=True)

    def token_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final patch tokens as their (frequency, time) grid: (batch, rows, columns, embed_dim),
        rows low to high frequency. What "band" pooling averages over time, and what a search
        for a call's time span compares window by window."""
        patches = tokens[:, self.num_prefix_tokens:]
        batch, n_patches, dim = patches.shape
        rows = self.patch_grid_hw[0]
        return patches.reshape(batch, rows, n_patches // rows, dim)

    @property
    def band_dim(self) -> int:
        """Width of the per-frequency-band embeddings: frequency rows * embed_dim."""
        return self.patch_grid_hw[0] * self.embed_dim

    def pooling_dim(self, pooling: str) -> int:
        """Width of one pooling's embedding (`pooling.POOLINGS`)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        return self.band_dim if pooling in BAND_POOLINGS else self.embed_dim

    def embed(self, tiles: torch.Tensor) -> PooledEmbeddings:
        """Tile embeddings, every pooling of `pooling.POOLINGS`, for a batch of tiles."""
        return self.pooled(self.forward_features(tiles), tiles)

    def last_block_attention(self, tiles: torch.Tensor) -> LastBlockAttention:
        """Final tokens and every head's attention weights in the last block, in one forward pass."""
        tokens = self.embed_tokens(tiles)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        weights = attention_weights(last.attn, last.norm1(tokens))
        tokens = self.norm(last(tokens))
        return LastBlockAttention(tokens=tokens, attention=weights, grid_hw=self.grid_hw_for(tiles))

    def cls_attention_maps(self, tiles: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """Per-head attention of the class token to each patch: (batch, heads, grid rows, grid columns).

        The class token also attends to itself, so a raw map sums to 1 minus that self-attention;
        `renormalize=True` rescales each map to sum to 1 over patches (a distribution over the
        spectrogram, ready for "keep the top 60% of attention mass" thresholding).
        """
        result = self.last_block_attention(tiles)
        rows, columns = result.grid_hw
        maps = result.attention[:, :, 0, self.num_prefix_tokens:]
        if renormalize:
            maps = maps / maps.sum(dim=-1, keepdim=True)
        return maps.reshape(maps.shape[0], maps.shape[1], rows, columns)


def build_backbone(config: BackboneConfig) -> SpectrogramViT:
    """A freshly initialised spectrogram ViT (timm's default ViT initialisation)."""
    return SpectrogramViT(config)


def patch_grid_hw(shape_hw: tuple[int, int], patch_hw: tuple[int, int]) -> tuple[int, int]:
    """(frequency rows, time columns) of whole `patch_hw` patches in an array of `shape_hw` cells."""
    return shape_hw[0] // patch_hw[0], shape_hw[1] // patch_hw[1]


def patchify(tiles: torch.Tensor, patch_hw: tuple[int, int]) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, n_patches, patch rows * patch columns * C), patches in row-major
    grid order, each flattened row-major (mel bins outer, frames inner).

    The order matches the patch tokens of `SpectrogramViT` (frequency rows outer, time inner).
    """
    batch, channels, height, width = tiles.shape
    patch_mels, patch_frames = patch_hw
    rows, columns = patch_grid_hw((height, width), patch_hw)
    patches = tiles.reshape(batch, channels, rows, patch_mels, columns, patch_frames)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # batch, rows, columns, mels, frames, channels
    return patches.reshape(batch, rows * columns, patch_mels * patch_frames * channels)


def unpatchify(patches: torch.Tensor, patch_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify` for 1-channel tiles: (batch, n_patches, mels*frames) -> (batch, 1, H, W)."""
    batch = patches.shape[0]
    rows, columns = grid_hw
    patch_mels, patch_frames = patch_hw
    tiles = patches.reshape(batch, rows, columns, patch_mels, patch_frames, 1).permute(0, 5, 1, 3, 2, 4)
    return tiles.reshape(batch, 1, rows * patch_mels, columns * patch_frames)


class MethodOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars for logging and collapse checks


class SSLMethod(torch.nn.Module):
    """What the training engine needs from a self-supervised method (DINO, MAE, VICReg).

    A method owns every module it trains (backbone, heads, EMA teacher, centre) so that its
    `state_dict()` is the whole training state of the model, and DDP can wrap it as one module.
    """

    name: str = ""

    @property
    def embedding_pooling(self) -> str:
        """The pooling of the final tokens this method trains (`pooling.POOLINGS`), recorded in
        the checkpoint as the embedding to use by default; the mean of the patch tokens unless
        the method's loss reads another one."""
        return "mean"

    def forward(self, tiles: torch.Tensor, step: int, generator: torch.Generator | None = None) -> MethodOutput:
        """The loss for a batch of normalised tiles (batch, 1, n_mels, n_frames) at optimizer step `step`."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        """Adjust gradients after backward and clipping, e.g. DINO freezes its last layer early on."""

    def after_optimizer_step(self, step: int) -> None:
        """Update non-gradient state after the optimizer step, e.g. DINO's EMA teacher."""

    def export_backbone(self) -> SpectrogramViT:
        """The backbone that later stages embed with."""
        raise NotImplementedError

    def collapse_reason(self, metrics: dict[str, float]) -> str | None:
        """A human-readable reason if these (rank-averaged) metrics show representation collapse."""
        return None
