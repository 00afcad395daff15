"""The DPO training loop, to be read top to bottom.

    for each optimizer step:
        for each micro-batch of pairs (chosen and rejected concatenated into one batch):
            policy log-probs   <- one forward of the policy, with grad
            reference log-probs<- one forward of the frozen reference (or a cache)
            per-pair loss      <- losses.preference_loss (DPO eq. 7 by default)
            backward of sum(loss) / pairs-per-step        (so accumulation == a bigger batch)
        clip gradients, step the optimizer and the schedule, log the metrics
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
import sys
import time
import types
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatch
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from preftune.carried_state import (
    check_sync_compatible,
    has_synced,
    live_reference_model,
    next_reward_shift,
    sync_reference,
)
from preftune.checkpoint import (
    RUN_ENTRIES,
    earlier_run_entries,
    latest_good_checkpoint,
    prune_checkpoints,
    remove_earlier_run,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from preftune.config import Config, dump_config, with_absolute_paths
from preftune.data.collate import collate_pairs, epoch_order, micro_batches
from preftune.data.heldout import (
    HELDOUT_FILE,
    check_heldout,
    hold_out,
    remove_stale_heldout,
    shared_prompts,
    write_heldout,
)
from preftune.data.io import load_pairs
from preftune.data.repeats import eval_overlap_warning, repeated_rows_warning
from preftune.data.tokenize import TokenizedPair, tokenize_pairs
from preftune.distributed import full_tensor, resume_command
from preftune.errors import UserError
from preftune.evaluate import check_pairs_fit, evaluate_pairs, pair_logps
from preftune.loggers import check_backends
from preftune.losses import BATCH_WIDE, preference_loss
from preftune.metrics import StepMetrics
from preftune.modeling import (
    ADAPTER_CONFIG,
    adapter_base,
    autocast_context,
    disable_dropout,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from preftune.optim import (
    build_optimizer,
    build_scheduler,
    follow_schedule,
    load_scheduler_state,
    parameter_groups,
)
from preftune.packing import choose_collate
from preftune.progress import TrainProgress
from preftune.reference import (
    MAX_LENGTH_ADVICE,
    build_reference,
    compact_frozen_linears,
    compact_reference,
    weight_files_fingerprint,
)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # data position: steps of this epoch already consumed
    bad_steps: int = 0
    total_steps: int = 0  # the run's length when saved (0 in checkpoints older than this field)
    data: str = ""  # data_fingerprint of the training pairs ("" in older checkpoints)
    # bco_pair's reward shift delta: the mean implicit reward of the steps so far, and how many
    # rewards (2 per pair) it averages (0 in older checkpoints).
    reward_shift: float = 0.0
    rewards_seen: int = 0
    # TRL's num_tokens: the tokens of the steps so far, chosen and rejected sequences each with
    # its prompt (0 in older checkpoints, whose resumes count from there).
    num_tokens: int = 0
    model: str = ""  # models_fingerprint of the starting model and reference ("" in older checkpoints)
    # The local base models their adapter_config.json names, when model.path or reference_path is
    # a PEFT adapter folder: {base as named there: its models_fingerprint} ({} in older checkpoints).
    bases: dict = field(default_factory=dict)


def data_fingerprint(pairs: list[TokenizedPair]) -> str:
    """'<N> pairs <hash of their token ids, in order>': the data position a checkpoint saves
    means nothing on other data, so a resume checks it (about 0.5 s per 20M tokens)."""
    digest = hashlib.blake2b(digest_size=12)
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(array("q", ids).tobytes() + b"|")
    return f"{len(pairs)} pairs {digest.hexdigest()}"


def models_fingerprint(paths: list[str | None]) -> str:
    """A cheap identity of the local model folders a run starts from (model.path, and
    model.reference_path): each weight and config file's name, size and first and last MiB, as
    the reference cache's key reads them but without times. The policy's weights come from a
    checkpoint at a resume, but its reference is built from these again; this tells another model
    under the same path (another seed of the same architecture) from a moved copy without reading
    gigabytes. Hub ids add nothing."""
    digest = hashlib.blake2b(digest_size=12)
    for path in paths:
        folder = Path(os.path.expanduser(path)) if path else None
        if folder is not None and folder.is_dir():
            weight_files_fingerprint(folder, lambda v: digest.update(v if isinstance(v, bytes) else v.encode()),
                                     times=False)
    return digest.hexdigest()


def adapter_bases(paths: list[str | None]) -> dict[str, str]:
    """{local base model folder: the adapter folder whose adapter_config.json names it} for each
    adapter folder among `paths`, and for that base's own base in a chain of adapters."""
    named = {}
    for path in paths:
        adapter, base = path, adapter_base(path) if path else None
        while base is not None and os.path.isdir(os.path.expanduser(base)) and base not in named:
            named[base] = adapter
            adapter, base = base, adapter_base(base)
    return named


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ data


