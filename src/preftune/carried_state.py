"""State that training carries from one optimizer step to the next, beyond the weights and the
optimizer: TR-DPO's moving reference and BCO's running mean of the implicit rewards.

Both live outside the losses, which stay pure functions: the loop keeps them, saves them in every
checkpoint and restores them, and each is computed from numbers every rank holds alike (the
policy's replicated or identically sharded weights, the step's all-reduced metrics), so every rank
holds the same state without a collective of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.errors import UserError

# ------------------------------------------------------------------------------ TR-DPO


def live_reference_model(reference_fn) -> nn.Module:
    """The reference model behind a live reference: a frozen copy (`FrozenModelReference.model`),
    or under fsdp the sharded copy (`ShardedReference.module.model`)."""
    model = getattr(reference_fn, "model", None)
    if model is None and hasattr(reference_fn, "module"):
        model = reference_fn.module.model
    if model is None:
        raise TypeError(f"{type(reference_fn).__name__} holds no reference model to sync")
    return model


def check_sync_compatible(policy: nn.Module, reference: nn.Module) -> None:
    """Mixing the policy into the reference needs the same parameters, name by name and shape by
    shape: true of the default copy, said in one sentence for a `model.reference_path` that differs."""
    ours = {name: tuple(p.shape) for name, p in policy.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    if ours != theirs:
        differ = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
        raise UserError(f"model.reference_sync mixes the policy's weights into the reference's, but the "
                        f"reference (model.reference_path) has other parameters than the policy (e.g. "
                        f"{differ[0]!r}); use a reference of the policy's architecture and size, or remove "
                        "model.reference_sync.")


@torch.no_grad()
def sync_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
    Good Alignment"): every reference parameter becomes alpha * policy + (1 - alpha) * reference,
    the paper's soft update; alpha = 1 is its hard update (the reference becomes the policy).

    `lerp_` rounds once (into the reference's dtype) and gives the policy's values exactly at
    alpha = 1. Under fsdp both models are sharded alike (same layers, same mesh), so each rank
    updates its own shards from the policy's shards of the same rows: no communication.
    """
    policy_params = dict(policy.named_parameters())
    for name, target in reference.named_parameters():
        source = policy_params[name]
        if hasattr(target, "to_local") != hasattr(source, "to_local"):
            raise RuntimeError(f"{name}: the policy and the reference are not sharded alike")
        if hasattr(target, "to_local"):
            if target.placements != source.placements:
                raise RuntimeError(f"{name}: the policy and the reference are sharded differently")
            target, source = target.to_local(), source.to_local()
        target.lerp_(source.to(target.dtype), alpha)


def has_synced(step: int, sync) -> bool:
    """True once the reference has moved off the starting weights (a sync at step `every`)."""
    return sync is not None and step >= sync.every


# ------------------------------------------------------------------------------ BCO


def next_reward_shift(shift: float, rewards_seen: int, step_mean: float, step_rewards: int) -> tuple[float, int]:
    """BCO's reward shift delta after one more optimizer step: the mean of every implicit reward
    (chosen and rejected, beta * log pi/ref) of the training steps so far, each reward weighing
    the same. `step_mean` is the step's mean over its `step_rewards` rewards (2 per pair, all ranks).
    Returns (delta, rewards seen); delta is 0 before the first step."""
    seen = rewards_seen + step_rewards
    return shift + (step_mean - shift) * step_rewards / seen, seen
