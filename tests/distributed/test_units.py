"""The small decisions behind distributed runs, checked in-process without torchrun."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from preftune.dist_checkpoint import _check_shape, _with_tied_twins
from preftune.distributed import DistContext, decoder_layers, resolve_strategy
from preftune.errors import UserError
from preftune.launch import describe_failures, torchrun_args, worker_args


@pytest.mark.parametrize(("argv", "expected"), [
    (["/bin/preftune", "train", "c.yaml", "--nproc", "4", "optim.lr=1e-6"], ["c.yaml", "optim.lr=1e-6"]),
    (["/bin/preftune", "train", "--nproc=2", "c.yaml", "--resume"], ["c.yaml", "--resume"]),
    (["-m", "train", "train.yaml"], ["train.yaml"]),  # a config called train.yaml is no subcommand
])
def test_worker_args_drop_nproc_and_keep_the_rest(argv, expected):
    assert worker_args(argv) == expected


def test_torchrun_args_are_a_standalone_module_launch():
    args = torchrun_args(3, ["preftune", "train", "c.yaml", "--nproc", "3"])
    assert args == ["--standalone", "--nproc-per-node", "3", "-m", "preftune", "train", "c.yaml"]


def test_failure_summary_names_failed_and_stopped_ranks():
    def failure(code):
        return types.SimpleNamespace(exitcode=code, signal_name=lambda: "SIGTERM")

    line = describe_failures({1: failure(2), 0: failure(-15), 2: failure(2)}, 1, 4)
    assert line == "ranks 1, 2 of 4 failed (exit code 2); rank 0 stopped with them."
    assert describe_failures({0: failure(-15)}, 0, 2) == "rank 0 of 2 failed (signal SIGTERM)."


def test_a_rank_that_reported_its_error_but_was_killed_while_exiting_counts_as_failed():
    """Rank 0 printed '[rank 0] error: ...', then torchrun, seeing rank 1 exit first, killed it while
    it exited: the summary said 'rank 1 of 3 failed (exit code 2); ranks 0, 2 stopped with it.'"""
    def failure(code, message=""):
        return types.SimpleNamespace(exitcode=code, signal_name=lambda: "SIGTERM", message=message)

    failures = {1: failure(2, "[rank 1] error: 8 pairs cannot be shared out."),
                # as torchrun reads the file rank_errors writes
                0: failure(-15, {"message": "[rank 0] error: 8 pairs cannot be shared out.", "extraInfo": {}}),
                2: failure(-15, "Signal 15 (SIGTERM) received by PID 7")}
    assert describe_failures(failures, 1, 3) == "ranks 0, 1 of 3 failed (exit code 2); rank 2 stopped with them."


def test_nproc_exits_with_the_mistakes_status_when_torchrun_first_lists_a_rank_it_killed(
        monkeypatch, tmp_path, capsys):
    """Both ranks wrote '[rank r] error: ...' in the same second; torchrun, ordering failures by
    that second, listed first rank 1, which it had killed while it exited: the launcher said
    'ranks 0, 1 of 2 failed (signal SIGTERM).' and exited 1, not 2 as DISTRIBUTED.md says."""
    import json
    import time

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    import preftune.launch

    def failure(rank, exitcode):
        path = tmp_path / f"error-{rank}.json"  # as rank_errors writes it
        message = f"[rank {rank}] error: data file data/train.jsonl does not exist; check data.train."
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": {
            "py_callstack": message, "timestamp": str(int(time.time()))}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(path))

    def run(args):
        raise ChildFailedError("preftune", {1: failure(1, -15), 0: failure(0, 2)})

    monkeypatch.setattr(torch.distributed.run, "run", run)
    monkeypatch.setattr(preftune.launch.StopForwarder, "install", lambda self, args: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    status = preftune.launch.launch_torchrun(2, ["preftune", "train", "c.yaml", "--nproc", "2"])
    assert capsys.readouterr().err == "preftune: ranks 0, 1 of 2 failed (exit code 2).\n"
    assert status == 2


@pytest.mark.parametrize(("requested", "world_size", "expected"), [
    ("auto", 1, "none"), ("auto", 2, "ddp"), ("ddp", 1, "none"), ("ddp", 4, "ddp"),
    ("fsdp", 1, "fsdp"), ("fsdp", 2, "fsdp"), ("none", 1, "none"),
])
def test_strategy_resolution(requested, world_size, expected):
    assert resolve_strategy(requested, world_size) == expected


def test_no_strategy_under_torchrun_is_a_user_error(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(UserError, match="torchrun started 2 processes; .* or run without torchrun.$"):
        resolve_strategy("none", 2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # as every `accelerate launch` sets it
    with pytest.raises(UserError, match="`accelerate launch` started 2 processes; .* run without `accelerate launch`.$"):
        resolve_strategy("none", 2)


def test_no_strategy_with_nproc_is_refused_before_any_worker_starts(monkeypatch, tmp_path):
    """It started the workers, each said 'torchrun started 2 processes; ... or run without
    torchrun', to a user who typed no torchrun, and the launcher added 'ranks 0, 1 of 2 failed'."""
    from dist_helpers import write_config
    from typer.testing import CliRunner

    import preftune.launch
    from preftune.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(preftune.launch, "launch_torchrun", lambda *args: pytest.fail("workers started"))
    config = write_config(tmp_path, tmp_path / "model", 2, distributed="none")
    result = CliRunner().invoke(app, ["train", str(config), "--nproc", "2"])
    assert result.exit_code == 2
    assert ("train.distributed is 'none' but --nproc 2 asks for 2 processes; set train.distributed to auto, "
            "ddp or fsdp, or leave --nproc out.") in " ".join(result.output.split())


