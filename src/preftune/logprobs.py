"""Per-sequence log-probabilities of completions, without the full (B, T, V) logits.

DPO needs, for each sequence, sum_t log p(y_t | x, y_<t) over completion tokens only. The naive
way builds logits for every position of every row, then a float32 log-softmax of the same size:
at a 151,936-token vocabulary that is 0.57 GiB per 1,000 tokens, twice over, before gradients.

Here the model runs up to its final hidden states; only the completion positions are kept, and
they meet the LM head in chunks of `chunk_size` tokens, so at most one chunk of logits exists
at any time, forward or backward. For a plain `nn.Linear` head, `LinearTokenLogps` (a custom
autograd function) keeps only each token's logsumexp; its backward recomputes a chunk's logits
and turns them into the gradients directly: d log p(t) / d logits = onehot(t) - softmax, so
grad_hidden = g * (W[t] - softmax @ W) and grad_W = onehot^T (g h) - softmax^T (g h). That takes
fewer passes over the (chunk, V) logits than autograd through log-softmax, and no (M, V)
tensor is ever saved. A frozen head (LoRA leaves it untouched) needs only grad_hidden, whose
direction W[t] - softmax @ W does not depend on g: the forward works it out while the softmax is
at hand and keeps that (M, H), so the backward is one multiplication, no logits at all. Any
other head (a LoRA-wrapped one, say) goes through `torch.utils.checkpoint` per chunk instead:
same memory bound, autograd's own backward.
`naive_completion_logps` is the plain computation the tests compare against.

Two options, off by default (and then no step does any work for them), act on every path alike:
`ld_alpha` (LD-DPO) sums the tokens past the shorter response of the pair at a discount, which
needs sequence n and n + N/2 to be a pair (chosen first), as in every batch layout here; `stats`
names per-token statistics of the logits (token_stats.py: WPO's aligned log-prob, entropy, ...)
that each chunk's logits give while they exist, returned summed per sequence beside the log-probs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from preftune.data.collate import CountedTokens, counted_mask, counted_tokens
from preftune.token_stats import chunk_token_stats


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


def supports_hidden_state_path(model: nn.Module, recheck: bool = False) -> bool:
    """Models whose logits are exactly lm_head(final hidden states).

    Several families post-process them: Gemma 2 soft-caps, Cohere multiplies by a logit scale,
    Granite divides by `logits_scaling`, FalconH1 multiplies by `lm_head_multiplier`, MiniCPM
    scales the hidden states first. For them the chunked path would give other log-probs, so
    they take the naive one. Rather than a list of every family's knob, the model's own logits
    are compared with the bare head's once (see `_head_gives_the_logits`); the verdict is kept on
    the model, so it is decided eagerly, before any torch.compile traces the caller. `recheck`
    decides anew, for a model whose head has changed since (an adapter attached to it).
    """
    lm = unwrap_causal_lm(model)
    verdict = None if recheck else getattr(lm, "_preftune_head_gives_logits", None)
    if verdict is None:
        verdict = _head_gives_the_logits(lm)
        lm._preftune_head_gives_logits = verdict
    return verdict


@torch.no_grad()
def _head_gives_the_logits(lm: nn.Module) -> bool:
    config = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if config is None or head is None or not hasattr(lm, getattr(lm, "base_model_prefix", "")):
        return False
    # Soft-capping is refused by name: on a freshly initialised model the logits are too small
    # for tanh to bend them visibly, so the comparison below would pass it.
    if getattr(config, "final_logit_softcapping", None):
        return False
    first = next(lm.parameters())
    ids = torch.arange(8, device=first.device).remainder(head.weight.shape[0]).unsqueeze(0)
    was_training = lm.training
    lm.eval()  # no dropout: both sides must see the same network
    try:
        expected = lm(input_ids=ids, use_cache=False).logits.float()
        hidden = getattr(lm, lm.base_model_prefix)(input_ids=ids, use_cache=False).last_hidden_state
        got = head(hidden).float()
    except Exception:  # any model that cannot run this probe (remote code...) takes the safe path
        return False
    finally:
        lm.train(was_training)
    # Relative: a scale of 1.001 is caught; the two sides run the same matmul, so they agree
    # to rounding otherwise.
    return bool((got - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1e-6))


def _token_logps_of_chunk(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                          stats: tuple[str, ...] = ()):
    """(m,) token log-probs of one chunk; with `stats`, a tuple of them and the statistics (m,) each."""
    logits = lm_head(hidden).float()  # (M_chunk, V): the only logits alive at any moment
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps, *chunk_token_stats(logits, targets, stats)) if stats else token_logps


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in here (bf16 under bf16 autocast)."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _chunk_logits(hidden, weight, bias) -> torch.Tensor:
    logits = torch.mm(hidden, weight.t())  # (m, V) in the compute dtype
    if bias is not None:
        logits += bias
    return logits.float()  # a no-op in float32; log-softmax in float32 under bf16


# Below this size the logits of a whole micro-batch are kept from forward to backward instead of
# recomputed: a recompute costs one more (M, H) x (H, V) matmul, about a third of the head's
# work, which only pays when it saves real memory (a 1,016-token batch at V = 8,192: 33 MB).
KEEP_LOGITS_MAX_BYTES = 256 * 2**20


def _logsumexp_inplace(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, overwriting `logits`: no second (m, V) buffer."""
    maxes = logits.amax(dim=-1, keepdim=True)  # (m, 1)
    return logits.sub_(maxes).exp_().sum(dim=-1).log_().add_(maxes.squeeze(-1))


