"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def fused_adamw_supported(params, device: torch.device) -> bool:
    """The fused kernel updates every tensor in one pass (CUDA and, since torch 2.4, CPU: about
    3x faster than the per-tensor loop there). Sharded (DTensor) parameters keep the default."""
    from torch.distributed.tensor import DTensor

    if device.type not in ("cuda", "cpu"):
        return False
    return all(p.is_floating_point() and not isinstance(p.data, DTensor) for p in params)


# Hugging Face Trainer's rule (Trainer.get_decay_parameter_names), which TRL's DPOTrainer follows:
# no decay for a parameter inside an nn.LayerNorm, nor one whose lower-cased name says bias or
# norm (RMSNorm weights: input_layernorm, model.norm, q_norm).
NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decays(model: nn.Module) -> dict[str, bool]:
    """Whether weight decay applies, by name of each trainable parameter, in the order of
    model.parameters()."""
    in_layer_norm = {id(p) for module in model.modules() if isinstance(module, nn.LayerNorm)
                     for p in module.parameters()}
    return {name: id(p) not in in_layer_norm and not NO_DECAY_NAMES.search(name.lower())
            for name, p in model.named_parameters() if p.requires_grad}


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    """The model's trainable parameters for the optimizer. With weight decay, in two groups as
    Hugging Face Trainer has them: biases and normalization weights undecayed (an empty group
    left out, as LoRA's adapters are all decayed). Without, one group, as before."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [p for _, p in trainable]
    decayed = decays(model)
    groups = [{"params": [p for name, p in trainable if decayed[name]]},
              {"params": [p for name, p in trainable if not decayed[name]], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """`params`: parameters, or groups of them (`parameter_groups`)."""
    params = list(params)
    flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    if optim_cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                                   eps=optim_cfg.eps)
    fused = optim_cfg.fused if optim_cfg.fused is not None else fused_adamw_supported(flat, device)
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, fused=fused or None)


def regroup_saved_state(saved: dict, optimizer: torch.optim.Optimizer, trainable: list) -> dict:
    """A positional optimizer state (optimizer.state_dict()) written before biases and norm
    weights were left undecayed, so in one group over `trainable` (this run's trainable
    parameters, in model order), laid over this optimizer's groups: each parameter keeps its
    moments and step, and takes its group's weight decay from now on. Anything else is
    returned as it is."""
    wanted = [group["weight_decay"] for group in optimizer.param_groups]
    if len(saved["param_groups"]) != 1 or [g["weight_decay"] for g in saved["param_groups"]] == wanted:
        return saved
    [old] = saved["param_groups"]
    if len(old["params"]) != len(trainable):
        return saved  # another model: load_state_dict says so
    saved_id = {id(p): index for p, index in zip(trainable, old["params"])}
    groups = [dict(old, params=[saved_id[id(p)] for p in group["params"]], weight_decay=group["weight_decay"])
              for group in optimizer.param_groups]
    return dict(saved, param_groups=groups)


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


def load_scheduler_state(scheduler, saved: dict) -> None:
    """scheduler.load_state_dict, for a checkpoint of the one-group optimizer too
    (`regroup_saved_state`): its single base rate goes to every group, which share one rate;
    else the schedule would move the first group's rate only."""
    scheduler.load_state_dict(saved)
    groups = len(scheduler.optimizer.param_groups)
    if len(scheduler.base_lrs) == 1 < groups:
        scheduler.base_lrs = scheduler.base_lrs * groups
        scheduler._last_lr = scheduler._last_lr * groups


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
