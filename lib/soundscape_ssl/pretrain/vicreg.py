"""VICReg (Bardes, Ponce & LeCun 2022) for log-mel tiles: variance, invariance and covariance terms.

Two augmented time crops of each tile go through the backbone and an expander MLP. The loss
pulls the two expansions together (invariance: mean squared error), keeps every expanded
dimension's standard deviation over the batch above 1 (variance: a hinge, so the embedding
cannot shrink to a point) and pushes the off-diagonal covariances to zero (covariance: the
dimensions carry different information). No teacher, no negatives, no centring. Variance and
covariance are computed over the global batch (all ranks), as in the reference code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn.functional as F
from torch import nn

from .augment import AugmentConfig, Normalization, augmented_views, spec_augment
from .models import BackboneConfig, MethodOutput, SpectrogramViT, SSLMethod, build_backbone
from .pooling import POOLINGS


@dataclasses.dataclass
class VicregConfig:
    """VICReg hyper-parameters (the paper's loss weights; a narrower expander than its 8192)."""

    expander_dim: int = 2048
    expander_layers: int = 3
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    crop_frames: int = 224  # both views are time crops of this width
    pooling: str = "cls"  # representation fed to the expander: "cls" token, "mean" of patches,
                          # "band" (per-frequency-row means) or "band_active" (the same over the
                          # active time columns); see models.PooledEmbeddings
    spec_mask: bool = True  # SpecAugment masks on both views (VICReg is symmetric)
    collapse_std: float = 0.05  # representation spread below this (see `representation_spread`): collapse

    def validate(self, n_frames: int, patch_frames: int) -> None:
        """`patch_frames`: the backbone's patch width in time frames (`BackboneConfig.patch_hw[1]`)."""
        if not 0 < self.crop_frames <= n_frames or self.crop_frames % patch_frames:
            raise ValueError(f"vicreg.crop_frames={self.crop_frames} must be a multiple of the patch width "
                             f"{patch_frames} frames and at most the tile width {n_frames}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"vicreg.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.expander_layers < 1:
            raise ValueError("vicreg.expander_layers must be >= 1")


def build_expander(in_dim: int, width: int, n_layers: int) -> nn.Sequential:
    """Linear-BatchNorm-ReLU blocks and a final plain linear layer (VICReg's expander)."""
    layers: list[nn.Module] = []
    widths = [in_dim] + [width] * n_layers
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < n_layers - 1:
            layers += [nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _gather_with_gradient(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks; gradients flow back to each rank's own slice."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch.cat(dist_functional.all_gather(x))
    return x


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class VicregTerms(NamedTuple):
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor
    below_hinge_fraction: torch.Tensor  # share of expanded dimensions (both views) with std < 1; no gradient


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> VicregTerms:
    """The invariance, variance and covariance terms for two batches of expansions (batch, dim).

    Invariance uses the local batch; variance and covariance the batch gathered over all ranks
    (a gradient-preserving all-gather, as the reference code), so that with DDP's averaging of
    gradients W ranks of B tiles train as one process on W x B. All in float32, autocast off: the
    statistics are cheap and bf16 covariances of a wide expansion are noisy.
    """
    with torch.autocast(z_a.device.type, enabled=False):
        z_a, z_b = z_a.float(), z_b.float()
        invariance = F.mse_loss(z_a, z_b)
        z_a, z_b = _gather_with_gradient(z_a), _gather_with_gradient(z_b)
        n, dim = z_a.shape
        z_a = z_a - z_a.mean(dim=0)
        z_b = z_b - z_b.mean(dim=0)
        std_a = torch.sqrt(z_a.var(dim=0) + 1e-4)
        std_b = torch.sqrt(z_b.var(dim=0) + 1e-4)
        variance = (F.relu(1.0 - std_a).mean() + F.relu(1.0 - std_b).mean()) / 2
        cov_a = (z_a.T @ z_a) / (n - 1)
        cov_b = (z_b.T @ z_b) / (n - 1)
        covariance = off_diagonal(cov_a).pow(2).sum() / dim + off_diagonal(cov_b).pow(2).sum() / dim
        below_hinge_fraction = ((std_a < 1).float().mean() + (std_b < 1).float().mean()).detach() / 2
    return VicregTerms(invariance, variance, covariance, below_hinge_fraction)


def scale_gradients(terms: VicregTerms, config: VicregConfig) -> dict[str, torch.Tensor]:
    """Each weighted term's derivative with respect to a common log-scale of the expansions.

    Scaling every expansion by (1 + e) multiplies the invariance by (1 + e)^2 and the covariance
    by (1 + e)^4, and lowers the variance hinge by e * mean(std * [std < 1]) = e * (share below 1
    - hinge), up to the 1e-4 inside the square root. Where the three sum to about 0 the loss sits
    at a balance of scale: the hinge asks for larger expansions and the other two terms for
    smaller ones, and their shares say which term holds the hinge unmet.
    """
    return {
        "scale_gradient_variance": -config.variance_weight * (terms.below_hinge_fraction - terms.variance.detach()),
        "scale_gradient_invariance": 2 * config.invariance_weight * terms.invariance.detach(),
        "scale_gradient_covariance": 4 * config.covariance_weight * terms.covariance.detach(),
    }


def representation_spread(representations: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised representations, times sqrt(dim).

    About 1 when the representations spread over the sphere, 0 when they collapse to a point
    (the SimSiam collapse monitor); independent of the embedding's scale.
    """
    normalized = F.normalize(representations.float(), dim=-1)
    return normalized.std(dim=0).mean() * math.sqrt(normalized.shape[-1])


class VicregMethod(SSLMethod):
    """Backbone + expander; `forward` makes two views per tile and returns the VICReg loss."""

    name = "vicreg"

    @property
    def embedding_pooling(self) -> str:
        return self.config.pooling

    def __init__(self, backbone_config: BackboneConfig, config: VicregConfig, augment: AugmentConfig,
                 normalization: Normalization) -> None:
        super().__init__()
        config.validate(backbone_config.n_frames, backbone_config.patch_hw[1])
        augment.validate()
        self.config, self.augment, self.normalization = config, augment, normalization
        self.backbone = build_backbone(backbone_config)
        self.expander = build_expander(self.backbone.pooling_dim(config.pooling), config.expander_dim,
                                       config.expander_layers)

    def _represent(self, views: torch.Tensor) -> torch.Tensor:
        return getattr(self.backbone.embed(views), self.config.pooling)

    def forward(self, tiles: torch.Tensor, step: int, generator: torch.Generator | None = None) -> MethodOutput:
        views = augmented_views(tiles, 2, self.config.crop_frames, self.augment, self.normalization, generator)
        if self.config.spec_mask:
            views = spec_augment(views, self.augment, generator)
        representations = self._represent(views)
        # Each view through the expander on its own, as in the reference: its batch normalisation
        # then standardises one view over the batch, never the two views of a tile together.
        z_a, z_b = (self.expander(part).float() for part in representations.chunk(2))
        terms = vicreg_terms(z_a, z_b)
        config = self.config
        loss = (config.invariance_weight * terms.invariance + config.variance_weight * terms.variance
                + config.covariance_weight * terms.covariance)
        metrics = {
            "invariance": terms.invariance.detach(),
            "variance": terms.variance.detach(),
            "covariance": terms.covariance.detach(),
            "representation_spread": representation_spread(representations.detach()),
            **scale_gradients(terms, config),
        }
        return MethodOutput(loss, metrics)

    def export_backbone(self) -> SpectrogramViT:
        return self.backbone

    def collapse_reason(self, metrics: dict[str, float]) -> str | None:
        spread = metrics.get("representation_spread")
        if spread is not None and spread < self.config.collapse_std:
            return (f"VICReg collapse: the backbone's normalised representations have spread {spread:.4f} "
                    f"(threshold {self.config.collapse_std}); raise variance_weight or lower the learning rate")
        return None