def _describe_counts(counts) -> str:
    return ", ".join(f"{n} {why}" for why, n in counts.items()) or "none"


def _load_sources(sources: str | list[str], split: str, name: str, console: Console,
                  split_inherited: bool = False, config: str | None = None):
    """Read every source of the train or eval data, printing for each what was read, kept and
    skipped, and why; returns the pairs and the skip counts of all sources together.
    `split_inherited`: see `load_pairs`."""
    pairs, skipped = [], Counter()
    for source in _as_list(sources):
        loaded = load_pairs(source, split, setting=f"data.{name}", split_inherited=split_inherited, config=config)
        pairs += loaded.pairs
        skipped.update(loaded.skipped)
        split_read = f", split {loaded.split!r}" if loaded.split else ""  # "(train)" is the role, not the split
        console.print(escape(f"data: {loaded.rows_read} rows read from {source}{split_read} ({name}), "
                             f"{len(loaded.pairs)} kept, skipped: {_describe_counts(loaded.skipped)}"))
    return pairs, skipped


def prepare_data(config: Config, tokenizer, console: Console):
    """Load, split and tokenize; print what was kept, skipped and truncated, and why. Returns
    the tokenized train and eval pairs, and the pairs data.eval_fraction held out (else [])."""
    data = config.data
    train_pairs, train_skipped = _load_sources(data.train, data.split, "train", console, config=data.config)
    rows_read = len(train_pairs) + sum(train_skipped.values())
    # Said, not fixed: duplicates weigh a pair 2x or more, which the user may want or not.
    if repeats := repeated_rows_warning(train_pairs):
        console.print(f"[yellow]{escape(repeats)}[/yellow]")
    eval_pairs, held_out = [], []
    if data.eval:
        # data.split (train_prefs, say) is for data.eval too when it has splits; an eval file has none.
        eval_pairs, _ = _load_sources(data.eval, data.eval_split or data.split, "eval", console,
                                      split_inherited=data.eval_split is None, config=data.eval_config)
        # A held-out split's overlap is said below (shared_prompts), for prompts and so rows too.
        if overlap := eval_overlap_warning(train_pairs, eval_pairs):
            console.print(f"[yellow]{escape(overlap)}[/yellow]")
    elif data.eval_fraction > 0:
        train_pairs, held_out = hold_out(train_pairs, data.eval_fraction, config.train.seed,
                                         data.eval_fraction_by)
        eval_pairs = held_out
        if shared := shared_prompts(train_pairs, held_out):
            console.print(f"[yellow]data: {shared} of the {len(held_out)} held-out pairs have a prompt that "
                          "training pairs have too (repeated rows, or several pairs per prompt), so their "
                          "eval/ numbers are optimistic; hold out whole prompts with "
                          "data.eval_fraction_by: prompt (or give a data.eval file) for an unbiased "
                          "evaluation.[/yellow]")
    train_tok, train_counts = tokenize_pairs(train_pairs, tokenizer, data)
    eval_tok, eval_counts = tokenize_pairs(eval_pairs, tokenizer, data)
    console.print(f"data: {len(train_tok)} train pairs, {len(eval_tok)} eval pairs; "
                  f"tokenization: train {_describe_counts(train_counts)}; eval {_describe_counts(eval_counts)}")
    if not train_tok:
        raise UserError(_no_pairs_left(rows_read, train_skipped, len(held_out), train_counts, data))
    if eval_pairs and not eval_tok:
        console.print(f"[yellow]data: none of the {len(eval_pairs)} eval pairs is left after tokenization "
                      f"({_describe_counts(eval_counts)}), so no evaluation will run; check data.max_length "
                      f"(now {data.max_length}).[/yellow]")
    if config.train.eval_every and not eval_pairs:
        console.print(f"[yellow]data: train.eval_every is {config.train.eval_every}, but no eval pairs are "
                      "given (data.eval or data.eval_fraction), so no evaluation will run.[/yellow]")
    return train_tok, eval_tok, held_out


def _no_pairs_left(rows_read: int, skipped: Counter, held_out: int, token_counts: Counter, data) -> str:
    """Why no training pair is left, from the counts printed before, and which setting to change."""
    # "truncated" pairs are kept; every other tokenization outcome drops the pair.
    dropped = Counter({why: n for why, n in token_counts.items() if why != "truncated"})
    causes, advice = [], []
    if skipped:
        causes.append(f"{sum(skipped.values())} skipped when read ({_describe_counts(skipped)})")
        advice.append("fix the skipped rows in the data")
    if held_out:
        causes.append(f"{held_out} held out for evaluation by data.eval_fraction")
        advice.append("lower data.eval_fraction")
    if dropped:
        causes.append(f"{sum(dropped.values())} dropped by tokenization ({_describe_counts(dropped)})")
        if "prompt longer than data.max_length" in dropped:
            advice.append(f"raise data.max_length (now {data.max_length}) above the prompts' token length")
        if set(dropped) - {"prompt longer than data.max_length"}:
            advice.append("check the dropped rows with `preftune data inspect`")
    return (f"no training pairs are left of the {rows_read} rows read: {', '.join(causes)}; "
            f"{' or '.join(advice)}.")


