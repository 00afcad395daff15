"""Where the reference log-probs log ref(y|x) come from.

`build_reference` returns a callable mapping a `PairBatch` to the reference's summed completion
log-probs, shape (2B,), in the batch's row order. The variants:
- copy: a frozen copy of the starting policy (or `model.reference_path`), run without grad;
  with LoRA, the policy itself with its adapters disabled: no second copy of the weights;
- precompute: one no-grad pass over the train (and eval) pairs before training, in large
  length-sorted batches, cached on disk and looked up by `PairBatch.indices`; the reference
  model is gone before the first step;
- none: zeros, for reference-free losses.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from preftune.data.collate import PairBatch, collate_pairs, to_device
from preftune.data.tokenize import TokenizedPair
from preftune.logprobs import completion_logps, shared_prompt_logps, unwrap_causal_lm
from preftune.modeling import adapter_base, make_reference

ReferenceFn = Callable[[PairBatch], torch.Tensor]
CACHE_DIR = "reference_logps"
CACHE_FORMAT = 1  # bump when the meaning of a cached number changes


def batch_logps(model, batch: PairBatch, chunk_size: int, ld_alpha: float | None = None) -> torch.Tensor:
    """Summed completion log-probs of a padded, packed or prompt-shared batch, one per sequence (2B,);
    LD-DPO's sums with `ld_alpha` (loss.ld_alpha), which apply to the reference as to the policy."""
    if batch.shared is not None:
        return shared_prompt_logps(model, batch.shared, chunk_size, ld_alpha)[0]
    logps, _ = completion_logps(model, batch.input_ids, batch.model_attention_mask, batch.completion_mask,
                                chunk_size, batch.position_ids, batch.sequence_ids, batch.counted, ld_alpha)
    return logps


