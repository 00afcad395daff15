"""What a step asks of the host: no waits for the device inside a step, and no graph breaks.

On a GPU, every read of a device value (`.item()`, a boolean-mask selection, `nonzero`) stops
the host until the device has caught up, so it cannot queue the next kernels meanwhile. These
tests count such operators on CPU, where the code paths are the same, with a dispatch mode that
sees every operator that reaches a backend. bench/host_ops.py counts them for whole trainers.
"""

import traceback

import pytest
import torch
from preftune_test_data import make_config, read_metrics
from torch.utils._python_dispatch import TorchDispatchMode

import preftune.data.collate as collate_module
from preftune.data.collate import collate_pairs, counted_mask, counted_tokens, pack_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.packing import prompt_sharing_wanted
from preftune.train import train

SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
           "aten.equal", "aten.unique", "aten._unique2", "aten.repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    """Records where each operator that would make the host wait for a GPU was called from."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.host_side = False  # batches are built on the host; their operators are CPU work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if not self.host_side and (name in SYNCING or boolean_index):
            self.calls.append((name, traceback.format_stack(limit=14)))
        return func(*args, **(kwargs or {}))


def _pairs(n=3):
    return [TokenizedPair(index=i, prompt_ids=list(range(1, 3 + i)), chosen_ids=[7] * (2 + i), rejected_ids=[8] * (4 - i))
            for i in range(n)]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_counted_tokens_select_what_the_mask_selects(layout):
    batch = collate_pairs(_pairs(), pad_token_id=0) if layout == "padded" else pack_pairs(_pairs())
    counted = counted_tokens(batch.completion_mask, batch.sequence_ids)
    predicted, owner = counted_mask(batch.completion_mask, batch.sequence_ids)
    width = batch.input_ids.shape[1]
    grid = torch.arange(batch.input_ids.numel()).reshape(batch.input_ids.shape)[:, :-1]
    assert counted.index.tolist() == grid[predicted].tolist()
    assert counted.owner.tolist() == owner[predicted].tolist()
    assert counted.num_sequences == 6
    # The tokens predicted are the completions, each exactly once.
    targets = batch.input_ids.reshape(-1)[counted.index + 1]
    assert sorted(targets.tolist()) == sorted([7] * 9 + [8] * 9)
    assert (counted.index % width < width - 1).all()


def device_waits_in_steps(config, monkeypatch) -> list[list[str]]:
    """The stack of every device read in the training steps of `train(config)`.

    transformers asks once per forward whether the attention mask is all ones (any caller pays
    that), so those are left out, as are the host-side copies that build a batch."""
    counter = SyncCounter()
    original_to = collate_module.PairBatch.to

    def to_on_host(self, device):
        counter.host_side = True
        try:
            return original_to(self, device)
        finally:
            counter.host_side = False

    monkeypatch.setattr(collate_module.PairBatch, "to", to_on_host)
    with counter:
        train(config)
    return [stack for _, stack in counter.calls if not any("masking_utils" in frame for frame in stack)
            and any("train_step" in frame for frame in stack)]


def test_a_training_step_never_waits_for_the_device(tmp_path, tiny_llama, pairs_file, monkeypatch):
    config = make_config(tmp_path, tiny_llama, pairs_file, data={"share_prompt": False},
                         train={"max_steps": 3})
    waits = device_waits_in_steps(config, monkeypatch)
    assert len(read_metrics(tmp_path / "run")) == 3
    assert not waits, "".join(waits[0])

    # The counter does see a read when there is one.
    counter = SyncCounter()
    with counter:
        torch.ones(3).sum().item()
    assert counter.calls[-1][0] == "aten._local_scalar_dense"


def test_share_prompt_auto_is_on_for_cpu_and_off_for_gpus(tmp_path):
    cfg = make_config(tmp_path, "model", "pairs.jsonl")
    assert cfg.data.share_prompt == "auto"
    assert prompt_sharing_wanted(cfg, torch.device("cpu"))
    assert not prompt_sharing_wanted(cfg, torch.device("cuda"))
    forced = make_config(tmp_path, "model", "pairs.jsonl", data={"share_prompt": True})
    assert prompt_sharing_wanted(forced, torch.device("cuda"))
    off = make_config(tmp_path, "model", "pairs.jsonl", data={"share_prompt": False})
    assert not prompt_sharing_wanted(off, "cpu")


def test_cuda_graphs_refuse_gradient_accumulation(tmp_path):
    from preftune.errors import UserError

    with pytest.raises(UserError, match="grad_accum: 1"):
        make_config(tmp_path, "model", "pairs.jsonl", model={"compile": True, "compile_mode": "reduce-overhead"},
                    train={"grad_accum": 2})
    make_config(tmp_path, "model", "pairs.jsonl", model={"compile": True, "compile_mode": "reduce-overhead"})
    make_config(tmp_path, "model", "pairs.jsonl", model={"compile": True}, train={"grad_accum": 2})


def test_step_metrics_carry_tokens_and_extras_in_one_reduction():
    from preftune.losses import PairLogps
    from preftune.metrics import StepMetrics

    logps = PairLogps(policy_chosen_logps=torch.tensor([-1.0, -2.0]), policy_rejected_logps=torch.tensor([-3.0, -1.0]),
                      reference_chosen_logps=torch.zeros(2), reference_rejected_logps=torch.zeros(2),
                      chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))
    metrics = StepMetrics("cpu")
    metrics.add(torch.tensor([0.5, 1.5]), logps, beta=1.0)
    metrics.add_tokens(30)
    metrics.add_tokens(12)
    result = metrics.reduce(extra={"grad_norm": torch.tensor(2.5)})
    assert result["loss"] == 1.0 and result["rewards/accuracies"] == 0.5
    assert result["_tokens"] == 42 and result["grad_norm"] == 2.5
    assert "_tokens" not in StepMetrics("cpu").reduce()  # evaluation counts no tokens
