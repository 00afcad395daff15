"""Batch layouts beyond plain padding: packing and prompt sharing, when safe and worth it.

Prompt sharing (data/shared_prompt.py, `data.share_prompt`, on by default on CPU) runs each
pair's prompt once; it is used whenever a start-up check shows it exact for the model. Packing:

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
from preftune.data.shared_prompt import collate_shared_prompt
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import (
    completion_logps,
    shared_prompt_logps,
    supports_hidden_state_path,
    unwrap_causal_lm,
)

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


@torch.no_grad()
def prompt_sharing_is_exact(model, device, vocab_size: int, tolerance: float = 1e-4) -> bool:
    """Two pairs with prompts of different lengths, prompt-shared and padded: same log-probs?

    The shared layout applies the bare LM head to hidden states, so a model whose logits are
    post-processed (Gemma 2's soft-capping) is refused outright: with small logits, as in a
    freshly initialised model, the probe below could not tell the difference. So is a model
    with sliding-window attention (see `uses_sliding_window`), which the probe's short
    sequences never reach."""
    if not supports_hidden_state_path(model) or uses_sliding_window(model):
        return False
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, max(2, vocab_size), (20,), generator=generator).tolist()
    probe = [TokenizedPair(ids[:3], ids[3:7], ids[7:9], index=0),
             TokenizedPair(ids[9:14], ids[14:15], ids[15:20], index=1)]
    was_training = model.training
    model.eval()
    try:
        batch = collate_shared_prompt(probe, pad_token_id=0).to(device)
        expected, _ = completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        got, _ = shared_prompt_logps(model, batch.shared)
    except (RuntimeError, ValueError, TypeError, AttributeError):  # no cache support, say
        return False
    finally:
        model.train(was_training)
    scale = expected.abs().max().clamp(min=1.0)
    return bool(((got.float() - expected.float()).abs().max() / scale) <= tolerance)


def uses_sliding_window(model) -> bool:
    """Whether any layer attends within a sliding window (Mistral, Gemma 2 and 3, Qwen 2 with
    use_sliding_window, Phi-3 with sliding_window), as transformers' own cache reads the config.

    Such a layer sees the last `sliding_window` slots of its cache, not positions: in the
    prompt-shared layout the padding between a short prompt and its rejected response takes
    slots of the window, so the response sees less of its prompt than in the padded layout; and
    the model's cache keeps only a window of keys, which cannot be cropped back to the prompt
    once a prompt and its chosen response outrun the window (a RuntimeError mid-training)."""
    from transformers import DynamicCache

    config = unwrap_causal_lm(model).config
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config this transformers cannot read a cache from: judge by the key
        return getattr(config, "sliding_window", None) is not None
    return any(getattr(layer, "is_sliding", False) for layer in layers)


def _packed_collate(config, model, pad_token_id: int, device, console):
    """pack_pairs when data.packing asks for it and the model keeps packed rows apart, else None."""
    mode = config.data.packing
    implementation = attention_implementation(model)
    if mode == "off" or (mode == "auto" and implementation not in VARLEN_ATTENTION):
        return None  # (auto) exact but not faster without a variable-length kernel: see above
    if not packing_is_exact(model, device, unwrap_causal_lm(model).config.vocab_size):
        warnings.warn(f"data.packing: {type(unwrap_causal_lm(model)).__name__} with attention "
                      f"{implementation!r} does not keep packed sequences apart; not packing.", stacklevel=3)
        return None
    if console is not None:
        console.print(f"data: packing each micro-batch into one row (attention {implementation})")
    return partial(pack_pairs, pad_token_id=pad_token_id)


def prompt_sharing_wanted(config, device) -> bool:
    """data.share_prompt, with "auto" resolved: on CPU yes, elsewhere no (see config.py)."""
    share = config.data.share_prompt
    return torch.device(device).type == "cpu" if share == "auto" else bool(share)


def _not_shared(config, console, why: str) -> None:
    """Say so when data.share_prompt: true was asked for and is not used (auto decides quietly)."""
    if config.data.share_prompt is True and console is not None:
        console.print(f"[yellow]data.share_prompt is true, but each pair's prompt runs once per response: "
                      f"{why}; remove data.share_prompt to drop this note.[/yellow]")


def choose_collate(config, model, pad_token_id: int, device, console=None, sharded: bool = False):
    """The function turning a micro-batch's pairs into a PairBatch: packed, prompt-shared or
    padded. Prompt sharing runs the decoder twice per forward with a key/value cache, which
    gradient checkpointing (transformers turns the cache off), compile and FSDP (one gather per
    forward) do not take; it is skipped there, as for models that fail the start-up check."""
    packed = _packed_collate(config, model, pad_token_id, device, console)
    if packed is not None:
        _not_shared(config, console, "data.packing packs each micro-batch into one row instead")
        return packed
    padded = partial(collate_pairs, pad_token_id=pad_token_id)
    model_cfg = config.model
    blocking = [key for key, on in (("model.gradient_checkpointing", model_cfg.gradient_checkpointing),
                                    ("model.compile", model_cfg.compile), ("train.distributed: fsdp", sharded)) if on]
    if not prompt_sharing_wanted(config, device) or blocking:
        _not_shared(config, console, f"{' and '.join(blocking)} cannot run its key/value-cache continuation")
        return padded
    if not prompt_sharing_is_exact(model, device, unwrap_causal_lm(model).config.vocab_size):
        _not_shared(config, console, f"{type(unwrap_causal_lm(model)).__name__} failed the start-up check "
                                     "that the shared layout gives the padded log-probs")
        return padded
    if console is not None:
        console.print("data: each pair's prompt runs through the model once (data.share_prompt)")
    return partial(collate_shared_prompt, pad_token_id=pad_token_id)