def test_train_ddp_timeout_is_the_process_groups_timeout(monkeypatch, tmp_path):
    """Torch's default (10 minutes for nccl) stopped a DDP run whose rank 0 took longer to write a
    large checkpoint to slow shared storage while the other ranks waited in a collective."""
    from datetime import timedelta

    import torch.distributed as torch_dist
    from preftune_test_data import make_config

    from preftune.distributed import setup_distributed

    timeouts, init_process_group = [], torch_dist.init_process_group

    def recorded(*args, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        if kwargs.get("world_size") == 1:  # the in-memory one-process group: a real one
            init_process_group(*args, **kwargs)

    monkeypatch.setattr(torch_dist, "init_process_group", recorded)
    config = make_config(tmp_path, "model", "d.jsonl", train={"device": "cpu", "ddp_timeout": 7200,
                                                               "distributed": "fsdp"})
    setup_distributed(config).shutdown()  # fsdp in one process
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts a rank (its rendezvous left out)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    setup_distributed(config)
    assert timeouts == [timedelta(seconds=7200)] * 2
    assert make_config(tmp_path, "model", "d.jsonl").train.ddp_timeout == 1800  # Hugging Face's default


@pytest.mark.parametrize(("arch", "block"), [("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block"),
                                             ("qwen2", "Qwen2DecoderLayer")])
def test_decoder_layers_are_the_repeated_blocks(arch, block):
    from preftune.demo.tiny import build_model

    layers = decoder_layers(build_model(arch, vocab_size=64, num_layers=3))
    assert [type(m).__name__ for m in layers] == [block] * 3


def test_tied_weights_get_their_twin_before_sharded_loading():
    from preftune.demo.tiny import build_model

    model = build_model("llama", vocab_size=64, tie_embeddings=True)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as saved
    filled = _with_tied_twins(model, state)
    assert filled["lm_head.weight"] is filled["model.embed_tokens.weight"]


def _config(batch_size, grad_accum):
    return types.SimpleNamespace(train=types.SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum))


def test_resume_with_the_same_global_batch_on_another_process_count_is_allowed():
    saved = {"distributed": {"world_size": 2, "strategy": "fsdp", "global_batch": 16}}
    _check_shape(saved, Path("ckpt"), _config(4, 1), DistContext(world_size=4, strategy="fsdp"))
    with pytest.raises(UserError) as refused:
        _check_shape(saved, Path("ckpt"), _config(4, 2), DistContext(world_size=4, strategy="fsdp"))
    assert str(refused.value) == (
        "checkpoint ckpt was written with 16 pairs per optimizer step (2 processes); this run has 32 "
        "(train.batch_size 4 x train.grad_accum 2 x 4 processes): set train.batch_size: 2, so that each "
        "step again sees 16 pairs.")


def test_a_global_batch_that_the_processes_cannot_share_names_the_counts_that_can():
    """It said 'set train.batch_size or train.grad_accum so the product is 8' to a run on 3
    processes, where no setting gives 8 (and '1 processes' for a one-process checkpoint)."""
    saved = {"distributed": {"world_size": 1, "strategy": "none", "global_batch": 8}}
    with pytest.raises(UserError) as refused:
        _check_shape(saved, Path("ckpt"), _config(2, 1), DistContext(world_size=3, strategy="ddp"))
    assert str(refused.value) == (
        "checkpoint ckpt was written with 8 pairs per optimizer step (1 process); this run has 6 "
        "(train.batch_size 2 x train.grad_accum 1 x 3 processes), and 8 pairs cannot be shared out "
        "equally over 3 processes: resume on 1, 2, 4, 8 processes, with train.batch_size x "
        "train.grad_accum x processes = 8.")
    # 4 per process, which grad_accum 3 cannot divide: batch size and accumulation together.
    with pytest.raises(UserError, match=r"set train.batch_size x train.grad_accum to 4 \(e.g. train.batch_size: 4, "
                                        r"train.grad_accum: 1\), so that each step again sees 8 pairs.$"):
        _check_shape(saved, Path("ckpt"), _config(1, 3), DistContext(world_size=2, strategy="ddp"))


