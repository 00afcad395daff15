"""Process groups and model wrapping: one process, or torchrun's N processes with DDP or FSDP2.

`setup_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
process group: nccl on CUDA, gloo on CPU. `wrap_policy` wraps the module that computes the
policy's completion log-probs (LM head included, so the wrapper sees the whole forward):
- ddp: every process holds the whole model; gradients are averaged after each backward;
- fsdp: FSDP2 (`fully_shard`) on each decoder layer and on the root, so each process keeps
  1/N of the weights, gradients and optimizer state, and gathers one layer at a time.
`shard_reference` gives the frozen reference the same layout, so it is never whole on a GPU.
Checkpoints of distributed runs live in `preftune.dist_checkpoint`; failures that should print
once rather than once per rank go through `rank_errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn

from preftune.errors import UserError
from preftune.logprobs import CompletionLogps, unwrap_causal_lm
from preftune.token_stats import wanted_stats


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    strategy: str = "none"  # none | ddp | fsdp, after resolving "auto"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists: collectives must be called by every rank."""
        return torch_dist.is_available() and torch_dist.is_initialized()

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_reduce_sum(self, value: float) -> float:
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.item()

    def shutdown(self) -> None:
        if self.active:
            torch_dist.destroy_process_group()


def resolve_strategy(requested: str, world_size: int, nproc_option: bool = False) -> str:
    """The strategy to run: "auto" is ddp under torchrun and none alone; fsdp also runs alone
    (useful with CPU offload, and to resume a sharded checkpoint on one device).
    `nproc_option`: the processes are asked for by `preftune train --nproc`, not yet started."""
    if requested == "none" and world_size > 1:
        if nproc_option:  # the user typed no torchrun to run without
            raise UserError(f"train.distributed is 'none' but --nproc {world_size} asks for {world_size} "
                            "processes; set train.distributed to auto, ddp or fsdp, or leave --nproc out.")
        # accelerate launch starts its workers as torchrun does; every one of its launches sets this.
        launcher = "`accelerate launch`" if "ACCELERATE_MIXED_PRECISION" in os.environ else "torchrun"
        raise UserError(f"train.distributed is 'none' but {launcher} started {world_size} processes; "
                        f"set train.distributed to ddp or fsdp, or run without {launcher}.")
    if requested == "fsdp":
        return "fsdp"
    return "ddp" if world_size > 1 else "none"


def _process_device(config, local_rank: int) -> torch.device:
    name = config.train.device
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    from preftune.modeling import pick_device

    device = pick_device(name)  # checked to exist on this machine
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process, by local rank
    elif device.type == "cuda" and (here := int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) > 1:
        # Every process of this machine would take that one GPU, which nccl refuses at the first
        # collective ("Duplicate GPU detected"), after the model and data have loaded.
        raise UserError(f"train.device is {name!r}, but {here} processes of this run share this machine and "
                        "each needs a GPU of its own: set train.device to cuda or auto, which give each "
                        "process the GPU of its local rank (CUDA_VISIBLE_DEVICES picks which GPUs).")
    return device