# ------------------------------------------------------------------------------ one step


def train_step(policy_logps, reference_logps, step_pairs: list[TokenizedPair], ctx,
               reward_shift: float = 0.0) -> tuple[dict, bool]:
    """Forward and backward over one optimizer step's pairs; returns metrics and whether the
    gradients are finite. The optimizer itself is stepped by the caller. `reward_shift` is
    bco_pair's delta for this step (TrainState.reward_shift)."""
    config, device = ctx.config, ctx.device
    metrics = StepMetrics.for_config(config, device)
    local = micro_batches([p.index for p in step_pairs], ctx.rank, ctx.world_size, config.train.batch_size)
    by_index = {p.index: p for p in step_pairs}
    pairs_this_rank = sum(len(m) for m in local)
    for i, micro in enumerate(local):
        batch = ctx.collate([by_index[j] for j in micro]).to(device)
        sync = ctx.no_sync() if i < len(local) - 1 else contextlib.nullcontext()
        if config.model.compile and config.model.compile_mode == "reduce-overhead":
            # The last micro-batch's graph outputs are spent: its CUDA graphs may replay over them.
            torch.compiler.cudagraph_mark_step_begin()
        with sync:
            with ctx.autocast():
                logps = pair_logps(policy_logps, reference_logps, batch)
            losses = preference_loss(logps, config.loss, reward_shift)  # (B,)
            # Dividing by the step's pairs (not the micro-batch's) makes k micro-batches of n
            # pairs give exactly the gradient of one batch of k * n pairs.
            (losses.sum() / pairs_this_rank).backward()
        metrics.add(losses, logps, config.loss.beta)
        metrics.add_tokens(batch.num_tokens)
    max_norm = config.optim.max_grad_norm or math.inf
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(ctx.trainable, max_norm))
    # The step's one wait for the device; "_tokens" comes summed over ranks with the metrics.
    result = metrics.reduce(extra={"grad_norm": grad_norm})
    finite = math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])
    return result, finite


# ------------------------------------------------------------------------------ the run


class RunContext:
    """What every step needs: config, device, process group, and the model's bookkeeping."""

    def __init__(self, config: Config, device, dist, trainable, pad_token_id: int, wrapped):
        self.config, self.device, self.dist = config, device, dist
        self.rank, self.world_size = dist.rank, dist.world_size
        self.trainable = trainable
        self.collate = partial(collate_pairs, pad_token_id=pad_token_id)  # or pack_pairs: see train()
        self.wrapped = wrapped
        self.autocast = autocast_context(config.model.autocast, device)

    def no_sync(self):
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()

    def all_reduce_sum(self, value: float) -> float:
        return self.dist.all_reduce_sum(value)


