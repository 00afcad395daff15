"""Per-token statistics of the LM head's logits, worked out chunk by chunk beside the log-probs.

The log-prob paths (logprobs.py) never hold the whole (B, T, V) logits, so anything else a step
wants from them has to be computed from each chunk's logits while that chunk exists. A caller
asks for such statistics by name: `stats`, a tuple of keys of TOKEN_STATS, travels with the
log-prob call, and the per-sequence sums of each statistic (N,) come back beside the summed
log-probs. The empty tuple, the default, computes nothing.

Each statistic is a function of one chunk's float32 logits z (m, V) and the tokens they predict
(m,), returning (m,), without gradient (they weigh or describe; none is trained through):

    wpo         log p(y_t) - log sum_v p(v)^2, WPO's aligned log-prob (loss.wpo_weighting)
    entropy     -sum_v p(v) log p(v), the policy's uncertainty at the token (train.token_metrics)
    mean_logit  1/V sum_v z_v, the mean logit over the vocabulary (train.token_metrics)
    top1        1 where y_t is the argmax of z (the first one on ties, as torch.argmax), else 0

p = softmax(z). The last three are TRL's `entropy`, `logits/*` and `mean_token_accuracy`
(metrics.py averages them over tokens).
"""

from __future__ import annotations

import torch

WPO = "wpo"
ENTROPY = "entropy"
MEAN_LOGIT = "mean_logit"
TOP1 = "top1"
# What train.token_metrics asks for.
TOKEN_METRIC_STATS = (ENTROPY, MEAN_LOGIT, TOP1)


def _target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (m,)


def wpo_aligned_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t) - log sum_v p(v)^2 = z_t + logsumexp(z) - logsumexp(2z): the log of WPO's aligned
    token probability p(y_t) / sum_v p(v)^2 (Zhou et al. 2024, eq. 2 and sec. 3.2)."""
    return _target_logits(logits, targets) + torch.logsumexp(logits, -1) - torch.logsumexp(2 * logits, -1)


def entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log p(v) = logsumexp(z) - sum_v p(v) z_v."""
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def mean_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.mean(-1)


def top1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == targets).float()


TOKEN_STATS = {WPO: wpo_aligned_logps, ENTROPY: entropy, MEAN_LOGIT: mean_logit, TOP1: top1}


@torch.no_grad()
def chunk_token_stats(logits: torch.Tensor, targets: torch.Tensor, stats: tuple[str, ...]) -> list[torch.Tensor]:
    """The statistics named in `stats` of one chunk's logits (m, V) and targets (m,): (m,) each, in order."""
    logits = logits.float()
    return [TOKEN_STATS[name](logits, targets) for name in stats]


def wanted_stats(config) -> tuple[str, ...]:
    """The statistics a run's policy log-probs must come with: WPO's for loss.wpo_weighting, the
    token metrics' for train.token_metrics; () by default, which costs the step nothing."""
    stats = (WPO,) if config.loss.wpo_weighting else ()
    return stats + (TOKEN_METRIC_STATS if config.train.token_metrics else ())


def wpo_weights(aligned_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each sequence (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted
    Preference Optimization", eq. 2, with its aligned token probabilities): the geometric mean
    over the response's tokens of p(y_t) / sum_v p(v)^2, i.e.
        w(x, y) = exp(1/|y| sum_t (log p(y_t | x, y_<t) - log sum_v p(v | x, y_<t)^2))
    under the policy being trained, without gradient: how likely the current policy is to produce
    this response itself. aligned_sums (N,): the per-sequence sums of the `wpo` statistic;
    counts (N,): the tokens summed -> (N,).
    """
    return torch.exp(aligned_sums / counts.clamp(min=1))
