"""Spectrogram augmentations, schedules and the three SSL methods (DINO, MAE, VICReg) on tiny ViTs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from soundscape_ssl.pretrain.augment import (
    AugmentConfig,
    Normalization,
    apply_random_gain,
    augmented_views,
    mix_with_background,
    random_time_crop,
    shift_frequency,
    spec_augment,
)
from soundscape_ssl.pretrain.dino import DinoConfig, DinoMethod, dino_cross_entropy
from soundscape_ssl.pretrain.mae import MaeConfig, MaeMethod, normalized_patch_targets, patch_keep_order
from soundscape_ssl.pretrain.models import BackboneConfig, SSLMethod
from soundscape_ssl.pretrain.schedules import CosineSchedule, LinearWarmupSchedule, scaled_learning_rate
from soundscape_ssl.pretrain.vicreg import (VicregConfig, VicregMethod, representation_spread, scale_gradients,
                                            vicreg_terms)



BACKBONE = BackboneConfig(arch="vit_tiny", depth=2, embed_dim=64, num_heads=2, n_mels=32, n_frames=64,
                          patch_size=8, drop_path_rate=0.0)
# Rectangular patches, 4 mel bins x 16 frames: an 8 x 4 grid, as many tokens as BACKBONE's 4 x 8.
RECTANGULAR = dataclasses.replace(BACKBONE, patch_size=4, patch_frames=16)
NORMALIZATION = Normalization(mean_db=-60.0, std_db=12.0)
NO_AUGMENT = AugmentConfig(gain_db=0.0, mix_probability=0.0, time_masks=0, frequency_masks=0)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_dino(backbone: BackboneConfig = BACKBONE, **changes) -> DinoMethod:
    config = DinoConfig(out_dim=256, head_hidden_dim=128, head_bottleneck_dim=32, global_crop_frames=48,
                        local_crops=2, local_crop_frames=16, freeze_last_layer_epochs=0)
    for key, value in changes.items():
        setattr(config, key, value)
    return DinoMethod(backbone, config, AugmentConfig(), NORMALIZATION, total_steps=100, steps_per_epoch=10)


def _tiny_mae(backbone: BackboneConfig = BACKBONE, **changes) -> MaeMethod:
    return MaeMethod(backbone, MaeConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **changes))


def _tiny_vicreg(pooling: str = "cls", backbone: BackboneConfig = BACKBONE, crop_frames: int = 48) -> VicregMethod:
    return VicregMethod(backbone, VicregConfig(expander_dim=128, crop_frames=crop_frames, pooling=pooling),
                        AugmentConfig(), NORMALIZATION)


def _tiny_vicreg_on_bands() -> VicregMethod:
    """VICReg whose expander reads the per-frequency-band embedding (4 rows x 64 dims)."""
    method = _tiny_vicreg("band")
    assert method.expander[0].in_features == 4 * 64
    return method


# -- augmentations ------------------------------------------------------------------------------


def _frame_ramp(batch: int = 6) -> torch.Tensor:
    """Tiles whose value is the frame index (plus 100 x tile index), to read crops back."""
    frames = torch.arange(64.0)[None, None, None, :].expand(batch, 1, 32, 64)
    return frames + 100.0 * torch.arange(batch, dtype=torch.float32)[:, None, None, None]


def test_random_time_crop_takes_contiguous_frames_at_random_offsets() -> None:
    tiles = _frame_ramp()
    crops = random_time_crop(tiles, 16, _generator())
    assert crops.shape == (6, 1, 32, 16)
    starts = crops[:, 0, 0, 0] - 100.0 * torch.arange(6)
    torch.testing.assert_close(crops[:, 0, 0], starts[:, None] + 100.0 * torch.arange(6)[:, None] + torch.arange(16.0))
    assert starts.min() >= 0 and starts.max() <= 48
    assert len(set(starts.tolist())) > 1  # independent offsets per tile
    torch.testing.assert_close(crops, random_time_crop(tiles, 16, _generator()))  # reproducible


def test_frequency_shift_moves_bins_and_repeats_edges() -> None:
    tiles = torch.arange(32.0)[None, None, :, None].expand(8, 1, 32, 4).contiguous()
    shifted = shift_frequency(tiles, 3, _generator())
    shifts = shifted[:, 0, 16, 0] - 16.0  # how far each tile's content moved down the bin index
    assert shifts.abs().max() <= 3 and len(set(shifts.tolist())) > 1
    for tile, shift in zip(shifted, shifts.long().tolist()):
        expected = (torch.arange(32) + shift).clamp(0, 31).float()
        torch.testing.assert_close(tile[0, :, 0], expected)
    assert shift_frequency(tiles, 0, _generator()) is tiles


def test_random_gain_is_a_constant_offset_in_db() -> None:
    tiles = torch.randn(16, 1, 32, 64)
    gained = apply_random_gain(tiles, 6.0, NORMALIZATION, _generator())
    offsets_db = (gained - tiles) * NORMALIZATION.std_db
    per_tile = offsets_db[:, 0, 0, 0]
    torch.testing.assert_close(offsets_db, per_tile[:, None, None, None].expand_as(offsets_db))
    assert per_tile.abs().max() <= 6.0 and per_tile.std() > 1.0


def test_mixing_adds_powers() -> None:
    signal_db = torch.tensor([-30.0, -100.0, -60.0]).reshape(1, 1, 3, 1)
    background_db = torch.tensor([-60.0, -60.0, -50.0]).reshape(1, 1, 3, 1)
    mixed = mix_with_background(NORMALIZATION.from_db(signal_db), NORMALIZATION.from_db(background_db), 1.0,
                                (10.0, 10.0), NORMALIZATION, _generator())
    expected_db = 10 * torch.log10(10 ** (signal_db / 10) + 10 ** ((background_db - 10.0) / 10))
    torch.testing.assert_close(NORMALIZATION.to_db(mixed), expected_db)
    # A loud bin barely changes, a silent bin takes the attenuated background level.
    assert abs(NORMALIZATION.to_db(mixed)[0, 0, 0, 0].item() + 30.0) < 0.01
    assert abs(NORMALIZATION.to_db(mixed)[0, 0, 1, 0].item() + 70.0) < 0.01
    untouched = mix_with_background(signal_db, background_db, 0.0, (10.0, 10.0), NORMALIZATION, _generator())
    assert untouched is signal_db


def test_spec_augment_masks_whole_bands_with_zero() -> None:
    tiles = torch.randn(32, 1, 32, 64) + 5.0  # no natural zeros
    config = AugmentConfig(time_masks=2, max_time_mask_frames=30, frequency_masks=1, max_frequency_mask_bins=6)
    masked = spec_augment(tiles, config, _generator())
    hidden = masked == 0
    assert 0.0 < hidden.float().mean() < 0.5
    torch.testing.assert_close(masked[~hidden], tiles[~hidden])
    frames_hidden = hidden[:, 0].all(dim=1)  # whole time columns
    bins_hidden = hidden[:, 0].all(dim=2)  # whole frequency rows
    torch.testing.assert_close(hidden[:, 0], frames_hidden[:, None, :] | bins_hidden[:, :, None])
    assert frames_hidden.sum(dim=1).max() <= 2 * 16  # each time mask is capped at a quarter of 64 frames
    assert bins_hidden.sum(dim=1).max() <= 6


def test_augmented_views_are_view_major_crops_of_each_tile() -> None:
    tiles = _frame_ramp(batch=4)
    views = augmented_views(tiles, 3, 24, NO_AUGMENT, NORMALIZATION, _generator())
    assert views.shape == (12, 1, 32, 24)
    tile_of_row = torch.div(views[:, 0, 0, 0], 100, rounding_mode="floor")
    torch.testing.assert_close(tile_of_row, torch.arange(4.0).repeat(3))
    augmented = augmented_views(tiles, 3, 24, AugmentConfig(mix_probability=1.0), NORMALIZATION, _generator())
    assert not torch.allclose(augmented, views)


# -- schedules ----------------------------------------------------------------------------------


def test_cosine_schedule_with_linear_warmup() -> None:
    schedule = CosineSchedule(base=1.0, final=0.1, total_steps=110, warmup_steps=10)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5) and schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # half way through the cosine
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    momentum = CosineSchedule(base=0.996, final=1.0, total_steps=100)
    assert momentum(0) == pytest.approx(0.996) and momentum(100) == pytest.approx(1.0)
    temperature = LinearWarmupSchedule(start=0.04, end=0.07, warmup_steps=30)
    assert temperature(15) == pytest.approx(0.055) and temperature(30) == temperature(99) == 0.07
    assert scaled_learning_rate(5e-4, 1024) == pytest.approx(2e-3)


# -- DINO ---------------------------------------------------------------------------------------


def test_dino_cross_entropy_skips_same_view_pairs() -> None:
    torch.manual_seed(0)
    student = torch.randn(4 * 2, 5)  # 4 views of 2 tiles
    teacher_probs = torch.softmax(torch.randn(2 * 2, 5), dim=-1)  # 2 global views
    loss = dino_cross_entropy(student, teacher_probs, 0.1, n_student_views=4, n_teacher_views=2)
    log_p = torch.log_softmax(student / 0.1, dim=-1).reshape(4, 2, 5)
    q = teacher_probs.reshape(2, 2, 5)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    expected = sum(-(q[t] * log_p[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)


def test_dino_teacher_starts_as_student_and_follows_by_ema() -> None:
    method = _tiny_dino()
    for teacher, student in zip(method.teacher.parameters(), method.student.parameters()):
        assert torch.equal(teacher, student) and not teacher.requires_grad
    before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for parameter in method.student.parameters():
            parameter.add_(1.0)
    method.after_optimizer_step(0)
    momentum = method.teacher_momentum(0)
    for old, teacher, student in zip(before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(teacher, momentum * old + (1 - momentum) * student)


def test_dino_centre_is_an_ema_of_teacher_outputs() -> None:
    method = _tiny_dino(center_momentum=0.9).eval()
    tiles = torch.randn(4, 1, 32, 64)
    method(tiles, 0, _generator())
    with torch.no_grad():
        teacher_logits = method.teacher(augmented_views(tiles, 2, 48, method.augment, NORMALIZATION, _generator()))[0]
    torch.testing.assert_close(method.center, 0.1 * teacher_logits.mean(dim=0, keepdim=True))


def test_dino_freezes_last_layer_at_first() -> None:
    method = DinoMethod(BACKBONE, DinoConfig(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                                             global_crop_frames=48, local_crops=0, freeze_last_layer_epochs=1),
                        AugmentConfig(), NORMALIZATION, total_steps=20, steps_per_epoch=5)
    method(torch.randn(4, 1, 32, 64), 0, _generator()).loss.backward()
    assert method.student.head.last_layer.direction.grad is not None
    method.before_optimizer_step(4)
    assert method.student.head.last_layer.direction.grad is None
    assert method.student.head.mlp[0].weight.grad is not None


def test_dino_collapse_rules() -> None:
    method = _tiny_dino()
    assert method.collapse_reason({"teacher_entropy_fraction": 0.6, "teacher_max_marginal": 0.1}) is None
    assert "uniform" in method.collapse_reason({"teacher_entropy_fraction": 0.995, "teacher_max_marginal": 0.0})
    assert "one prototype" in method.collapse_reason({"teacher_entropy_fraction": 0.1, "teacher_max_marginal": 0.95})


def test_dino_rejects_crops_that_are_not_whole_patches() -> None:
    with pytest.raises(ValueError, match="global_crop_frames"):
        _tiny_dino(global_crop_frames=50)


def test_crop_widths_must_be_whole_patch_widths_not_heights() -> None:
    """With 4 x 16 patches a crop must be a multiple of 16 frames; 40 or 24 frames are whole
    4-cell (and 8-cell) steps but not whole patches, and the message names the width."""
    with pytest.raises(ValueError, match=r"vicreg.crop_frames=40 must be a multiple of the patch width 16 frames"):
        _tiny_vicreg(backbone=RECTANGULAR, crop_frames=40)
    with pytest.raises(ValueError, match=r"dino.local_crop_frames=24 must be a multiple of the patch width 16 frames"):
        _tiny_dino(RECTANGULAR, local_crop_frames=24)
    with pytest.raises(ValueError, match=r"dino.global_crop_frames=40 .* patch width 16 frames"):
        _tiny_dino(RECTANGULAR, global_crop_frames=40)
    _tiny_vicreg(backbone=RECTANGULAR, crop_frames=32)  # 2 columns: fine
    _tiny_vicreg(backbone=BACKBONE, crop_frames=40)  # square 8 x 8 patches: 5 columns, fine


# -- MAE ----------------------------------------------------------------------------------------


def test_random_masking_hides_the_requested_share() -> None:
    order, n_visible = patch_keep_order(5, (4, 8), 0.75, "random", _generator())
    assert n_visible == 8
    assert order.shape == (5, 32)
    assert torch.equal(order.sort(dim=1).values, torch.arange(32).expand(5, -1))  # a permutation per tile
    assert not torch.equal(order[0], order[1])


def test_time_masking_hides_whole_columns() -> None:
    order, n_visible = patch_keep_order(6, (4, 8), 0.6, "time", _generator())
    assert n_visible == (8 - 5) * 4
    for tile_order in order:
        visible = torch.zeros(32, dtype=torch.bool)
        visible[tile_order[:n_visible]] = True
        columns_visible = visible.reshape(4, 8)
        assert torch.equal(columns_visible.all(dim=0), columns_visible.any(dim=0))  # columns all in or all out
        assert columns_visible.all(dim=0).sum() == 3


def test_normalized_patch_targets() -> None:
    targets = normalized_patch_targets(torch.randn(2, 10, 64) * 5 + 3)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(-1), torch.ones(2, 10), atol=1e-4, rtol=0)


def test_mae_loss_only_sees_hidden_patches() -> None:
    method = _tiny_mae(mask_ratio=0.5).eval()
    tiles = torch.randn(2, 1, 32, 64)
    output = method(tiles, 0, _generator())
    assert output.metrics["hidden_fraction"].item() == 0.5
    order, n_visible = patch_keep_order(2, (4, 8), 0.5, "random", _generator())
    # Changing the tiles only inside visible patches changes the targets only where the loss ignores
    # them, but it does change the encoder input: so compare with a tile edited in hidden patches.
    edited = tiles.clone()
    edited_patches = edited.reshape(2, 1, 4, 8, 8, 8)  # (batch, 1, rows, 8, columns, 8) view
    hidden_patch = order[0, n_visible].item()
    row, column = divmod(hidden_patch, 8)
    edited_patches[0, 0, row, :, column, :] += torch.randn(8, 8)
    assert method(edited, 0, _generator()).loss.item() != pytest.approx(output.loss.item())
    with pytest.raises(ValueError, match="whole"):
        method(tiles[..., :48], 0, _generator())


# -- VICReg -------------------------------------------------------------------------------------


def test_vicreg_terms_against_a_direct_computation() -> None:
    torch.manual_seed(0)
    z_a, z_b = torch.randn(32, 8) * 0.5, torch.randn(32, 8) * 2.0
    invariance, variance, covariance, below_hinge_fraction = vicreg_terms(z_a, z_b)
    assert invariance.item() == pytest.approx(((z_a - z_b) ** 2).mean().item())
    hinge = lambda z: torch.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()  # noqa: E731
    assert variance.item() == pytest.approx(((hinge(z_a) + hinge(z_b)) / 2).item(), rel=1e-5)

    def off_diagonal_term(z: torch.Tensor) -> float:
        cov = torch.cov(z.T)
        return ((cov ** 2).sum() - (cov.diagonal() ** 2).sum()).item() / z.shape[1]

    assert covariance.item() == pytest.approx(off_diagonal_term(z_a) + off_diagonal_term(z_b), rel=1e-4)
    below = lambda z: (torch.sqrt(z.var(0) + 1e-4) < 1).float().mean()  # noqa: E731
    assert below_hinge_fraction.item() == pytest.approx(((below(z_a) + below(z_b)) / 2).item())


@pytest.mark.parametrize("spread", [0.3, 1.0])
def test_vicreg_scale_gradients_are_the_loss_derivative_under_rescaling(spread: float) -> None:
    """Each logged scale gradient equals autograd's derivative of its weighted term with respect
    to a common scale of both expansions, with dimensions on both sides of the hinge."""
    config = VicregConfig(invariance_weight=25.0, variance_weight=25.0, covariance_weight=1.0)
    generator = torch.Generator().manual_seed(3)
    z_a = torch.randn(64, 16, generator=generator) * torch.linspace(0.1, 2.5, 16) * spread
    z_b = z_a + 0.2 * torch.randn(64, 16, generator=generator)
    scale = torch.ones((), requires_grad=True)
    terms = vicreg_terms(scale * z_a, scale * z_b)
    gradients = scale_gradients(terms, config)
    for name, weight in (("invariance", 25.0), ("variance", 25.0), ("covariance", 1.0)):
        (derivative,) = torch.autograd.grad(weight * getattr(terms, name), scale, retain_graph=True)
        # the hinge's derivative is var / std per dimension, the logged one std: 1e-4 / std apart
        assert gradients[f"scale_gradient_{name}"].item() == pytest.approx(derivative.item(), rel=2e-3, abs=1e-3)
    assert gradients["scale_gradient_variance"] < 0 < gradients["scale_gradient_covariance"]


def test_representation_spread_detects_collapse() -> None:
    spread_out = representation_spread(torch.randn(256, 64))
    collapsed = representation_spread(torch.ones(256, 64) + 1e-4 * torch.randn(256, 64))
    assert 0.8 < spread_out.item() < 1.2
    assert collapsed.item() < 0.01
    method = _tiny_vicreg()
    assert method.collapse_reason({"representation_spread": collapsed.item()}) is not None
    assert method.collapse_reason({"representation_spread": spread_out.item()}) is None


# -- every positional column trains -------------------------------------------------------------


@pytest.mark.parametrize("build", [_tiny_dino, _tiny_vicreg], ids=["dino", "vicreg"])
def test_crops_narrower_than_the_tile_train_every_positional_column(build) -> None:
    """Crops of 6 (and, for DINO, 2) of 8 columns must still train all 8 columns that a full tile uses.

    With the window always at column 0, columns 6-7 got no gradient at all.
    """
    torch.manual_seed(0)
    method: SSLMethod = build()
    method.train()
    backbone = method.student.backbone if isinstance(method, DinoMethod) else method.backbone
    rows, columns = backbone.patch_grid_hw
    tiles = torch.randn(8, 1, 32, 64, generator=_generator(1))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    column_gradient = torch.zeros(columns)
    for step in range(6):
        torch.manual_seed(1000 + step)  # as the engine does before every step
        output = method(tiles, step, _generator(step))
        optimizer.zero_grad()
        output.loss.backward()
        column_gradient += backbone.pos_embed.grad[0, 1:].reshape(rows, columns, -1).abs().sum(dim=(0, 2))
        method.before_optimizer_step(step)
        optimizer.step()
        method.after_optimizer_step(step)
    assert (column_gradient > 0).all(), column_gradient


# -- every method learns ------------------------------------------------------------------------


def _dino_with_fixed_targets(backbone: BackboneConfig = BACKBONE) -> DinoMethod:
    """DINO whose teacher and centre stay put, so the loss measures only the student fitting them
    (the EMA and the centre are tested above; with them moving, the loss is not monotone)."""
    return _tiny_dino(backbone, teacher_momentum=1.0, center_momentum=1.0)


def _rectangular_dino() -> DinoMethod:
    """DINO on 4 x 16 patches: 48-frame global and 16-frame local crops are 3 and 1 columns wide."""
    method = _dino_with_fixed_targets(RECTANGULAR)
    assert method.student.backbone.patch_grid_hw == (8, 4)
    return method


def _rectangular_mae() -> MaeMethod:
    """MAE on 4 x 16 patches: the decoder predicts 64 values per patch, in patchify's (4, 16) order."""
    method = _tiny_mae(RECTANGULAR)
    assert method.decoder_pred.out_features == 4 * 16 and method.grid_hw == (8, 4)
    return method


