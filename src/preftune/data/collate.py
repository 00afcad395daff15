"""Batches: the order pairs are visited in, and padded tensors for one concatenated forward.

The DPO reference code's habit: chosen and rejected sequences of a micro-batch go through the
model as one batch of 2B rows (chosen first), so each model runs one forward per micro-batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from preftune.data.tokenize import TokenizedPair


def to_device(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    """A host tensor on `device`, without making the host wait for the GPU.

    A plain `.to("cuda")` from pageable memory synchronises: the host stops until every kernel
    queued so far has run, and cannot queue the next ones meanwhile. From pinned memory the
    copy is queued like a kernel (the caching host allocator keeps the buffer until it is done).
    """
    if tensor is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class CountedTokens:
    """Which positions' predictions count, as indices worked out on the host.

    `index` holds flat positions b * T + t of the (B, T) grid whose hidden state predicts a
    counted token (the token at t + 1); `owner` the sequence each belongs to. Selecting with
    them is a gather of known size, where a boolean mask would make the host wait for the GPU
    to learn how many rows it selects (and would break a torch.compile graph in two).
    """

    index: torch.Tensor  # (M,) long
    owner: torch.Tensor  # (M,) long
    num_sequences: int

    def to(self, device) -> "CountedTokens":
        return CountedTokens(to_device(self.index, device), to_device(self.owner, device), self.num_sequences)


def counted_mask(completion_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None):
    """(B, T-1) mask of the positions whose prediction counts, and the sequence each belongs to.

    Token t is predicted from position t - 1, so a position counts when the next token is a
    completion token. In a packed row, the first token of a sequence would be "predicted" by the
    last token of the one before it; that prediction never counts.
    """
    predicted = completion_mask[:, 1:].bool()  # (B, T-1)
    if sequence_ids is None:
        owner = torch.arange(completion_mask.shape[0], device=completion_mask.device)
        return predicted, owner.unsqueeze(1).expand_as(predicted)
    return predicted & (sequence_ids[:, 1:] == sequence_ids[:, :-1]), sequence_ids[:, 1:]


def counted_tokens(completion_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> CountedTokens:
    """`counted_mask` as flat indices into the (B, T) grid, for a gather of known size."""
    predicted, owner = counted_mask(completion_mask, sequence_ids)
    b, t = predicted.nonzero(as_tuple=True)
    if sequence_ids is None:
        num_sequences = completion_mask.shape[0]
    else:
        num_sequences = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
    return CountedTokens(b * completion_mask.shape[1] + t, owner[predicted], num_sequences)


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, T): B chosen rows, then B rejected rows
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) 1 on completion tokens: the ones whose log-prob counts
    indices: list[int]  # data set position of each pair: the key of cached reference log-probs
    pair_ids: list  # the rows' pair_id values (None where absent), for logs of bad steps
    # Packed batches (`pack_pairs`): all 2B sequences in one row (1, L), positions restarting
    # at 0 for each, and the sequence (0..2B-1, chosen first) each token belongs to.
    position_ids: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    # Prompt-shared layout (data/shared_prompt.py): each prompt runs through the model once.
    # The padded tensors above stay, for token counts and for code that reads rows.
    shared: object | None = None
    # Worked out on the host by `to()`, so that nothing in a step waits for the GPU to say them.
    counted: CountedTokens | None = None
    host_num_tokens: int | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    @property
    def model_attention_mask(self) -> torch.Tensor | None:
        """What the model gets: none for a packed row, which the position ids split into
        sequences (transformers builds the block-diagonal mask from them)."""
        return None if self.sequence_ids is not None else self.attention_mask

    @property
    def num_tokens(self) -> int:
        if self.host_num_tokens is not None:
            return self.host_num_tokens
        return int(self.attention_mask.sum())

    def to(self, device) -> "PairBatch":
        on_host = self.input_ids.device.type == "cpu"
        counted = self.counted
        if counted is None and on_host and self.shared is None:
            counted = counted_tokens(self.completion_mask, self.sequence_ids)
        return PairBatch(to_device(self.input_ids, device), to_device(self.attention_mask, device),
                         to_device(self.completion_mask, device), self.indices, self.pair_ids,
                         to_device(self.position_ids, device), to_device(self.sequence_ids, device),
                         self.shared.to(device) if self.shared is not None else None,
                         counted.to(device) if counted is not None else None,
                         self.num_tokens if on_host else self.host_num_tokens)


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None) -> PairBatch:
    """Right-pad chosen then rejected sequences into one (2B, T) batch."""
    sequences, completion_flags = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            completion = getattr(pair, side)
            sequences.append(pair.prompt_ids + completion)
            completion_flags.append([0] * len(pair.prompt_ids) + [1] * len(completion))
    width = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, flags) in enumerate(zip(sequences, completion_flags)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, : len(seq)] = torch.tensor(flags, dtype=torch.long)
    return PairBatch(input_ids, attention_mask, completion_mask,
                     [p.index for p in pairs], [p.pair_id for p in pairs])


def pack_pairs(pairs: list[TokenizedPair], pad_token_id: int = 0) -> PairBatch:
    """Chosen then rejected sequences end to end in one (1, L) row: no padding at all."""
    ids, completion, positions, owners = [], [], [], []
    sequences = [pair.prompt_ids + getattr(pair, side) for side in ("chosen_ids", "rejected_ids")
                 for pair in pairs]
    prompts = [len(pair.prompt_ids) for pair in pairs] * 2
    for number, (sequence, prompt) in enumerate(zip(sequences, prompts)):
        ids += sequence
        completion += [0] * prompt + [1] * (len(sequence) - prompt)
        positions += range(len(sequence))
        owners += [number] * len(sequence)
    row = torch.tensor([ids], dtype=torch.long)
    return PairBatch(row, torch.ones_like(row), torch.tensor([completion], dtype=torch.long),
                     [p.index for p in pairs], [p.pair_id for p in pairs],
                     torch.tensor([positions], dtype=torch.long), torch.tensor([owners], dtype=torch.long))


def epoch_order(
    lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The pairs each optimizer step sees in one epoch, as lists of data set positions.

    Deterministic in (seed, epoch), so a resumed run replays the same order, and independent of
    how a step is split into micro-batches or ranks (step_size = pairs per optimizer step).
    With `group_by_length`, shuffled pools of 32 steps are sorted by length before being cut
    into steps, and the steps are shuffled again: batches of similar lengths waste little
    compute on padding, while the order stays random. The len(lengths) % step_size pairs that
    would make an incomplete last step (it would change the effective batch size) are left out
    of the epoch; they are drawn at random each epoch, before any grouping, so neither the
    shortest pairs nor any others are left out every time.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[:len(order) - len(order) % step_size]
    if group_by_length:
        pool = step_size * 32
        order = [i for start in range(0, len(order), pool)
                 for i in sorted(order[start:start + pool], key=lambda j: -lengths[j])]
    steps = [order[i:i + step_size] for i in range(0, len(order), step_size)]
    if group_by_length:
        rng.shuffle(steps)
    return steps


def micro_batches(step_indices: list[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's share of one optimizer step, cut into micro-batches of `batch_size` pairs."""
    share = step_indices[rank::world_size]
    return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
