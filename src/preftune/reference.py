"""Where the reference log-probs log ref(y|x) come from.

`build_reference` returns a callable mapping a `PairBatch` to the reference's summed completion
log-probs, shape (2B,), in the batch's row order. The variants:
- copy: a frozen copy of the starting policy (or `model.reference_path`), run without grad;
- none: zeros, for reference-free losses.
"""

from __future__ import annotations

from typing import Callable

import torch

from preftune.data.collate import PairBatch
from preftune.logprobs import completion_logps
from preftune.modeling import make_reference

ReferenceFn = Callable[[PairBatch], torch.Tensor]


class FrozenModelReference:
    def __init__(self, model, chunk_size: int, autocast):
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, batch: PairBatch) -> torch.Tensor:
        with self.autocast():
            logps, _ = completion_logps(self.model, batch.input_ids, batch.attention_mask,
                                        batch.completion_mask, self.chunk_size)
        return logps


def no_reference(batch: PairBatch) -> torch.Tensor:
    return torch.zeros(batch.input_ids.shape[0], device=batch.input_ids.device)


def build_reference(config, policy, autocast) -> ReferenceFn:
    if config.model.reference == "none" or config.loss.reference_free:
        return no_reference
    return FrozenModelReference(make_reference(policy, config.model),
                                config.train.logprob_chunk_size, autocast)