class StopRequest:
    """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: Config | dict | str | Path, resume: str | bool | None = None,
          overwrite: bool = False) -> Path:
    """Run DPO training as configured; returns the folder of the final policy.

    `config` is a `Config`, a dict of sections, or the path of a YAML file. `resume`: True for
    the newest good checkpoint in train.output_dir, or a checkpoint folder. An output_dir that
    already holds a run is refused unless the run resumes it, or `overwrite` is True: then the
    earlier run's files are deleted before the first step (its reference log-prob cache is kept).
    """
    held_before = set(_held_locks)
    try:
        return _train(config, resume, overwrite)
    finally:  # however the run ended, its folder is free again, to this process or another
        for folder in set(_held_locks) - held_before:
            _held_locks.pop(folder).close()  # closing the file drops its lock


def _train(config: Config | dict | str | Path, resume: str | bool | None, overwrite: bool) -> Path:
    from preftune.config import load_config, validate_config
    from preftune.dist_checkpoint import check_resume_settings
    from preftune.distributed import setup_distributed, shard_reference, start_notes, wrap_policy

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = validate_config(config)

    dist = setup_distributed(config)
    if dist.world_size > 1 and (wide := sorted(BATCH_WIDE & set(config.loss.types))):
        # Each process would sort its own share of a step (the config refuses accumulation alike).
        raise UserError(f"loss.type {' and '.join(wide)} sorts margins across one micro-batch, and each of the "
                        f"{dist.world_size} processes would sort its own; run it in one process, with "
                        f"train.batch_size: {config.train.batch_size * dist.world_size}.")
    # Lines unwrapped: a log file keeps each message (and a path or command in it) whole.
    console = Console(quiet=not dist.is_main, soft_wrap=True)
    output_dir = Path(config.train.output_dir)
    # Every rank, so that all stop together; a missing package surfaces now, not after the
    # model, the data and the reference's log-probs are ready.
    check_backends(config.train.loggers, logs=dist.is_main)
    if config.model.lora is not None:  # likewise a missing peft
        from preftune.lora import peft_module

        peft_module()
    # Checked before the model loads, so a refusal costs nothing; deleted only once everything
    # else has been checked, so a bad config or data set never costs the earlier run.
    start_over = _check_output_dir(output_dir, resume, overwrite, dist)
    if start_over:
        _check_overwrite_spares_inputs(config, output_dir)
    # Before the model, the data and the reference's log-probs: --resume in a folder with no
    # checkpoint (a typo in train.output_dir) is said in seconds, not once they are ready.
    checkpoint = resolve_resume(resume, output_dir)
    if dist.is_main and output_dir.is_dir():  # else once it is made, before anything is written
        _lock_run_folder(output_dir)
    if checkpoint is not None:  # a changed loss or optimizer setting is said now too, not once the model loads
        check_resume_settings(checkpoint, config, dist)
    device = dist.device or pick_device(config.train.device)
    seed_everything(config.train.seed)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    if config.model.dtype == "float16":
        # Not mixed precision: the weights and AdamW's moments themselves in float16, with no
        # loss scaling. Updates under ~6e-8 vanish and activations overflow past 65,504.
        console.print("[yellow]model.dtype float16 trains the float16 weights themselves, without loss "
                      "scaling: small updates vanish and large activations overflow. Prefer model.dtype: "
                      "bfloat16, or float32 with model.autocast: bfloat16.[/yellow]")
    for note in start_notes(config, dist, device):
        console.print(f"[yellow]{escape(note)}[/yellow]")
    tokenizer = load_tokenizer(config.model.path, config.model.trust_remote_code)
    policy = load_causal_lm(config.model.path, config.model.dtype, config.model.attn_implementation,
                            config.model.trust_remote_code, merge_adapter=True).to(device)
    if (base := adapter_base(config.model.path)) is not None:
        console.print(escape(f"model: {config.model.path} is a PEFT adapter on {base}; training starts from "
                             "the two merged (the reference too, unless model.reference_path is set)"))
    if config.model.disable_dropout:
        disable_dropout(policy)
    if config.model.lora is not None:  # after disable_dropout: lora.dropout is the user's choice
        from preftune.lora import apply_lora

        policy = apply_lora(policy, config.model.lora)  # base frozen; the reference is the base
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    policy.config.use_cache = False
    train_pairs, eval_pairs, held_out = prepare_data(config, tokenizer, console)
    # Before the reference's log-probs: a pair longer than the model's positions stopped the first
    # forward with an IndexError (learned positions, GPT-2), or trained past the lengths a rotary
    # model knows. A packed row restarts positions at each sequence: a pair's own length counts.
    check_pairs_fit(train_pairs + eval_pairs, "data.train", ((policy, "model.path", config.model.path),),
                    advice=MAX_LENGTH_ADVICE)
    autocast = autocast_context(config.model.autocast, device)
    reference_logps = build_reference(config, policy, autocast, train_pairs, eval_pairs, tokenizer.pad_token_id,
                                      device, console, dist.is_main)
    # A reference that model.reference_sync moves stays in the policy's dtype: held in bf16, each
    # soft update would be rounded into it, drifting from alpha * policy + (1 - alpha) * reference.
    if dist.strategy != "fsdp" and config.model.reference_sync is None:
        reference_logps = compact_reference(reference_logps, config)
    # Under fsdp a frozen reference is sharded like the policy, never whole on every rank.
    reference_logps = shard_reference(reference_logps, config, dist)
    # Precomputed log-probs are looked up by pair index, one table per split.
    eval_reference_logps = getattr(reference_logps, "eval_reference", None) or reference_logps
    # TR-DPO: the reference model that model.reference_sync moves toward the policy.
    synced = live_reference_model(reference_logps) if config.model.reference_sync else None
    if synced is not None:
        check_sync_compatible(policy, synced)

    step_size = config.train.batch_size * config.train.grad_accum * dist.world_size
    lengths = [p.length for p in train_pairs]
    steps_per_epoch = len(train_pairs) // step_size
    if steps_per_epoch == 0:
        # Only a factor above 1 can be lowered: "lower train.batch_size" at batch_size 1 left no way out.
        factors = [name for name, value in (("train.batch_size", config.train.batch_size),
                                            ("train.grad_accum", config.train.grad_accum),
                                            ("the number of processes", dist.world_size)) if value > 1]
        raise UserError(f"{len(train_pairs)} training pair{'s are' if len(train_pairs) != 1 else ' is'} "
                        f"fewer than one optimizer step "
                        f"({step_size} = batch_size x grad_accum x processes); lower {' or '.join(factors)}.")
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    if len(train_pairs) % step_size:
        console.print(f"data: {len(train_pairs) % step_size} of the {len(train_pairs)} training pairs sit out "
                      f"each epoch (too few for another step of {step_size}); drawn anew each epoch")

    # Its start-up checks run the whole model: once FSDP has sharded it, a forward outside the
    # sharded root fails, and packing would be refused as if the model mixed packed rows.
    collate = choose_collate(config, policy, tokenizer.pad_token_id, device, console,
                             sharded=dist.strategy == "fsdp")
    policy_logps, wrapped = wrap_policy(policy, config, dist)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameter_groups(policy, config.optim.weight_decay), config.optim, device)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    ctx = RunContext(config, device, dist, trainable, tokenizer.pad_token_id, wrapped)
    ctx.collate = collate
    if dist.strategy != "fsdp":  # LoRA's frozen base; after choose_collate's checks, run in float32
        compacted = compact_frozen_linears(policy, config)
        if compacted:
            console.print(f"model: {compacted} frozen linear layers held in bf16 (exact under autocast)")

    state = TrainState()
    if checkpoint is not None:
        state = _restore(checkpoint, policy, optimizer, scheduler, config, dist, synced)
        if state.step > total_steps:  # it would train nothing, yet rewrite final/ and config.yaml
            raise UserError(f"checkpoint {checkpoint} is at step {state.step}, past this run's {total_steps} steps "
                            "(train.max_steps, train.epochs); raise them to extend the run, or pass --resume-from "
                            "an earlier checkpoint.")
        console.print(f"resumed from {checkpoint} at step {state.step}")
        if state.total_steps and state.total_steps != total_steps:
            schedule = (f"; the {config.optim.scheduler} schedule's remaining learning rates follow "
                        "the new length" if config.optim.scheduler != "constant" else "")
            console.print(f"resume: the run is now {total_steps} steps long, not {state.total_steps} "
                          f"(train.epochs or max_steps changed){schedule}")
            follow_schedule(scheduler)
    data = data_fingerprint(train_pairs)
    if state.data and state.data != data:
        raise UserError(f"checkpoint {checkpoint} was written for other training data ({state.data.split()[0]} "
                        f"pairs, now {data.split()[0]}, or the same number with other tokens); its data "
                        "position means nothing on these, so restore the data the run started with or "
                        "start a new run in another train.output_dir.")
    models = models_fingerprint([config.model.path, config.model.reference_path])
    if state.model and state.model != models:
        raise UserError(f"checkpoint {checkpoint} was written for another starting model: the weight files under "
                        f"model.path {config.model.path}{' or model.reference_path' if config.model.reference_path else ''} "
                        "differ from those the run started from, and the reference built from them would change "
                        "mid-run; point it back to the model the run started with, or start a new run in another "
                        "train.output_dir.")
    # models_fingerprint reads an adapter folder's own files, yet the adapter is merged onto its
    # base again at a resume: another model under the base's path would change the run unseen.
    named = adapter_bases([config.model.path, config.model.reference_path])
    bases = {base: models_fingerprint([base]) for base in named}
    changed = [base for base, fingerprint in state.bases.items() if bases.get(base, fingerprint) != fingerprint]
    if changed:
        adapter_config = Path(os.path.expanduser(named[changed[0]])) / ADAPTER_CONFIG
        raise UserError(f"checkpoint {checkpoint} was written for another base model: the weight files under "
                        f"{changed[0]}, the base model {adapter_config} names, differ from those the run started "
                        "from, and the model built on them would change mid-run; put back the base model the run "
                        "started with, or start a new run in another train.output_dir.")
    if checkpoint is not None and held_out:  # the fingerprint above covers the training pairs only
        check_heldout(output_dir, held_out, dist)
    state.total_steps, state.data, state.model, state.bases = total_steps, data, models, bases
    if start_over:
        _start_over(output_dir, console, dist)
    if dist.is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"train.output_dir {output_dir}: the folder cannot be made ({e.strerror}); "
                            "choose another train.output_dir.") from None
        if os.path.realpath(output_dir) not in _held_locks:  # a folder new to this run
            _lock_run_folder(output_dir)
        dump_config(with_absolute_paths(config), output_dir / "config.yaml")
        if held_out:
            console.print(escape(write_heldout(output_dir, held_out, config.data.eval_fraction_by)))
        elif checkpoint is None and (removed := remove_stale_heldout(output_dir, _data_sources(config))):
            console.print(escape(removed))

    def save(step_state: TrainState) -> Path:
        # The reference only once a sync has moved it: before, the run's start rebuilds it.
        reference = synced if has_synced(step_state.step, config.model.reference_sync) else None
        return _save(output_dir, step_state, policy, tokenizer, optimizer, scheduler, config, dist, reference)

    def run_eval(step: int) -> None:
        if eval_pairs:
            with autocast():
                results = evaluate_pairs(policy_logps, eval_reference_logps, eval_pairs, config, device,
                                         tokenizer.pad_token_id, rank=dist.rank, world_size=dist.world_size,
                                         reward_shift=state.reward_shift)
            logger.log({f"eval/{k}": v for k, v in results.items()}, step=step)
            console.print(f"eval at step {step}: loss {results['loss']:.4f}, "
                          f"accuracy {results['rewards/accuracies']:.3f}")

    from preftune.loggers import MetricsLogger

    # Resumed at its last step (killed while writing final/), the run evaluates there again.
    redo_final_eval = checkpoint is not None and state.step >= total_steps and \
        (not config.train.eval_every or state.step % config.train.eval_every)
    logger = MetricsLogger(output_dir, config.train.loggers, run_name=output_dir.name,
                           config_dict=config.model_dump(mode="json"), enabled=dist.is_main,
                           start_step=state.step, redo_eval_at_start=bool(redo_final_eval))
    progress = TrainProgress(total_steps, state.step, enabled=dist.is_main and config.train.progress)
    with StopRequest() as stop, logger, progress:
        while state.step < total_steps:
            steps = epoch_order(lengths, step_size, config.train.seed, state.epoch, config.data.group_by_length)
            for step_indices in steps[state.step_in_epoch:]:
                started = time.perf_counter()
                policy.train()
                step_pairs = [train_pairs[i] for i in step_indices]
                metrics, finite = train_step(policy_logps, reference_logps, step_pairs, ctx, state.reward_shift)
                # The rate this step's update uses (as the HF Trainer logs it), read before the
                # schedule moves on to the next step's.
                learning_rate = scheduler.get_last_lr()[0]
                stop_error = None
                if finite:
                    optimizer.step()
                    scheduler.step()
                else:
                    state.bad_steps += 1
                    stop_error = _report_bad_step(console, state, metrics, step_indices, train_pairs, config,
                                                  save, ctx)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                _carry_state(state, metrics, finite, len(step_indices), policy, synced, config)
                elapsed = time.perf_counter() - started
                tokens = metrics.pop("_tokens")
                state.num_tokens += round(tokens)
                metrics.update(epoch=state.epoch + state.step_in_epoch / steps_per_epoch,
                               learning_rate=learning_rate,
                               tokens_per_second=tokens / elapsed, num_tokens=state.num_tokens)
                logger.log(metrics, step=state.step)
                progress.update(state.step, metrics)
                if stop_error is not None:  # raised once logged: the step that stops the run is shown too
                    raise stop_error
                if config.train.eval_every and state.step % config.train.eval_every == 0:
                    run_eval(state.step)
                # A signal can reach the ranks during different steps; they must all stop after
                # the same one, since the checkpoint they then write together is a collective.
                stopping = ctx.all_reduce_sum(float(stop.requested)) > 0
                if (config.train.save_every and state.step % config.train.save_every == 0) or stopping:
                    saved = save(state)
                if stopping:
                    resume_with = resume_command(output_dir / "config.yaml", dist.world_size)
                    console.print(escape(f"stopped by signal after step {state.step}; checkpoint {saved}. "
                                         f"Resume with: {resume_with}"), soft_wrap=True)  # a command to copy whole
                    dist.shutdown()
                    return saved
                if state.step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
        if not config.train.eval_every or state.step % config.train.eval_every:
            run_eval(state.step)
    final = _save_final(output_dir, policy, tokenizer, config, dist)
    for line in logger.where():  # the run's summary: where its numbers, report and model are
        console.print(escape(line))
    if dist.is_main and config.train.report:
        from preftune.report import write_report

        console.print(f"report: {write_report(output_dir)}")
    console.print(f"final policy: {final}")
    if dist.is_main and config.model.lora is not None:
        from preftune.lora import local_base_note

        if note := local_base_note(final, output_dir):
            console.print(escape(note), soft_wrap=True)  # a command to copy whole
    dist.shutdown()
    return final


# ------------------------------------------------------------------------------ helpers


def _check_output_dir(output_dir: Path, resume, overwrite: bool, dist) -> bool:
    """Refuse to start a fresh run in a folder that holds one (their metrics, checkpoints and
    final policy would mix); True when `overwrite` is to delete the earlier run. Rank 0 looks
    and every rank follows its answer, so all of them raise, or go on, together."""
    if resume and overwrite:
        raise UserError(f"--resume continues the run in {output_dir} and --overwrite deletes it; "
                        "pass one of them, not both.")
    if output_dir.exists() and not output_dir.is_dir():  # said now, before the model and data load
        raise UserError(f"train.output_dir {output_dir} is a file, not a folder; choose another train.output_dir.")
    if resume is True or resume == "latest":
        return False
    found = earlier_run_entries(output_dir)
    held = dist.all_reduce_sum(float(bool(found)) if dist.is_main else 0.0)
    shown = ", ".join(found) if found else "an earlier run's files"
    if resume:  # --resume-from FOLDER: resumed in its own run, or branched into a folder of its own
        folder = Path(resume)
        inside = os.path.relpath(os.path.realpath(folder), os.path.realpath(output_dir))
        if held and (inside == ".." or inside.startswith(".." + os.sep)):
            owner = folder.parent.parent if folder.parent.name == "checkpoints" else None
            of = f"a checkpoint of {owner}" if owner else f"outside {output_dir}"
            raise UserError(f"--resume-from {folder} is {of}, and train.output_dir {output_dir} holds another "
                            f"run ({shown}); continue it in {f'{owner} or in ' if owner else ''}an empty "
                            "train.output_dir.")
        return False  # one inside output_dir is this run's, or resolve_resume says what it is not
    if not held:
        return False
    if overwrite:
        return True
    raise UserError(f"train.output_dir {output_dir} already holds a run ({shown}); resume it with "
                    "--resume, choose another train.output_dir, or pass --overwrite to delete it "
                    "and start over.")


def _check_overwrite_spares_inputs(config: Config, output_dir: Path) -> None:
    """--overwrite deletes the earlier run's entries (RUN_ENTRIES); refuse it when the model or
    data this run reads lies in one of them, as when a second round trains from the first's
    final/ or merged/ into the same folder: loaded first, then deleted, it would be lost."""
    reads = [("model.path", config.model.path), ("model.reference_path", config.model.reference_path)]
    reads += [(f"data.{name}", source) for name in ("train", "eval")
              for source in _as_list(getattr(config.data, name))]
    for setting, path in reads:
        if not path or not os.path.exists(path):  # a hub id, or nothing
            continue
        # Named through a link or not, it is lost if either way of writing it leads into an entry.
        for inside, folder in ((os.path.abspath(path), os.path.abspath(output_dir)),
                               (os.path.realpath(path), os.path.realpath(output_dir))):
            relative = Path(os.path.relpath(inside, folder)).parts
            if relative and relative[0] != ".." and any(fnmatch(relative[0], p) for p in RUN_ENTRIES):
                raise UserError(f"--overwrite would delete {output_dir / relative[0]}, and {setting} {path} "
                                f"is in it; copy it out of {output_dir} first, or choose another "
                                "train.output_dir.")


# Held (flock) by the process that trains in a run folder; rank 0 of a distributed run.
LOCK_FILE = ".preftune-train.lock"
_held_locks: dict[str, object] = {}  # run folder (real path) -> its open lock file


def _lock_run_folder(output_dir: Path) -> None:
    """Hold train.output_dir until this run ends: a second `preftune train` there (a script run
    twice, an --overwrite or --resume in another terminal) would delete or mix with its files.
    The operating system drops the lock with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # no flock on this system: unguarded, as before
        return
    try:
        handle = open(output_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held past this call)
    except PermissionError:  # the first file a run writes: a folder of another account's, say
        raise UserError(f"train.output_dir {output_dir} cannot be written by this user; make it writable "
                        "(chmod u+w) or choose another train.output_dir.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"train.output_dir {output_dir} is in use by another preftune train (process {holder}); "
                        "wait for it to end, or choose another train.output_dir.") from None
    except OSError:  # a file system without locks (some network mounts): unguarded, as before
        handle.close()
        return
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    _held_locks[os.path.realpath(output_dir)] = handle


