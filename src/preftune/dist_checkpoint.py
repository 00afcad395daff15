"""Checkpoints of any run, one process or many: full weights written once, optimizer sharded.

A checkpoint folder (written atomically by `checkpoint.save_checkpoint`: temp folder, manifest,
rename) holds:
  model.safetensors, config.json, tokenizer files  the full policy, loadable by from_pretrained;
                        under fsdp gathered from every rank, written by rank 0 only
  training_state.pt     step, data position, scheduler, each rank's RNG (and the optimizer
                        under none/ddp, where every rank holds the same whole optimizer state)
  optimizer/            under fsdp: the optimizer state as torch.distributed.checkpoint (DCP)
                        shards, one file per rank plus `.metadata`. DCP reshards on load, so a
                        checkpoint written by N processes resumes on M.
  reference/            with model.reference_sync, once a sync has moved it: the reference
                        model, loadable by from_pretrained (gathered under fsdp, as the policy)

Every rank first writes its DCP shard into a staging folder beside the checkpoint; rank 0 then
fills the temp folder, moves the shards in and closes the checkpoint with its manifest. A
killed save leaves only `*.tmp` folders, which are never resumed from. The output folder must
be one file system that every node sees (as usual for multi-node training).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch.distributed as torch_dist
from torch import nn

from preftune.checkpoint import load_model_weights, load_training_state, save_checkpoint
from preftune.distributed import DistContext
from preftune.errors import UserError
from preftune.optim import regroup_saved_state

OPTIMIZER_DIR = "optimizer"
REFERENCE_DIR = "reference"


def run_shape(config, dist: DistContext) -> dict:
    """What a resumed run must match: the global batch fixes the order in which data is read."""
    return {"world_size": dist.world_size, "strategy": dist.strategy,
            "global_batch": config.train.batch_size * config.train.grad_accum * dist.world_size}


# ------------------------------------------------------------------------------ weights


def full_state_dict(policy: nn.Module, dist: DistContext) -> dict | None:
    """Under fsdp, the whole state dict on rank 0's CPU (a collective: every rank calls it);
    None otherwise, as the model itself holds it."""
    if not dist.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_weights(policy: nn.Module, folder: Path, state: dict | None) -> None:
    """HF-loadable safetensors (rank 0 only); `state` from `full_state_dict`."""
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder, state_dict=state, safe_serialization=True)


def _with_tied_twins(policy: nn.Module, state: dict) -> dict:
    """save_pretrained writes a tied weight once (say embed_tokens); the loader of a sharded
    model wants every name, so the twin (lm_head) gets the same tensor."""
    by_id: dict[int, list[str]] = {}
    for name, param in policy.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    for names in by_id.values():
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    return state


def _load_weights_sharded(policy: nn.Module, folder: Path, dist: DistContext) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict = {}
    if dist.is_main:  # read once; the other ranks receive their shards by broadcast
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"checkpoint {folder} holds no .safetensors weights.")
        for f in files:
            state.update(load_file(str(f)))
        state = _with_tied_twins(policy, state)
    set_model_state_dict(policy, state, options=StateDictOptions(full_state_dict=True,
                                                                 broadcast_from_rank0=True))


# ------------------------------------------------------------------------------ optimizer


def _save_sharded_optimizer(policy, optimizer, staging: Path, dist: DistContext) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=str(staging))


def _load_sharded_optimizer(policy, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    # The template holds this run's shards; DCP fills them from whatever layout was saved.
    template = get_optimizer_state_dict(policy, optimizer)
    groups = template["param_groups"]
    # Written before biases and norm weights went undecayed, the state holds one group: load it
    # as one, then lay it over this run's groups, each parameter keeping its moments and step.
    one_group = "optimizer.param_groups.1.lr" not in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if one_group:
        template["param_groups"] = [dict(groups[0], params=[name for g in groups for name in g["params"]])]
    state = {"optimizer": template}
    with warnings.catch_warnings():
        # Without a process group DCP reads every shard itself, as wanted, and says so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    if one_group:
        [saved] = state["optimizer"]["param_groups"]
        state["optimizer"]["param_groups"] = [dict(saved, params=g["params"], weight_decay=g["weight_decay"])
                                              for g in groups]
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])


def _load_whole_optimizer_sharded(policy, optimizer, saved: dict) -> None:
    """A none/ddp checkpoint (positional optimizer state) resumed under fsdp: name each entry
    by its parameter, in the order the optimizer was built (trainable parameters), and shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Saved positions match this optimizer's parameters group by group, as load_state_dict reads them.
    name_of = {id(p): n for n, p in policy.named_parameters()}
    names = dict(zip((i for g in saved["param_groups"] for i in g["params"]),
                     (name_of[id(p)] for g in optimizer.param_groups for p in g["params"])))
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in saved["param_groups"]]
    state = {names[i]: value for i, value in saved["state"].items()}
    set_optimizer_state_dict(policy, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------ save / restore


def save_training_checkpoint(folder: Path, step: int, policy, tokenizer, optimizer,
                             training_state: dict, config, dist: DistContext, reference=None) -> Path:
    """Write one checkpoint; every rank calls it. `training_state` holds what train.py owns
    (step, data position, scheduler, RNG); weights and optimizer are added here, and the
    `reference` model when one is given (a reference that model.reference_sync has moved)."""
    folder = Path(folder)
    full = full_state_dict(policy, dist)
    reference_full = full_state_dict(reference, dist) if reference is not None else None
    staging = folder.with_name(folder.name + ".shards.tmp")
    training_state = dict(training_state, distributed=run_shape(config, dist),
                          config=config.model_dump(mode="json"))
    if dist.active and dist.world_size > 1:
        # Each rank's own RNG (dropout draws as many numbers as its own micro-batches hold, so
        # the ranks' streams part after the first step); "rng" alone is rank 0's.
        training_state["rng_by_rank"] = [None] * dist.world_size
        torch_dist.all_gather_object(training_state["rng_by_rank"], training_state["rng"])
    if dist.sharded:
        _save_sharded_optimizer(policy, optimizer, staging, dist)
        training_state["optimizer"] = None
    else:
        training_state["optimizer"] = optimizer.state_dict()
    if dist.is_main:
        def save_model(path: Path) -> None:
            write_weights(policy, path, full)
            tokenizer.save_pretrained(path)
            if reference is not None:
                write_weights(reference, path / REFERENCE_DIR, reference_full)
            if dist.sharded:
                os.replace(staging, path / OPTIMIZER_DIR)

        save_checkpoint(folder, step, save_model, training_state)
    dist.barrier()
    return folder


def _check_shape(saved: dict, folder: Path, config, dist: DistContext) -> None:
    before, now = saved.get("distributed"), run_shape(config, dist)
    if not before or before["global_batch"] == now["global_batch"]:
        return
    wanted, processes, accum = before["global_batch"], dist.world_size, config.train.grad_accum
    written = "1 process" if before["world_size"] == 1 else f"{before['world_size']} processes"
    said = (f"checkpoint {folder} was written with {wanted} pairs per optimizer step ({written}); this run "
            f"has {now['global_batch']} (train.batch_size {config.train.batch_size} x train.grad_accum "
            f"{accum} x {processes} process{'es' if processes != 1 else ''})")
    if wanted % processes:  # no batch size restores it: each process takes an equal share
        counts = ", ".join(str(n) for n in range(1, wanted + 1) if wanted % n == 0)
        raise UserError(f"{said}, and {wanted} pairs cannot be shared out equally over {processes} processes: "
                        f"resume on {counts} processes, with train.batch_size x train.grad_accum x processes "
                        f"= {wanted}.")
    per_process = wanted // processes
    fix = (f"set train.batch_size: {per_process // accum}" if per_process % accum == 0 else
           f"set train.batch_size x train.grad_accum to {per_process} (e.g. train.batch_size: {per_process}, "
           "train.grad_accum: 1)")
    raise UserError(f"{said}: {fix}, so that each step again sees {wanted} pairs.")


# Keys that fix what a run computes: its data order, loss, optimizer and schedule. A resume must
# keep them; else the resumed run is another run, and config.yaml, rewritten at the resume,
# would describe neither. (optim.lr, betas, eps and weight_decay would not even take effect:
# the saved optimizer and scheduler state carry the old values.) Every other key may change:
# paths (data moved), eval, saving, logging, devices, batch layout (with the global batch kept,
# checked above), train.epochs / max_steps (to extend a run), model.reference (copy and
# precompute give the same log-probs of the same starting model).
FIXED_AT_RESUME = {
    "model": ("lora", "disable_dropout", "reference_sync"),
    "data": ("split", "eval_fraction", "eval_fraction_by", "max_length", "max_prompt_length",
             "truncation", "group_by_length"),
    "loss": None,  # every key
    "optim": ("name", "lr", "weight_decay", "betas", "eps", "scheduler", "warmup_steps", "max_grad_norm"),
    "train": ("seed",),
}


def _inert_keys(config: dict) -> set[str]:
    """Fixed keys that did nothing in a run of `config` and that the config now refuses so
    (data.max_prompt_length without data.max_length, optim.betas beside rmsprop): a run started
    before the refusal must be able to drop them, as it says, and resume."""
    inert = set()
    if (config.get("data") or {}).get("max_length", 1024) is None:  # nothing was cut
        inert.add("data.max_prompt_length")
    if (config.get("optim") or {}).get("name", "adamw") != "adamw":  # RMSprop takes no betas
        inert.add("optim.betas")
    return inert


def _check_fixed_keys(saved: dict, folder: Path, config) -> None:
    before, now = saved.get("config"), config.model_dump(mode="json")
    if not before:  # written before checkpoints held their config
        return
    changed, inert = [], _inert_keys(before)
    for section, keys in FIXED_AT_RESUME.items():
        old, new = before.get(section, {}), now.get(section, {})
        # Keys known to both: a key that a later preftune adds (or drops) is no change.
        for key in keys or sorted(old):
            if key in old and key in new and old[key] != new[key] and f"{section}.{key}" not in inert:
                changed.append(f"{section}.{key} {old.get(key)!r} (now {new.get(key)!r})")
    if changed:
        raise UserError(
            f"checkpoint {folder} was written with {', '.join(changed)}; a resumed run must keep "
            f"the settings that fix its data order, loss, optimizer and schedule, so set "
            f"{'it' if len(changed) == 1 else 'them'} back (the run's config.yaml holds them), or start "
            f"a new run in another train.output_dir.")


def check_resume_settings(folder: Path, config, dist: DistContext) -> None:
    """Refuse a resume from `folder` whose config changes the global batch or a FIXED_AT_RESUME
    key. Called before the model loads: on a large model the refusal came minutes late. The
    training state is read memory-mapped, so its optimizer state (twice the weights under
    none/ddp) is not read from disk for the saved config beside it."""
    saved = load_training_state(folder, mmap=True)
    _check_shape(saved, Path(folder), config, dist)
    _check_fixed_keys(saved, Path(folder), config)


def restore_training_checkpoint(folder: Path, policy, optimizer, config, dist: DistContext,
                                reference=None) -> dict:
    """Load weights and optimizer into this run's (possibly sharded) model, and into `reference`
    the reference the checkpoint holds, if it holds one (else the reference stays the starting
    model it was built as); every rank calls it. Returns the saved training state for train.py
    (scheduler, step, RNG). The caller has checked the settings with `check_resume_settings`."""
    folder = Path(folder)
    saved = load_training_state(folder)
    if dist.sharded:
        _load_weights_sharded(policy, folder, dist)
    else:
        load_model_weights(policy, folder)
    if (folder / OPTIMIZER_DIR).is_dir():
        _load_sharded_optimizer(policy, optimizer, folder / OPTIMIZER_DIR)
    else:
        # Written before biases and norm weights went undecayed: one group, laid over this run's.
        whole = regroup_saved_state(saved["optimizer"], optimizer,
                                    [p for p in policy.parameters() if p.requires_grad])
        if dist.sharded:
            _load_whole_optimizer_sharded(policy, optimizer, whole)
        else:
            optimizer.load_state_dict(whole)
    if reference is not None and (folder / REFERENCE_DIR).is_dir():
        if dist.sharded:
            _load_weights_sharded(reference, folder / REFERENCE_DIR, dist)
        else:
            load_model_weights(reference, folder / REFERENCE_DIR)
    by_rank = saved.get("rng_by_rank")
    if by_rank and len(by_rank) == dist.world_size:
        # This rank's stream; on another number of processes no rank's continues (its pairs
        # are others), and every rank takes rank 0's.
        saved["rng"] = by_rank[dist.rank]
    return saved
