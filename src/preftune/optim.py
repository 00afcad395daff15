"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch


def fused_adamw_supported(params, device: torch.device) -> bool:
    """The fused kernel updates every tensor in one pass (CUDA and, since torch 2.4, CPU: about
    3x faster than the per-tensor loop there). Sharded (DTensor) parameters keep the default."""
    from torch.distributed.tensor import DTensor

    if device.type not in ("cuda", "cpu"):
        return False
    return all(p.is_floating_point() and not isinstance(p.data, DTensor) for p in params)


def build_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if optim_cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                   eps=optim_cfg.eps)
    fused = optim_cfg.fused if optim_cfg.fused is not None else fused_adamw_supported(params, device)
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, fused=fused or None)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, optim_cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, optim_cfg.warmup_steps_in(total_steps), total_steps,
                                   optim_cfg.scheduler),
    )


def follow_schedule(scheduler) -> None:
    """Set the optimizer's rates to what the schedule, as now built, gives for the next step.

    A checkpoint restores the rate the old schedule computed for the next step; after a resume
    that changed the run's length that is the old schedule's (0 at the end of a linear or cosine
    decay, so the first step of an extended run would not train at all).
    """
    groups = scheduler.optimizer.param_groups
    for group, base_lr, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
