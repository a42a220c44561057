"""DINO (Caron et al. 2021) for log-mel tiles: self-distillation with an EMA teacher and multi-crop in time.

The student sees global and local time crops (masked SpecAugment-style); the teacher, an
exponential moving average of the student, sees only the unmasked global crops. The student
is trained to match the teacher's sharpened, centred output distribution for every pair of
different views. Centring (subtracting a running mean of teacher outputs) stops one output
dimension from dominating; sharpening (a low teacher temperature) stops the uniform solution;
together they avoid collapse without negative pairs. See `augment` for why these views.

Options measured for the study's open question (does DINO find species?), off by default so the
original method stays the reference:

* `pooling`: what the head reads. DINO's class token by default; "band" (the per-frequency-row
  means of the patch tokens, see `models.PooledEmbeddings`) makes the teacher's targets depend on
  where in frequency a sound lies, a species cue that a class token may ignore.
* `centering="sinkhorn_knopp"`: the teacher's targets are balanced over the batch by three
  Sinkhorn-Knopp iterations (DINOv2, after SwAV) instead of a running centre; every prototype gets
  an equal share of each batch, which rules out the one-prototype collapse by construction.
* `koleo_weight`: the KoLeo regulariser (DINOv2) on the student's pooled global views: minus the
  mean log distance of each embedding to its nearest neighbour in the batch, which spreads them.

The head's last layer and the teacher's softmax run in float32 even under bf16 autocast: the
logits are divided by a temperature of 0.04, which would magnify bf16's rounding 25 times.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .augment import AugmentConfig, Normalization, augmented_views, spec_augment
from .models import BackboneConfig, MethodOutput, SpectrogramViT, SSLMethod, build_backbone
from .pooling import POOLINGS
from .schedules import CosineSchedule, LinearWarmupSchedule


CENTERINGS = ("center", "sinkhorn_knopp")


@dataclasses.dataclass
class DinoConfig:
    """DINO hyper-parameters; defaults follow the DINO ViT-S/16 recipe, crops adapted to 256-frame tiles."""

    out_dim: int = 65536  # prototypes in the head's output (the study measured 8192 on one GPU)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # fix the weight-normed last layer's scale at 1 (more stable)
    global_crops: int = 2
    global_crop_frames: int = 224  # of 256: ~2.6 s of a 3 s tile
    local_crops: int = 8
    local_crop_frames: int = 96  # ~1.1 s: about one song phrase
    pooling: str = "cls"  # what the head reads: "cls", "mean" or "band" (see the module docstring)
    centering: str = "center"  # teacher targets: "center" (running centre) or "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.0  # KoLeo spreading term on the student's global views; 0 = off
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    teacher_momentum: float = 0.996  # cosine-scheduled up to teacher_momentum_end
    teacher_momentum_end: float = 1.0
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0  # no gradient to the last layer at first (DINO's stabiliser)
    collapse_entropy_fraction: float = 0.98  # teacher entropy >= this x log(out_dim): uniform collapse
    collapse_max_probability: float = 0.9  # one prototype holds >= this share of the batch: collapse

    def validate(self, n_frames: int, patch_frames: int) -> None:
        """`patch_frames`: the backbone's patch width in time frames (`BackboneConfig.patch_hw[1]`)."""
        if self.global_crops < 1:
            raise ValueError("DINO needs at least one global crop")
        if self.global_crops + self.local_crops < 2:
            raise ValueError("DINO needs at least two views (global_crops + local_crops >= 2)")
        for name in ("global_crop_frames", "local_crop_frames") if self.local_crops else ("global_crop_frames",):
            frames = getattr(self, name)
            if not 0 < frames <= n_frames or frames % patch_frames:
                raise ValueError(f"dino.{name}={frames} must be a multiple of the patch width "
                                 f"{patch_frames} frames and at most the tile width {n_frames}")
        if self.out_dim < 2:
            raise ValueError("out_dim must be >= 2")
        if self.pooling not in POOLINGS:
            raise ValueError(f"dino.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.centering not in CENTERINGS:
            raise ValueError(f"dino.centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.sinkhorn_iterations < 1 or self.koleo_weight < 0:
            raise ValueError("dino.sinkhorn_iterations must be >= 1 and dino.koleo_weight >= 0")


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: W = scale * direction / ||direction|| per output."""

    def __init__(self, in_features: int, out_features: int, fixed_scale: bool) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.direction, std=0.02)
        self.scale = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.direction, dim=1) * self.scale)


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normed linear layer to `out_dim` prototype scores."""

    def __init__(self, in_dim: int, config: DinoConfig) -> None:
        super().__init__()
        if config.head_layers < 1:
            raise ValueError("head_layers must be >= 1")
        widths = [in_dim] + [config.head_hidden_dim] * (config.head_layers - 1) + [config.head_bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(config.head_bottleneck_dim, config.out_dim, config.norm_last_layer)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        bottleneck = self.mlp(embeddings)
        # The prototype scores in float32 (see the module docstring): autocast off for this layer.
        with torch.autocast(bottleneck.device.type, enabled=False):
            return self.last_layer(F.normalize(bottleneck.float(), dim=-1))


class DinoNetwork(nn.Module):
    """Backbone + head over groups of crops; crops of one width go through the backbone together.

    `pooling` names what the head reads (`pooling.POOLINGS`); `forward` returns the logits and
    the pooled embeddings they were computed from.
    """

    def __init__(self, backbone: SpectrogramViT, head: DinoHead, pooling: str = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pooling = pooling

    def forward(self, *crop_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = torch.cat([getattr(self.backbone.embed(group), self.pooling)
                                for group in crop_groups if group.shape[0] > 0])
        return self.head(embeddings), embeddings


def head_input_dim(backbone: SpectrogramViT, pooling: str) -> int:
    return backbone.pooling_dim(pooling)


@torch.no_grad()
def sinkhorn_knopp_targets(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int) -> torch.Tensor:
    """Teacher targets (batch, out_dim) whose prototypes share the batch equally (DINOv2 / SwAV).

    Alternately normalises the prototypes' total mass to 1/out_dim and each row to 1/batch
    (sums over all ranks), starting from exp(logits / temperature); rows sum to 1 at the end.
    """
    scores = (teacher_logits.float() - teacher_logits.float().max()) / teacher_temp
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # a shared maximum keeps every rank's exponentials on one scale
        peak = teacher_logits.float().max().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        scores = (teacher_logits.float() - peak) / teacher_temp
    q = torch.exp(scores).t()  # (out_dim, batch)
    batch = q.shape[1] * (dist.get_world_size() if distributed else 1)
    n_prototypes = q.shape[0]
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        q /= per_prototype.clamp_min(1e-30) * n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30) * batch
    return (q * batch).t()


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo: -mean log distance of each L2-normalised embedding to its nearest other one."""
    normalized = F.normalize(embeddings.float(), dim=-1)
    similarity = normalized @ normalized.t()
    similarity.fill_diagonal_(-2.0)  # never one's own neighbour
    nearest = similarity.argmax(dim=1)
    distances = (normalized - normalized[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def dino_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float,
                       n_student_views: int, n_teacher_views: int) -> torch.Tensor:
    """Mean over all (teacher view, different student view) pairs of H(teacher, student).

    Views are stacked view-major; teacher view i is the same crop as student view i, so those
    pairs are skipped.
    """
    student_log_probs = F.log_softmax(student_logits / student_temp, dim=-1).chunk(n_student_views)
    teacher_views = teacher_probs.chunk(n_teacher_views)
    total = student_logits.new_zeros(())
    n_pairs = 0
    for teacher_index, targets in enumerate(teacher_views):
        for student_index, log_probs in enumerate(student_log_probs):
            if student_index == teacher_index:
                continue
            total = total + torch.sum(-targets * log_probs, dim=-1).mean()
            n_pairs += 1
    return total / n_pairs


class DinoMethod(SSLMethod):
    """Student, EMA teacher and centre; `forward` builds the views from raw tiles and returns the DINO loss."""

    name = "dino"

    @property
    def embedding_pooling(self) -> str:
        return self.config.pooling

    def __init__(self, backbone_config: BackboneConfig, config: DinoConfig, augment: AugmentConfig,
                 normalization: Normalization, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        config.validate(backbone_config.n_frames, backbone_config.patch_hw[1])
        augment.validate()
        self.config, self.augment, self.normalization = config, augment, normalization
        student_backbone = build_backbone(backbone_config)
        head = DinoHead(head_input_dim(student_backbone, config.pooling), config)
        self.student = DinoNetwork(student_backbone, head, config.pooling)
        # The teacher has no stochastic depth (as in DINO) and starts as a copy of the student.
        teacher_backbone = build_backbone(dataclasses.replace(backbone_config, drop_path_rate=0.0))
        self.teacher = DinoNetwork(teacher_backbone, copy.deepcopy(self.student.head), config.pooling)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.teacher_temp = LinearWarmupSchedule(config.warmup_teacher_temp, config.teacher_temp,
                                                 round(config.warmup_teacher_temp_epochs * steps_per_epoch))
        self.teacher_momentum = CosineSchedule(config.teacher_momentum, config.teacher_momentum_end, total_steps)
        self.freeze_last_layer_steps = round(config.freeze_last_layer_epochs * steps_per_epoch)

    def train(self, mode: bool = True) -> "DinoMethod":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops anything
        return self

    def forward(self, tiles: torch.Tensor, step: int, generator: torch.Generator | None = None) -> MethodOutput:
        config = self.config
        global_views = augmented_views(tiles, config.global_crops, config.global_crop_frames,
                                       self.augment, self.normalization, generator)
        local_views = tiles.new_zeros((0,) + tiles.shape[1:])
        if config.local_crops:
            local_views = augmented_views(tiles, config.local_crops, config.local_crop_frames,
                                          self.augment, self.normalization, generator)
        with torch.no_grad():
            teacher_logits = self.teacher(global_views)[0].float()
        student_logits, student_embeddings = self.student(spec_augment(global_views, self.augment, generator),
                                                          spec_augment(local_views, self.augment, generator))
        student_logits = student_logits.float()

        teacher_temp = self.teacher_temp(step)
        teacher_probs = self.teacher_targets(teacher_logits, step)
        loss = dino_cross_entropy(student_logits, teacher_probs, config.student_temp,
                                  config.global_crops + config.local_crops, config.global_crops)
        koleo = torch.zeros((), device=loss.device)
        if config.koleo_weight > 0:
            n_global = global_views.shape[0] // config.global_crops
            koleo = sum(koleo_loss(view) for view in
                        student_embeddings[:global_views.shape[0]].split(n_global)) / config.global_crops
            loss = loss + config.koleo_weight * koleo
        self._update_center(teacher_logits)

        with torch.no_grad():
            entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-30))).sum(-1).mean()
            metrics = {
                "teacher_entropy": entropy,
                "teacher_entropy_fraction": entropy / math.log(config.out_dim),
                "teacher_max_marginal": teacher_probs.mean(0).max(),  # share of the busiest prototype
                "center_norm": self.center.norm(),
                "teacher_temp": torch.tensor(teacher_temp),
                "teacher_momentum": torch.tensor(self.teacher_momentum(step)),
                "koleo": koleo.detach(),
            }
        return MethodOutput(loss, metrics)

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, step: int) -> torch.Tensor:
        """The teacher's centred (or Sinkhorn-Knopp balanced), sharpened probabilities, always in
        float32 with autocast off: at a temperature of 0.04 bf16's rounding of the logits would be
        magnified 25 times (see the module docstring)."""
        with torch.autocast(teacher_logits.device.type, enabled=False):
            logits = teacher_logits.float()
            if self.config.centering == "sinkhorn_knopp":
                return sinkhorn_knopp_targets(logits, self.teacher_temp(step), self.config.sinkhorn_iterations)
            return F.softmax((logits - self.center.float()) / self.teacher_temp(step), dim=-1)

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch (all ranks)."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        momentum = self.config.center_momentum
        self.center.mul_(momentum).add_(batch_sum / count, alpha=1.0 - momentum)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer_steps:
            for parameter in self.student.head.last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """teacher <- m * teacher + (1 - m) * student, with m on a cosine schedule towards 1."""
        momentum = self.teacher_momentum(step)
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student.parameters())
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    def export_backbone(self) -> SpectrogramViT:
        """The teacher's backbone: DINO's teacher gives the better features (Caron et al., sec. 5.2)."""
        return self.teacher.backbone

    def collapse_reason(self, metrics: dict[str, float]) -> str | None:
        fraction = metrics.get("teacher_entropy_fraction")
        if fraction is not None and fraction >= self.config.collapse_entropy_fraction:
            return (f"DINO collapse to the uniform distribution: teacher entropy is {fraction:.3f} x "
                    f"log(out_dim={self.config.out_dim}) (threshold {self.config.collapse_entropy_fraction}); "
                    "lower teacher_temp or its warm-up, or raise the learning-rate warm-up")
        share = metrics.get("teacher_max_marginal")
        if share is not None and share >= self.config.collapse_max_probability:
            return (f"DINO collapse to one prototype: it receives {share:.2f} of the batch's teacher mass "
                    f"(threshold {self.config.collapse_max_probability}); centring is too weak for the "
                    "sharpening: lower center_momentum or raise teacher_temp")
        return None