def test_one_process_context_needs_no_process_group():
    ctx = DistContext()
    assert ctx.is_main and not ctx.active and not ctx.sharded
    assert ctx.all_reduce_sum(2.5) == 2.5
    ctx.barrier()  # nothing to wait for


def test_only_a_reference_that_runs_a_model_is_sharded():
    from preftune.distributed import shard_reference
    from preftune.reference import no_reference

    fsdp = DistContext(world_size=2, strategy="fsdp")
    assert shard_reference(no_reference, None, fsdp) is no_reference  # nothing to shard
    adapters_off = types.SimpleNamespace(model=object())  # LoRA's: the policy itself, adapters off
    assert shard_reference(adapters_off, None, DistContext(world_size=2, strategy="ddp")) is adapters_off
    with pytest.raises(AssertionError):  # the config refuses it before anything loads (test_config)
        shard_reference(adapters_off, None, fsdp)


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_is_refused_not_run_as_one_process(tmp_path, nproc):
    # It once trained in one process without a word, as if --nproc had not been given.
    from typer.testing import CliRunner

    from preftune.cli import app

    result = CliRunner().invoke(app, ["train", str(tmp_path / "never-read.yaml"), "--nproc", nproc])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())  # the box's rows, as one line
    assert "Invalid value for '--nproc': Input should be greater than or equal to 1" in said


def test_ddp_or_fsdp_in_one_process_says_so_and_how_to_start_several(tmp_path, tiny_llama, pairs_file,
                                                                     monkeypatch, capsys):
    """Without torchrun or --nproc, train.distributed: ddp trained in one process without a word."""
    from preftune_test_data import make_config

    from preftune.config import validate_config
    from preftune.distributed import start_notes
    from preftune.train import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"distributed": "ddp"}))
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("train.distributed is 'ddp', but this run is one process (without DDP); start several "
                      "with `preftune train CONFIG --nproc N` on one node, or with torchrun "
                      "(docs/DISTRIBUTED.md).") == 1

    def notes(strategy, world_size):
        config = validate_config({"model": {"path": "x"}, "data": {"train": "x"},
                                  "train": {"distributed": strategy}})
        return start_notes(config, DistContext(world_size=world_size), torch.device("cpu"))

    [fsdp_alone] = notes("fsdp", 1)
    assert fsdp_alone.startswith("train.distributed is 'fsdp', but this run is one process (FSDP2 over one rank)")
    assert notes("ddp", 2) == notes("fsdp", 2) == notes("auto", 1) == notes("none", 1) == []


ACCELERATE_ENV = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                  "ACCELERATE_DYNAMO_BACKEND", "WORLD_SIZE", "MASTER_ADDR")


@pytest.mark.parametrize(("env", "distributed", "said"), [
    # `accelerate launch --multi_gpu --mixed_precision bf16`: two workers in float32, without a word.
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"}, "auto",
     ["started by `accelerate launch`, whose settings preftune does not read: --mixed_precision bf16 "
      "(set model.autocast: bfloat16). This run trains as its config says (docs/DISTRIBUTED.md)."]),
    # `accelerate config` with FSDP: every GPU held the whole model under DDP.
    ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "auto",
     ["started by `accelerate launch`, whose settings preftune does not read: FSDP (set "
      "train.distributed: fsdp). This run trains as its config says (docs/DISTRIBUTED.md)."]),
    ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "fsdp", []),
    # `accelerate launch --num_processes 2` on CPU: one process, and nothing said.
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}, "auto",
     ["`accelerate launch` started one process: it does so on CPU (or with --cpu) whatever "
      "--num_processes says; start several with `preftune train CONFIG --nproc N` or with torchrun "
      "(docs/DISTRIBUTED.md)."]),
    ({"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "auto", []),
    ({"MASTER_ADDR": "127.0.0.1"}, "auto", []),  # not accelerate: nothing to say
])
def test_accelerate_launch_settings_preftune_does_not_follow_are_said(monkeypatch, env, distributed, said):
    from preftune.config import validate_config
    from preftune.distributed import start_notes

    for key in ACCELERATE_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = validate_config({"model": {"path": "x"}, "data": {"train": "x"}, "train": {"distributed": distributed}})
    world_size = int(env.get("WORLD_SIZE", "1"))
    strategy = "fsdp" if distributed == "fsdp" else ("ddp" if world_size > 1 else "none")
    notes = start_notes(config, DistContext(world_size=world_size, strategy=strategy), torch.device("cpu"))
    assert notes == said


