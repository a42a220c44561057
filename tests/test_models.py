"""Spectrogram ViT backbones: patch grids, time-crop positions, pooled embeddings, last-block attention."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from soundscape_ssl.pretrain.models import (
    ARCHITECTURES,
    BackboneConfig,
    PooledEmbeddings,
    SpectrogramViT,
    build_backbone,
    patchify,
    unpatchify,
)
from soundscape_ssl.core.config import config_from_mapping
from soundscape_ssl.pretrain.pooling import POOLINGS



TINY = dict(arch="vit_tiny", depth=2, embed_dim=64, num_heads=4, n_mels=32, n_frames=64, patch_size=8,
            drop_path_rate=0.0)


@pytest.fixture(scope="module")
def tiny_model() -> SpectrogramViT:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    return torch.randn(3, 1, 32, 64, generator=torch.Generator().manual_seed(1))


def test_non_square_patch_grid(tiny_model: SpectrogramViT, tiles: torch.Tensor) -> None:
    assert tiny_model.patch_grid_hw == (4, 8)
    tokens = tiny_model.forward_features(tiles)
    assert tokens.shape == (3, 1 + 4 * 8, 64)
    assert tiny_model(tiles).shape == (3, 64)


def test_study_default_is_vit_small_with_8x16_grid() -> None:
    config = BackboneConfig()
    assert config.resolved() == ARCHITECTURES["vit_small"] == (384, 12, 6)
    model = build_backbone(BackboneConfig(depth=1)).eval()  # one block keeps the test fast
    maps = model.cls_attention_maps(torch.randn(1, 1, 128, 256))
    assert maps.shape == (1, 6, 8, 16)


def test_narrow_time_crop_slices_positions_instead_of_stretching(tiny_model: SpectrogramViT,
                                                                tiles: torch.Tensor) -> None:
    crop = tiles[..., :16]  # 2 time columns of patches
    tokens = tiny_model.embed_tokens(crop)
    patch_embeddings = tiny_model.patch_embed(crop).reshape(3, 8, 64)  # NHWC -> (batch, rows*cols, dim)
    grid_pos = tiny_model.pos_embed[:, 1:].reshape(1, 4, 8, 64)[:, :, :2].reshape(1, 8, 64)
    torch.testing.assert_close(tokens[:, 1:], patch_embeddings + grid_pos)
    torch.testing.assert_close(tokens[:, 0], (tiny_model.cls_token + tiny_model.pos_embed[:, :1])[:, 0].expand(3, -1))
    # The first columns of a full tile get exactly the same token as the crop.
    torch.testing.assert_close(tiny_model.embed_tokens(tiles)[:, 1:].reshape(3, 4, 8, 64)[:, :, :2].reshape(3, 8, 64),
                               tokens[:, 1:])


def _window_offset(model: SpectrogramViT, crop: torch.Tensor, tokens: torch.Tensor) -> int:
    """The time-column offset of the positional window that `tokens` were built with (asserts one fits)."""
    rows, full_columns = model.patch_grid_hw
    columns = crop.shape[-1] // model.config.patch_hw[1]
    patch_embeddings = model.patch_embed(crop).reshape(crop.shape[0], rows * columns, -1)
    grid_pos = model.pos_embed[:, 1:].reshape(1, rows, full_columns, -1)
    matches = [offset for offset in range(full_columns - columns + 1)
               if torch.allclose(tokens[:, 1:], patch_embeddings
                                 + grid_pos[:, :, offset:offset + columns].reshape(1, rows * columns, -1))]
    assert len(matches) == 1, matches
    return matches[0]


def test_training_slides_the_positional_window_over_every_column(tiles: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**TINY)).train()
    crop = tiles[..., :16]  # 2 of 8 columns: offsets 0..6
    with torch.no_grad():
        offsets = []
        for seed in range(40):
            torch.manual_seed(seed)
            offsets.append(_window_offset(model, crop, model.embed_tokens(crop)))
        torch.manual_seed(3)
        repeated = _window_offset(model, crop, model.embed_tokens(crop))
        # Eval mode: always the first columns, whatever the random state.
        model.eval()
        torch.manual_seed(3)
        assert _window_offset(model, crop, model.embed_tokens(crop)) == 0
    assert sorted(set(offsets)) == list(range(7))  # every valid window is drawn, so every column trains
    assert repeated == offsets[3]  # drawn from torch's global generator: reproducible from its seed


def test_full_tile_positions_are_timms_and_draw_nothing(tiny_model: SpectrogramViT, tiles: torch.Tensor) -> None:
    """A full tile gets the whole grid, in eval and training mode, without touching the random state."""
    with torch.no_grad():
        patch_embeddings = tiny_model.patch_embed(tiles)
        reference = VisionTransformer._pos_embed(tiny_model, patch_embeddings)  # timm's own positions
        torch.testing.assert_close(tiny_model._pos_embed(patch_embeddings), reference, rtol=0, atol=0)
        first = tiny_model(tiles)
        torch.manual_seed(123)
        torch.testing.assert_close(tiny_model(tiles), first, rtol=0, atol=0)
        tiny_model.train()
        try:
            state = torch.get_rng_state()
            torch.testing.assert_close(tiny_model._pos_embed(patch_embeddings), reference, rtol=0, atol=0)
            assert torch.equal(torch.get_rng_state(), state)
        finally:
            tiny_model.eval()


def test_wider_input_falls_back_to_interpolation(tiny_model: SpectrogramViT) -> None:
    assert tiny_model.forward_features(torch.randn(2, 1, 32, 96)).shape == (2, 1 + 4 * 12, 64)


def test_pooled_embeddings(tiny_model: SpectrogramViT, tiles: torch.Tensor) -> None:
    tokens = tiny_model.forward_features(tiles)
    pooled = tiny_model.embed(tiles)
    torch.testing.assert_close(pooled.cls, tiny_model(tiles))
    torch.testing.assert_close(pooled.mean, tokens[:, 1:].mean(dim=1))
    assert not torch.allclose(pooled.cls, pooled.mean)
    # One definition of the pooling names: the tuple's fields are they, in their order.
    assert PooledEmbeddings._fields == POOLINGS
    widths = [64, 64, tiny_model.band_dim, tiny_model.band_dim]
    assert [getattr(pooled, name).shape[1] for name in POOLINGS] == widths
    assert [tiny_model.pooling_dim(name) for name in POOLINGS] == widths
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_model.pooling_dim("max")


def test_band_active_pools_each_row_over_the_loud_columns_only(tiny_model: SpectrogramViT) -> None:
    # 8 time columns of 8 frames: a call in columns 1, 2, 5 and 6 of each tile, quiet elsewhere
    # (the other half), so the median column activity falls between quiet and loud.
    tiles = 0.1 * torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(3))
    loud = [1, 2, 5, 6]
    for column in loud:
        tiles[..., column * 8:(column + 1) * 8] += 3.0
    expected_mask = torch.zeros(2, 8, dtype=torch.bool)
    expected_mask[:, loud] = True
    assert torch.equal(tiny_model.active_columns(tiles), expected_mask)
    grid = tiny_model.token_grid(tiny_model.forward_features(tiles))          # (2, 4 rows, 8 columns, 64)
    pooled = tiny_model.embed(tiles)
    torch.testing.assert_close(pooled.band_active, grid[:, :, loud].mean(dim=2).flatten(1))
    assert not torch.allclose(pooled.band_active, pooled.band)
    # A flat tile has no column above another: every column is active, and the pooling is "band".
    flat = torch.ones(1, 1, 32, 64)
    assert tiny_model.active_columns(flat).all()
    torch.testing.assert_close(tiny_model.embed(flat).band_active, tiny_model.embed(flat).band)
    # A time crop (VICReg's views) is judged on its own columns.
    assert tiny_model.active_columns(tiles[..., 8:24]).shape == (2, 2)


def test_band_pooling_keeps_each_frequency_row(tiny_model: SpectrogramViT, tiles: torch.Tensor) -> None:
    tokens = tiny_model.forward_features(tiles)
    band = tiny_model.embed(tiles).band
    rows, columns = tiny_model.patch_grid_hw
    assert band.shape == (3, tiny_model.band_dim) == (3, rows * 64)
    # Row r of the band embedding: the mean over time of the patch tokens of frequency row r
    # (tokens after the class token are in row-major (frequency, time) order).
    for row in range(rows):
        expected = tokens[:, 1 + row * columns:1 + (row + 1) * columns].mean(dim=1)
        torch.testing.assert_close(band[:, row * 64:(row + 1) * 64], expected)
    # The mean of the rows is the mean over all patches; a time crop keeps every row.
    torch.testing.assert_close(band.reshape(3, rows, 64).mean(dim=1), tiny_model.embed(tiles).mean)
    assert tiny_model.embed(tiles[..., :32]).band.shape == (3, rows * 64)
    # The token grid is the same tokens laid out (batch, rows, columns, dim): cell (r, c) is token
    # 1 + r * columns + c, so a search can compare windows of columns within each row.
    grid = tiny_model.token_grid(tokens)
    assert grid.shape == (3, rows, columns, 64)
    torch.testing.assert_close(grid[:, 1, 2], tokens[:, 1 + columns + 2])
    torch.testing.assert_close(grid.mean(dim=2).flatten(1), band)


def test_last_block_attention_matches_timms_explicit_softmax(tiny_model: SpectrogramViT,
                                                             tiles: torch.Tensor) -> None:
    result = tiny_model.last_block_attention(tiles)
    assert result.attention.shape == (3, 4, 33, 33)
    assert result.grid_hw == (4, 8)
    torch.testing.assert_close(result.attention.sum(-1), torch.ones(3, 4, 33))
    torch.testing.assert_close(result.tokens, tiny_model.forward_features(tiles))

    # Reference: timm's own non-fused path, whose softmax output passes through attn_drop.
    last_attention = tiny_model.blocks[-1].attn
    captured: list[torch.Tensor] = []
    handle = last_attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(output))
    last_attention.fused_attn = False
    try:
        tiny_model.forward_features(tiles)
    finally:
        last_attention.fused_attn = True
        handle.remove()
    torch.testing.assert_close(result.attention, captured[0], atol=1e-6, rtol=1e-5)


def test_cls_attention_maps(tiny_model: SpectrogramViT, tiles: torch.Tensor) -> None:
    raw = tiny_model.cls_attention_maps(tiles, renormalize=False)
    full = tiny_model.last_block_attention(tiles).attention
    assert raw.shape == (3, 4, 4, 8)  # (batch, heads, frequency rows, time columns)
    torch.testing.assert_close(raw.reshape(3, 4, 32), full[:, :, 0, 1:])
    cls_to_itself = full[:, :, 0, 0]
    torch.testing.assert_close(raw.sum(dim=(-2, -1)) + cls_to_itself, torch.ones(3, 4))
    renormalized = tiny_model.cls_attention_maps(tiles)
    torch.testing.assert_close(renormalized.sum(dim=(-2, -1)), torch.ones(3, 4))
    torch.testing.assert_close(renormalized, raw / raw.sum(dim=(-2, -1), keepdim=True))


def test_patchify_order_matches_the_patch_grid(tiles: torch.Tensor) -> None:
    patches = patchify(tiles, (8, 8))
    assert patches.shape == (3, 32, 64)
    row, column = 2, 5
    torch.testing.assert_close(patches[:, row * 8 + column], tiles[:, 0, 16:24, 40:48].reshape(3, 64))
    torch.testing.assert_close(unpatchify(patches, (8, 8), (4, 8)), tiles)


@pytest.mark.parametrize("changes, message", [
    (dict(n_frames=60), "whole number"),
    (dict(embed_dim=65), "divisible"),
    (dict(arch="vit_huge"), "unknown arch"),
    (dict(patch_size=4, patch_frames=24), r"4x24 \(mel bins x frames\) patches"),  # 24 does not divide 64 frames
    (dict(patch_size=3, patch_frames=16), r"3x16"),  # 3 does not divide 32 mel bins
    (dict(patch_frames=0), ">= 1"),
])
def test_bad_backbone_config(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(BackboneConfig(**{**TINY, **changes}))


# -- rectangular patches ------------------------------------------------------------------------

# 8 mel bins x 32 frames on the study's 128 x 256 tiles: a 16 x 8 grid, the same 128 tokens as
# 16 x 16 patches' 8 x 16, with twice the frequency resolution.
RECTANGULAR = dict(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2, n_mels=128, n_frames=256,
                   patch_size=8, patch_frames=32, drop_path_rate=0.0)


def test_patch_hw_is_square_unless_patch_frames_is_set() -> None:
    assert BackboneConfig().patch_hw == (16, 16)
    assert BackboneConfig(patch_size=8).patch_hw == (8, 8)
    assert BackboneConfig(**RECTANGULAR).patch_hw == (8, 32)
    # A config written before the field (no patch_frames key) is the square one.
    assert config_from_mapping(BackboneConfig, {"patch_size": 8}).patch_frames is None


def test_rectangular_patches_give_a_finer_frequency_grid_at_the_same_token_count() -> None:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**RECTANGULAR)).eval()
    square = build_backbone(BackboneConfig(**{**RECTANGULAR, "patch_size": 16, "patch_frames": None})).eval()
    assert model.patch_grid_hw == (16, 8) and square.patch_grid_hw == (8, 16)
    assert model.patch_embed.proj.weight.shape == (32, 1, 8, 32)
    tiles = torch.randn(2, 1, 128, 256, generator=torch.Generator().manual_seed(1))
    tokens = model.forward_features(tiles)
    assert tokens.shape == square.forward_features(tiles).shape == (2, 1 + 128, 32)
    # Band pooling: one row per 8 mel bins, 16 rows, each the time mean of its row's 8 tokens.
    band = model.embed(tiles).band
    assert model.band_dim == 16 * 32 and band.shape == (2, 16 * 32)
    torch.testing.assert_close(band[:, 5 * 32:6 * 32], tokens[:, 1 + 5 * 8:1 + 6 * 8].mean(dim=1))
    # Attention maps and the grid of a time crop (96 frames = 3 columns of 32) follow the rectangle.
    assert model.cls_attention_maps(tiles).shape == (2, 2, 16, 8)
    assert model.grid_hw_for(tiles[..., :96]) == (16, 3)
    assert model.forward_features(tiles[..., :96]).shape == (2, 1 + 16 * 3, 32)
    assert model.embed(tiles[..., :96]).band.shape == (2, 16 * 32)


def test_rectangular_patchify_order_is_the_token_order() -> None:
    tiles = torch.randn(2, 1, 128, 256, generator=torch.Generator().manual_seed(2))
    patches = patchify(tiles, (8, 32))
    assert patches.shape == (2, 128, 8 * 32)
    row, column = 11, 6  # mel bins 88-95, frames 192-223
    torch.testing.assert_close(patches[:, row * 8 + column], tiles[:, 0, 88:96, 192:224].reshape(2, 256))
    torch.testing.assert_close(unpatchify(patches, (8, 32), (16, 8)), tiles, rtol=0, atol=0)
    # The patch embedding is a linear map of each flattened patch: token i is patchify's patch i.
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(**RECTANGULAR))
    projection = model.patch_embed.proj
    expected = patches @ projection.weight.flatten(1).T + projection.bias
    torch.testing.assert_close(model.patch_embed(tiles).reshape(2, 128, 32), expected, atol=1e-5, rtol=1e-5)


def test_square_config_builds_the_model_it_built_before_patch_frames() -> None:
    """patch_frames None (every older config and checkpoint) and patch_frames == patch_size build
    the model timm builds from the integer patch size, as this class did before the field: same
    initialisation draws, weights and outputs, bit for bit."""
    outputs = []
    for changes in ({}, {"patch_frames": 8}):
        torch.manual_seed(0)
        model = build_backbone(BackboneConfig(**{**TINY, **changes})).eval()
        outputs.append((model.state_dict(), model.embed(torch.ones(1, 1, 32, 64))))
    torch.manual_seed(0)
    reference = VisionTransformer(img_size=(32, 64), patch_size=8, in_chans=1, num_classes=0, embed_dim=64,
                                  depth=2, num_heads=4, drop_path_rate=0.0, dynamic_img_size=True).eval()
    for state, pooled in outputs:
        assert state.keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.equal(state[key], value), key
        torch.testing.assert_close(pooled.cls, reference(torch.ones(1, 1, 32, 64)), rtol=0, atol=0)
        torch.testing.assert_close(pooled.mean, outputs[0][1].mean, rtol=0, atol=0)
