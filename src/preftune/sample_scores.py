"""The log-probs and KL estimates of sampled responses, policy and reference in one pass.

For a response y sampled from the policy pi on prompt x, `eval generate` records two unbiased
estimates of the sequence KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)]:

* `kl` = log pi(y|x) - log ref(y|x), the Monte Carlo log-ratio of the one sample. Simple, but
  its variance is high and a single row can be negative.
* `kl_tokens` = sum_t KL(pi(.|x, y_<t) || ref(.|x, y_<t)), the exact KL of the two next-token
  distributions at every response position that `kl` counts (the EOS position too), summed.
  By the chain rule of KL its mean over y ~ pi is the same sequence KL, but the expectation over
  each token y_t is taken exactly instead of by one draw, so its variance is lower, and every
  term is >= 0.

Both need the two models' logits at the same positions, so each batch runs through both, and
only the positions that predict response tokens meet the LM heads, `chunk_size` rows at a time:
at most one chunk of each model's logits exists at once (a 151,936-token vocabulary makes a
full (T, V) float32 tensor 0.6 GB per 1,000 tokens). A model whose logits are not its head's
output (soft-capping, logit scales: see `logprobs.supports_hidden_state_path`) gives its own
logits instead, from which only the counted positions are kept.

Two models with one tokenizer can still have output layers of different sizes (Qwen2.5-7B scores
152,064 ids, 0.5B 151,936): their next-token distributions range over different ids, so there is
no token-wise KL (None per response), while each model's log-probs, and so `kl`, stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from preftune.data.collate import CountedTokens, counted_tokens
from preftune.logprobs import (
    final_hidden_states,
    per_sequence_sums,
    supports_hidden_state_path,
    unwrap_causal_lm,
)


@dataclass
class SampleScores:
    """Per response: log pi(y|x), log ref(y|x) and the token-wise KL estimate, in nats (None
    when the two output layers differ in size)."""

    policy_logps: list[float]
    reference_logps: list[float]
    kl_tokens: list[float | None]


@torch.no_grad()
def score_samples(policy, reference, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                  pad_token_id: int, batch_size: int = 16, chunk_size: int = 1024) -> SampleScores:
    """Scores of each completion on the given ids (no re-tokenizing), every completion token
    counted, the stop token included when the completion holds one."""
    device = next(policy.parameters()).device
    scores = SampleScores([], [], [])
    for start in range(0, len(prompt_ids), batch_size):
        batch = padded_batch(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size],
                             pad_token_id)
        input_ids, attention_mask, completion_mask = (t.to(device) for t in batch)
        counted = counted_tokens(completion_mask)
        targets = input_ids.reshape(-1).index_select(0, counted.index + 1)  # (M,): the token at t + 1
        policy_logits = counted_logits(policy, input_ids, attention_mask, counted)
        reference_logits = counted_logits(reference, input_ids, attention_mask, counted)
        policy_token, reference_token, kl_token = token_scores(policy_logits, reference_logits, targets,
                                                               chunk_size)
        for values, out in ((policy_token, scores.policy_logps), (reference_token, scores.reference_logps),
                            (kl_token, scores.kl_tokens)):
            if values is None:  # no token-wise KL between output layers of different sizes
                out.extend([None] * counted.num_sequences)
                continue
            sums, _ = per_sequence_sums(values, counted.owner, counted.num_sequences)  # (B,)
            out.extend(sums.double().cpu().tolist())
    return scores


def padded_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_token_id: int):
    """input_ids, attention_mask and completion_mask (B, T) of prompt + completion rows, right-padded."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    completion_mask = torch.zeros_like(input_ids)  # (B, T)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        completion_mask[i, len(p):len(row)] = 1
    return input_ids, attention_mask, completion_mask


def counted_logits(model, input_ids, attention_mask, counted: CountedTokens) -> Callable[[slice], torch.Tensor]:
    """A function giving the float32 logits (m, V) of the counted positions `rows` of `model`."""
    if supports_hidden_state_path(model):
        hidden = final_hidden_states(model, input_ids, attention_mask)  # (B, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted.index)  # (M, H)
        head = unwrap_causal_lm(model).get_output_embeddings()
        return lambda rows: head(hidden[rows]).float()
    # The model post-processes its head's output: only its own forward gives the logits.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    kept = logits.reshape(-1, logits.shape[-1]).index_select(0, counted.index)  # (M, V)
    del logits
    return lambda rows: kept[rows].float()


def token_scores(policy_logits: Callable, reference_logits: Callable, targets: torch.Tensor,
                 chunk_size: int = 1024):
    """log pi(y_t), log ref(y_t) and KL(pi || ref) of the next-token distributions, per counted
    position (M,) each, one chunk of both models' logits at a time; the KL is None when the two
    models' logits have different widths (vocabularies)."""
    num_rows = targets.shape[0]  # M: one row per counted position
    policy_token = torch.empty(num_rows, dtype=torch.float32, device=targets.device)  # (M,)
    reference_token = torch.empty_like(policy_token)
    kl_token = torch.empty_like(policy_token)
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        policy_logprobs = log_softmax_(policy_logits(rows))  # (m, V)
        reference_logprobs = log_softmax_(reference_logits(rows))  # (m, V)
        chosen = targets[rows].unsqueeze(1)  # (m, 1)
        policy_token[rows] = policy_logprobs.gather(1, chosen).squeeze(1)
        reference_token[rows] = reference_logprobs.gather(1, chosen).squeeze(1)
        if kl_token is not None and policy_logprobs.shape[-1] == reference_logprobs.shape[-1]:
            kl_token[rows] = token_kl_(policy_logprobs, reference_logprobs)
        else:  # output layers of different sizes: no KL over the same ids
            kl_token = None
        del policy_logprobs, reference_logprobs  # before the next chunk's logits exist
    return policy_token, reference_token, kl_token


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last dim, in place: no second (m, V) buffer kept."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def token_kl_(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """sum_v pi(v) (log pi(v) - log ref(v)) per row (m,), from log-probs (m, V); overwrites both.

    The exact value is >= 0; float rounding of nearly equal distributions can dip below, so it
    is clamped at 0.
    """
    log_ratio = reference_logprobs.neg_().add_(policy_logprobs)  # (m, V) log pi - log ref
    probs = policy_logprobs.exp_()  # (m, V) pi
    return log_ratio.mul_(probs).sum(dim=-1).clamp_(min=0.0)  # (m,)
