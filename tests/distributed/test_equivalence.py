"""Two processes under torchrun (CPU, gloo) train exactly like one process with the same global
batch: same per-step metrics, same evaluation, same final weights; and a sharded checkpoint
resumes, on another number of processes, to the run that was never stopped."""

from __future__ import annotations

import math

import pytest
import torch
from dist_helpers import (
    STEP_KEYS,
    assert_runs_match,
    assert_same_rows,
    final_weights,
    max_weight_difference,
    metrics,
    preftune_cmd,
    run_command,
    torchrun_cmd,
    train_in_process,
    write_config,
)
from safetensors.torch import load_file

from preftune.checkpoint import is_complete, load_training_state

DDP_TOLERANCE = 1e-5
FSDP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def single_run(tiny_llama, tmp_path_factory):
    """The reference run: one process, 4 steps of 8 pairs (4 per micro-batch x 2)."""
    folder = tmp_path_factory.mktemp("single")
    return train_in_process(write_config(folder, tiny_llama, nproc=1))


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama, tmp_path_factory):
    """FSDP2 over 2 processes, launched by torchrun itself, checkpointing at step 2."""
    folder = tmp_path_factory.mktemp("fsdp")
    config = write_config(folder, tiny_llama, nproc=2, distributed="fsdp", save_every=2)
    result = run_command(torchrun_cmd(2, config))
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "run", result


def _printed_once(output: str, text: str) -> None:
    assert output.count(text) == 1, f"{text!r} printed {output.count(text)} times:\n{output}"


def test_ddp_two_processes_train_like_one(tiny_llama, single_run, tmp_path):
    config = write_config(tmp_path, tiny_llama, nproc=2, distributed="ddp")
    result = run_command(preftune_cmd(config, "--nproc", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_runs_match(single_run, tmp_path / "run", DDP_TOLERANCE)
    # The comparison means something only if training moved the weights well past it.
    assert max_weight_difference(tiny_llama, single_run / "final") > 100 * DDP_TOLERANCE
    for line in ("train pairs", "eval at step 4", "final policy:"):  # rank 0 alone prints
        _printed_once(result.stdout, line)


def _lora_runs(tiny_llama, tmp_path, *overrides):
    pytest.importorskip("peft")
    lora = ("model.lora.r=4", "model.lora.alpha=8", *overrides)
    single = train_in_process(write_config(tmp_path / "single", tiny_llama, nproc=1), *lora)
    config = write_config(tmp_path / "ddp", tiny_llama, nproc=2, distributed="ddp")
    result = run_command(preftune_cmd(config, "--nproc", "2", *lora))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "ddp" / "run" / "final" / "adapter_model.safetensors").exists()
    return single, tmp_path / "ddp" / "run", result.stdout


def test_ddp_with_lora_trains_like_one_process(tiny_llama, tmp_path):
    """LoRA under DDP: the frozen base and head take no gradient, the adapters are averaged."""
    single, ddp, _ = _lora_runs(tiny_llama, tmp_path)
    assert_runs_match(single, ddp, DDP_TOLERANCE)
    # lora_B starts at zero: the comparison means something only if training moved it well past.
    moved = max(t.abs().max().item() for n, t in final_weights(single / "final").items() if "lora_B" in n)
    assert moved > 100 * DDP_TOLERANCE


def test_fsdp_with_lora_and_a_precomputed_reference_trains_like_one_process(tiny_llama, tmp_path):
    """LoRA under fsdp, as docs/DISTRIBUTED.md advises it for large models: the frozen base is
    sharded like any weights, and the reference (the base with adapters off) is precomputed
    before the policy is sharded."""
    pytest.importorskip("peft")
    # Padded everywhere: the fsdp policy cannot share prompts, and a pass that did would round its
    # sums differently, so that step 1's zero margins would fall on either side of 0 (accuracies).
    lora = ("model.lora.r=4", "model.lora.alpha=8", "model.reference=precompute", "data.share_prompt=false")
    single = train_in_process(write_config(tmp_path / "single", tiny_llama, nproc=1), *lora)
    config = write_config(tmp_path / "fsdp", tiny_llama, nproc=2, distributed="fsdp")
    result = run_command(torchrun_cmd(2, config, *lora))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "fsdp" / "run" / "final" / "adapter_model.safetensors").exists()
    assert_runs_match(single, tmp_path / "fsdp" / "run", FSDP_TOLERANCE)
    # Each process ran half of the reference's pass (not all of it), and the table gathered
    # from the halves is the one process's.
    _printed_once(result.stdout, "86 train pairs' log-probs computed by 2 processes, a share each,")
    _printed_once(result.stdout, "10 eval pairs' log-probs computed by 2 processes, a share each,")
    caches = sorted((single / "reference_logps").glob("*.safetensors"))
    assert len(caches) == 2  # train and eval; the same keys, since data and model are the same
    for cache in caches:
        one, two = load_file(str(cache)), load_file(str(tmp_path / "fsdp" / "run" / "reference_logps" / cache.name))
        assert sorted(one["indices"].tolist()) == sorted(two["indices"].tolist())
        row_of = {int(i): row for row, i in enumerate(two["indices"])}
        torch.testing.assert_close(two["logps"][[row_of[int(i)] for i in one["indices"]]], one["logps"])
    # lora_B starts at zero: the comparison means something only if training moved it well past.
    moved = max(t.abs().max().item() for n, t in final_weights(single / "final").items() if "lora_B" in n)
    assert moved > 10 * FSDP_TOLERANCE