# What LinearTokenLogps keeps from forward to backward.
RECOMPUTE = "recompute"  # one logsumexp per row; the backward recomputes each chunk's logits
KEEP_LOGITS = "keep_logits"  # the whole (M, V) log-softmax, for batches too small to chunk
HIDDEN_GRAD = "hidden_grad"  # frozen head: d log p / d hidden per row (M, H), worked out in forward


def saving_strategy(hidden: torch.Tensor, head: nn.Linear) -> str:
    """Which of the three a call of LinearTokenLogps should use (the cheapest that fits)."""
    head_trains = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if torch.is_grad_enabled() and hidden.requires_grad and not head_trains:
        return HIDDEN_GRAD  # (M, H) float32, far less than one chunk of logits; no backward matmul
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_trains)
    if needs_grad and hidden.shape[0] * head.out_features * 4 <= KEEP_LOGITS_MAX_BYTES:
        return KEEP_LOGITS
    return RECOMPUTE


def _softmax_inplace(logits: torch.Tensor) -> torch.Tensor:
    """Turns `logits` (m, V) into their softmax in place; returns their logsumexp (m,)."""
    maxes = logits.amax(dim=-1, keepdim=True)  # (m, 1)
    sums = logits.sub_(maxes).exp_().sum(dim=-1, keepdim=True)  # (m, 1)
    logits.div_(sums)
    return (sums.log_() + maxes).squeeze(-1)


class LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ W^T + b)[targets], per row of hidden (M, H), `chunk_size` rows at a time.

    `strategy` says what the forward saves for the backward (see `saving_strategy`):
    RECOMPUTE saves hidden, W and one logsumexp per row, and the backward recomputes each
    chunk's logits once. KEEP_LOGITS computes the whole (M, V) logits as one chunk and saves
    them as log-softmax; the backward turns them into the softmax in place. HIDDEN_GRAD (W and b
    frozen) saves d log p(t) / d hidden = W[t] - softmax @ W per row; the backward scales it.
    Matmuls run in the autocast dtype when autocast is on (as nn.Linear would), the softmax and
    the gradient accumulators in float32. With `stats` (names of token_stats.TOKEN_STATS) it also
    returns each statistic per row (M,), without gradient, worked out from each chunk's logits
    before they are overwritten.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, strategy: str = RECOMPUTE,
                stats: tuple[str, ...] = ()):
        compute_dtype = _compute_dtype(hidden)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        keep_logits = strategy == KEEP_LOGITS
        chunk_size = max(hidden.shape[0], 1) if keep_logits else chunk_size
        logsumexp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (M,)
        token_logps = torch.empty_like(logsumexp)
        stat_rows = [torch.empty_like(logsumexp) for _ in stats]  # (M,) each
        kept = None
        if strategy == HIDDEN_GRAD:
            kept = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)  # (M, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows].to(compute_dtype), w, b)  # (m, V) float32
                target_logits = logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1)  # (m,)
                if stats:  # before the branches below overwrite the logits in place
                    for values, chunk_values in zip(stat_rows, chunk_token_stats(logits, targets[rows], stats)):
                        values[rows] = chunk_values
                if strategy == HIDDEN_GRAD:
                    logsumexp[rows] = _softmax_inplace(logits)
                    kept[rows] = w[targets[rows]].float() - torch.mm(logits.to(compute_dtype), w).float()
                elif keep_logits:  # kept as log-softmax: the backward needs one exp_ pass, no sub
                    logsumexp[rows] = torch.logsumexp(logits, -1)
                    kept = logits.sub_(logsumexp[rows].unsqueeze(1))
                else:
                    logsumexp[rows] = _logsumexp_inplace(logits)
                token_logps[rows] = target_logits - logsumexp[rows]
                del logits  # before the next chunk's logits exist, not after
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp, kept)
        ctx.compute_dtype, ctx.chunk_size, ctx.strategy = compute_dtype, chunk_size, strategy
        if stats:
            ctx.mark_non_differentiable(*stat_rows)
            return token_logps, *stat_rows
        return token_logps

    @staticmethod
    def backward(ctx, grad_logps, *_):  # grad_logps: (M,); none flows into the statistics
        hidden, weight, bias, targets, logsumexp, kept = ctx.saved_tensors
        if ctx.strategy == HIDDEN_GRAD:  # kept: d log p / d hidden (M, H); W and b take no gradient
            return (grad_logps.float().unsqueeze(1) * kept).to(hidden.dtype), None, None, None, None, None, None
        needs = ctx.needs_input_grad[:3]
        dtype = ctx.compute_dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grads = [torch.empty_like(hidden) if needs[0] else None,
                 torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None,
                 torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None]
        grad_logps = grad_logps.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)  # (m, H)
                # The saved logits are consumed in place: this graph cannot be backpropagated twice
                # (autograd's version check says so if someone tries).
                if kept is not None:
                    logits = kept  # the log-softmax, saved by the forward
                else:
                    logits = _chunk_logits(h, w, b).sub_(logsumexp[rows].unsqueeze(1))
                probs = logits.exp_()  # (m, V) softmax
                _add_chunk_grads(grads, rows, h, w, probs, targets[rows], grad_logps[rows].unsqueeze(1), dtype)
                del logits, probs  # before the next chunk's logits exist, not after
        grad_hidden, grad_weight, grad_bias = grads
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _add_chunk_grads(grads, rows, h, w, probs, targets, g, dtype) -> None:
    """One chunk's share of the gradients, with grad_logits = g * (onehot(t) - softmax).

    h (m, H), probs (m, V) float32, targets (m,), g (m, 1). The onehot part is an index
    operation, never an (m, V) tensor; the row scale g is applied on (m, H), not on (m, V).
    """
    grad_hidden, grad_weight, grad_bias = grads
    probs_c = probs.to(dtype)
    if grad_hidden is not None:
        grad_hidden[rows] = (g * (w[targets].float() - torch.mm(probs_c, w).float())).to(grad_hidden.dtype)
    if grad_weight is not None or grad_bias is not None:
        scaled = g * h.float()  # (m, H)
        if grad_weight is not None:
            if dtype == torch.float32:  # accumulate in place: no (V, H) temporary
                grad_weight.addmm_(probs_c.t(), scaled, alpha=-1.0)
            else:  # the bf16 product is promoted inside sub_: no float32 (V, H) copy of it
                grad_weight.sub_(torch.mm(probs_c.t(), scaled.to(dtype)))
            grad_weight.index_add_(0, targets, scaled)
        if grad_bias is not None:
            grad_bias -= torch.mm(g.t(), probs).squeeze(0)
            grad_bias.index_add_(0, targets, g.squeeze(1))