def _rectangular_vicreg_on_bands() -> VicregMethod:
    """VICReg on 4 x 16 patches reading the band embedding: 8 frequency rows x 64 dims."""
    method = _tiny_vicreg("band", RECTANGULAR)
    assert method.expander[0].in_features == 8 * 64
    return method


@pytest.mark.parametrize("build", [_dino_with_fixed_targets, _tiny_mae, _tiny_vicreg, _tiny_vicreg_on_bands,
                                   _rectangular_dino, _rectangular_mae, _rectangular_vicreg_on_bands],
                         ids=["dino", "mae", "vicreg", "vicreg_band", "dino_4x16", "mae_4x16", "vicreg_band_4x16"])
def test_loss_falls_on_a_fixed_batch(build) -> None:
    torch.manual_seed(0)
    method: SSLMethod = build()
    tiles = torch.randn(16, 1, 32, 64, generator=_generator(1))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        output = method(tiles, step, _generator(2))  # the same views every step
        optimizer.zero_grad()
        output.loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.after_optimizer_step(step)
        losses.append(output.loss.item())
        assert all(math.isfinite(value.item()) for value in output.metrics.values())
    assert losses[-1] < 0.9 * losses[0], losses


def test_views_get_the_background_removal_of_inference_after_mixing_and_gain() -> None:
    """A view is a crop of the *whole* tile's model input: band medians over all frames, computed
    after the gain, so a gain cancels exactly and the crop equals the crop of normalize_tiles'."""
    from soundscape_ssl.tiles.store import normalize_tiles

    tiles_db = -60.0 + 12.0 * torch.randn(3, 1, 32, 64)
    normalization = Normalization(mean_db=-60.0, std_db=12.0, background="band_median")
    tiles = (tiles_db - normalization.mean_db) / normalization.std_db
    config = AugmentConfig(gain_db=6.0, mix_probability=0.0, time_masks=0, frequency_masks=0)
    views = augmented_views(tiles, 2, 64, config, normalization, _generator())
    expected = normalize_tiles(tiles_db, {"mean": -60.0, "std": 12.0, "background": "band_median"})
    torch.testing.assert_close(views, expected.repeat(2, 1, 1, 1), atol=1e-5, rtol=0)
    crops = augmented_views(tiles, 1, 16, config, normalization, _generator(1))
    starts = [next(s for s in range(64 - 16 + 1)
                   if torch.allclose(crop, expected[i, ..., s:s + 16], atol=1e-5)) for i, crop in enumerate(crops)]
    assert len(starts) == 3   # every crop is a window of the whole tile's model input


