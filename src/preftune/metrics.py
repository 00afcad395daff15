"""Step metrics with the names DPO users already read (TRL's keys).

`rewards/*` are beta * (policy - reference) summed log-probs, `logps/*` the policy's summed
log-probs, both averaged over the pairs of an optimizer step, whatever the split into
micro-batches or ranks: sums and counts are accumulated, and reduced once per step.

Two groups are logged only when their setting is on (the default step computes neither):
`wpo/weight` (loss.wpo_weighting), the pairs' mean WPO weight w(y_w) * w(y_l), and TRL's token
metrics (train.token_metrics), means over the step's completion tokens (token-weighted, as TRL
weighs them across ranks):
    entropy              entropy of the policy's next-token distribution, chosen and rejected tokens
    logits/chosen        the logits' mean over the vocabulary, over chosen tokens
    logits/rejected      the same over rejected tokens
    mean_token_accuracy  share of chosen tokens that are the policy's top choice
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from preftune.losses import PairLogps, implicit_rewards
from preftune.token_stats import ENTROPY, MEAN_LOGIT, TOP1

PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins", "logps/chosen", "logps/rejected")
WPO_KEY = "wpo/weight"
TOKEN_METRIC_KEYS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
# The token sums behind them: entropy (all tokens), mean logit (chosen, rejected), top-1 (chosen),
# then the chosen and rejected token counts.
TOKEN_SUMS = 6


class StepMetrics:
    """Sums of per-pair values over one optimizer step (or one evaluation pass)."""

    def __init__(self, device, wpo: bool = False, token_metrics: bool = False):
        self.wpo = wpo
        self.pair_keys = PAIR_KEYS + ((WPO_KEY,) if wpo else ())
        self.token_metrics = token_metrics
        # Per-pair sums, the number of pairs, the token sums (with token_metrics), then the
        # tokens seen (see add_tokens).
        size = len(self.pair_keys) + 1 + (TOKEN_SUMS if token_metrics else 0) + 1
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)
        self.counts_tokens = False

    @classmethod
    def for_config(cls, config, device) -> StepMetrics:
        return cls(device, wpo=config.loss.wpo_weighting, token_metrics=config.train.token_metrics)

    def add_tokens(self, n: int) -> None:
        """Tokens of a micro-batch, summed over ranks with the rest (no all-reduce of its own)."""
        self.sums[-1] += n  # a host number into a device slot: no wait
        self.counts_tokens = True

    def add(self, per_pair_loss: torch.Tensor, logps: PairLogps, beta: float) -> None:
        chosen, rejected = implicit_rewards(logps, beta)
        rows = [
            per_pair_loss.detach(),
            chosen,
            rejected,
            (chosen > rejected).to(chosen.dtype),
            chosen - rejected,
            logps.policy_chosen_logps.detach(),
            logps.policy_rejected_logps.detach(),
        ]
        if self.wpo:
            rows.append(logps.pair_weights.to(chosen.dtype))
        columns = torch.stack([*rows, torch.ones_like(chosen)]).double()  # (K + 1, B)
        k = len(self.pair_keys)
        self.sums[:k + 1] += columns.sum(dim=1)
        if self.token_metrics:
            self.sums[k + 1:-1] += token_sums(logps)

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
        k = len(self.pair_keys)
        count = max(values[k], 1.0)
        means = {key: values[i] / count for i, key in enumerate(self.pair_keys)}
        if self.token_metrics:
            means |= token_means(*values[k + 1:k + 1 + TOKEN_SUMS])
        if self.counts_tokens:
            means["_tokens"] = values[len(sums) - 1]
        return means | dict(zip(extra, values[len(sums):]))


def token_sums(logps: PairLogps) -> torch.Tensor:
    """The TOKEN_SUMS sums of one micro-batch (float64), from its per-sequence statistic sums."""
    stats, b = logps.token_stat_sums, logps.chosen_lengths.shape[0]
    return torch.stack([
        stats[ENTROPY].sum(),
        stats[MEAN_LOGIT][:b].sum(),
        stats[MEAN_LOGIT][b:].sum(),
        stats[TOP1][:b].sum(),
        logps.chosen_lengths.sum(),
        logps.rejected_lengths.sum(),
    ]).double()


def token_means(entropy, logit_chosen, logit_rejected, top1_chosen, chosen_tokens, rejected_tokens) -> dict:
    """TOKEN_METRIC_KEYS from the step's token sums; 0.0 where no token was counted (as TRL)."""
    def mean(total, tokens):
        return total / tokens if tokens > 0 else 0.0

    return {"entropy": mean(entropy, chosen_tokens + rejected_tokens),
            "logits/chosen": mean(logit_chosen, chosen_tokens),
            "logits/rejected": mean(logit_rejected, rejected_tokens),
            "mean_token_accuracy": mean(top1_chosen, chosen_tokens)}