def chunked_token_logps(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024,
    stats: tuple[str, ...] = (),
):
    """log softmax(lm_head(hidden))[targets] for (M, H) hidden states, `chunk_size` rows at a time;
    with `stats`, the pair (those (M,), {name: statistic (M,), without gradient})."""
    if type(lm_head) is nn.Linear:  # exactly Linear: a subclass (LoRA, quantized) may change forward
        strategy = saving_strategy(hidden, lm_head)
        out = LinearTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size, strategy, stats)
        return (out[0], dict(zip(stats, out[1:]))) if stats else out
    return checkpointed_token_logps(hidden, lm_head, targets, chunk_size, stats)


def checkpointed_token_logps(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024,
    stats: tuple[str, ...] = (),
):
    """`chunked_token_logps` for any head module: autograd with one checkpoint per chunk."""
    pieces = []
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_grad:
            pieces.append(checkpoint(_token_logps_of_chunk, h, lm_head, t, stats, use_reentrant=False))
        else:
            pieces.append(_token_logps_of_chunk(h, lm_head, t, stats))
    if not pieces:
        none = hidden.new_zeros(0, dtype=torch.float32)
        return (none, {name: none for name in stats}) if stats else none
    if stats:  # each piece is (token log-probs, *statistics)
        columns = [torch.cat(column) for column in zip(*pieces)]  # (M,) each
        return columns[0], dict(zip(stats, columns[1:]))
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
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    counted: CountedTokens | None = None,
    ld_alpha: float | None = None,
    stats: tuple[str, ...] = (),
):
    """Summed completion log-probs per sequence (N,) and the number of tokens summed (N,); with
    `stats` (names of token_stats.TOKEN_STATS), a third: {name: that statistic summed per sequence (N,)}.

    Padded batches hold one sequence per row. A packed batch (`sequence_ids` given, shape like
    input_ids, values 0..N-1) holds several sequences per row, with `position_ids` restarting
    at each and no attention mask, so the model keeps them apart. `counted` (from the host,
    see data.collate.counted_tokens) saves working out the counted positions on the device.
    `ld_alpha`: LD-DPO's sums (see `length_desensitized_sums`).
    """
    if not supports_hidden_state_path(model):
        return naive_completion_logps(model, input_ids, attention_mask, completion_mask, position_ids,
                                      sequence_ids, ld_alpha, stats)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)  # (B, T, H)
    lm_head = unwrap_causal_lm(model).get_output_embeddings()
    return logps_from_hidden(hidden, lm_head, input_ids, completion_mask, chunk_size, sequence_ids, counted,
                             ld_alpha, stats)


def logps_from_hidden(hidden, lm_head, input_ids, completion_mask, chunk_size: int = 1024,
                      sequence_ids=None, counted: CountedTokens | None = None, ld_alpha: float | None = None,
                      stats: tuple[str, ...] = ()):
    """The LM-head stage of `completion_logps`: final hidden states (B, T, H) to per-sequence sums."""
    if counted is None:  # worked out here; on a GPU that waits for the device (a nonzero)
        counted = counted_tokens(completion_mask, sequence_ids)
    # Only the hidden states that predict completion tokens, and the tokens they predict.
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted.index)  # (M, H)
    targets = input_ids.reshape(-1).index_select(0, counted.index + 1)  # (M,): the token at t + 1
    token_logps = chunked_token_logps(h, lm_head, targets, chunk_size, stats)  # (M,), or a pair with stats
    return _sums(token_logps, counted.owner, counted.num_sequences, ld_alpha)