def test_ddp_with_lora_under_bf16_autocast(tiny_llama, tmp_path):
    """The LoRA base's linears are stored in bf16 after DDP has wrapped the model. bf16 matmuls
    round differently for micro-batches of other sizes, and Adam turns such noise in near-zero
    gradients into lr-sized weight differences, so the curves are compared, not the weights."""
    single, ddp, printed = _lora_runs(tiny_llama, tmp_path, "model.autocast=bfloat16")
    _printed_once(printed, "frozen linear layers held in bf16")
    (train_a, eval_a), (train_b, eval_b) = metrics(single), metrics(ddp)
    assert_same_rows(train_a, train_b, STEP_KEYS, 1e-3)
    assert_same_rows(eval_a, eval_b, ["eval/loss", "eval/rewards/margins"], 1e-3)
    # The adapters learned, so later steps test them: the held-out loss (exactly log 2 while the
    # policy equals its reference) ends more than 3x the runs' tolerance under it.
    assert eval_a[4]["eval/loss"] < math.log(2) - 3e-3


def test_fsdp_two_processes_train_like_one(single_run, fsdp_run):
    run, result = fsdp_run
    assert_runs_match(single_run, run, FSDP_TOLERANCE)
    _printed_once(result.stdout, "final policy:")


def test_fsdp_with_ld_alpha_and_wpo_trains_like_one_process(tiny_llama, tmp_path):
    """The sharded policy returns WPO's weights beside its log-probs; the sharded reference copy
    sums LD-DPO's way, as the policy does."""
    loss = ("loss.ld_alpha=0.5", "loss.wpo_weighting=true")
    single = train_in_process(write_config(tmp_path / "single", tiny_llama, nproc=1), *loss)
    config = write_config(tmp_path / "fsdp", tiny_llama, nproc=2, distributed="fsdp")
    result = run_command(torchrun_cmd(2, config, *loss))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_runs_match(single, tmp_path / "fsdp" / "run", FSDP_TOLERANCE)


def test_ddp_token_metrics_and_wpo_weight_are_reduced_over_ranks(tiny_llama, tmp_path):
    """train.token_metrics' token sums and wpo/weight's pair sums are all-reduced with the other
    metrics: two processes log what one process with the same global batch logs."""
    overrides = ("train.token_metrics=true", "loss.wpo_weighting=true")
    single = train_in_process(write_config(tmp_path / "single", tiny_llama, nproc=1), *overrides)
    config = write_config(tmp_path / "ddp", tiny_llama, nproc=2, distributed="ddp")
    result = run_command(preftune_cmd(config, "--nproc", "2", *overrides))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_runs_match(single, tmp_path / "ddp" / "run", DDP_TOLERANCE)
    keys = ["entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"]
    (train_a, eval_a), (train_b, eval_b) = metrics(single), metrics(tmp_path / "ddp" / "run")
    assert_same_rows(train_a, train_b, [*keys, "wpo/weight"], DDP_TOLERANCE)
    assert eval_a and train_a[1]["wpo/weight"] != 1.0
    assert_same_rows(eval_a, eval_b, [f"eval/{key}" for key in keys], DDP_TOLERANCE)


def test_fsdp_checkpoint_holds_full_weights_and_sharded_optimizer(fsdp_run, tiny_llama):
    run, _ = fsdp_run
    checkpoint = run / "checkpoints" / "step-000002"
    assert is_complete(checkpoint)  # the manifest covers the optimizer shards too
    shards = sorted(p.name for p in (checkpoint / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    saved = load_training_state(checkpoint)
    assert saved["optimizer"] is None
    assert saved["distributed"] == {"world_size": 2, "strategy": "fsdp", "global_batch": 8}
    assert not list((run / "checkpoints").glob("*.tmp"))
    # The full weights load like any Hugging Face checkpoint.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())


@pytest.mark.parametrize("strategy", ["fsdp", "none"])
def test_fsdp_checkpoint_resumes_on_one_process(single_run, fsdp_run, tmp_path, tiny_llama, strategy):
    """Written by 2 ranks, read by 1, sharded or not: DCP reshards the optimizer state."""
    run, _ = fsdp_run
    config = write_config(tmp_path, tiny_llama, nproc=1, distributed=strategy)
    resumed = train_in_process(config, resume=str(run / "checkpoints" / "step-000002"))
    assert_runs_match(single_run, resumed, FSDP_TOLERANCE, steps={3, 4})
    assert sorted(metrics(resumed)[0]) == [3, 4]


def test_resume_with_another_global_batch_is_refused(fsdp_run, tmp_path, tiny_llama):
    from preftune.errors import UserError

    run, _ = fsdp_run
    config = write_config(tmp_path, tiny_llama, nproc=1, batch_size=2)  # 4 pairs per step, not 8
    with pytest.raises(UserError, match="8 pairs per optimizer step"):
        train_in_process(config, resume=str(run / "checkpoints" / "step-000002"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (nccl)")
def test_fsdp_bf16_on_two_gpus_trains_like_one(tiny_llama, tmp_path):
    """Where GPUs are: FSDP2 with its bf16 mixed-precision policy against one bf16-autocast GPU."""
    single = train_in_process(write_config(tmp_path / "one", tiny_llama, nproc=1),
                              "model.autocast=bfloat16", "train.device=cuda")
    config = write_config(tmp_path / "two", tiny_llama, nproc=2, distributed="fsdp")
    result = run_command(torchrun_cmd(2, config, "model.autocast=bfloat16"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_runs_match(single, tmp_path / "two" / "run", tol=2e-2)
