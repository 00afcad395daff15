"""Step metrics with the names DPO users already read (TRL's keys).

`rewards/*` are beta * (policy - reference) summed log-probs, `logps/*` the policy's summed
log-probs, both averaged over the pairs of an optimizer step, whatever the split into
micro-batches or ranks: sums and counts are accumulated, and reduced once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from preftune.losses import PairLogps, implicit_rewards

PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins", "logps/chosen", "logps/rejected")


class StepMetrics:
    """Sums of per-pair values over one optimizer step (or one evaluation pass)."""

    def __init__(self, device):
        # Per-pair sums, then the number of pairs, then the tokens seen (see add_tokens).
        self.sums = torch.zeros(len(PAIR_KEYS) + 2, dtype=torch.float64, device=device)
        self.counts_tokens = False

    def add_tokens(self, n: int) -> None:
        """Tokens of a micro-batch, summed over ranks with the rest (no all-reduce of its own)."""
        self.sums[-1] += n  # a host number into a device slot: no wait
        self.counts_tokens = True

    def add(self, per_pair_loss: torch.Tensor, logps: PairLogps, beta: float) -> None:
        chosen, rejected = implicit_rewards(logps, beta)
        columns = torch.stack([
            per_pair_loss.detach(),
            chosen,
            rejected,
            (chosen > rejected).to(chosen.dtype),
            chosen - rejected,
            logps.policy_chosen_logps.detach(),
            logps.policy_rejected_logps.detach(),
            torch.ones_like(chosen),
        ]).double()  # (K + 1, B)
        self.sums[:-1] += columns.sum(dim=1)

    def reduce(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Means over every pair seen, across all ranks when distributed, plus the `extra`
        scalars (the gradient norm, say) as they are.

        Everything comes to the host in one copy: each read of a GPU value makes the host wait
        for the device, so a step reads once, at its end.
        """
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        extra = extra or {}
        values = torch.cat([sums, *(v.detach().reshape(1).to(sums) for v in extra.values())]).tolist()
        k = len(PAIR_KEYS)
        count = max(values[k], 1.0)
        means = {key: values[i] / count for i, key in enumerate(PAIR_KEYS)}
        if self.counts_tokens:
            means["_tokens"] = values[k + 1]
        return means | dict(zip(extra, values[k + 2:]))