def _start_over(output_dir: Path, console, dist) -> None:
    """--overwrite: rank 0 deletes the earlier run, the others wait until it is gone."""
    if dist.is_main:
        removed, left = remove_earlier_run(output_dir)
        # Rewritten, or deleted when this run holds nothing out, once the run is set up.
        left = [name for name in left if name not in ("config.yaml", HELDOUT_FILE, LOCK_FILE)]
        kept = f"; kept: {', '.join(left)}" if left else ""
        console.print(escape(f"overwrite: deleted the earlier run's {', '.join(removed)} "
                             f"in {output_dir}{kept}"))
    dist.barrier()


def _as_list(sources: str | list[str] | None) -> list[str]:
    """data.train or data.eval as a list: one source, several, or none."""
    return [sources] if isinstance(sources, str) else list(sources or [])


def _data_sources(config: Config) -> list[str]:
    """Every data.train and data.eval source, local file or not."""
    return _as_list(config.data.train) + _as_list(config.data.eval)


def _report_bad_step(console, state, metrics, step_indices, train_pairs, config, save,
                     ctx) -> UserError | None:
    """Print the skipped step and its pairs. Past train.max_bad_steps, save the checkpoint before
    it and return the error that stops the run, for the caller to raise once the step is logged."""
    # A row is named by its pair_id, else by where it was read ("file.jsonl, line 12").
    ids = [train_pairs[i].pair_id or train_pairs[i].origin or f"pair {train_pairs[i].index}"
           for i in step_indices]
    shown = ", ".join(map(str, ids[:16])) + (f" and {len(ids) - 16} more" if len(ids) > 16 else "")
    console.print(f"[yellow]step {state.step + 1}: non-finite loss or gradient "
                  f"(loss {metrics['loss']}, grad_norm {metrics['grad_norm']}); skipped. "
                  f"Pairs: {escape(shown)}[/yellow]")
    if state.bad_steps <= config.train.max_bad_steps:
        return None
    if not _count_nonfinite(ctx.trainable, ctx.dist):
        # The state before this step, which a resume retries: its count leaves this step out.
        where = f"stopped with checkpoint {save(replace(state, bad_steps=state.bad_steps - 1))}"
    else:  # saving would only preserve the damage; point at the last checkpoint before it
        last = latest_good_checkpoint(Path(config.train.output_dir))
        where = (f"the weights themselves are non-finite, so no checkpoint was written; the last "
                 f"good one is {last or 'none'}")
    return UserError(f"{state.bad_steps} steps had a non-finite loss or gradient "
                     f"(train.max_bad_steps is {config.train.max_bad_steps}); {where}. "
                     "Check the data and dtype, or lower optim.lr and start a new run (another "
                     "train.output_dir): a resumed run keeps the optimizer settings it was started with.")