@pytest.mark.parametrize(("world_size", "local_world_size", "expected"), [
    (1, None, "preftune train run/config.yaml --resume"),
    (2, "2", "preftune train run/config.yaml --resume --nproc 2"),  # --nproc 2, or torchrun on one machine
    # 4 machines x 8 processes: it said `--nproc 32`, which starts 32 processes on one machine.
    (32, "8", "the torchrun command that started the run, on every machine, with --resume added"),
])
def test_the_resume_command_of_a_stopped_run_fits_how_it_was_started(monkeypatch, world_size,
                                                                      local_world_size, expected):
    from preftune.distributed import resume_command

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if local_world_size:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert resume_command(Path("run") / "config.yaml", world_size) == expected


def test_one_named_gpu_for_several_processes_of_a_machine_is_refused(monkeypatch):
    """train.device: cuda:0 (a one-GPU config) under --nproc 2 put both ranks on GPU 0, which nccl
    refuses only at the first collective, after the model and data had loaded."""
    import preftune.modeling
    from preftune.distributed import _process_device

    monkeypatch.setattr(preftune.modeling, "pick_device", lambda name: torch.device(name))  # no GPU here
    config = types.SimpleNamespace(train=types.SimpleNamespace(device="cuda:0"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^train.device is 'cuda:0', but 2 processes of this run share this "
                                        r"machine and each needs a GPU of its own: set train.device to cuda"):
        _process_device(config, local_rank=1)
    config.train.device = "cuda"
    assert _process_device(config, local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: its GPU may be named
    config.train.device = "cuda:1"
    assert _process_device(config, local_rank=0) == torch.device("cuda", 1)


def test_nproc_that_disagrees_with_torchrun_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2 -m preftune train CFG --nproc 4` trained on 2
    processes, and so on half the global batch that --nproc 4 promised, without a word (torchrun
    itself refuses --nproc, as an ambiguous abbreviation of its --nproc-per-node)."""
    from typer.testing import CliRunner

    from preftune.cli import app

    (tmp_path / "c.yaml").write_text("model: {path: m}\ndata: {train: d.jsonl}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--nproc", "4"])
    assert result.exit_code == 2, result.output
    assert result.output == ("[rank 0] error: --nproc 4, but the launcher (torchrun, accelerate launch) "
                             "started 2 processes on this machine, and its count decides; leave --nproc out.\n")


class _InterruptedImport(types.ModuleType):
    """preftune.cli as Ctrl-C finds it: still importing (torch, transformers take seconds)."""

    def __getattr__(self, name):
        raise KeyboardInterrupt


def test_ctrl_c_while_a_worker_imports_ends_it_quietly(monkeypatch, capsys):
    """Every worker of `preftune train --nproc 2` printed a KeyboardInterrupt traceback of the module
    it was importing; a worker now ends with status 130, as typer ends a running command."""
    import runpy
    import sys

    monkeypatch.setitem(sys.modules, "preftune.cli", _InterruptedImport("preftune.cli"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("preftune", run_name="__main__")
    assert stopped.value.code == 130
    assert stopped.value.__suppress_context__  # no "During handling of the above exception" traceback
    assert capsys.readouterr().err == ""  # the launcher says it once for all workers
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: it says so itself, in one line
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("preftune", run_name="__main__")
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "preftune: stopped by Ctrl-C while starting; nothing was done.\n"


def test_a_worker_stopped_by_ctrl_c_is_said_to_be_stopped_not_failed():
    """Ctrl-C once the command runs ends a worker with typer's status 130, which the launcher
    reported as 'rank 1 of 2 failed (exit code 130); rank 0 stopped with it.'"""
    import signal

    from preftune.launch import ended_by

    assert ended_by(signal.SIGINT, 130) and ended_by(signal.SIGINT, -signal.SIGINT)
    assert ended_by(signal.SIGTERM, -signal.SIGTERM) and ended_by(signal.SIGTERM, 143)
    assert not ended_by(signal.SIGINT, 2) and not ended_by(signal.SIGTERM, 130) and not ended_by(signal.SIGINT, 1)