def test_rectangular_mae_targets_are_the_hidden_4x16_patches() -> None:
    """Editing one hidden 4 x 16 patch changes the loss; editing cells of a visible one only (same
    encoder input aside) leaves the hidden targets alone: the targets are cut on the rectangle."""
    method = _tiny_mae(RECTANGULAR, mask_ratio=0.5).eval()
    tiles = torch.randn(2, 1, 32, 64, generator=_generator(3))
    loss = method(tiles, 0, _generator()).loss.item()
    order, n_visible = patch_keep_order(2, (8, 4), 0.5, "random", _generator())
    row, column = divmod(order[0, n_visible].item(), 4)  # a hidden patch of tile 0
    edited = tiles.clone()
    edited[0, 0, row * 4:(row + 1) * 4, column * 16:(column + 1) * 16] += torch.randn(4, 16, generator=_generator(4))
    assert method(edited, 0, _generator()).loss.item() != pytest.approx(loss)
    # A per-patch constant shift of a hidden patch: norm_pix targets (each patch minus its own
    # mean) do not move, and the encoder never sees it, so the loss is unchanged. Cut as 8 x 8 or
    # 16 x 4 patches, the same cells would straddle patches and move their targets.
    shifted = tiles.clone()
    shifted[0, 0, row * 4:(row + 1) * 4, column * 16:(column + 1) * 16] += 5.0
    assert method(shifted, 0, _generator()).loss.item() == pytest.approx(loss, rel=1e-5)