def _count_nonfinite(params, dist) -> float:
    """Parameters holding a NaN or inf, summed over ranks so that every rank takes the same
    branch (what follows is a collective save); under fsdp each rank checks its own shards."""
    local = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                for p in params)
    return dist.all_reduce_sum(local)


def _carry_state(state: TrainState, metrics: dict, finite: bool, step_pairs: int, policy, synced,
                 config) -> None:
    """After optimizer step `state.step`: BCO's running mean takes in the step's rewards (a skipped,
    non-finite step's are left out), and every `reference_sync.every` steps TR-DPO moves the
    reference. Both from numbers every rank holds alike (all-reduced metrics, the policy's
    weights), so the state stays the same on every rank."""
    if "bco_pair" in config.loss.types and config.loss.bco_reward_shift == "running_mean":
        metrics["bco/reward_shift"] = state.reward_shift  # the delta this step's loss used
        step_mean = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2  # (r_w + r_l) / 2
        if finite and math.isfinite(step_mean):
            state.reward_shift, state.rewards_seen = next_reward_shift(
                state.reward_shift, state.rewards_seen, step_mean, 2 * step_pairs)
    sync = config.model.reference_sync
    if sync is not None and state.step % sync.every == 0:
        sync_reference(policy, synced, sync.alpha)