def _sums(token_logps, owner, num_sequences: int, ld_alpha: float | None):
    """`per_sequence_sums` of what `chunked_token_logps` returned (a pair with stats)."""
    if isinstance(token_logps, tuple):
        return per_sequence_sums(token_logps[0], owner, num_sequences, ld_alpha, token_stats=token_logps[1])
    return per_sequence_sums(token_logps, owner, num_sequences, ld_alpha)


def per_sequence_sums(token_logps, owner, num_sequences: int, ld_alpha: float | None = None,
                      token_stats: dict[str, torch.Tensor] | None = None):
    """Token log-probs (M,) summed per sequence (N,), and how many tokens each sum holds (N,).

    `owner` gives each token's sequence, a sequence's tokens in their order (not necessarily
    together). With `ld_alpha` the sums are LD-DPO's. With `token_stats` ({name: (M,)}), a third:
    each statistic summed per sequence (N,), plainly (LD-DPO discounts log-probs only).
    """
    counts = torch.zeros(num_sequences, dtype=torch.long, device=token_logps.device)
    counts = counts.index_add(0, owner, torch.ones_like(owner))
    if ld_alpha is None:
        sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
        sums = sums.index_add(0, owner, token_logps)
    else:  # LD-DPO splits each sum at the pair's shared length, which needs the counts first
        sums = length_desensitized_sums(token_logps, owner, counts, ld_alpha)
    if token_stats is None:
        return sums, counts
    zeros = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    return sums, counts, {name: zeros.index_add(0, owner, values) for name, values in token_stats.items()}


