"""Evaluation on held-out preference pairs: implicit-reward accuracy, margins, log-probs.

The numbers carry the keys of training's metrics, so `eval/rewards/accuracies` in
metrics.jsonl and the output of `preftune eval pairs` mean the same thing.
"""

from __future__ import annotations

import torch

from preftune.data.collate import PairBatch, collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.losses import PairLogps, preference_loss
from preftune.metrics import StepMetrics


def pair_logps(policy_logps, reference_logps, batch: PairBatch) -> PairLogps:
    """Policy (with grad) and reference (without) log-probs of a concatenated pair batch."""
    logps, lengths = policy_logps(batch.input_ids, batch.attention_mask, batch.completion_mask)
    reference = reference_logps(batch).to(logps.dtype)  # (2B,)
    b = batch.num_pairs
    return PairLogps(
        policy_chosen_logps=logps[:b], policy_rejected_logps=logps[b:],
        reference_chosen_logps=reference[:b], reference_rejected_logps=reference[b:],
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
    )


@torch.no_grad()
def evaluate_pairs(policy_logps, reference_logps, pairs: list[TokenizedPair], config, device,
                   pad_token_id: int, batch_size: int | None = None) -> dict[str, float]:
    """Mean loss, rewards, accuracy, margins and log-probs over `pairs`, plus mean lengths."""
    was_training = getattr(policy_logps, "training", False)
    if hasattr(policy_logps, "eval"):
        policy_logps.eval()
    batch_size = batch_size or config.train.eval_batch_size or config.train.batch_size
    metrics = StepMetrics(device)
    chosen_tokens = rejected_tokens = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_token_id).to(device)
        logps = pair_logps(policy_logps, reference_logps, batch)
        metrics.add(preference_loss(logps, config.loss), logps, config.loss.beta)
        chosen_tokens += float(logps.chosen_lengths.sum())
        rejected_tokens += float(logps.rejected_lengths.sum())
    if was_training:
        policy_logps.train()
    results = metrics.reduce()
    n = max(len(pairs), 1)
    results["lengths/chosen"] = chosen_tokens / n
    results["lengths/rejected"] = rejected_tokens / n
    return results