def setup_distributed(config) -> DistContext:
    """Join torchrun's process group (or make a one-process group for fsdp alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = resolve_strategy(config.train.distributed, world_size)
    if strategy == "none":
        return DistContext()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _process_device(config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        # Naming the device binds nccl's communicator to it (and silences torch's guess).
        device_id = device if device.type == "cuda" else None
        timeout = timedelta(seconds=config.train.ddp_timeout)
        if world_size == 1:  # fsdp on one device: an in-memory store, no rendezvous needed
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1,
                                          device_id=device_id, timeout=timeout)
        else:
            torch_dist.init_process_group(backend, device_id=device_id, timeout=timeout)
    return DistContext(rank, world_size, local_rank, device, strategy)


# ------------------------------------------------------------------------------ wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers names their class in
    `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...)."""
    names = set(getattr(unwrap_causal_lm(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"train.distributed fsdp: found no decoder layers in {type(model).__name__} "
                        "(its _no_split_modules is empty); use train.distributed: ddp.")
    return layers


def _fsdp_options(config, dist: DistContext) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options = {"mesh": init_device_mesh(dist.device.type, (dist.world_size,))}
    if config.model.autocast == "bfloat16":
        # bf16 weights in the forward and backward, gradients reduced and kept in float32.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.train.fsdp_cpu_offload:
        if dist.device.type != "cuda":
            raise UserError("train.fsdp_cpu_offload moves weights from GPU to host memory; "
                            "on CPU they are there already: set it to false.")
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    return options


def _shard(module: CompletionLogps, config, dist: DistContext) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    options = _fsdp_options(config, dist)
    for layer in decoder_layers(module.model):
        fully_shard(layer, **options)
    # The root holds what no layer owns: embeddings, final norm, LM head (tied or not).
    fully_shard(module, **options)
    return module


def wrap_policy(policy, config, dist: DistContext):
    """(module computing policy log-probs, the wrapper that owns gradient sync)."""
    module = CompletionLogps(policy, config.train.logprob_chunk_size, config.loss.ld_alpha, wanted_stats(config))
    if dist.strategy == "fsdp":
        module = _shard(module, config, dist)
    elif dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # Buffers (rotary tables) are constants; broadcasting them in every forward would also
        # tie evaluation forwards to lock-step across ranks.
        module = DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    if config.model.compile:
        module = torch.compile(module, mode=config.model.compile_mode)
    return module, module


def start_notes(config, dist: DistContext, device: torch.device) -> list[str]:
    """What the config asks for that this launch or device cannot give, said once at start-up
    instead of dropped without a word."""
    notes = []
    mode = config.model.compile_mode
    if config.model.compile and mode in ("reduce-overhead", "max-autotune") and device.type != "cuda":
        # torch skips CUDA graphs off CUDA; the rest of the mode still applies.
        instead = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        notes.append(f"model.compile_mode {mode!r} records CUDA graphs, which need a CUDA device; on "
                     f"{device.type} the run compiles as in mode {instead!r}.")
    if config.train.distributed in ("ddp", "fsdp") and dist.world_size == 1:
        runs_as = "without DDP" if config.train.distributed == "ddp" else "FSDP2 over one rank"
        notes.append(f"train.distributed is {config.train.distributed!r}, but this run is one process "
                     f"({runs_as}); start several with `preftune train CONFIG --nproc N` on one node, "
                     "or with torchrun (docs/DISTRIBUTED.md).")
    notes += accelerate_notes(config, dist)
    return notes


def accelerate_notes(config, dist: DistContext) -> list[str]:
    """`accelerate launch` starts workers with torchrun's environment, so preftune runs under it
    as under torchrun; but accelerate's own settings (its flags, `accelerate config`) reach the
    workers only as ACCELERATE_* variables, which preftune does not read. Say which were asked
    for and what to set instead, rather than train without them and without a word."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" not in env:  # every `accelerate launch` sets it
        return []
    ignored = []
    precision = env["ACCELERATE_MIXED_PRECISION"].lower()
    if precision == "bf16" and config.model.autocast != "bfloat16":
        ignored.append("--mixed_precision bf16 (set model.autocast: bfloat16)")
    elif precision not in ("no", "bf16"):
        ignored.append(f"--mixed_precision {precision} (preftune's mixed precision is model.autocast: bfloat16)")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and dist.strategy != "fsdp":
        ignored.append("FSDP (set train.distributed: fsdp)")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        ignored.append("DeepSpeed (preftune shards with train.distributed: fsdp)")
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO" and not config.model.compile:
        ignored.append("--dynamo_backend (set model.compile: true)")
    notes = []
    if ignored:
        notes.append(f"started by `accelerate launch`, whose settings preftune does not read: {'; '.join(ignored)}. "
                     "This run trains as its config says (docs/DISTRIBUTED.md).")
    # accelerate sets MASTER_ADDR for --num_processes above 1, yet on CPU (or with --cpu) it
    # starts one process, with no WORLD_SIZE: the run would be one process where two were asked.
    if dist.world_size == 1 and "WORLD_SIZE" not in env and "MASTER_ADDR" in env:
        notes.append("`accelerate launch` started one process: it does so on CPU (or with --cpu) whatever "
                     "--num_processes says; start several with `preftune train CONFIG --nproc N` or with "
                     "torchrun (docs/DISTRIBUTED.md).")
    return notes


def resume_command(config_path, world_size: int) -> str:
    """How to continue a stopped run. `--nproc N` starts N processes on this machine: right for a
    run of one machine, however started, but a run over several machines would be squeezed onto
    one; that run resumes by the torchrun command that started it."""
    if world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
        return "the torchrun command that started the run, on every machine, with --resume added"
    nproc = f" --nproc {world_size}" if world_size > 1 else ""
    return f"preftune train {config_path} --resume{nproc}"


class ShardedReference:
    """The frozen reference as an FSDP2 module: log-probs of a batch, computed without grad."""

    def __init__(self, module: nn.Module, autocast):
        self.module = module
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        with self.autocast():
            logps, _ = self.module(batch.input_ids, batch.model_attention_mask, batch.completion_mask,
                                   batch.position_ids, batch.sequence_ids, counted=batch.counted)
        # FSDP keeps the root's weights gathered after a forward, expecting a backward; the
        # reference has none, so free them now.
        self.module.reshard()
        return logps


def shard_reference(reference_fn, config, dist: DistContext):
    """Under fsdp a frozen-model reference is sharded like the policy; a reference without a
    model (precomputed log-probs, none) is returned as it is."""
    from preftune.reference import FrozenModelReference

    if dist.strategy != "fsdp" or not hasattr(reference_fn, "model"):
        return reference_fn
    # LoRA's reference (the policy with its adapters off) is refused beside fsdp by the config.
    assert isinstance(reference_fn, FrozenModelReference), type(reference_fn).__name__
    module = _shard(CompletionLogps(reference_fn.model, reference_fn.chunk_size, reference_fn.ld_alpha), config, dist)
    return ShardedReference(module, reference_fn.autocast)


def full_tensor(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor: it is a DTensor when the grads are sharded."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------ failures


def _store():
    """A key-value store every rank can reach even after another rank died: under torchrun it
    is the launcher's own store. None when there is none (the caller then prints anyway)."""
    try:
        if torch_dist.is_initialized():
            return torch_dist.distributed_c10d._get_default_store()
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            return torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       is_master=False, timeout=timedelta(seconds=5))
    except Exception:  # noqa: BLE001 -- reporting an error must never raise one of its own
        return None
    return None


def _first_to_claim(key: str) -> bool:
    """True on exactly one rank per key (an atomic counter); True everywhere without a store."""
    store = _store()
    if store is None:
        return True
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run") + "/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return store.add(f"preftune/{run}/{key}", 1) == 1
    except Exception:  # noqa: BLE001
        return True


def _write_error_file(message: str) -> None:
    """torchrun's failure summary shows `message` where it would show '<N/A>' or a traceback
    (the layout is the one torch's own `record` writes)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                              "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump(data, f)


@contextlib.contextmanager
def rank_errors():
    """Under torchrun, a failure is reported once, not by every rank.

    A UserError prints as one line, by the first rank to hit that message, prefixed with its
    rank; its exit status is 2. Errors on the other ranks that only follow from it (a
    collective whose peer has gone) exit with status 1 and print nothing. A genuine bug prints
    its traceback from the first rank that failed. Outside torchrun this does nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield
        return
    rank = int(os.environ.get("RANK", "0"))
    try:
        yield
    except UserError as e:
        message = f"[rank {rank}] error: {e}"
        _write_error_file(message)
        _first_to_claim("failed")  # so the other ranks' follow-on errors stay quiet
        # Every rank usually reads the same config and data and fails with the same sentence.
        if _first_to_claim("message-" + hashlib.sha1(str(e).encode()).hexdigest()):
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception:
        if not _first_to_claim("failed"):
            _write_error_file(f"[rank {rank}] stopped because another rank failed first.")
            raise SystemExit(1) from None
        _write_error_file(f"[rank {rank}] " + traceback.format_exc())
        print(f"[rank {rank}] failed:", file=sys.stderr, flush=True)
        raise
