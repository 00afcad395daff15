"""Padding-free packing: when it is safe, and when it is worth it.

A packed micro-batch puts its 2B sequences end to end in one row, with position ids that
restart at 0 for each and no attention mask (data.collate.pack_pairs). transformers 5 then
keeps the sequences apart itself: for flash-attention it turns the restarts into variable-length
boundaries (cu_seqlens), and for sdpa / eager `create_causal_mask` builds a block-diagonal mask
from them. Whether a given model does either is a property of its modeling code, so it is not
assumed: `packing_is_exact` runs two short sequences through the model packed and apart, and
packing is used only when the log-probs agree.

Worth it: with a variable-length kernel (flash-attention) the attention cost stays per sequence
and no compute goes to padding. With sdpa / eager the mask is a dense (L, L) one over the whole
row, so attention costs grow with the square of the packed length: exact, but slower on batches
of like lengths. `data.packing: auto` therefore packs only with flash-attention; `on` packs
whenever the check passes.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from preftune.data.collate import collate_pairs, pack_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import completion_logps, unwrap_causal_lm

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def attention_implementation(model) -> str:
    return getattr(unwrap_causal_lm(model).config, "_attn_implementation", None) or "eager"


@torch.no_grad()
def packing_is_exact(model, device, vocab_size: int, tolerance: float = 1e-4) -> bool:
    """Two sequences of different lengths, packed and padded: do their log-probs agree?"""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, vocab_size), (11,), generator=generator).tolist()
    probe = [TokenizedPair(ids[:3], ids[3:7], ids[7:11], index=0)]
    was_training = model.training
    model.eval()
    try:
        padded = collate_pairs(probe, pad_token_id=0).to(device)
        packed = pack_pairs(probe).to(device)
        expected, _ = completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
        got, _ = completion_logps(model, packed.input_ids, None, packed.completion_mask,
                                  position_ids=packed.position_ids, sequence_ids=packed.sequence_ids)
    except (RuntimeError, ValueError, TypeError):  # a model that rejects position_ids or no mask
        return False
    finally:
        model.train(was_training)
    scale = expected.abs().max().clamp(min=1.0)
    return bool(((got.float() - expected.float()).abs().max() / scale) <= tolerance)


def choose_collate(config, model, pad_token_id: int, device, console=None):
    """The function turning a micro-batch's pairs into a PairBatch: packed or padded."""
    padded = partial(collate_pairs, pad_token_id=pad_token_id)
    mode = config.data.packing
    if mode == "off":
        return padded
    implementation = attention_implementation(model)
    if mode == "auto" and implementation not in VARLEN_ATTENTION:
        return padded  # exact but not faster without a variable-length kernel: see above
    vocab = unwrap_causal_lm(model).config.vocab_size
    if not packing_is_exact(model, device, vocab):
        warnings.warn(f"data.packing: {type(unwrap_causal_lm(model)).__name__} with attention "
                      f"{implementation!r} does not keep packed sequences apart; training on padded "
                      "batches instead.", stacklevel=2)
        return padded
    if console is not None:
        console.print(f"data: packing each micro-batch into one row (attention {implementation})")
    return lambda pairs: pack_pairs(pairs, pad_token_id)