class FrozenModelReference:
    def __init__(self, model, chunk_size: int, autocast, ld_alpha: float | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.ld_alpha = ld_alpha

    @torch.no_grad()
    def __call__(self, batch: PairBatch) -> torch.Tensor:
        with self.autocast():
            return batch_logps(self.model, batch, self.chunk_size, self.ld_alpha)


def compact_reference(reference_fn: ReferenceFn, config) -> ReferenceFn:
    """A frozen copy's linear layers held in bf16 under bf16 autocast (`compact_frozen_linears`)."""
    # Exactly a frozen copy: _EvalModeReference, a subclass, runs the policy itself.
    if type(reference_fn) is FrozenModelReference:
        compact_frozen_linears(reference_fn.model, config)
    return reference_fn


def compact_frozen_linears(model, config) -> int:
    """Under bf16 autocast over float32 weights, the frozen linear layers are stored in bf16
    (a frozen reference copy's, LoRA's base): half their memory, and no cast of them in every
    forward. Returns how many.

    Exact: autocast runs every `nn.Linear` in bf16, casting its float32 weight and bias to
    bf16 first, which is the rounding done here once. Everything autocast keeps in float32
    stays so: norms, embeddings, and a head that shares its weight with the embedding; so do
    layers that train (adapters). Not under FSDP, which gathers one dtype per layer. Call it
    after anything that runs the model outside autocast (choose_collate's start-up checks).
    """
    if config.model.autocast != "bfloat16" or config.model.dtype != "float32":
        return 0
    layers = compactable_linears(model)
    for module in layers:
        module.to(torch.bfloat16)
    return len(layers)


def compactable_linears(model) -> list[torch.nn.Linear]:
    """The layers compact_frozen_linears stores in bf16: every plain, frozen nn.Linear except a
    head that shares its weight with an embedding (a lookup, which autocast leaves in float32)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [m for m in model.modules() if type(m) is torch.nn.Linear and id(m.weight) not in embeddings
            and not any(p.requires_grad for p in m.parameters())]


@contextmanager
def adapters_disabled(model):
    """The PEFT model as its base model, for the length of the block."""
    was_training = model.training
    model.eval()  # LoRA dropout and any other dropout off, as for a frozen reference
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


class AdapterDisabledReference:
    """LoRA: the reference is the policy with its adapters switched off, the same weights."""

    def __init__(self, peft_model, chunk_size: int, autocast, ld_alpha: float | None = None):
        self.model = peft_model
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.ld_alpha = ld_alpha

    @torch.no_grad()
    def __call__(self, batch: PairBatch) -> torch.Tensor:
        with adapters_disabled(self.model), self.autocast():
            return batch_logps(self.model, batch, self.chunk_size, self.ld_alpha)


def no_reference(batch: PairBatch) -> torch.Tensor:
    return torch.zeros(batch.input_ids.shape[0], device=batch.input_ids.device)


# ------------------------------------------------------------------------------ precompute


class PrecomputedReference:
    """Cached log-probs looked up by pair index: `table[index] = (chosen, rejected)`."""

    def __init__(self, indices: torch.Tensor, table: torch.Tensor, eval_reference=None):
        self.row_of = {int(i): row for row, i in enumerate(indices.tolist())}
        self.table = table  # (N, 2) float32
        self.eval_reference = eval_reference  # the same for the evaluation pairs (or None)

    def __call__(self, batch: PairBatch) -> torch.Tensor:
        rows = torch.tensor([self.row_of[i] for i in batch.indices], dtype=torch.long)
        pairs = self.table[rows]  # (B, 2)
        return to_device(torch.cat([pairs[:, 0], pairs[:, 1]]), batch.input_ids.device)  # chosen rows first


def _hub_snapshot(repo_id: str) -> Path | None:
    """The hub cache's folder of the revision `from_pretrained(repo_id)` loads, named by its
    commit hash (snapshots/<hash>/); None when `repo_id` resolves to none."""
    from transformers.utils import cached_file

    for name in ("config.json", "adapter_config.json"):
        try:
            found = cached_file(repo_id, name, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):  # no such repo, or not a repo id: loading says why
            return None
        if found:
            return Path(found).parent
    return None


def _weights_fingerprint(path: str, update) -> None:
    """The weight files' names, sizes, times and first and last MiB: changes when they do,
    without reading gigabytes. An adapter folder's base model counts too. A hub id is its
    snapshot's folder: a new revision on the Hub is a new key, not the old revision's cache."""
    folder = Path(os.path.expanduser(path))
    update(str(folder.resolve() if folder.exists() else path))
    if not folder.exists():
        folder = _hub_snapshot(path)
        if folder is None:
            return
        update(f" snapshot {folder.name}")
    if not folder.is_dir():
        return
    base = adapter_base(str(folder))
    if base is not None:
        _weights_fingerprint(base, update)
    weight_files_fingerprint(folder, update)


def weight_files_fingerprint(folder: Path, update, times: bool = True) -> None:
    """Each weight or config file's name, size, modification time (unless `times` is False: a
    moved copy then matches) and first and last MiB, passed to `update` (str or bytes)."""
    for file in sorted(folder.iterdir()):
        if file.suffix not in (".safetensors", ".bin", ".pt", ".json") or not file.is_file():
            continue
        stat = file.stat()
        update(f"{file.name}:{stat.st_size}" + (f":{stat.st_mtime_ns}" if times else ""))
        with open(file, "rb") as f:
            update(f.read(1 << 20))
            f.seek(max(0, stat.st_size - (1 << 20)))
            update(f.read(1 << 20))


def cache_key(config, pairs: list[TokenizedPair], split: str) -> str:
    """A hash of the reference model (path and weight files), its numerics, LD-DPO's alpha (which
    changes the sums), and the token ids of every pair (which hold every tokenization setting's
    effect)."""
    digest = hashlib.blake2b(digest_size=16)

    def update(value) -> None:
        digest.update(value if isinstance(value, bytes) else str(value).encode())

    model = config.model
    update(f"format {CACHE_FORMAT} split {split} dtype {model.dtype} autocast {model.autocast} "
           f"attn {model.attn_implementation}")
    if config.loss.ld_alpha is not None:  # absent otherwise: caches written before it still match
        update(f" ld_alpha {config.loss.ld_alpha!r}")
    _weights_fingerprint(model.reference_path or model.path, update)
    for pair in pairs:
        update(f"{pair.index}|{pair.prompt_ids}|{pair.chosen_ids}|{pair.rejected_ids}")
    return digest.hexdigest()


@torch.inference_mode()
def precompute_reference_logps(reference_fn: ReferenceFn, pairs: list[TokenizedPair], batch_size: int,
                               collate, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over `pairs`, longest first (batches of like lengths pad little):
    (indices (N,), table (N, 2) of chosen and rejected log-probs). `collate(pairs)` makes a batch."""
    ordered = sorted(pairs, key=lambda p: -p.length)
    indices, rows = [], []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        batch = collate(chunk).to(device)
        logps = reference_fn(batch).float()  # (2B,), left on the device: the host goes on queueing
        rows.append(torch.stack([logps[:len(chunk)], logps[len(chunk):]], dim=1))
        indices += [p.index for p in chunk]
    table = torch.cat(rows).cpu() if rows else torch.zeros(0, 2)  # one copy back, at the end
    return torch.tensor(indices, dtype=torch.long), table


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torchrun's process group; (0, 1) outside one."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _gathered(value) -> list:
    """Every process's `value`, in rank order ([value] outside a process group)."""
    import torch.distributed as torch_dist

    if _process_group()[1] == 1:
        return [value]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, value)
    return out


def precompute_in_shares(reference_fn, pairs, batch_size: int, collate, device):
    """`precompute_reference_logps`, each process of a group taking every N-th pair by length (so
    every share holds like lengths and as much work), then gathered: every process holds the
    whole table, for the time of one process's share."""
    rank, world_size = _process_group()
    share = sorted(pairs, key=lambda p: -p.length)[rank::world_size]
    tables = _gathered(precompute_reference_logps(reference_fn, share, batch_size, collate, device))
    return torch.cat([indices for indices, _ in tables]), torch.cat([table for _, table in tables])