def test_mae_reconstructs_the_model_input() -> None:
    normalization = Normalization(mean_db=-60.0, std_db=12.0, background="band_median")
    method = MaeMethod(BACKBONE, MaeConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
                       normalization)
    seen = []
    method.encoder.embed_tokens = lambda tiles, f=method.encoder.embed_tokens: seen.append(tiles) or f(tiles)
    tiles = torch.randn(2, 1, 32, 64)
    method(tiles, 0, _generator())
    from soundscape_ssl.tiles.store import remove_band_background

    torch.testing.assert_close(seen[0], remove_band_background(tiles))


def test_vicreg_expands_each_view_on_its_own() -> None:
    """Batch norm statistics of one view never mix with the other view's (as in the reference)."""
    method = _tiny_vicreg()
    batches = []
    method.expander.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    method(torch.randn(6, 1, 32, 64), 0, _generator())
    assert batches == [6, 6]


def _vicreg_terms_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a gloo group: VICReg's terms and the gradient of the loss on its half of the batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        z_a, z_b = (part.chunk(world_size)[rank].clone().requires_grad_(True) for part in _vicreg_batch())
        invariance, variance, covariance, _ = vicreg_terms(z_a, z_b)
        (25 * invariance + 25 * variance + covariance).backward()
        torch.save({"terms": torch.stack([invariance, variance, covariance]).detach(),
                    "grad_a": z_a.grad, "grad_b": z_b.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _vicreg_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    z_a = torch.randn(16, 12, generator=generator) * torch.linspace(0.2, 2.0, 12)   # some dims below std 1
    return z_a, z_a + 0.3 * torch.randn(16, 12, generator=generator)


@pytest.mark.slow
def test_vicreg_statistics_span_all_ranks(tmp_path) -> None:
    """Two gloo ranks of 8 tiles train as one process of 16: the rank-averaged loss equals the
    loss of the concatenated batch, and the gradients DDP averages are that loss's gradients
    (the all-gather carries them back to each rank's slice)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_vicreg_terms_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    z_a, z_b = (part.clone().requires_grad_(True) for part in _vicreg_batch())
    invariance, variance, covariance, _ = vicreg_terms(z_a, z_b)
    (25 * invariance + 25 * variance + covariance).backward()
    mean_terms = (ranks[0]["terms"] + ranks[1]["terms"]) / 2
    torch.testing.assert_close(mean_terms, torch.stack([invariance, variance, covariance]).detach())
    assert variance > 0 and covariance > 0                     # the batch-wide terms are in play
    for name, full in (("grad_a", z_a.grad), ("grad_b", z_b.grad)):
        # each rank holds d(sum of both ranks' losses)/d(its slice); DDP divides by the world size
        torch.testing.assert_close(torch.cat([ranks[0][name], ranks[1][name]]) / 2, full)


def test_dino_head_scores_in_float32_under_bf16_autocast() -> None:
    method = _tiny_dino()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = method.teacher(torch.randn(4, 1, 32, 48))
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_dino_teacher_probabilities_in_float32_under_bf16_autocast(monkeypatch, centering) -> None:
    """A whole bf16 training forward: the teacher's probabilities that reach the loss are float32
    and equal to the float64 softmax of its logits to float32 precision (bf16 anywhere on the way
    would be off by percents at temperature 0.04)."""
    from soundscape_ssl.pretrain import dino

    method = _tiny_dino(centering=centering)
    logits, probs = [], []
    method.teacher.head.register_forward_hook(lambda module, inputs, output: logits.append(output))
    original = dino.dino_cross_entropy
    monkeypatch.setattr(dino, "dino_cross_entropy",
                        lambda student, teacher, *args: probs.append(teacher) or original(student, teacher, *args))
    with torch.no_grad():
        method.center.copy_(torch.randn(1, 256) * 0.1)
    center = method.center.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method(torch.randn(8, 1, 32, 64), 0, _generator())
    assert logits[0].dtype == probs[0].dtype == torch.float32
    if centering == "center":
        expected = torch.softmax((logits[0].double() - center.double()) / 0.04, dim=-1)
    else:
        expected = dino.sinkhorn_knopp_targets(logits[0].double(), 0.04, 3).double()
    torch.testing.assert_close(probs[0].double(), expected, atol=1e-6, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):            # bf16 logits in: float32 out
        assert method.teacher_targets(logits[0].bfloat16(), 0).dtype == torch.float32


def test_sinkhorn_knopp_targets_share_the_batch_equally() -> None:
    from soundscape_ssl.pretrain.dino import sinkhorn_knopp_targets

    # Seeded: drawn from the global generator, the plain softmax's largest share depended on the
    # tests before (it topped four shares in 9% of 200 seeds, two shares in all of them).
    logits = torch.randn(64, 16, generator=_generator(0)) * 3 + torch.linspace(0, 5, 16)  # prototype 15 favoured
    targets = sinkhorn_knopp_targets(logits, 0.5, iterations=50)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(targets.mean(dim=0), torch.full((16,), 1 / 16), atol=2e-3, rtol=0)
    plain = torch.softmax(logits / 0.5, dim=1).mean(dim=0)
    assert plain.max() > 2 / 16   # without balancing the favoured prototypes take twice their share


def test_koleo_is_lower_for_spread_embeddings() -> None:
    from soundscape_ssl.pretrain.dino import koleo_loss

    spread = torch.eye(8)
    clumped = torch.eye(8) * 0.01 + torch.ones(8, 8)
    assert koleo_loss(spread) < koleo_loss(clumped)
    torch.testing.assert_close(koleo_loss(spread), -torch.log(torch.tensor(math.sqrt(2.0))))


@pytest.mark.parametrize("changes", [{"pooling": "band"}, {"centering": "sinkhorn_knopp"}, {"koleo_weight": 0.1}])
def test_dino_options_train(changes) -> None:
    method = _tiny_dino(**changes)
    if changes.get("pooling") == "band":
        assert method.student.head.mlp[0].in_features == 4 * 64
    optimizer = torch.optim.AdamW(method.student.parameters(), lr=1e-3)
    tiles = torch.randn(8, 1, 32, 64)
    losses = []
    for step in range(6):
        output = method(tiles, step, _generator(step))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        losses.append(float(output.loss))
    assert all(math.isfinite(loss) for loss in losses)
    if changes.get("koleo_weight"):
        assert float(output.metrics["koleo"]) != 0.0


# -- precision and compile: the GPU paths (CPU where the path exists there too) ------------------

_TINY_METHODS = {"dino": lambda: _tiny_dino(), "mae": lambda: _tiny_mae(), "vicreg": lambda: _tiny_vicreg()}


def _training_losses(method_name: str, device: str, autocast_dtype, steps: int = 2,
                     compile: bool = False) -> list[float]:
    """Losses of `steps` optimizer steps of a tiny method from fixed weights, batch and draws."""
    from soundscape_ssl.pretrain.engine import train_step
    from soundscape_ssl.pretrain.train import compile_for_training

    torch.manual_seed(0)
    method = _TINY_METHODS[method_name]().to(device).train()
    if compile:
        compile_for_training(method)
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    tiles = torch.randn(8, 1, 32, 64, generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)                           # stochastic depth
        generator = torch.Generator(device=device).manual_seed(step)
        loss, _, grad_norm = train_step(method, method, optimizer, tiles, step, learning_rate=1e-4,
                                        weight_decay=0.0, autocast_dtype=autocast_dtype, clip_grad_norm=3.0,
                                        parameters=parameters, generator=generator)
        assert torch.isfinite(grad_norm), (method_name, step)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("method_name", sorted(_TINY_METHODS))
def test_a_bf16_training_step_is_finite_and_close_to_fp32(method_name: str, device: str) -> None:
    """bf16 autocast (training's precision on a GPU) from the same weights, batch and draws: every
    loss finite, the first within 2 % of the float32 loss (bf16 keeps ~3 significant digits; the
    teacher targets and VICReg's statistics are float32, see their tests)."""
    from soundscape_ssl.core.stage import tf32_matmuls

    with tf32_matmuls(False):
        fp32 = _training_losses(method_name, device, None)
        bf16 = _training_losses(method_name, device, torch.bfloat16)
    assert all(math.isfinite(loss) for loss in fp32 + bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("method_name", sorted(_TINY_METHODS))
def test_compiled_training_gives_the_eager_losses(method_name: str) -> None:
    """torch.compile of the transformer blocks (train's `compile: true`) on CUDA: the losses of two
    float32 steps equal the eager ones within 1e-4 relative (fusion reorders float sums)."""
    from soundscape_ssl.core.stage import tf32_matmuls

    with tf32_matmuls(False):
        eager = _training_losses(method_name, "cuda", None)
        compiled = _training_losses(method_name, "cuda", None, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