def length_desensitized_sums(token_logps, owner, counts, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"): the
    likelihood of a response y is split at l_p = min(|y_w|, |y_l|), the length both responses of
    the pair share, and what lies past it is discounted by alpha:
        log p^(y|x) = sum_{t <= l_p} log p(y_t | x, y_<t) + alpha * sum_{t > l_p} log p(y_t | x, y_<t)
    so the longer response's extra tokens weigh alpha, not 1 (alpha = 1 is DPO). |y| counts the
    tokens summed (EOS included), as TRL's `ld_alpha` does. Sequence n pairs with n + N/2.
    token_logps (M,), owner (M,), counts (N,) -> (N,).
    """
    n = counts.shape[0]
    shared_length = torch.minimum(counts, counts.roll(n // 2))  # (N,) l_p of each sequence's pair
    # Each token's place in its response: tokens grouped by sequence, in their order (stable sort).
    order = torch.sort(owner, stable=True).indices  # (M,)
    start = counts.cumsum(0) - counts  # (N,) where each sequence's tokens begin in `order`
    place = torch.empty_like(owner)
    place[order] = torch.arange(owner.shape[0], device=owner.device) - start[owner[order]]
    past = place >= shared_length[owner]  # (M,) tokens beyond the shorter response
    zeros = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device)
    shared = zeros.index_add(0, owner, token_logps.masked_fill(past, 0.0))
    tail = zeros.index_add(0, owner, token_logps.masked_fill(~past, 0.0))
    return shared + ld_alpha * tail


def shared_prompt_logps(model, shared, chunk_size: int = 1024, ld_alpha: float | None = None,
                        stats: tuple[str, ...] = ()):
    """`completion_logps` of a prompt-shared batch (data/shared_prompt.py): (2B,) sums and
    counts, chosen sequences first, as from the padded layout."""
    lm = unwrap_causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    first = decoder(input_ids=shared.first_ids, attention_mask=shared.first_mask, use_cache=True)
    cache = getattr(first, "cache", None) or first.past_key_values  # transformers 5.24 renamed it
    surplus = shared.first_ids.shape[1] - shared.prompt_width
    if surplus > 0:
        cache.crop(-surplus)  # keep the keys and values of the prompt positions only
    cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    second = decoder(input_ids=shared.second_ids, attention_mask=shared.second_mask,
                     position_ids=shared.second_positions, use_cache=True, **{cache_kwarg: cache})
    h_first, h_second = first.last_hidden_state, second.last_hidden_state  # (B, T1, H) (B, T2, H)
    b = shared.first_ids.shape[0]
    rows = torch.arange(b, device=h_first.device)
    chosen = shared.chosen_mask[:, 1:].bool()  # (B, T1-1): positions predicting a chosen token
    rejected_rest = shared.second_mask[:, shared.prompt_width + 1:].bool()  # (B, T2-1)
    hidden = torch.cat([
        h_first[:, :-1][chosen],
        h_first[rows, shared.prompt_lengths - 1],  # the prompt's end predicts the first rejected token
        h_second[:, :-1][rejected_rest],
    ])  # (M, H)
    targets = torch.cat([shared.first_ids[:, 1:][chosen], shared.second_ids[:, 0],
                         shared.second_ids[:, 1:][rejected_rest]])
    # Each rejected response's first token comes before its others: the order LD-DPO counts in.
    owner = torch.cat([rows.unsqueeze(1).expand_as(chosen)[chosen], rows + b,
                       (rows + b).unsqueeze(1).expand_as(rejected_rest)[rejected_rest]])
    token_logps = chunked_token_logps(hidden, lm.get_output_embeddings(), targets, chunk_size, stats)
    return _sums(token_logps, owner, 2 * b, ld_alpha)


def naive_completion_logps(model, input_ids, attention_mask, completion_mask, position_ids=None,
                           sequence_ids=None, ld_alpha: float | None = None, stats: tuple[str, ...] = ()):
    """The textbook computation: full logits, full log-softmax, gather, mask, sum."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits  # (B, T, V)
    return naive_logps_from_logits(logits, input_ids, completion_mask, sequence_ids, ld_alpha, stats)


def naive_logps_from_logits(logits, input_ids, completion_mask, sequence_ids=None, ld_alpha: float | None = None,
                            stats: tuple[str, ...] = ()):
    predicted, owner = counted_mask(completion_mask, sequence_ids)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_logps = torch.gather(log_probs, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    num_sequences = input_ids.shape[0] if sequence_ids is None else int(sequence_ids.max()) + 1
    if ld_alpha is not None or stats:  # the counted tokens, in order, as the other paths give them
        token_stats = None
        if stats:
            values = chunk_token_stats(logits[:, :-1][predicted], input_ids[:, 1:][predicted], stats)
            token_stats = dict(zip(stats, values))
        return per_sequence_sums(token_logps[predicted], owner[predicted], num_sequences, ld_alpha, token_stats)
    sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, owner.reshape(-1), (token_logps * predicted).reshape(-1))
    counts = torch.zeros(num_sequences, dtype=torch.long, device=logits.device)
    return sums, counts.index_add(0, owner.reshape(-1), predicted.reshape(-1).long())


class CompletionLogps(nn.Module):
    """`completion_logps` as a module, so DDP / FSDP see one forward that owns the model.

    Wrappers that hook a module's forward (DDP's gradient bookkeeping, FSDP's parameter
    gathering) need the whole computation, LM head included, inside one `forward` call.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, ld_alpha: float | None = None,
                 stats: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.ld_alpha = ld_alpha  # LD-DPO's discount of the tokens past the shorter response
        self.stats = stats  # per-token statistics to return summed per sequence (token_stats.py)
        # Which path the log-probs take is decided here, while the model is whole and unwrapped:
        # not later inside a torch.compile trace or after FSDP has sharded it.
        supports_hidden_state_path(model)

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, sequence_ids=None,
                shared=None, counted=None):
        if shared is not None:
            return shared_prompt_logps(self.model, shared, self.chunk_size, self.ld_alpha, self.stats)
        return completion_logps(self.model, input_ids, attention_mask, completion_mask,
                                self.chunk_size, position_ids, sequence_ids, counted, self.ld_alpha, self.stats)
