"""Per-sequence log-probabilities of completions, without the full (B, T, V) logits.

DPO needs, for each sequence, sum_t log p(y_t | x, y_<t) over completion tokens only. The naive
way builds logits for every position of every row, then a float32 log-softmax of the same size:
at a 151,936-token vocabulary that is 0.57 GiB per 1,000 tokens, twice over, before gradients.

Here the model runs up to its final hidden states; only the completion positions are kept, and
they meet the LM head in chunks of `chunk_size` tokens. Under autograd each chunk is
checkpointed: the forward keeps only the chunk's hidden states, and the backward recomputes
that chunk's logits, so at most one chunk of logits exists at any time, forward or backward.
`naive_completion_logps` is the plain computation the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM under DDP / torch.compile / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        else:
            return model


def supports_hidden_state_path(model: nn.Module) -> bool:
    """Models whose logits are exactly lm_head(final hidden states).

    Some families post-process logits (soft-capping in Gemma 2, a logit scale in Cohere); for
    them the chunked path would be wrong, so they take the naive path.
    """
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or lm.get_output_embeddings() is None:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return hasattr(lm, lm.base_model_prefix)


def _token_logps_of_chunk(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (M_chunk, V): the only logits alive at any moment
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[targets] for (M, H) hidden states, `chunk_size` rows at a time."""
    pieces = []
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_grad:
            pieces.append(checkpoint(_token_logps_of_chunk, h, lm_head, t, use_reentrant=False))
        else:
            pieces.append(_token_logps_of_chunk(h, lm_head, t))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)  # (M,)


def final_hidden_states(model: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H): everything but the LM head."""
    lm = unwrap_causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return decoder(**kwargs).last_hidden_state


def completion_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs per row (N,) and the number of tokens summed (N,).

    Token t is predicted from position t - 1, so the mask of counted predictions is the
    completion mask shifted left by one.
    """
    if not supports_hidden_state_path(model):
        return naive_completion_logps(model, input_ids, attention_mask, completion_mask, position_ids)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)  # (N, T, H)
    predicted = completion_mask[:, 1:].bool()  # (N, T-1)
    rows = predicted.nonzero(as_tuple=True)[0]  # (M,) row of each counted token
    h = hidden[:, :-1][predicted]  # (M, H): hidden states that predict completion tokens
    targets = input_ids[:, 1:][predicted]  # (M,)
    lm_head = unwrap_causal_lm(model).get_output_embeddings()
    token_logps = chunked_token_logps(h, lm_head, targets, chunk_size)  # (M,)
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums, predicted.sum(dim=1)


def naive_completion_logps(model, input_ids, attention_mask, completion_mask, position_ids=None):
    """The textbook computation: full logits, full log-softmax, gather, mask, sum."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits[:, :-1].float()  # (N, T-1, V)
    predicted = completion_mask[:, 1:].bool()
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * predicted).sum(dim=1), predicted.sum(dim=1)


class CompletionLogps(nn.Module):
    """`completion_logps` as a module, so DDP / FSDP see one forward that owns the model.

    Wrappers that hook a module's forward (DDP's gradient bookkeeping, FSDP's parameter
    gathering) need the whole computation, LM head included, inside one `forward` call.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None):
        return completion_logps(self.model, input_ids, attention_mask, completion_mask,
                                self.chunk_size, position_ids)