def _save(output_dir, state, policy, tokenizer, optimizer, scheduler, config, dist, reference=None) -> Path:
    from preftune.dist_checkpoint import save_training_checkpoint

    folder = output_dir / "checkpoints" / f"step-{state.step:06d}"
    # A checkpoint of NaN/inf weights would be resumed from and poison every later step.
    if _count_nonfinite(policy.parameters(), dist):
        last = latest_good_checkpoint(output_dir)
        raise UserError(f"the weights became non-finite by step {state.step} (an overflow: lower "
                        f"optim.lr, or train in float32/bfloat16 rather than float16); nothing was "
                        f"saved; the last good checkpoint is {last or 'none'}.")
    # Weights and optimizer state are added in the layout of the strategy (sharded under fsdp);
    # every rank takes part, rank 0 writes the manifest.
    training_state = {"state": asdict(state), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    save_training_checkpoint(folder, state.step, policy, tokenizer, optimizer, training_state, config, dist,
                             reference)
    if dist.is_main:
        prune_checkpoints(output_dir, config.train.keep_checkpoints, state.step)
    dist.barrier()
    return folder


def _restore(folder: Path, policy, optimizer, scheduler, config, dist, reference=None) -> TrainState:
    from preftune.dist_checkpoint import restore_training_checkpoint

    saved = restore_training_checkpoint(folder, policy, optimizer, config, dist, reference)
    load_scheduler_state(scheduler, saved["scheduler"])
    set_rng_state(saved["rng"])
    return TrainState(**saved["state"])


def _save_final(output_dir: Path, policy, tokenizer, config, dist) -> Path:
    from preftune.checkpoint import write_folder_atomically
    from preftune.dist_checkpoint import full_state_dict, write_weights
    from preftune.model_card import write_model_card

    final = output_dir / "final"
    full = full_state_dict(policy, dist)  # every rank: under fsdp the weights are gathered
    if dist.is_main:
        def fill(tmp: Path) -> None:
            write_weights(policy, tmp, full)
            if config.model.lora is not None:
                from preftune.lora import name_cached_base_by_hub_id

                name_cached_base_by_hub_id(tmp)
            tokenizer.save_pretrained(tmp)
            write_model_card(tmp, output_dir, config.model_dump(mode="json"),
                             adapter=config.model.lora is not None, world_size=dist.world_size)

        # Never a half-written final/ that from_pretrained would load or fail on.
        write_folder_atomically(final, fill, "the final policy")
    dist.barrier()
    return final


__all__ = ["train", "train_step", "prepare_data", "TrainState"]


class _CallableModule(types.ModuleType):
    """`preftune.train(config)` reads as the issue and the README write it, while
    `from preftune.train import train_step` keeps working: the module calls its `train`."""

    def __call__(self, config, resume=None, overwrite=False):
        return train(config, resume, overwrite)


sys.modules[__name__].__class__ = _CallableModule
