"""One training step and one epoch of self-supervised pretraining (no wiring, no I/O: see `train`).

Randomness is counter-based: before step `s` on rank `r` both the augmentation generator and
torch's global generator (stochastic depth) are seeded from (seed, rank, s). A run resumed at
step `s` therefore draws exactly the crops, masks and drops that an uninterrupted run would
have drawn, without storing per-rank generator states in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .models import SSLMethod
from .schedules import CosineSchedule


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights of this step are not saved."""


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step produced, for logging and checks (rank-averaged loss)."""

    step: int  # optimizer steps completed so far (the step just taken is step - 1)
    epoch: int
    loss: float
    learning_rate: float
    weight_decay: float
    grad_norm: torch.Tensor  # before clipping; a tensor so that reading it is the caller's choice
    metrics: dict[str, torch.Tensor]  # the method's detached metrics on this rank
    step_s: float  # wall time of the step, data loading excluded
    data_wait_s: float  # time spent waiting for the batch


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct 63-bit seed for every (seed, rank, step)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**63 - 1)


def set_optimizer_values(optimizer: torch.optim.Optimizer, learning_rate: float, weight_decay: float) -> None:
    """Apply this step's learning rate to every group and weight decay to the groups marked `decay`."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
        group["weight_decay"] = weight_decay if group.get("decay", True) else 0.0


def train_step(model: nn.Module, method: SSLMethod, optimizer: torch.optim.Optimizer, tiles: torch.Tensor,
               step: int, *, learning_rate: float, weight_decay: float, autocast_dtype: torch.dtype | None,
               clip_grad_norm: float | None, parameters: list[torch.nn.Parameter],
               generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Forward, backward, clip, optimizer step and the method's post-step update (e.g. EMA teacher).

    `model` is what runs the forward pass (the DDP wrapper, or `method` itself on one process).
    Returns (detached loss, method metrics, gradient norm before clipping).
    """
    set_optimizer_values(optimizer, learning_rate, weight_decay)
    with torch.autocast(device_type=tiles.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        output = model(tiles, step, generator)
    output.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm if clip_grad_norm else math.inf)
    method.before_optimizer_step(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(step)
    return output.loss.detach(), output.metrics, grad_norm.detach()


def train_one_epoch(model: nn.Module, method: SSLMethod, optimizer: torch.optim.Optimizer,
                    batches: Iterable[torch.Tensor], *, epoch: int, start_step: int, end_step: int,
                    device: torch.device, lr_schedule: CosineSchedule, wd_schedule: CosineSchedule,
                    autocast_dtype: torch.dtype | None, clip_grad_norm: float | None, seed: int, rank: int,
                    stop_requested: Callable[[], bool],
                    on_step: Callable[[StepRecord], None]) -> tuple[int, bool]:
    """Train on `batches` from step `start_step` until they run out or `end_step` is reached.

    After every step, one all-reduce averages the loss over ranks and shares whether any rank
    was asked to stop (a signal), so all ranks stop at the same step. A non-finite loss raises
    `NonFiniteLossError` on every rank before `on_step` (and so before any checkpoint).
    Returns (steps completed so far, whether a stop was requested).
    """
    model.train()
    parameters = [p for p in method.parameters() if p.requires_grad]
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    generator = torch.Generator(device=device)
    step = start_step
    if step >= end_step:
        return step, False
    wait_start = time.perf_counter()
    for tiles in batches:
        tiles = tiles.to(device, non_blocking=True)
        step_start = time.perf_counter()
        generator.manual_seed(step_seed(seed, rank, step))
        torch.manual_seed(step_seed(seed, rank, step) ^ 0x5EED)
        learning_rate, weight_decay = lr_schedule(step), wd_schedule(step)
        loss, metrics, grad_norm = train_step(
            model, method, optimizer, tiles, step, learning_rate=learning_rate, weight_decay=weight_decay,
            autocast_dtype=autocast_dtype, clip_grad_norm=clip_grad_norm, parameters=parameters,
            generator=generator)
        status = torch.stack([loss.float(), torch.tensor(float(stop_requested()), device=loss.device)])
        if distributed:
            dist.all_reduce(status)
        mean_loss, stop = status[0].item() / world_size, status[1].item() > 0
        step_end = time.perf_counter()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"loss is {mean_loss} at step {step} (epoch {epoch}, learning rate {learning_rate:.3g}); "
                "the last checkpoint is untouched. Lower base_lr, lengthen warmup_epochs or set clip_grad_norm")
        step += 1
        on_step(StepRecord(step=step, epoch=epoch, loss=mean_loss, learning_rate=learning_rate,
                           weight_decay=weight_decay, grad_norm=grad_norm, metrics=metrics,
                           step_s=step_end - step_start, data_wait_s=step_start - wait_start))
        wait_start = time.perf_counter()
        if stop or step >= end_step:
            return step, stop
    return step, False