def cached_reference_table(config, reference_fn, pairs, split, collate, device, console, is_main):
    """Load the split's table from OUTPUT/reference_logps/<key>.safetensors, or compute and save it."""
    from safetensors.torch import load_file, save_file

    path = Path(config.train.output_dir) / CACHE_DIR / f"{cache_key(config, pairs, split)}.safetensors"
    if all(_gathered(path.exists())):  # all processes, or none: computing it is a collective
        saved = load_file(str(path))
        console.print(f"reference: {len(pairs)} {split} pairs' log-probs from the cache {path}")
        return saved["indices"], saved["logps"], True
    batch_size = 4 * max(config.train.batch_size, config.train.eval_batch_size or 0)
    indices, table = precompute_in_shares(reference_fn, pairs, batch_size, collate, device)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"indices": indices, "logps": table}, str(tmp),
                  metadata={"split": split, "pairs": str(len(pairs)), "model": config.model.path})
        os.replace(tmp, path)  # a killed run never leaves half a cache behind
    world_size = _process_group()[1]
    shares = f" by {world_size} processes, a share each," if world_size > 1 else ""
    console.print(f"reference: {len(pairs)} {split} pairs' log-probs computed{shares} and cached in {path}")
    return indices, table, False


def _live_reference(config, policy, autocast, for_precompute: bool) -> ReferenceFn:
    chunk, ld_alpha = config.train.logprob_chunk_size, config.loss.ld_alpha
    if config.model.lora is not None and not config.model.reference_path:
        return AdapterDisabledReference(policy, chunk, autocast, ld_alpha)
    if for_precompute and not config.model.reference_path:
        # Before the first step the policy is the reference: no copy needed for one pass.
        return _EvalModeReference(policy, chunk, autocast, ld_alpha)
    return FrozenModelReference(make_reference(policy, config.model), chunk, autocast, ld_alpha)


class _EvalModeReference(FrozenModelReference):
    @torch.no_grad()
    def __call__(self, batch: PairBatch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return super().__call__(batch)
        finally:
            self.model.train(was_training)


def _precompute_collate(config, model, pad_token_id, device):
    """Prompt-shared batches when the model passes the check (no grad: no checkpointing issue)."""
    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.packing import prompt_sharing_is_exact, prompt_sharing_wanted

    vocab = unwrap_causal_lm(model).config.vocab_size
    if prompt_sharing_wanted(config, device) and prompt_sharing_is_exact(model, device, vocab):
        return partial(collate_shared_prompt, pad_token_id=pad_token_id)
    return partial(collate_pairs, pad_token_id=pad_token_id)


# What train says to change when a pair outruns a model's positions (evaluate.check_pairs_fit).
MAX_LENGTH_ADVICE = "set data.max_length to {limit} or less"


def _check_reference_fits(config, live: ReferenceFn, pairs: list[TokenizedPair]) -> None:
    """A model.reference_path model may have fewer positions than the policy, which train checks:
    a pair past them stopped the precompute, or the first step, with an IndexError traceback."""
    if config.model.reference_path and pairs:
        from preftune.evaluate import check_pairs_fit

        check_pairs_fit(pairs, "data.train", ((live.model, "model.reference_path", config.model.reference_path),),
                        advice=MAX_LENGTH_ADVICE)


def build_reference(config, policy, autocast, train_pairs=None, eval_pairs=None, pad_token_id=None,
                    device=None, console=None, is_main: bool = True) -> ReferenceFn:
    if config.model.reference == "none" or config.loss.reference_free:
        return no_reference
    if config.model.reference != "precompute":
        live = _live_reference(config, policy, autocast, for_precompute=False)
        _check_reference_fits(config, live, (train_pairs or []) + (eval_pairs or []))
        return live
    if train_pairs is None:
        raise ValueError("model.reference: precompute needs the training pairs")
    from rich.console import Console

    console = console or Console(quiet=True)
    live = _live_reference(config, policy, autocast, for_precompute=True)
    _check_reference_fits(config, live, train_pairs + (eval_pairs or []))
    device = device or next(policy.parameters()).device
    collate = _precompute_collate(config, live.model, pad_token_id, device)
    tables = {}
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs or [])):
        if pairs:
            indices, table, _ = cached_reference_table(config, live, pairs, split, collate, device,
                                                       console, is_main)
            tables[split] = (indices, table)
    if isinstance(live, FrozenModelReference) and live.model is not policy:
        del live.model  # a model loaded from reference_path: gone before training starts
    del live
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    eval_reference = PrecomputedReference(*tables["eval"]) if "eval" in tables else None
    return PrecomputedReference(*tables["train"], eval_reference=eval_reference)


__all__ = [
    "AdapterDisabledReference",
    "FrozenModelReference",
    "PrecomputedReference",
    "adapters_disabled",
    "build_reference",
    "cache_key",
    "precompute_reference_logps",
]
